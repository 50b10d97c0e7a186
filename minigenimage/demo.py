"""The demo: the whole method on MiniGenImage, on a CPU, in minutes (``make demo``).

1. build the benchmark (photo crops + images sampled from the committed generator zoo);
2. stage 1 with ``ldm-a`` as the LaRE model (the benchmark's stand-in for Stable Diffusion) and
   a seeded random backbone (``small`` by default), for train / val / test;
3. stage 2: ``egre``, ``linear``, ``lare-only`` and ``egre-zero-lare`` (EGRE with the LaRE map
   zeroed in training and testing) on ldm-a vs real, selected and calibrated on val;
4. per-generator evaluation of each model on all four generators, and one comparison table.

The backbone is a small ModifiedResNet with seeded random weights (no CLIP weights can be had
offline), so the ``linear`` row measures what random pooled features carry; ``egre`` adds the
feature map and the LaRE map, ``lare-only`` the LaRE map alone, ``egre-zero-lare`` the feature map
without the LaRE map. The README reads the table.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lare2.shared.logs import console, get_logger
from lare2.shared.errors import InputError

log = get_logger(__name__)

DETECTORS = {
    "egre": {"model": "egre"},
    "linear": {"model": "linear"},
    "lare-only": {"model": "lare-only"},
    "egre-zero-lare": {"model": "egre", "zero_lare": True},  # the ablation: what the LaRE map adds to EGRE
}
"""The demo's detectors: name -> training settings."""
MODELS = tuple(DETECTORS)


@dataclass(kw_only=True)
class DemoConfig:
    """Where the demo writes and how big it is."""

    out: str = "runs/minigenimage"
    """Everything goes under here: ``data/`` (benchmark), ``cache/`` (stage 1), ``<model>/`` (runs)."""
    build_preset: str = "demo"
    """MiniGenImage size: ``demo`` (the README's table), ``reduced`` (96 / 40 / 48 per class; too
    small to learn well) or ``tiny``."""
    models: list[str] = field(default_factory=lambda: list(MODELS))
    """Detectors to train and compare."""
    clip: str = "small"
    """Weights of stage 1's image backbone (``--clip``; seeded random: no CLIP weights can be had offline):
    ``small`` (the README's table), ``tiny`` (4x narrower, faster, weaker) or a path to real CLIP RN50 weights."""
    train_preset: str = "paper"
    """Stage-2 recipe (``paper``: Adam 1e-4, batch 48, plateau schedule on val AUC)."""
    epochs: int = 40
    """Training epochs per model. The paper's recipe was sized for ~320k training images; on the demo's
    480, 20 epochs (200 steps) stop while validation AUC still climbs, and it levels off by about 30."""
    seed: int = 0
    """Seeds the benchmark, the LaRE draws and training."""
    zoo: str = ""
    """Generator zoo to sample, and whose ``ldm-a`` computes the LaRE maps; empty: the committed zoo.
    ``lare2 minigenimage zoo --zoo DIR`` retrains one elsewhere without touching the committed weights."""
    batch_size: int = 16
    """Images per stage-1 model call."""
    prompt_mode: str = "class"
    """Stage-1 prompts (docs/method.md §1.4): ``class`` (the paper's), ``empty`` or ``fixed``."""

    def __post_init__(self) -> None:
        from lare2.shared.config import PROMPT_MODES

        if self.prompt_mode not in PROMPT_MODES:
            raise InputError(f"prompt_mode={self.prompt_mode!r}: choose from {PROMPT_MODES}")
        unknown = sorted(set(self.models) - set(MODELS))
        if unknown:
            raise InputError(f"models {unknown}: choose from {MODELS}")
        if self.zoo and not (Path(self.zoo) / "ldm-a" / "unet").is_dir():
            raise InputError(f"zoo={self.zoo!r}: no ldm-a/unet there; "
                             f"train one with `lare2 minigenimage zoo --zoo {self.zoo}`")

    @property
    def zoo_dir(self) -> Path:
        from lare2.minigenimage.zoo import ZOO_DIR

        return Path(self.zoo) if self.zoo else ZOO_DIR


