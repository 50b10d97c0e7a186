"""``lare2 extract``: stage 1 from the command line (also ``python -m lare2.extract`` for
``accelerate launch``). A preset plus a few overrides; any other field through ``--set key=value``."""

from __future__ import annotations

import dataclasses
import json
from typing import Optional

import typer

EXTRACT_HELP = "Compute LaRE maps + backbone features for a manifest selection into a Zarr cache (reruns resume)."


def _parse_overrides(pairs: list[str]) -> dict:
    from lare2.shared.config import ExtractConfig

    fields = {f.name: f for f in dataclasses.fields(ExtractConfig)}
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in fields:
            raise typer.BadParameter(f"--set {pair!r}: expected key=value with key one of {sorted(fields)}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value  # a bare string
    return overrides


def extract(
    manifest: str = typer.Option(..., "--manifest", "-m", help="Parquet manifest (lare2 manifest build)."),
    out: str = typer.Option("cache/train", "--out", "-o", help="Cache directory (created or resumed)."),
    split: Optional[str] = typer.Option(None, help="Only this split (train/val/test)."),
    generator: list[str] = typer.Option([], "--generator", "-g", help="Only these generators (repeatable)."),
    preset: str = typer.Option("paper", help="Settings preset: paper (SPEC 2.1) or debug (tiny models)."),
    sd: Optional[str] = typer.Option(None, "--sd", help="Latent diffusion model: diffusers folder, .safetensors/.ckpt, hub id, or 'tiny'."),
    backbone: Optional[str] = typer.Option(None, "--backbone", "--clip", help="CLIP RN50: RN50.pt, a state dict, 'random-rn50' or 'tiny'."),
    batch_size: Optional[int] = typer.Option(None, help="Images per model call."),
    num_workers: Optional[int] = typer.Option(None, help="Decoding workers."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda (each process of accelerate launch takes its own GPU)."),
    num_shards: int = typer.Option(1, help="Independent array jobs sharing this cache (each may run several processes)."),
    shard_index: int = typer.Option(0, help="This array job's index in [0, num_shards), e.g. $SLURM_ARRAY_TASK_ID."),
    limit: Optional[int] = typer.Option(None, help="Only the first N selected rows."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Reruns always resume; --no-resume refuses an existing cache."),
    set_: list[str] = typer.Option([], "--set", help="Any ExtractConfig field, key=value (repeatable)."),
    create_only: bool = typer.Option(False, "--create-only", help="Create (or check) the cache, extract nothing: run once before an array of jobs."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
) -> None:
    from pathlib import Path

    from lare2.shared.cache import CacheError
    from lare2.shared.config import preset as make_preset

    overrides = {k: v for k, v in dict(manifest=manifest, out=out, split=split, generators=list(generator),
                                       sd_model=sd, backbone=backbone, batch_size=batch_size, num_workers=num_workers,
                                       device=device, num_shards=num_shards, shard_index=shard_index, limit=limit).items()
                 if v is not None}
    overrides |= _parse_overrides(set_)
    try:
        cfg = make_preset(preset, **overrides)
    except (TypeError, ValueError) as err:
        raise typer.BadParameter(str(err)) from None
    if not resume and (Path(cfg.out) / "zarr.json").exists():
        typer.echo(f"error: {cfg.out} exists and --no-resume was given", err=True)
        raise typer.Exit(2)

    from lare2.extract.run import run_extraction
    from lare2.shared.logs import console

    try:
        summary = run_extraction(cfg, create_only=create_only)
    except (CacheError, FileNotFoundError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    if summary.rank != 0:
        return  # under accelerate launch / torchrun, the main process speaks for the job
    if json_out:
        typer.echo(json.dumps(dataclasses.asdict(summary)))
    else:
        console.print(summary.line())
        console.print(f"cache {summary.cache}: {summary.samples} samples, status counts {summary.counts}")


def register(app: typer.Typer) -> None:
    app.command("extract", help=EXTRACT_HELP)(extract)


def main(argv: list[str] | None = None) -> None:
    standalone = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)
    standalone.command(help=EXTRACT_HELP)(extract)
    standalone(args=argv, prog_name="python -m lare2.extract")
