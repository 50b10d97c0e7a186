"""Each input path is used: the class planted in the LaRE map vs in the features flips the winners."""

from __future__ import annotations

import json

import pytest

from lare2.shared.cache import CacheLayout
from lare2.train.cli import main
from tests.helpers.caches import write_synthetic_cache

LAYOUT = CacheLayout(pooled_dim=32, fmap_shape=(32, 14, 14), lare_shape=(4, 32, 32), chunk_samples=32)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("signals")
    out = {}
    for signal in ("lare", "features"):
        for split, seed, n in (("train", 1, 192), ("val", 2, 128)):
            write_synthetic_cache(root / signal / split, num_samples=n, signal=signal, seed=seed, layout=LAYOUT)
        out[signal] = root / signal
    return out


def val_acc(root, signal: str, kind: str) -> float:
    run = root / f"run-{kind}"
    code = main(["train", "--preset", "debug", "--model", kind, "--train", str(root / "train"),
                 "--val", str(root / "val"), "--out", str(run), "--epochs", "4", "--set", "progress=false"])
    assert code == 0
    return json.loads((run / "config.json").read_text())["val_metrics"]["acc"]


@pytest.mark.slow
def test_class_in_lare_map_is_learned_by_map_readers_only(caches) -> None:
    accs = {kind: val_acc(caches["lare"], "lare", kind) for kind in ("egre", "lare-only", "linear")}
    assert accs["egre"] > 0.95 and accs["lare-only"] > 0.95, accs
    assert accs["linear"] < 0.7, accs


@pytest.mark.slow
def test_class_in_features_flips_the_winners(caches) -> None:
    accs = {kind: val_acc(caches["features"], "features", kind) for kind in ("egre", "lare-only", "linear")}
    assert accs["linear"] > 0.95 and accs["egre"] > 0.95, accs
    assert accs["lare-only"] < 0.7, accs
