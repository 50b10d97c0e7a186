"""Resume after a kill equals an uninterrupted run; fingerprints are enforced; the evaluation report."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lare2.shared.cache import CacheLayout
from lare2.train.checkpoint import CheckpointError, load_detector
from lare2.train.cli import main
from lare2.train.metrics import detection_metrics
from lare2.train.report import evaluate
from lare2.train.scoring import score_features
from tests.helpers.caches import write_synthetic_cache

LAYOUT = CacheLayout(pooled_dim=16, fmap_shape=(16, 7, 7), lare_shape=(4, 16, 16), chunk_samples=16)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    write_synthetic_cache(root / "train", num_samples=96, signal="lare", seed=1, layout=LAYOUT)
    write_synthetic_cache(root / "val", num_samples=64, signal="lare", seed=2, layout=LAYOUT)
    return root


def train_args(data, out, *extra: str) -> list[str]:
    return ["train", "--preset", "debug", "--model", "egre", "--train", str(data / "train"), "--val", str(data / "val"),
            "--out", str(out), "--epochs", "3", "--batch-size", "16", "--set", "progress=false", "--set", "head_dim=8",
            *extra]


def test_resume_after_a_kill_gives_the_same_weights(data, tmp_path) -> None:
    assert main(train_args(data, tmp_path / "straight")) == 0
    # 6 steps per epoch: die in the middle of epoch 2, then run again
    assert main(train_args(data, tmp_path / "killed", "--stop-after-steps", "9")) == 3
    assert not (tmp_path / "killed" / "config.json").exists()
    assert torch.load(tmp_path / "killed" / "resume.pt", weights_only=True)["epoch"] == 1
    assert main(train_args(data, tmp_path / "killed")) == 0

    for name in ("model.safetensors",):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "killed" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    last_a = torch.load(tmp_path / "straight" / "resume.pt", weights_only=True)
    last_b = torch.load(tmp_path / "killed" / "resume.pt", weights_only=True)
    assert last_a["step"] == last_b["step"] == 18
    assert all(torch.equal(last_a["model"][k], last_b["model"][k]) for k in last_a["model"])
    a, b = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("straight", "killed"))
    assert a["threshold"] == b["threshold"] and a["val_metrics"] == b["val_metrics"]


def test_resume_restores_the_best_weights_it_recorded(data, tmp_path) -> None:
    """resume.pt carries the best weights: a kill between writing a new best and resume.pt (or a lost
    model.safetensors) cannot leave weights that disagree with the recorded best epoch."""
    run = tmp_path / "run"
    assert main(train_args(data, run, "--epochs", "2")) == 0
    best = {k: v.clone() for k, v in load_file(run / "model.safetensors").items()}  # not a view of the file
    saved_best = torch.load(run / "resume.pt", weights_only=True)["best_model"]
    assert all(torch.equal(best[k], v) for k, v in saved_best.items())
    (run / "model.safetensors").write_bytes(b"")  # as if the weights of another epoch had been half-written there
    assert main(train_args(data, run, "--epochs", "2")) == 0  # resumes after the last epoch: straight to calibration
    restored = load_file(run / "model.safetensors")
    assert restored.keys() == best.keys() and all(torch.equal(restored[k], best[k]) for k in best)


def test_changed_settings_refuse_to_resume(data, tmp_path, capsys) -> None:
    assert main(train_args(data, tmp_path / "run", "--stop-after-steps", "7")) == 3
    capsys.readouterr()
    # a user error: one `error:` line and exit 2 (the CheckpointError used to escape as a traceback)
    assert main(train_args(data, tmp_path / "run", "--lr", "0.01")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    assert "saved with other settings {'lr': (0.001, 0.01)}" in err, err


def test_caches_from_other_extractions_are_refused(data, tmp_path, capsys) -> None:
    other = write_synthetic_cache(tmp_path / "other", num_samples=32, signal="lare", seed=5, layout=LAYOUT,
                                  identity={"timestep": 280})
    capsys.readouterr()
    # a user error: one `error:` line and exit 2 (the CacheError used to escape as a traceback)
    assert main(["train", "--preset", "debug", "--train", str(data / "train"), "--val", str(other.path),
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "fingerprint" in err and str(other.path) in err


def test_evaluation_report_per_generator(data, tmp_path) -> None:
    run = tmp_path / "run"
    assert main(train_args(data, run, "--epochs", "2")) == 0
    mixed = write_synthetic_cache(tmp_path / "test_mixed", num_samples=48, signal="lare", seed=3, layout=LAYOUT,
                                  generators=("sd", "glide"), error_rows=(5,))
    write_synthetic_cache(tmp_path / "test_mj", num_samples=16, signal="lare", seed=4, layout=LAYOUT,
                          generators=("midjourney",), fake_fraction=1.0)  # a fake-only generator
    assert main(["eval", str(run), "--test", str(tmp_path / "test_*"), "--report", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    rows = {r["generator"]: r for r in report["rows"]}
    assert set(rows) == {"sd", "glide", "midjourney"}
    assert report["extraction_errors"][str(mixed.path)] == 1

    # every row equals the metrics recomputed here from the detector's own scores
    model, config = load_detector(run)
    arrays = mixed.read(slice(None))
    p = score_features(model, arrays["pooled"], arrays["fmap"], arrays["lare"]).numpy()
    labels, gens, ok = mixed.column("label"), mixed.column("generator"), mixed.ok_mask()
    for gen in ("sd", "glide"):
        sel = ok & (gens == gen)
        expected = detection_metrics(labels[sel], p[sel], config.threshold)
        for key, value in expected.items():
            assert rows[gen][key] == pytest.approx(value, nan_ok=True, abs=1e-6), (gen, key)
        assert rows[gen]["reals_from"] == "generator"
    # the fake-only generator borrows the reals of all test caches (its own cache has none)
    assert rows["midjourney"]["reals_from"] == "all tests"
    assert rows["midjourney"]["n_fake"] == 16 and rows["midjourney"]["n_real"] == int(((labels == 0) & ok).sum())
    # pooled reals outnumber the fakes: ACC is balanced, so that many reals do not swamp 16 fakes
    midjourney = rows["midjourney"]
    assert midjourney["acc"] == pytest.approx((midjourney["real_acc"] + midjourney["fake_acc"]) / 2)
    assert report["mean"]["acc"] == pytest.approx(np.mean([rows[g]["acc"] for g in rows]))
    assert report["threshold"] == config.threshold

    with open(tmp_path / "report" / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["generator"] for r in table] == ["sd", "glide", "midjourney", "mean"]
    assert float(table[0]["auc"]) == pytest.approx(rows["sd"]["auc"])
    for png in ("roc.png", "acc_ap.png"):
        assert (tmp_path / "report" / png).read_bytes()[:4] == b"\x89PNG"

    stranger = write_synthetic_cache(tmp_path / "stranger", num_samples=16, signal="lare", seed=6, layout=LAYOUT,
                                     identity={"seed": 9})
    with pytest.raises(CheckpointError, match="fingerprint"):
        evaluate(run, [stranger.path], tmp_path / "r2")


def test_stage_2_never_loads_diffusers_or_the_extractor() -> None:
    import subprocess
    import sys

    from pathlib import Path

    # stage 2 and the cache fixtures its tests write with; run from the repository root so tests/ imports
    code = ("import sys, lare2.train.cli, lare2.train.trainer, lare2.train.report, tests.helpers.caches; "
            "bad = [m for m in sys.modules if m.split('.')[0] == 'diffusers' or m.startswith('lare2.extract')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_set_resume_false_starts_afresh(data, tmp_path, capsys) -> None:
    assert main(train_args(data, tmp_path / "run", "--stop-after-steps", "7")) == 3
    # resuming with another lr is refused (test above); --set resume=false must not be overridden by the flag default:
    # like --no-resume it refuses the run already there (exit 2), and with --overwrite starts afresh
    capsys.readouterr()
    assert main(train_args(data, tmp_path / "run", "--lr", "0.01", "--set", "resume=false")) == 2
    assert "already holds a run" in capsys.readouterr().err  # not the refusal to resume with another lr
    assert main(train_args(data, tmp_path / "run", "--lr", "0.01", "--set", "resume=false", "--overwrite")) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["lr"] == 0.01


def test_pending_samples_are_counted_and_reported(tmp_path, caplog) -> None:
    import logging

    from lare2.train.data import CacheSplit
    from tests.helpers.caches import CHUNK, ERROR_INDICES, build_tiny_cache

    from lare2.shared.cache import CacheError

    cache = build_tiny_cache(tmp_path, images=False)
    with pytest.raises(CacheError, match="4 of 24 samples are still pending .* --allow-pending"):
        CacheSplit(cache.path, ("lare",))  # an unfinished extraction is refused unless asked for
    lare2_logger = logging.getLogger("lare2")
    lare2_logger.addHandler(caplog.handler)
    try:
        split = CacheSplit(cache.path, ("lare",), allow_pending=True)
    finally:
        lare2_logger.removeHandler(caplog.handler)
    assert (split.num_pending, split.num_errors) == (CHUNK, len(ERROR_INDICES))
    assert split.num_ok == len(cache.ids) - CHUNK - len(ERROR_INDICES)
    assert any("4 of 24 samples are still pending" in r.getMessage() for r in caplog.records)


def test_same_generator_in_caches_with_the_same_folder_name(data, tmp_path) -> None:
    from lare2.train.report import generator_rows, score_caches

    run = tmp_path / "run"
    assert main(train_args(data, run, "--epochs", "1")) == 0
    paths = [write_synthetic_cache(tmp_path / d / "test", num_samples=32, signal="lare", seed=s, layout=LAYOUT,
                                   generators=("sd",)).path for d, s in (("a", 7), ("b", 8))]
    _, config, scored = score_caches(run, paths)
    rows, curves = generator_rows(scored, config.threshold)
    # one row and one curve per cache: the names must not collide, or a curve would overwrite the other
    assert len({r["generator"] for r in rows}) == len(curves) == 2
    assert [r["cache"] for r in rows] == [str(p) for p in paths]
