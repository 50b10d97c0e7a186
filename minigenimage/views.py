"""The paper's training recipe inside the cache, measured on the demo: augmented views and a trainable backbone top.

After ``lare2 minigenimage demo --out OUT`` (and, for the robustness columns, ``lare2 minigenimage
robustness --out OUT``): the training split is extracted again with ``--views K`` (same models,
seeds and settings; only ``views`` differs, so validation and test caches stay the demo's), then two
EGRE detectors train with the demo's recipe and seed:

- ``egre-views<K>``: one augmented view per sample per epoch, the frozen backbone's features;
- ``egre-views<K>-top``: the same, with the backbone's ``layer4`` + attention pool trained too
  (``--train-backbone-top``, at a tenth of the head's learning rate).

Each is evaluated on every test cache under ``OUT/cache`` (clean and perturbed) with ``--robustness``;
the demo's frozen single-view ``egre`` is the baseline they are compared with (``OUT/views.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

from lare2.shared.logs import console


def evaluation_caches(out: Path) -> list[str]:
    """The demo's clean test cache first, then the perturbed ones ``lare2 minigenimage robustness`` wrote."""
    caches = sorted(p for p in (out / "cache").glob("test-*") if (p / "zarr.json").exists())
    return [str(out / "cache" / "test"), *map(str, caches)]


def run_views(out: str | Path, views: int = 4) -> dict:
    """Extract the training split with ``views`` views, train the two detectors, evaluate them and the
    demo's ``egre``; returns (and writes to ``OUT/views.json``) {detector: robustness report}."""
    from lare2.extract.run import run_extraction
    from lare2.shared.cache import FeatureCache
    from lare2.shared.config import ExtractConfig
    from lare2.train.config import preset as train_preset
    from lare2.train.report import evaluate
    from lare2.train.trainer import run_training

    out = Path(out)
    for needed in (out / "cache" / "train" / "zarr.json", out / "cache" / "val" / "zarr.json",
                   out / "egre" / "config.json"):
        if not needed.exists():
            raise FileNotFoundError(f"{needed.parent}: not there; run `lare2 minigenimage demo --out {out}` first")
    demo = json.loads((out / "summary.json").read_text())["config"] if (out / "summary.json").exists() else {}
    recorded = FeatureCache.open(out / "cache" / "train").attrs["extract_config"]
    train_views = ExtractConfig.from_dict(recorded, views=views, out=str(out / "cache" / f"train-views{views}"))
    console.rule(f"[bold]Training split with {views} augmented views per image")
    console.print(run_extraction(train_views).line())

    tests = evaluation_caches(out)
    reports = {"egre": evaluate(out / "egre", tests, report_dir=out / "egre" / "robustness", robustness=True)}
    for name, extra in ((f"egre-views{views}", {}), (f"egre-views{views}-top", {"train_backbone_top": True})):
        console.rule(f"[bold]{name}: train on views{', backbone top trained' if extra else ''}; evaluate")
        run_training(train_preset(demo.get("train_preset", "paper"), model="egre", train=train_views.out,
                                  val=str(out / "cache" / "val"), out=str(out / name), epochs=demo.get("epochs", 40),
                                  seed=demo.get("seed", 0), device="cpu", **extra))
        reports[name] = evaluate(out / name, tests, report_dir=out / name / "robustness", robustness=True)
    results = {name: report["robustness"] for name, report in reports.items()}
    (out / "views.json").write_text(json.dumps(results, indent=2, default=str))
    console.print(f"reports in {out}/<detector>/robustness; summary in {out / 'views.json'}")
    return results
