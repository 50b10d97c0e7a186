"""``lare2 score``: a trained detector's verdict on image files and folders (table, CSV or JSON)."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Optional

import typer

from lare2.shared.cli_errors import check_device, user_errors

SCORE_HELP = "Score images or folders with a trained detector: p(fake) and the calibrated verdict."


def score(
    run_dir: Path = typer.Argument(..., help="A finished run (lare2 train --out)."),
    inputs: list[Path] = typer.Argument(..., help="Image files and/or folders (searched recursively)."),
    sd: Optional[str] = typer.Option(None, "--sd", help="Latent diffusion weights, if not where the run recorded them."),
    clip: Optional[str] = typer.Option(None, "--clip", "--backbone", help="Backbone weights, if not where the run recorded them."),
    class_name: Optional[str] = typer.Option(None, help="Class for the prompt (default: from GenImage-style file names)."),
    device: str = typer.Option("auto", help="auto (CUDA when present) | cpu | cuda."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the verdicts as CSV."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    from rich.table import Table

    from lare2.detect import Verdict, score_images
    from lare2.shared.logs import console

    device = check_device(device)  # cuda without CUDA: one line, exit 2
    with user_errors():
        verdicts = score_images(run_dir, inputs, sd_model=sd, backbone=clip, class_name=class_name, device=device)
    rows = [asdict(v) for v in verdicts]
    if out:
        with open(out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[f.name for f in fields(Verdict)])
            writer.writeheader()
            writer.writerows(rows)
    if json_out:
        typer.echo(json.dumps(rows))
        return
    table = Table(title=f"{run_dir}: p(fake), verdict at the calibrated threshold")
    for column in ("image", "p(fake)", "verdict", "prompt / error"):
        table.add_column(column)
    for v in verdicts:
        verdict = "error" if v.error else ("FAKE" if v.fake else "real")
        table.add_row(v.path, "" if v.p_fake is None else f"{v.p_fake:.4f}", verdict, v.error or repr(v.prompt))
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("score", help=SCORE_HELP)(score)
