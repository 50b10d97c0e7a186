"""``lare2 manifest build``, ``show`` and ``audit``: make and inspect manifests.

pyarrow, Pillow and scikit-learn are imported inside the commands, so that ``lare2 --help`` stays fast.
Bad input (no such folder or manifest, not a manifest, an option that does not apply) is one ``error:``
line on stderr and exit 2 (``lare2.shared.cli_errors``); ``audit`` exits 1 when it finds a shortcut.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from lare2.shared.cli_errors import EXIT_PROBLEMS, fail, run_commands, user_errors

DEFAULT_VAL_FRACTION = 0.05
LOSSLESS = {"PNG", "BMP", "TIFF", "PPM"}
"""Formats whose file size follows from the pixels alone (no quality setting)."""
DEFAULT_SHORTCUT_BOUND = 0.75  # = lare2.shared.manifest.audit.SHORTCUT_AUC_BOUND (kept here so --help imports nothing)

BUILD_HELP = (
    "Build a manifest (one parquet row per image) from SRC. KIND is the layout of SRC:\n\n"
    "- genimage: SRC/<generator>/[<subset>/]{train,val}/{ai,nature}/*; GenImage val -> test, GenImage train -> "
    "train minus a held-out --val-fraction (chosen by content hash) -> val.\n\n"
    "- folders: SRC/[<generator>/]<split>/{0_real,1_fake}/*, or SRC/{0_real,1_fake}/* with --split.\n\n"
    "- list: a text file of 'path<sep>label' lines (tab, comma or space), paths relative to it or absolute; "
    "needs --split.\n\n"
    "- webdataset: a folder of tar shards (or one .tar) with key.jpg|png|webp members and key.cls / key.json "
    "labels.\n"
)


def build(
    kind: str = typer.Argument(..., help="Layout of SRC: genimage, folders, list or webdataset."),
    src: Path = typer.Argument(..., help="Dataset folder, list file, or tar shard(s) folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Manifest to write (.parquet); replaced if present."),
    val_fraction: float = typer.Option(DEFAULT_VAL_FRACTION, help="genimage: share of GenImage train held out as val."),
    generator: Optional[str] = typer.Option(None, help="Generator of rows whose layout names none."),
    split: Optional[str] = typer.Option(None, help="Split (train/val/test) of rows whose layout names none."),
    label: Optional[str] = typer.Option(None, help="list/webdataset: label (0/1/real/fake) of rows that carry none."),
    keep_duplicates: bool = typer.Option(False, help="Keep every copy of an image (a cache needs unique ids per "
                                                     "split)."),
    workers: int = typer.Option(min(8, os.cpu_count() or 1), help="Threads hashing files."),
    json_out: bool = typer.Option(False, "--json", help="Print the manifest's counts as JSON (as `manifest show "
                                                        "--json`)."),
) -> None:
    """Build a manifest from a dataset layout."""
    from lare2.shared.logs import get_logger
    from lare2.shared.manifest import (BUILDERS, build_manifest, count_rows, parse_label, print_build_report,
                                       split_warnings, write_built)

    if kind not in BUILDERS:
        fail(f"unknown manifest builder {kind!r}; choose from {sorted(BUILDERS)}")
    if out.is_dir():
        fail(f"--out {out}: a folder; name the manifest file to write, e.g. --out {out / 'manifest.parquet'}")
    given = {"--generator": generator, "--split": split, "--label": label,
             "--val-fraction": None if val_fraction == DEFAULT_VAL_FRACTION else val_fraction}
    applies = {"genimage": ("--val-fraction",), "folders": ("--generator", "--split"),
               "list": ("--generator", "--split", "--label"), "webdataset": ("--generator", "--split", "--label")}
    stray = [flag for flag, value in given.items() if value is not None and flag not in applies[kind]]
    if stray:
        fail(f"{', '.join(stray)} do(es) not apply to the {kind} builder (it takes {', '.join(applies[kind])})")
    options: dict = {"keep_duplicates": keep_duplicates, "workers": workers}
    if kind == "genimage":
        options["val_fraction"] = val_fraction
    else:
        options.update(generator=generator, split=split)
    with user_errors():
        if kind in ("list", "webdataset"):
            options["label"] = None if label is None else parse_label(label, "--label")
        built = build_manifest(kind, src, **options)
        print_build_report(built)
        write_built(out, built)
    log = get_logger(__name__)
    log.info("%s: %d rows (%d with errors) under %s", out, built.table.num_rows, built.num_errors, built.root)
    for warning in split_warnings(count_rows(built.table)):
        log.warning("%s: %s", out, warning)
    if json_out:
        show(out, json_out=True)


def show(
    path: Path = typer.Argument(..., help="Manifest (.parquet)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Counts per split x generator x label (and errors), and the root."""
    from rich.table import Table

    from lare2.shared.logs import get_logger, output_console
    from lare2.shared.manifest import (LABEL_FAKE, LABEL_REAL, count_rows, empty_manifest_error, read_manifest,
                                       read_manifest_metadata, split_warnings)

    with user_errors():
        meta = read_manifest_metadata(path)
        table, root = read_manifest(path)
        if table.num_rows == 0:  # as for every command that needs rows: bad input, not a finding
            raise empty_manifest_error(path)
    counts = count_rows(table)
    summary = {
        "manifest": str(path),
        "root": str(root),
        "builder": meta["builder"],
        "builder_args": meta["builder_args"],
        "num_rows": table.num_rows,
        "num_errors": sum(c["errors"] for c in counts),
        "counts": counts,
        "warnings": split_warnings(counts),
    }
    for warning in [] if json_out else summary["warnings"]:
        get_logger(__name__).warning("%s: %s", path, warning)
    if json_out:
        from lare2.shared.jsonio import print_json

        print_json(summary)
        return
    pivot: dict[tuple[str, str], dict[int | str, int]] = {}
    for c in counts:
        cell = pivot.setdefault((c["split"], c["generator"]), {LABEL_REAL: 0, LABEL_FAKE: 0, "errors": 0})
        cell[c["label"]] = c["count"]
        cell["errors"] += c["errors"]
    title = f"{path}: {summary['num_rows']} images, {summary['num_errors']} errors ({meta['builder']})"
    grid = Table(title=title, min_width=len(title))  # a title wider than the cells would wrap at their width
    for column in ("split", "generator", "real", "fake", "errors"):
        grid.add_column(column, justify="left" if column in ("split", "generator") else "right")
    for (split_name, generator_name), cell in pivot.items():
        grid.add_row(split_name, generator_name, str(cell[LABEL_REAL]), str(cell[LABEL_FAKE]), str(cell["errors"]))
    console = output_console()
    console.print(grid)
    console.print(f"root: {root}", highlight=False)  # a line of its own: a caption would wrap at the table's width


