"""The demo on MiniGenImage: every stage runs on real generated images, and EGRE detects ldm-a on
photographs neither the zoo nor the detector saw.

Measured with this test's settings (build preset ``demo``: 240 train / 80 val / 120 test images per
class, ``small`` random backbone, paper recipe, 40 epochs), seed 0, held-out ldm-a test split:
egre ACC@0.5 0.904, AUC 0.963, fake ACC 0.908; lare-only AUC 0.662 (README "MiniGenImage"). The
bars below sit under those figures with a margin for thread-count rounding.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lare2.minigenimage.demo import comparison_rows
from lare2.minigenimage.zoo import GENERATORS

pytestmark = pytest.mark.slow


def test_demo_detects_ldm_a_on_unseen_photographs(tmp_path, capsys):
    # the README's command in a fresh process, as `make demo` runs it (a pytest worker's torch threads
    # predate the demo's denormal flushing and would train 2x slower)
    command = [sys.executable, "-m", "lare2.cli", "minigenimage", "demo", "--out", str(tmp_path), "--model", "egre",
               "--model", "lare-only"]
    finished = subprocess.run(command, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-4000:]
    reports = json.loads((tmp_path / "summary.json").read_text())["reports"]
    egre = {row["generator"]: row for row in reports["egre"]["rows"]}

    # every generator is evaluated, with its own held-out reals and fakes
    assert sorted(egre) == sorted(GENERATORS)
    assert all(row["n_real"] == 120 and row["n_fake"] == 120 and row["reals_from"] == "generator"
               for row in egre.values())
    # the calibrated threshold comes from validation reals only
    assert reports["egre"]["target_fpr"] == pytest.approx(0.05)

    figures = {model: {r["generator"]: {k: round(r[k], 3) for k in ("acc", "real_acc", "fake_acc", "ap", "auc")}
                       for r in rep["rows"]}
               for model, rep in reports.items()}
    with capsys.disabled():  # the figures of every generator, in the CI log
        print("\nMiniGenImage demo (seed 0):", json.dumps(figures, indent=1))
    assert egre["ldm-a"]["acc"] >= 0.88, figures
    assert egre["ldm-a"]["auc"] >= 0.94, figures
    assert egre["ldm-a"]["fake_acc"] >= 0.88, figures
    lare_only = {row["generator"]: row for row in reports["lare-only"]["rows"]}
    assert egre["ldm-a"]["auc"] > lare_only["ldm-a"]["auc"], figures

    # no photograph gives crops to two pools: the real crops of each split come from its own pool only
    import pyarrow.parquet as pq
    from pathlib import Path

    from lare2.minigenimage.build import SPLIT_POOL
    from lare2.minigenimage.photos import photos_of

    rows = pq.read_table(tmp_path / "data" / "manifest.parquet").to_pylist()
    used = {split: {Path(r["path"]).stem.split("_", 2)[2] for r in rows if r["label"] == 0 and r["split"] == split}
            for split in SPLIT_POOL}
    zoo = {p.name for p in photos_of("zoo")}
    for split, names in used.items():
        assert names and names <= {p.name for p in photos_of(SPLIT_POOL[split])} and not names & zoo, split
    assert not (used["train"] & used["val"] or used["train"] & used["test"] or used["val"] & used["test"])
    assert len({r["sample_id"] for r in rows}) == len(rows)

    assert set(reports) == {"egre", "lare-only"}
    assert [row["generator"] for row in comparison_rows(reports)] == [*sorted(GENERATORS), "mean"]
    for model in ("egre", "lare-only"):
        assert (tmp_path / model / "report" / "roc.png").stat().st_size > 0
