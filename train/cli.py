"""``lare2 train``, ``lare2 eval``, ``lare2 convert-reference`` and ``lare2 calibrate``.

Heavy imports (torch, accelerate, sklearn, matplotlib) happen inside the commands so that
``lare2 --help`` stays fast. ``main(argv)`` runs the same commands without the console script and
returns the exit code (see ``lare2.shared.cli_errors``: 0 done, 2 bad usage or input with one
``error:`` line, 3 stopped by ``--stop-after-steps``).

``--resume`` (the default) continues the run at ``--out`` from its last saved epoch when its
settings match (a changed setting is refused, naming it); ``--no-resume`` refuses a run directory
that already holds a run, like ``lare2 extract --no-resume``; ``--overwrite`` starts afresh there.
"""

from __future__ import annotations

import contextlib
import glob
import sys
from pathlib import Path
from typing import Optional

import typer

from lare2.shared.cli_errors import (EXIT_STOPPED, check_device, check_out_folder, fail, interrupted, run_commands,
                                     user_errors)

JSON_OPTION = typer.Option(False, "--json", help="Print the summary as one JSON document on stdout (logs go to "
                                                 "stderr).")


def _expand_tests(patterns: list[str]) -> list[str]:
    paths: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if any(ch in pattern for ch in "*?[") else [pattern]
        if not matches:
            fail(f"--test {pattern}: matches no cache")
        paths += [m for m in matches if m not in paths]
    if not paths:
        fail("no test caches given: pass --test CACHE (repeatable, or a quoted glob such as 'cache/test_*')")
    return paths


def _holds_run(out: Path) -> bool:
    return any((out / name).exists() for name in ("resume.pt", "config.json", "model.safetensors"))


def _load_run(run_dir: Path):
    """(model, DetectorConfig) of a run directory; exit 2 with the reason when it is not one."""
    from lare2.train.checkpoint import load_detector

    with user_errors():
        if not run_dir.is_dir():
            raise FileNotFoundError(f"{run_dir}: no such run directory (train one with `lare2 train --out {run_dir}`)")
        return load_detector(run_dir)