AUDIT_HELP = (
    "Audit a manifest for shortcuts before training: can the label be told from file metadata alone?\n\n"
    "Reads every image's header (no decoding) and reports per split x generator x label: formats, width and "
    "height, JPEG quality (estimated from the quantisation tables), chroma subsampling, bytes per pixel. Then "
    "cross-validates a classifier on those metadata alone; a ROC AUC above --bound is a shortcut (GenImage's "
    "\"JPEG or not\", Grommelt et al. 2024, arXiv 2403.17608): a warning names the features and the exit code is 1.\n"
)


def audit(
    path: Path = typer.Argument(..., help="Manifest (.parquet)."),
    split: Optional[str] = typer.Option(None, help="Audit only this split (train/val/test); default all, grouped by "
                                                   "split."),
    bound: float = typer.Option(DEFAULT_SHORTCUT_BOUND, help="CV ROC AUC above which the metadata are a shortcut, in "
                                                             "(0.5, 1)."),
    seed: int = typer.Option(0, help="Seed of the cross-validation folds and the classifier."),
    workers: int = typer.Option(min(8, os.cpu_count() or 1), help="Threads reading headers and fitting the "
                                                                  "classifier."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document (groups, classifier, shortcut) "
                                                        "instead of tables."),
) -> None:
    """Formats, sizes, JPEG quality per group, and whether they predict the label."""
    from lare2.shared.logs import get_logger
    from lare2.shared.manifest import audit_manifest, print_audit_report

    with user_errors():
        report = audit_manifest(path, split=split, bound=bound, seed=seed, workers=workers)
    if json_out:
        from lare2.shared.jsonio import print_json

        print_json(report.to_json())
    else:
        print_audit_report(report)
    result = report.classifier
    log = get_logger(__name__)
    if report.unreadable:
        log.warning("%s: %d images could not be read (e.g. %s: %s)", path, len(report.unreadable),
                    report.unreadable[0]["path"], report.unreadable[0]["error"])
    if report.shortcut:
        log.warning("%s: SHORTCUT: the label is predictable from file metadata alone (CV ROC AUC %.3f > %.2f), "
                    "through %s; a detector trained on these images can learn it instead of generation artefacts",
                    path, result.auc, result.bound, ", ".join(result.features))
        if result.features == ["bytes_per_pixel"] and all(set(g.formats) <= LOSSLESS for g in report.groups):
            # a lossless file's size measures its pixels' compressibility: content, not the container
            log.warning("%s: every image is lossless (%s): bytes per pixel measures how smooth the pixels are, which "
                        "re-encoding (--normalize) cannot remove; read the detector's figures with that in mind",
                        path, ", ".join(sorted({f for g in report.groups for f in g.formats})))
        raise typer.Exit(EXIT_PROBLEMS)
    if result is not None and result.auc is not None:
        log.info("%s: no metadata shortcut (CV ROC AUC %.3f <= %.2f)", path, result.auc, result.bound)


def register(app: typer.Typer) -> None:
    manifest_app = typer.Typer(help="Build and inspect manifests: one parquet row per image.", no_args_is_help=True)
    manifest_app.command("build", help=BUILD_HELP)(build)
    manifest_app.command("show")(show)
    manifest_app.command("audit", help=AUDIT_HELP)(audit)
    app.add_typer(manifest_app, name="manifest")


def main(argv: list[str] | None = None) -> int:
    """``main(["manifest", "show", PATH])``: a ``lare2 manifest`` command without the console script; the exit code."""
    return run_commands(register, argv)
