"""``lare2 train``, ``lare2 eval`` and ``lare2 convert-reference``.

Heavy imports (torch, accelerate, sklearn, matplotlib) happen inside the commands so that
``lare2 --help`` stays fast. ``main(argv)`` runs the same commands without the console script.
"""

from __future__ import annotations

import glob
from dataclasses import fields
from pathlib import Path
from typing import List, Optional

import typer


def _parse_override(text: str, config_cls) -> tuple[str, object]:
    """``KEY=VALUE`` -> (key, value typed like the field's default)."""
    if "=" not in text:
        raise typer.BadParameter(f"--set {text!r}: expected KEY=VALUE")
    key, raw = text.split("=", 1)
    key = key.strip().replace("-", "_")
    known = {f.name: f for f in fields(config_cls)}
    if key not in known:
        raise typer.BadParameter(f"--set {key}: unknown setting; choose from {sorted(known)}")
    default = known[key].default
    if raw.lower() in ("none", "null") and "None" in str(known[key].type):
        return key, None
    if isinstance(default, bool):
        if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise typer.BadParameter(f"--set {key}={raw}: expected true or false")
        return key, raw.lower() in ("true", "1", "yes")
    for caster in (int, float):
        if isinstance(default, caster) or (default is None and caster is int and "int" in str(known[key].type)):
            try:
                return key, caster(raw)
            except ValueError as err:
                raise typer.BadParameter(f"--set {key}={raw}: expected {caster.__name__}") from err
    return key, raw


def _expand_tests(patterns: list[str]) -> list[str]:
    paths: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if any(ch in pattern for ch in "*?[") else [pattern]
        if not matches:
            raise typer.BadParameter(f"--test {pattern!r} matches no cache")
        paths += [m for m in matches if m not in paths]
    return paths


def train_command(
    preset: str = typer.Option("paper", help="Settings to start from: paper (reference recipe) or debug (tiny, CPU, seconds)."),
    model: Optional[str] = typer.Option(None, help="egre | linear | lare-only (default: the preset's, egre)."),
    train: Optional[str] = typer.Option(None, help="Training cache directory."),
    val: Optional[str] = typer.Option(None, help="Validation cache directory (selection, schedule, threshold)."),
    out: Optional[str] = typer.Option(None, help="Run directory."),
    epochs: Optional[int] = typer.Option(None, help="Epochs."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size."),
    lr: Optional[float] = typer.Option(None, help="Adam learning rate."),
    seed: Optional[int] = typer.Option(None, help="Seed of weights, data order and dropout."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda."),
    target_fpr: Optional[float] = typer.Option(None, help="FPR on validation reals for the calibrated threshold."),
    set_: List[str] = typer.Option([], "--set", help="Any other TrainConfig field: --set KEY=VALUE (repeatable)."),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume",
                                          help="Resume from the run directory's saved epoch when present (default: resume)."),
    stop_after_steps: Optional[int] = typer.Option(None, hidden=True, help="Debug: stop without saving after N steps."),
) -> None:
    """Fit a detector on cached features; select and calibrate on the validation cache."""
    from lare2.train.config import TrainConfig
    from lare2.train.config import preset as make_preset
    from lare2.train.trainer import run_training

    overrides = dict(_parse_override(s, TrainConfig) for s in set_)
    named = {"model": model, "train": train, "val": val, "out": out, "epochs": epochs, "batch_size": batch_size, "lr": lr,
             "seed": seed, "device": device, "target_fpr": target_fpr, "stop_after_steps": stop_after_steps}
    overrides.update({k: v for k, v in named.items() if v is not None})
    if resume is not None:  # an explicit flag wins over --set resume=...
        overrides["resume"] = resume
    cfg = make_preset(preset, **overrides)
    result = run_training(cfg)
    if not result.finished:
        raise typer.Exit(code=3)


def eval_command(
    run_dir: Path = typer.Argument(..., help="Run directory of a trained detector (config.json + model.safetensors)."),
    more_tests: List[str] = typer.Argument(None, help="More test caches (so that --test cache/test_* works unquoted)."),
    test: List[str] = typer.Option([], help="Test cache, or a quoted glob such as 'cache/test_*' (repeatable)."),
    report: Optional[Path] = typer.Option(None, help="Report directory (default RUN_DIR/report)."),
    batch_size: int = typer.Option(256, help="Samples per scoring batch."),
    device: str = typer.Option("cpu", help="cpu | cuda."),
    plots: bool = typer.Option(True, help="Write roc.png and acc_ap.png."),
) -> None:
    """Per-generator ACC/AP/AUC/TPR@FPR table for every test cache; JSON, CSV and PNG plots."""
    from lare2.train.report import evaluate

    tests = _expand_tests([*test, *(more_tests or [])])
    evaluate(run_dir, tests, report, batch_size=batch_size, device=device, plots=plots)


def convert_reference_command(
    checkpoint: Path = typer.Argument(..., help="Reference CLipClassifierWMapV6 checkpoint (torch state dict)."),
    val: str = typer.Option(..., help="Validation cache: fixes the extraction fingerprint and calibrates the threshold."),
    out: Path = typer.Option(..., help="Run directory to write."),
    target_fpr: float = typer.Option(0.05, help="FPR on validation reals for the calibrated threshold."),
) -> None:
    """Write a lare2 detector from a reference checkpoint (head loaded strictly; backbone saved aside)."""
    from lare2.train.trainer import convert_reference

    convert_reference(checkpoint, val, out, target_fpr=target_fpr)


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("eval")(eval_command)
    app.command("convert-reference")(convert_reference_command)


def main(argv: list[str] | None = None) -> int:
    """Run one of this stage's commands, e.g. ``main(["train", "--preset", "debug", ...])``; returns the exit code."""
    app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False, no_args_is_help=True)
    register(app)
    code = app(args=argv, standalone_mode=False)  # click returns typer.Exit's code instead of exiting
    return int(code or 0)