def train_command(
    preset: str = typer.Option("paper", help="Settings to start from: paper (reference recipe) or debug (tiny, CPU, "
                                             "seconds)."),
    model: Optional[str] = typer.Option(None, help="egre | linear | lare-only (default: the preset's, egre)."),
    train: Optional[str] = typer.Option(None, help="Training cache directory."),
    val: Optional[str] = typer.Option(None, help="Validation cache directory (selection, schedule, threshold)."),
    out: Optional[str] = typer.Option(None, help="Run directory."),
    epochs: Optional[int] = typer.Option(None, help="Epochs."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size."),
    lr: Optional[float] = typer.Option(None, help="Adam learning rate."),
    seed: Optional[int] = typer.Option(None, help="Seed of weights, data order and dropout."),
    device: Optional[str] = typer.Option(None, help="auto (CUDA when present; the default, the debug preset picks cpu) "
                                                    "| cpu | cuda."),
    target_fpr: Optional[float] = typer.Option(None, help="FPR on validation reals for the calibrated threshold."),
    train_backbone_top: bool = typer.Option(False, "--train-backbone-top",
                                            help="Also train the backbone's layer4 + attention pool, from the weights "
                                                 "the "
                                                 "cache was made with; pooled is recomputed from the cached fmap "
                                                 "(its lr: --set backbone_top_lr_scale=0.1, the default)."),
    clip: Optional[str] = typer.Option(None, help="Backbone weights for --train-backbone-top (RN50.pt, a state dict, "
                                                  "or "
                                                  "tiny/small); default: the backbone the training cache recorded."),
    set_: list[str] = typer.Option([], "--set", help="Any other TrainConfig field: --set KEY=VALUE (repeatable)."),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume",
                                          help="--resume (default): continue the run at --out from its last saved "
                                               "epoch. "
                                               "--no-resume: refuse when --out already holds a run."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start afresh in --out, replacing the run there."),
    allow_pending: bool = typer.Option(False, "--allow-pending", help="Use caches still being extracted (pending "
                                                                      "samples left out)."),
    allow_overlap: bool = typer.Option(False, "--allow-overlap",
                                       help="Accept train and val sharing sample ids, or test data in either (a leak, "
                                            "if not meant)."),
    json_out: bool = JSON_OPTION,
    stop_after_steps: Optional[int] = typer.Option(None, hidden=True, help="Debug: stop without saving after N steps."),
) -> None:
    """Fit a detector on cached features; select and calibrate on the validation cache."""
    from lare2.train.config import TrainConfig
    from lare2.train.config import preset as make_preset
    from lare2.shared.settings import parse_overrides

    with user_errors():
        overrides = parse_overrides(set_, TrainConfig)
        named = {"model": model, "train": train, "val": val, "out": out, "epochs": epochs, "batch_size": batch_size,
                 "lr": lr, "seed": seed, "device": device, "target_fpr": target_fpr,
                 "stop_after_steps": stop_after_steps,
                 "allow_pending": allow_pending or None, "allow_overlap": allow_overlap or None,
                 "train_backbone_top": train_backbone_top or None, "clip": clip}
        overrides.update({k: v for k, v in named.items() if v is not None})
        if resume is not None:  # an explicit flag wins over --set resume=...
            overrides["resume"] = resume
        if overwrite:
            overrides["resume"] = False
        cfg = make_preset(preset, **overrides)
    if cfg.clip and not cfg.train_backbone_top:
        fail(f"--clip {cfg.clip}: only --train-backbone-top reads backbone weights at train time; "
             "add it, or drop --clip")
    check_device(cfg.device)
    check_out_folder(cfg.out, "--out", "the run")
    if not cfg.resume and not overwrite and _holds_run(Path(cfg.out)):
        fail(f"{cfg.out}: already holds a run and --no-resume was given; choose a new --out, "
             "or pass --overwrite to replace it")

    from lare2.train.trainer import run_training

    kept = "the run resumes from its last finished epoch (resume.pt); rerun the same command to continue"
    with user_errors(), interrupted(cfg.out, lambda: kept):
        result = run_training(cfg)
    if json_out:
        from lare2.shared.jsonio import print_json

        print_json({"run_dir": result.run_dir, "finished": result.finished, "best_epoch": result.best_epoch,
                    "threshold": result.threshold, "target_fpr": cfg.target_fpr, "select_metric": cfg.select_metric,
                    "val_metrics": result.val_metrics})
    if not result.finished:
        raise typer.Exit(code=EXIT_STOPPED)


def eval_command(
    run_dir: Path = typer.Argument(..., help="Run directory of a trained detector (config.json + model.safetensors)."),
    more_tests: list[str] = typer.Argument(None, help="More test caches (so that --test cache/test_* works unquoted)."),
    test: list[str] = typer.Option([], help="Test cache, or a quoted glob such as 'cache/test_*' (repeatable)."),
    report: Optional[Path] = typer.Option(None, help="Report directory (default RUN_DIR/report)."),
    batch_size: int = typer.Option(256, help="Samples per scoring batch."),
    device: str = typer.Option("auto", help="auto (CUDA when present) | cpu | cuda."),
    plots: bool = typer.Option(True, help="Write roc.png and acc_ap.png (and robustness.png)."),
    robustness: bool = typer.Option(False, "--robustness",
                                    help="Also a generator x perturbation table: test caches grouped by the "
                                         "perturbation "
                                         "of their extraction (clean for none); robustness.json/.csv/.png."),
    metric: Optional[str] = typer.Option(None, help="The figure the robustness table shows: auc (default) | acc | "
                                                    "acc@thr | ap "
                                                    "(JSON and CSV hold all four)."),
    allow_pending: bool = typer.Option(False, "--allow-pending", help="Score caches still being extracted (pending "
                                                                      "samples left out)."),
    allow_overlap: bool = typer.Option(False, "--allow-overlap", help="Test caches sharing samples with the training "
                                                                      "cache: no warning."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Per-generator ACC/AP/AUC/TPR@FPR table for every test cache; JSON, CSV, PNG plots and per-sample
    predictions.parquet; with --robustness, the same figures per perturbation of the test caches."""
    from lare2.train.calibration import is_calibrated
    from lare2.train.report import evaluate
    from lare2.train.robustness import METRICS

    if metric is not None and metric not in METRICS:
        fail(f"--metric {metric}: choose from {', '.join(METRICS)}")
    if metric is not None and not robustness:
        fail(f"--metric {metric}: only the robustness table has a shown metric; add --robustness "
             "(metrics.json always holds every metric)")
    tests = _expand_tests([*test, *(more_tests or [])])
    _, config = _load_run(run_dir)
    if not is_calibrated(config):
        fail(f"{run_dir}: converted but not calibrated; run `lare2 calibrate {run_dir} --val CACHE` first")
    torch_device = check_device(device)
    check_out_folder(report or run_dir / "report", "--report", "the report")
    # with --json the table goes to stderr, so that stdout holds the JSON document only
    with user_errors(), contextlib.redirect_stdout(sys.stderr if json_out else sys.stdout):
        result = evaluate(run_dir, tests, report, batch_size=batch_size, device=torch_device, plots=plots,
                          allow_pending=allow_pending, allow_overlap=allow_overlap, robustness=robustness,
                          metric=metric or "auc")
    if json_out:
        from lare2.shared.jsonio import print_json

        keys = ("run", "threshold", "target_fpr", "model", "rows", "mean", "extraction_errors", "robustness")
        print_json({key: result[key] for key in keys if key in result}
                   | {"report_dir": str(report or run_dir / "report")})


def convert_reference_command(
    checkpoint: Path = typer.Argument(..., help="Reference CLipClassifierWMapV6 checkpoint (torch state dict)."),
    out: Path = typer.Option(..., help="Run directory to write."),
    lare_size: int = typer.Option(32, help="Side of the LaRE map the head will see: image size / 8 (32 at 256 px)."),
    val: Optional[str] = typer.Option(None, hidden=True, help="Removed: calibrate with `lare2 calibrate`."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run already in --out."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Write an uncalibrated run from a reference checkpoint (head loaded strictly; backbone saved aside).

    Then extract a validation cache with --clip OUT/backbone.safetensors and set the threshold with
    `lare2 calibrate OUT --val CACHE`.
    """
    if val is not None:
        fail(f"--val {val}: convert-reference no longer calibrates; run `lare2 calibrate {out} --val {val}` after it "
             f"(extract {val} with --clip {out}/backbone.safetensors first)")
    if _holds_run(out) and not overwrite:
        fail(f"{out}: already holds a run; choose a new --out, or pass --overwrite to replace it")
    from lare2.train.reference import REFERENCE_BACKBONE_FILE, convert_reference

    with user_errors():
        config = convert_reference(checkpoint, out, lare_size=lare_size)
    backbone = out / REFERENCE_BACKBONE_FILE
    if json_out:
        from lare2.shared.jsonio import print_json

        print_json({"run_dir": out, "calibrated": False, "threshold": config.threshold, "model": config.model.to_dict(),
                    "backbone": backbone if backbone.exists() else None})


def calibrate_command(
    run_dir: Path = typer.Argument(..., help="Run directory (lare2 convert-reference or lare2 train)."),
    val: str = typer.Option(..., help="Validation cache extracted with the run's backbone (and, for a trained run, its "
                                      "settings)."),
    target_fpr: Optional[float] = typer.Option(None, help="FPR on validation reals for the threshold (default: the "
                                                          "run's, else 0.05)."),
    allow_pending: bool = typer.Option(False, "--allow-pending", help="Use a val cache still being extracted."),
    allow_overlap: bool = typer.Option(False, "--allow-overlap", help="Accept a val cache of the test split or holding "
                                                                      "the run's training samples (a leak, if not "
                                                                      "meant)."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Set a run's decision threshold from a validation cache's reals; refuses a cache that does not fit the run,
    a test-split cache and one holding the run's training samples."""
    from lare2.train.calibration import calibrate_run

    if target_fpr is not None and not 0.0 < target_fpr < 1.0:
        fail(f"--target-fpr {target_fpr}: expected a number in (0, 1)")
    with user_errors():
        config = calibrate_run(run_dir, val, target_fpr, allow_pending, allow_overlap)
    if json_out:
        from lare2.shared.jsonio import print_json

        print_json({"run_dir": run_dir, "val": val, "threshold": config.threshold, "target_fpr": config.target_fpr,
                    "val_metrics": config.val_metrics})


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("eval")(eval_command)
    app.command("convert-reference")(convert_reference_command)
    app.command("calibrate")(calibrate_command)


def main(argv: list[str] | None = None) -> int:
    """Run one of this stage's commands, e.g. ``main(["train", "--preset", "debug", ...])``; returns the exit code."""
    return run_commands(register, argv)
