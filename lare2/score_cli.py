"""``lare2 score``: a trained detector's verdict on image files and folders; a thin CLI on ``lare2.Detector``.

Rows (``path, p_fake, is_fake, threshold, prompt, status, error``, and ``heatmap`` with ``--heatmaps``: the
PNG drawn for the row, ``<row>-<stem>.png``) come in input order and go to ``--out`` (CSV, JSON or JSON Lines,
by suffix) as they are scored, so an interrupted run keeps what it did; a bad ``--out`` or ``--class-name`` is
refused before any model loads, and a file already at ``--out`` is replaced only once the detector has loaded
(a bad run or weights leave it whole). Exit 0 when every file was scored, 1 when some are error rows, 2 on bad usage,
130 on Ctrl-C (saying how many rows were kept).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Optional

import typer

from lare2.shared.cli_errors import EXIT_PROBLEMS, check_device, interrupted, run_commands, user_errors
from lare2.shared.errors import InputError

SCORE_HELP = ("Score images or folders with a trained detector: p(fake) and the verdict at the calibrated threshold. "
              "Exit 0: all scored; 1: some files could not be; 2: bad usage.")
OUT_SUFFIXES = (".csv", ".json", ".jsonl")
MAX_SKIPPED_SHOWN = 10


def check_out(path: Path) -> None:
    """Refuse an ``--out`` that cannot be written, without touching it (a previous file there stays whole until the
    detector has loaded and the rows start)."""
    if path.suffix.lower() not in OUT_SUFFIXES:
        raise InputError(f"{path}: --out must end in {', '.join(OUT_SUFFIXES)}")
    if path.is_dir():
        raise InputError(f"{path}: --out is a folder; name a file in it (e.g. {path / 'scores.csv'})")
    if not path.parent.is_dir():
        raise InputError(f"{path}: no folder {path.parent} to write into; create it or choose another --out")
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        what = path if path.exists() else f"the folder {path.parent}"
        raise InputError(f"{path}: cannot write ({what} is not writable); choose another --out")


class RowWriter:
    """Rows to ``path`` as they come: CSV, a JSON array (one row a line) or JSON Lines, flushed row by row."""

    def __init__(self, path: Path, fields: tuple[str, ...]) -> None:
        check_out(path)
        self.kind = path.suffix.lower()
        try:
            self.file = open(path, "w", newline="")
        except OSError as err:
            raise InputError(f"{path}: cannot write ({err.strerror}); choose another --out") from None
        self.rows = 0
        self.csv = csv.DictWriter(self.file, fieldnames=list(fields)) if self.kind == ".csv" else None
        if self.csv:
            self.csv.writeheader()
        elif self.kind == ".json":
            self.file.write("[")

    def write(self, row: dict) -> None:
        if self.csv:
            self.csv.writerow(row)
        else:
            separator = ("\n" if self.rows == 0 else ",\n") if self.kind == ".json" else ""
            self.file.write(separator + json.dumps(row) + ("\n" if self.kind == ".jsonl" else ""))
        self.rows += 1
        self.file.flush()

    def close(self) -> None:
        if self.kind == ".json":
            self.file.write("\n]\n")
        self.file.close()


def heatmap_name(row: int, path: str, rows: int) -> str:
    """``<row>-<stem>.png``: the row's index in input order (zero-padded to sort as the rows do) and the file's
    stem, so files of one name in several folders never share a heatmap."""
    return f"{row:0{max(4, len(str(rows - 1)))}d}-{Path(path).stem or 'image'}.png"


def score(
    run_dir: Path = typer.Argument(..., help="A finished run (lare2 train --out)."),
    inputs: list[Path] = typer.Argument(..., help="Image files and/or folders (searched recursively)."),
    sd: Optional[str] = typer.Option(None, "--sd", help="Latent diffusion weights, if not where the run recorded "
                                                        "them."),
    clip: Optional[str] = typer.Option(None, "--clip", "--backbone", help="CLIP weights, if not where the run recorded "
                                                                          "them."),
    class_name: Optional[str] = typer.Option(
        None, "--class-name",
        help="Runs trained with class prompts: the ImageNet class of every image, or 'auto' (CLIP zero-shot; needs "
             "--clip RN50.pt's text tower). Default: from GenImage-style file names; other images get the empty "
             "prompt when the run was extracted with classless_prompt=empty (as in training), else are error rows."),
    threshold: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Decision threshold on p(fake) (default: "
                                                                           "the run's calibrated one)."),
    heatmaps: Optional[Path] = typer.Option(None, "--heatmaps", help="Write one PNG per scored image here (image, LaRE "
                                                                     "map, EGRE attention), named ROW-STEM.png; the "
                                                                     "rows' heatmap column names it."),
    device: str = typer.Option("auto", help="auto (CUDA when present) | cpu | cuda."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the rows to this .csv, .json or .jsonl, "
                                                                 "as they are scored."),
    json_out: bool = typer.Option(False, "--json", help="Print the rows as JSON instead of a table."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Images per model call (default: the extraction's)."),
    workers: int = typer.Option(2, min=0, help="DataLoader workers decoding images (0: in this process)."),
) -> None:
    import time

    from lare2.detect import AUTO_CLASS, ROW_FIELDS, STATUS_ERROR, Detector, collect_inputs
    from lare2.shared.classnames import check_class_name
    from lare2.shared.logs import console, progress_bar, rate_text
    from lare2.shared.wording import counted

    device = check_device(device)  # cuda without CUDA: one line, exit 2
    writer = None
    with user_errors():
        if class_name and class_name != AUTO_CLASS:
            check_class_name(class_name, what="--class-name")
        files, skipped = collect_inputs(inputs)
        if not files:
            raise InputError(f"{' '.join(map(str, inputs))}: no image files to score "
                             f"({counted(len(skipped), 'other file')} skipped)")
        if heatmaps is not None:
            heatmaps.mkdir(parents=True, exist_ok=True)
        fields = ROW_FIELDS + (("heatmap",) if heatmaps is not None else ())
        if out:
            check_out(out)  # before any model loads; the file is opened once the detector has loaded
    results, rows = [], []
    try:
        with user_errors():
            detector = Detector.from_run(run_dir, sd=sd, clip=clip, device=device, threshold=threshold,
                                         num_workers=workers, batch_size=batch_size)
            if class_name == AUTO_CLASS and detector.prompt_mode == "class":
                detector.prepare_zero_shot()
            writer = RowWriter(out, fields) if out else None
        if class_name and detector.prompt_mode != "class":
            console.print(f"note: the run uses prompt_mode={detector.prompt_mode!r}; --class-name is ignored")
        started = time.perf_counter()
        with progress_bar("img") as bar, interrupted(str(run_dir), lambda: kept_rows(len(results), len(files), out)):
            task = bar.add_task(f"score {run_dir.name}", total=len(files), rate="")
            for result in detector.iter_score(files, class_name):
                row = result.row()
                if heatmaps is not None:
                    png = heatmaps / heatmap_name(len(results), result.path, len(files))
                    row["heatmap"] = str(png) if result.status != STATUS_ERROR else ""
                    if row["heatmap"]:
                        detector.heatmap(result, png)
                results.append(result)
                rows.append(row)
                if writer:
                    writer.write(row)
                bar.update(task, completed=len(results), rate=rate_text(len(results), time.perf_counter() - started))
    finally:
        if writer:
            writer.close()
    seconds = time.perf_counter() - started
    if json_out:
        from lare2.shared.jsonio import print_json

        print_json(rows)
    else:
        print_table(results, f"{run_dir}: p(fake), verdict at threshold {detector.threshold:.4g}")
    errors = sum(r.status == STATUS_ERROR for r in results)
    fake = sum(bool(r.is_fake) for r in results)
    console.print(f"scored {len(results) - errors} of {counted(len(results), 'image')} in {seconds:.1f} s "
                  f"({rate_text(len(results), seconds)}): {fake} fake, {len(results) - errors - fake} real, "
                  f"{counted(errors, 'error')}"
                  + (f"; rows in {out}" if out else "") + (f"; heatmaps in {heatmaps}" if heatmaps is not None else ""),
                  soft_wrap=True)
    if skipped:
        shown = ", ".join(str(p) for p in skipped[:MAX_SKIPPED_SHOWN])
        more = f" (+{len(skipped) - MAX_SKIPPED_SHOWN} more)" if len(skipped) > MAX_SKIPPED_SHOWN else ""
        console.print(f"skipped {counted(len(skipped), 'file')} without an image name: {shown}{more}",
                      soft_wrap=True, highlight=False)  # paths whole
    if errors:
        raise typer.Exit(EXIT_PROBLEMS)


def kept_rows(scored: int, total: int, out: Path | None) -> str:
    """What an interrupted ``lare2 score`` kept, and how to go on."""
    from lare2.shared.wording import counted

    if out is None:
        return f"{scored} of {counted(total, 'image')} scored, not kept (-o FILE keeps rows as they come); rerun"
    return f"the rows of the {scored} of {counted(total, 'image')} scored are in {out}; rerun to score the rest"


def print_table(results: list, title: str) -> None:
    """The rows as a table on stdout."""
    from rich.table import Table

    from lare2.shared.logs import output_console

    table = Table(title=title)
    for column in ("image", "p(fake)", "verdict", "prompt / error"):
        table.add_column(column, overflow="fold")
    for r in results:
        verdict = "error" if r.error else ("FAKE" if r.is_fake else "real")
        table.add_row(r.path, "" if r.p_fake is None else f"{r.p_fake:.4f}", verdict, r.error or repr(r.prompt))
    output_console().print(table)


def register(app: typer.Typer) -> None:
    app.command("score", help=SCORE_HELP)(score)


def main(argv: list[str] | None = None) -> int:
    """``main([RUN_DIR, IMAGE, ...])``: ``lare2 score`` without the console script; returns the exit code."""
    return run_commands(register, argv, prog_name="lare2 score")

