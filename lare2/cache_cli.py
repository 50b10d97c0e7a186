"""``lare2 cache ...``: see what a cache holds and prove it whole.

info, ls, show, verify, repair, diff, stats here; progress, pack and export (a cache on a cluster) in
``lare2.cache_cli_cluster``. Each prints rich tables, or with ``--json`` one JSON document on stdout for
scripts. Exit codes (``lare2.shared.cli_errors``): 0 fine, 1 problems found (verify) or runs that disagree
(diff), 2 bad usage (no such cache, not a cache, unknown id, bad option) with one ``error:`` line on stderr.
The logic lives in the ``lare2.shared.cache`` package (summary, verify, diff, plots, export, pack),
imported inside the commands so that ``lare2 --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from lare2.shared.cli_errors import EXIT_PROBLEMS, check_device, fail, run_commands, user_errors
from lare2.shared.wording import shown

MAX_ITEMS_SHOWN = 10

CACHE_HELP = "Inspect a feature cache: counts, samples, verification, run-to-run diff, plots, export."
CACHE_ARGUMENT = typer.Argument(..., help="Cache directory (a Zarr group made by `lare2 extract`).")
JSON_OPTION = typer.Option(False, "--json", help="Print one JSON document to stdout instead of tables.")


# ---- output -------------------------------------------------------------------------------------
def report_console():
    """Where the cache commands print their tables and report lines (stdout)."""
    from lare2.shared.logs import output_console

    return output_console()  # piped to a file or a pager: whole rows, no folded cells


def _check_png(png: Path | None) -> None:
    """``--png`` names a .png file: matplotlib takes the format from the suffix (and adds .png to a bare name)."""
    if png is None or (png.suffix.lower() == ".png" and not png.is_dir()):
        return
    example = png / "plot.png" if png.is_dir() else png.with_suffix(".png")
    fail(f"--png {png}: {'a folder' if png.is_dir() else 'not a .png file name'}; name the PNG to write, e.g. "
         f"--png {example}")


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _key_values(title: str, values: dict | None):
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value")
    for k, v in (values or {}).items():
        table.add_row(str(k), str(v))
    return table


def _load_recompute_fn():
    """The extractor's ``recompute_samples``, or a stand-in raising ``RecomputeUnavailable`` with
    the reason when the extractor (diffusers, torch) cannot be imported here."""
    from lare2.shared.cache import RecomputeUnavailable

    try:
        from lare2.extract.run import recompute_samples
    except ImportError as err:
        reason = f"the extractor cannot be imported ({err})"

        def unavailable(*args, **kwargs):
            raise RecomputeUnavailable(reason)

        return unavailable
    return recompute_samples


# ---- commands -----------------------------------------------------------------------------------
def info(path: Path = CACHE_ARGUMENT, json_out: bool = JSON_OPTION) -> None:
    """Counts per split x generator x label x status, array sizes, extraction config, fingerprints, provenance."""
    from rich.table import Table

    from lare2.shared.cache import open_cache
    from lare2.shared.cache.summary import cache_info, label_name

    with user_errors():
        report = cache_info(open_cache(path))
    if json_out:
        from lare2.shared.jsonio import print_json

        print_json(report)
        return
    console = report_console()
    blocks = report["blocks"]
    console.print(f"[bold]{report['path']}[/]: {report['num_samples']} samples, format {report['format']}, "
                  f"blocks {blocks['done']}/{blocks['total']} done; status {report['status_counts']}")
    console.print(f"images: perturb {report['perturb']}, normalize {report['normalize']}")
    counts = Table(title="samples", title_justify="left")
    for column in ("split", "generator", "label", "status", "count"):
        counts.add_column(column, justify="right" if column == "count" else "left")
    for row in report["groups"]:
        label = f"{row['label']} ({label_name(row['label'])})"
        counts.add_row(row["split"], row["generator"], label, row["status"], str(row["count"]))
    console.print(counts)
    arrays = Table(title="arrays", title_justify="left")
    for column in ("array", "shape", "dtype", "chunks", "bytes", "on disk", "ratio"):
        arrays.add_column(column)
    for a in report["arrays"]:
        ratio = "-" if a["compression_ratio"] is None else f"{a['compression_ratio']:.2f}"
        chunks = str(a["chunks"]) if a["pack_file"] is None else f"{a['chunks']} in files of {a['pack_file'][0]}"
        arrays.add_row(a["name"], str(a["shape"]), a["dtype"], chunks, _fmt_bytes(a["nbytes"]),
                       _fmt_bytes(a["bytes_on_disk"]), ratio)
    console.print(arrays)
    console.print(_key_values("extraction config", report["extract_config"]))
    console.print(_key_values("model fingerprints", report["fingerprints"]))
    provenance = report["provenance"] or {}
    console.print(_key_values("made", {"created": provenance.get("created"), "git_sha": provenance.get("git_sha"),
                                       **(provenance.get("versions") or {}), "manifest": report["manifest"]}))


def ls(
    path: Path = CACHE_ARGUMENT,
    generator: Optional[str] = typer.Option(None, help="Only this generator."),
    label: Optional[int] = typer.Option(None, help="Only this label (0 real, 1 fake)."),
    status: Optional[str] = typer.Option(None, help="Only this status: ok, error, pending."),
    split: Optional[str] = typer.Option(None, help="Only this split."),
    limit: int = typer.Option(20, help="At most this many rows (0 = all)."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Sample rows, filtered."""
    from rich.table import Table

    from lare2.shared.cache import META_COLUMNS, open_cache
    from lare2.shared.cache.summary import list_samples

    with user_errors():
        listing = list_samples(open_cache(path), generator=generator, label=label, status=status, split=split,
                               limit=limit or None)
    if json_out:
        from lare2.shared.jsonio import print_json

        print_json(listing)
        return
    table = Table(title=f"{len(listing['rows'])} of {listing['matching']} matching samples", title_justify="left")
    columns = ["index", *META_COLUMNS]
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in listing["rows"]:
        table.add_row(*(str(row[c]) for c in columns))
    report_console().print(table)


