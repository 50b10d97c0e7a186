"""``lare2 score``: a trained detector's verdict on new images (files or folders).

The features are computed exactly as for the caches the detector was trained on (the run
records that extraction config), cast through the cache's storage dtype, then scored. A detector
is refused when the models at hand are not the ones its training features came from.

Prompts: with ``prompt_mode=class`` the class comes from ``--class-name`` or the GenImage file-name
rule; an image with neither gets the empty prompt (and the table says so).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from lare2.shared.manifest import is_image_name

SCORE_HELP = "Score images or folders with a trained detector: p(fake) and the calibrated verdict."


@dataclass
class Verdict:
    path: str
    p_fake: float | None
    fake: bool | None
    prompt: str
    error: str = ""


def image_files(inputs: list[Path]) -> list[Path]:
    files = []
    for item in inputs:
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.is_file() and is_image_name(p.name))
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    return files


def score_images(run_dir: Path, inputs: list[Path], *, sd_model: str | None = None, backbone: str | None = None,
                 class_name: str | None = None, device: str = "cpu", batch_size: int = 8) -> list[Verdict]:
    import numpy as np
    import torch

    from lare2.extract.images import ImageError, backbone_input, decode_rgb, lare_input
    from lare2.extract.run import DecodedSample, compute_batch, load_models
    from lare2.shared.cache import CacheError
    from lare2.shared.classnames import class_name_from_filename
    from lare2.shared.config import ExtractConfig, identity_fingerprint
    from lare2.shared.manifest import content_id
    from lare2.shared.seeding import sample_seed
    from lare2.train.checkpoint import load_detector, score_features

    model, detector = load_detector(run_dir, device=device)
    stored = dict(detector.extra.get("extract_config") or {})
    if not stored:
        raise CacheError(f"{run_dir}: the run does not record its extraction config; retrain it with this lare2")
    stored.update({k: v for k, v in dict(sd_model=sd_model, backbone=backbone).items() if v})
    stored.update(device=device, num_workers=0)
    cfg = ExtractConfig(**stored)
    torch_device = torch.device(device)
    models = load_models(cfg, torch_device)
    identity = cfg.identity(models.fingerprints)
    if identity_fingerprint(identity) != detector.extraction_fingerprint:
        raise CacheError(f"{run_dir}: the models at hand ({models.fingerprints}) are not those the detector was trained on; "
                         "pass --sd/--clip pointing at the same weights")

    verdicts: list[Verdict] = []
    pending: list[tuple[Path, DecodedSample, str, int]] = []

    def flush() -> None:
        if not pending:
            return
        samples = [p[1] for p in pending]
        lare, pooled, fmap = compute_batch(models, samples, [p[2] for p in pending], [p[3] for p in pending], torch_device)
        as_stored = lambda a, name: a.astype(models.layout.dtype(name)).astype(np.float32)  # noqa: E731
        p_fake = score_features(model, as_stored(pooled, "pooled"), as_stored(fmap, "fmap"), as_stored(lare, "lare")).cpu().numpy()
        for (path, _, prompt, _), p in zip(pending, p_fake):
            if np.isfinite(p):
                verdicts.append(Verdict(str(path), float(p), bool(p > detector.threshold), prompt))
            else:  # never let a failed computation read as "real"
                verdicts.append(Verdict(str(path), None, None, prompt, "non-finite model output"))
        pending.clear()

    for index, path in enumerate(image_files(inputs)):
        try:
            data = path.read_bytes()
            image = decode_rgb(data, max_pixels=cfg.max_image_pixels)
        except (ImageError, OSError) as err:
            verdicts.append(Verdict(str(path), None, None, "", str(err)))
            continue
        prompt = cfg.prompt_for(class_name or class_name_from_filename(path.name))
        sample = DecodedSample(index, lare_input(image, cfg.image_size), backbone_input(image), "")
        pending.append((path, sample, prompt, sample_seed(cfg.seed, content_id(data))))
        if len(pending) == batch_size:
            flush()
    flush()
    return verdicts


def score(
    run_dir: Path = typer.Argument(..., help="A finished run (lare2 train --out)."),
    inputs: list[Path] = typer.Argument(..., help="Image files and/or folders (searched recursively)."),
    sd: Optional[str] = typer.Option(None, "--sd", help="Latent diffusion weights, if not where the run recorded them."),
    backbone: Optional[str] = typer.Option(None, "--backbone", "--clip", help="Backbone weights, if not where the run recorded them."),
    class_name: Optional[str] = typer.Option(None, help="Class for the prompt (default: from GenImage-style file names)."),
    device: str = typer.Option("cpu", help="cpu | cuda"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the verdicts as CSV."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    from rich.table import Table

    from lare2.shared.logs import console

    try:
        verdicts = score_images(run_dir, inputs, sd_model=sd, backbone=backbone, class_name=class_name, device=device)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    rows = [v.__dict__ for v in verdicts]
    if out:
        with open(out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(Verdict.__dataclass_fields__))
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