def run_demo(cfg: DemoConfig) -> dict:
    """Run the four steps; returns ``{model: evaluation report}`` and writes ``summary.json``."""
    from lare2.extract.run import run_extraction
    from lare2.minigenimage.build import build, preset as build_preset
    from lare2.minigenimage.models import IMAGE_SIZE
    from lare2.shared.config import paper
    from lare2.train.config import preset as train_preset
    from lare2.train.report import evaluate
    from lare2.train.trainer import run_training

    import torch

    # Flush denormals to zero before the first parallel op, so that torch's intra-op threads inherit
    # it: set later (as the trainer does), it reaches only the calling thread, and training after
    # stage 1 in this process ran 2.4x slower on denormal arithmetic in the other threads.
    torch.set_flush_denormal(True)
    out = Path(cfg.out)
    console.rule("[bold]1/4 MiniGenImage: crops of real photographs + images from the 4 generators of the zoo")
    manifest = build(build_preset(cfg.build_preset, out=str(out / "data"), seed=cfg.seed, zoo=str(cfg.zoo_dir)))

    console.rule(f"[bold]2/4 Stage 1: LaRE maps with ldm-a (t=200, 4 draws, {IMAGE_SIZE} px) + backbone features")
    caches = {}
    for split in ("train", "val", "test"):
        extract_config = paper(manifest=str(manifest), out=str(out / "cache" / split), split=split,
                               sd=str(cfg.zoo_dir / "ldm-a"), clip=cfg.clip, image_size=IMAGE_SIZE,
                               batch_size=cfg.batch_size, num_workers=0, seed=cfg.seed, prompt_mode=cfg.prompt_mode)
        console.print(run_extraction(extract_config).line())
        caches[split] = extract_config.out

    console.rule("[bold]3/4 Stage 2: training on ldm-a vs real; selection and calibration on val")
    reports = {}
    for model in cfg.models:
        run_dir = out / model
        run_training(train_preset(cfg.train_preset, **DETECTORS[model], train=caches["train"], val=caches["val"],
                                  out=str(run_dir), epochs=cfg.epochs, seed=cfg.seed, device="cpu"))
        console.rule(f"[bold]4/4 {model}: per-generator evaluation")
        reports[model] = evaluate(run_dir, [caches["test"]], report_dir=run_dir / "report")

    print_comparison(reports)
    (out / "summary.json").write_text(json.dumps({"config": asdict(cfg), "reports": reports}, indent=2, default=str))
    console.print(f"caches in {out / 'cache'}, runs and reports (JSON, CSV, ROC and bar plots) in {out}/<model>/report")
    return reports


def comparison_rows(reports: dict) -> list[dict]:
    """One row per generator (+ mean): ACC@0.5 and AP of every model, in %."""
    generators = [row["generator"] for row in next(iter(reports.values()))["rows"]]
    rows = []
    for generator in [*generators, "mean"]:
        row = {"generator": generator}
        for model, report in reports.items():
            source = (report["mean"] if generator == "mean"
                      else next(r for r in report["rows"] if r["generator"] == generator))
            row[f"{model} ACC"] = source["acc"]
            row[f"{model} AP"] = source["ap"]
        rows.append(row)
    return rows


def print_comparison(reports: dict) -> None:
    from rich.table import Table

    rows = comparison_rows(reports)
    table = Table(title="MiniGenImage: trained on ldm-a vs real; ACC@0.5 and AP (%) per test generator")
    for column in rows[0]:
        table.add_column(column, justify="left" if column == "generator" else "right")
    for row in rows:
        cells = [value if isinstance(value, str) else ("-" if value is None else f"{100 * value:.1f}")
                 for value in row.values()]
        table.add_row(*cells, end_section=row is rows[-2])
    console.print(table)