def show(
    path: Path = CACHE_ARGUMENT,
    sample_id: str = typer.Argument(..., help="Sample id (a unique prefix is enough)."),
    png: Optional[Path] = typer.Option(None, help="Save the image beside its LaRE map (one panel per channel)."),
    run: Optional[Path] = typer.Option(None, help="With --png: add the attention of this egre run over the feature "
                                                  "grid."),
    json_out: bool = JSON_OPTION,
) -> None:
    """One sample: metadata, per-channel LaRE statistics, feature norms; optionally a PNG."""
    from rich.table import Table

    from lare2.shared.cache import open_cache
    from lare2.shared.cache.plots import render_sample_png
    from lare2.shared.cache.summary import find_sample, sample_summary

    _check_png(png)
    with user_errors():  # a damaged block (absent chunk) is refused too
        cache = open_cache(path)
        index = find_sample(cache, sample_id)
        summary = sample_summary(cache, index)
    extra = {}
    if run is not None and png is not None:
        from lare2.heatmaps import cache_sample_attention

        with user_errors():
            extra[f"EGRE attention ({run.name})"] = cache_sample_attention(run, cache, index)
    if png is not None:
        with user_errors():  # e.g. --png into a folder that does not exist
            summary["png"] = render_sample_png(cache, index, png, extra_panels=extra)
    if json_out:
        from lare2.shared.jsonio import print_json

        print_json(summary)
        return
    console = report_console()
    console.print(_key_values(f"sample {index}", summary["metadata"]))
    if summary["lare"] is None:
        console.print(f"no arrays: status {summary['metadata']['status']} {summary['metadata']['error']}".rstrip())
    else:
        lare = Table(title=f"LaRE (mean {summary['lare']['mean']:.4g})", title_justify="left")
        for column in ("channel", "mean", "std", "min", "max"):
            lare.add_column(column, justify="right")
        for ch in summary["lare"]["channels"]:
            lare.add_row(str(ch["channel"]), *(f"{ch[k]:.4g}" for k in ("mean", "std", "min", "max")))
        console.print(lare)
        console.print(_key_values("feature norms", {k: f"{v:.4g}" for k, v in summary["features"].items()}))
    if png is not None:
        shown = summary["png"]
        console.print(f"wrote {shown['png']} ({shown['pixels'][0]}x{shown['pixels'][1]} px)"
                      + ("" if shown["image_shown"] else f"; image not shown: {shown['image_note']}"))


def verify(
    path: Path = CACHE_ARGUMENT,
    manifest: Optional[Path] = typer.Option(None, help="Manifest to check ids and metadata against "
                                                       "(default: the one the cache records, when at hand)."),
    recompute: int = typer.Option(0, min=0, help="Re-extract this many random ok samples and compare bit for bit."),
    seed: int = typer.Option(0, help="Seed choosing the samples to recompute."),
    sd: Optional[str] = typer.Option(None, "--sd", help="Override the cache's SD model for --recompute."),
    clip: Optional[str] = typer.Option(None, "--clip", help="Override the cache's CLIP weights for --recompute."),
    sd_model: Optional[str] = typer.Option(None, "--sd-model", hidden=True, help="Old spelling of --sd."),
    backbone: Optional[str] = typer.Option(None, "--backbone", hidden=True, help="Old spelling of --clip."),
    device: str = typer.Option("auto", help="Device for --recompute: auto (CUDA when present), cpu or cuda."),
    compute_dtype: Optional[str] = typer.Option(
        None, help="Override the cache's compute dtype for --recompute (float32 on a CPU for a GPU's float16 cache)."),
    tolerance: float = typer.Option(
        0.0, help="0: bit for bit. Else a sample matches when max |difference| <= tolerance x its max |value| "
                  "(for another device or compute dtype, e.g. 0.01)."),
    allow_pending: bool = typer.Option(False, "--allow-pending",
                                       help="Accept pending blocks (a cache still being written) with a warning."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Prove a cache whole; exit 1 on any problem.

    Every chunk a block must hold stored and readable, no NaN/Inf in ok samples, ids unique, metadata
    equal to the manifest, fingerprints consistent; pending blocks are an error unless --allow-pending.
    --recompute K re-extracts K random ok samples and compares them bit for bit, or within --tolerance
    (skipped, with the reason, when the models or the device are not at hand).
    """
    from lare2.shared.cache.verify import verify_cache

    if device != "auto" or recompute:
        device = check_device(device)  # cuda without CUDA: one line, exit 2
    with user_errors():
        report = verify_cache(path, manifest=manifest, recompute=recompute, seed=seed, sd=sd or sd_model,
                              clip=clip or backbone, device=device, compute_dtype=compute_dtype,
                              tolerance=tolerance,
                              recompute_fn=_load_recompute_fn() if recompute else None, progress=not json_out,
                              allow_pending=allow_pending)
    if json_out:
        from lare2.shared.jsonio import print_json

        print_json(report.to_dict())
    else:
        from rich.markup import escape

        console = report_console()
        for finding in report.findings:
            colour = "red" if finding.severity == "error" else "yellow"
            check, message = escape(f"[{finding.check}]"), escape(finding.message)  # text, not markup
            console.print(f"[{colour}]{finding.severity}[/] {check} {message}")
            for item in finding.items[:MAX_ITEMS_SHOWN]:
                console.print(f"    {item}", highlight=False)
            if len(finding.items) > MAX_ITEMS_SHOWN:
                console.print(f"    ... and {len(finding.items) - MAX_ITEMS_SHOWN} more (--json lists all)")
        console.print(_key_values("checked", report.checked))
        verdict = "[green]OK[/]" if report.ok else f"[red]FAILED[/] ({len(report.errors)} problems)"
        console.print(f"{report.path}: {verdict}, {len(report.warnings)} warnings")
    if not report.ok:
        raise typer.Exit(EXIT_PROBLEMS)


def repair(
    path: Path = CACHE_ARGUMENT,
    manifest: Optional[Path] = typer.Option(None, help="Manifest the cache was made from (default: the one it "
                                                       "records)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list the damaged blocks; exit 1 when there are any."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Mark every block with a missing, unreadable or inconsistent chunk as not done (metadata from the manifest),
    so that rerunning the same `lare2 extract` recomputes exactly those blocks."""
    from lare2.shared.cache.repair import repair_cache

    with user_errors():
        summary = repair_cache(path, manifest=manifest, dry_run=dry_run, progress=not json_out)
    if json_out:
        from lare2.shared.jsonio import print_json

        print_json(summary)
    else:
        console = report_console()
        verb = "would reset" if dry_run else "reset"
        for block, what in summary["damaged"].items():
            first, last = summary["samples"][block]
            console.print(f"{verb} block {block} (samples {first}-{last}): {', '.join(what)}", highlight=False)
        for message in summary["other_errors"]:
            console.print(f"[yellow]not repaired[/]: {message}", highlight=False)
        if not summary["damaged"]:
            console.print(f"{summary['path']}: no damaged blocks", highlight=False)
        elif not dry_run:
            console.print(f"{summary['path']}: {len(summary['reset'])} blocks reset; rerun the `lare2 extract` command "
                          "that made the cache to recompute them", highlight=False)
    if dry_run and summary["damaged"]:
        raise typer.Exit(EXIT_PROBLEMS)


def diff(
    a: Path = typer.Argument(..., help="First cache."),
    b: Path = typer.Argument(..., help="Second cache."),
    atol: float = typer.Option(0.0, min=0.0, help="Absolute difference tolerated per element."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Compare two caches sample by sample; exit 1 when they differ.

    Samples are matched by id; per array: max abs difference, samples differing by more than
    --atol, samples NaN on one side only. Ids on one side only and differing metadata count too.
    """
    from rich.table import Table

    from lare2.shared.cache.diff import diff_caches

    with user_errors():
        report = diff_caches(a, b, atol=atol)
    if json_out:
        from lare2.shared.jsonio import print_json

        print_json(report)
    else:
        console = report_console()
        table = Table(title=f"{report['compared']} samples compared (atol {atol:g})", title_justify="left")
        for column in ("array", "max abs diff", "samples differing", "NaN on one side", "worst sample"):
            table.add_column(column)
        for name, r in report["arrays"].items():
            if not r["comparable"]:
                table.add_row(name, r["reason"], "-", "-", "-")
            else:
                table.add_row(name, f"{r['max_abs_diff']:.4g}", str(len(r["samples_differing"])),
                              str(len(r["nan_on_one_side"])), str(r["worst_sample"] or "-"))
        console.print(table)
        for key in ("only_in_a", "only_in_b"):
            if report[key]:
                console.print(f"{len(report[key])} ids {key.replace('_', ' ')}: {report[key][:MAX_ITEMS_SHOWN]}")
        for column, ids in report["metadata_differs"].items():
            console.print(f"metadata {column!r} differs for {len(ids)} samples: {ids[:MAX_ITEMS_SHOWN]}")
        for key, (va, vb) in report["identity_differs"].items():
            console.print(f"identity {key}: {shown(va)} vs {shown(vb)}", highlight=False)
        console.print("[green]the caches agree[/]" if report["agree"] else "[red]the caches differ[/]")
    if not report["agree"]:
        raise typer.Exit(EXIT_PROBLEMS)


def stats(
    path: Path = CACHE_ARGUMENT,
    png: Optional[Path] = typer.Option(None, help="Save violins + histograms of mean LaRE per generator and label."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Distribution of mean LaRE per generator and label (ok samples)."""
    from rich.table import Table

    from lare2.shared.cache import open_cache
    from lare2.shared.cache.plots import render_stats_png
    from lare2.shared.cache.summary import label_name, lare_stats

    _check_png(png)
    with user_errors():
        summary = lare_stats(open_cache(path), progress=not json_out)
    if png is not None:
        with user_errors():
            summary["png"] = render_stats_png(summary, png)
    for group in summary["groups"]:
        del group["values"]  # per-sample means: for the plot, too long to print
    if json_out:
        from lare2.shared.jsonio import print_json

        print_json(summary)
        return
    table = Table(title=f"mean LaRE over {summary['ok_samples']} ok samples", title_justify="left")
    for column in ("generator", "label", "n", "mean", "std", "median", "q05", "q95"):
        table.add_column(column, justify="left" if column in ("generator", "label") else "right")
    for g in summary["groups"]:
        table.add_row(g["generator"], label_name(g["label"]), str(g["n"]),
                      *(f"{g[k]:.4g}" for k in ("mean", "std", "median", "q05", "q95")))
    console = report_console()
    console.print(table)
    if png is not None:
        console.print(f"wrote {summary['png']['png']} ({summary['png']['pixels'][0]}x{summary['png']['pixels'][1]} px)")


def register(app: typer.Typer) -> None:
    """``lare2 cache``: this module's commands, then ``lare2.cache_cli_cluster``'s, in one group."""
    from lare2.cache_cli_cluster import register as register_cluster  # that module imports this one's options

    cache_app = typer.Typer(help=CACHE_HELP, no_args_is_help=True)
    for command in (info, ls, show, verify, repair, diff, stats):
        cache_app.command(command.__name__)(command)
    register_cluster(cache_app)
    app.add_typer(cache_app, name="cache")


def main(argv: list[str] | None = None) -> int:
    """``main(["cache", "info", PATH])``: a ``lare2 cache`` command without the console script; the exit code."""
    return run_commands(register, argv)
