"""Splits never leak and complete means complete: extract writes one split per cache, train refuses
train = val and test data, eval warns on the training cache's ids, verify fails a --create-only cache;
the small-data warnings of manifests and calibration."""

from __future__ import annotations

import json
import logging

import pytest
import zarr
from lare2.shared.cache import CacheLayout, FeatureCache

from tests.helpers.caches import NUM_SAMPLES, build_tiny_cache, manifest_rows, write_synthetic_cache
from tests.helpers.cli_results import error_line, invoke
from tests.helpers.log_records import Logged

LAYOUT = CacheLayout(pooled_dim=16, fmap_shape=(16, 7, 7), lare_shape=(4, 16, 16), chunk_samples=16)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("splits")
    write_synthetic_cache(root / "train", num_samples=64, signal="lare", seed=1, layout=LAYOUT)
    write_synthetic_cache(root / "val", num_samples=48, signal="lare", seed=2, layout=LAYOUT)
    result = invoke("train", "--preset", "debug", "--train", root / "train", "--val", root / "val",
                    "--out", root / "run", "--epochs", "1", "--set", "progress=false", "--set", "head_dim=8")
    assert result.exit_code == 0, result.output
    return root


def train(root, val, out, *extra):
    return invoke("train", "--preset", "debug", "--train", root / "train", "--val", val, "--out", out, "--epochs", "1",
                  "--set", "progress=false", "--set", "head_dim=8", *extra)


def test_the_run_records_its_training_ids(caches):
    from lare2.train.checkpoint import load_detector
    from lare2.train.split_safety import ids_digest

    _, config = load_detector(caches / "run")
    expected = ids_digest(FeatureCache.open(caches / "train").column("sample_id"))
    assert config.train_ids_digest == expected
    assert json.loads((caches / "run" / "config.json").read_text())["train_ids_digest"] == expected


def test_train_refuses_the_training_cache_as_val(caches, tmp_path):
    result = train(caches, caches / "train", tmp_path / "run")
    line = error_line(result)
    assert result.exit_code == 2
    assert "shares 64 sample ids with the training cache" in line and "(the same cache?)" in line
    assert "--allow-overlap" in line and not (tmp_path / "run" / "config.json").exists()
    assert train(caches, caches / "train", tmp_path / "run", "--allow-overlap").exit_code == 0  # for those who mean it


def test_train_refuses_a_val_cache_sharing_some_ids(caches, tmp_path):
    val = write_synthetic_cache(tmp_path / "val", num_samples=48, signal="lare", seed=2, layout=LAYOUT).path
    group = zarr.open_group(val, mode="r+")
    ids = group["meta/sample_id"][:]
    ids[:3] = ["s1-000000", "s1-000001", "s1-000002"]  # three training samples slipped into val
    group["meta/sample_id"][:] = ids
    result = train(caches, val, tmp_path / "run")
    assert result.exit_code == 2 and f"{val}: shares 3 sample ids" in error_line(result)


def test_train_refuses_a_test_cache_as_val(caches, tmp_path):
    val = write_synthetic_cache(tmp_path / "val", num_samples=48, signal="lare", seed=3, layout=LAYOUT).path
    group = zarr.open_group(val, mode="r+")
    group.attrs["extract_config"] = {"split": "test"}
    result = train(caches, val, tmp_path / "run")
    line = error_line(result)
    assert result.exit_code == 2 and f"{val}: the validation cache was extracted from the test split" in line


def test_eval_warns_loudly_on_the_training_ids(caches, tmp_path, caplog):
    with Logged(caplog) as log:
        result = invoke("eval", caches / "run", "--test", caches / "train", "--report", tmp_path / "r", "--no-plots")
    assert result.exit_code == 0, result.output
    (leak,) = [m for m in log.messages(logging.WARNING) if m.startswith("LEAK:")]
    assert f"{caches / 'train'} is the run's training cache (same sample ids)" in leak and "\n" not in leak

    part = write_synthetic_cache(tmp_path / "test", num_samples=32, signal="lare", seed=4, layout=LAYOUT).path
    group = zarr.open_group(part, mode="r+")
    ids = group["meta/sample_id"][:]
    ids[:5] = [f"s1-{i:06d}" for i in range(5)]
    group["meta/sample_id"][:] = ids
    caplog.clear()
    with Logged(caplog) as log:
        assert invoke("eval", caches / "run", "--test", part, "--report", tmp_path / "r2", "--no-plots").exit_code == 0
    (leak,) = [m for m in log.messages(logging.WARNING) if m.startswith("LEAK:")]
    assert "shares 5 sample ids with the run's training cache" in leak
    caplog.clear()
    with Logged(caplog) as log:
        assert invoke("eval", caches / "run", "--test", part, "--report", tmp_path / "r3", "--no-plots",
                      "--allow-overlap").exit_code == 0
    assert not [m for m in log.messages(logging.WARNING) if m.startswith("LEAK:")]
    # a test cache of its own: not a word
    clean = write_synthetic_cache(tmp_path / "clean", num_samples=32, signal="lare", seed=6, layout=LAYOUT).path
    caplog.clear()
    with Logged(caplog) as log:
        assert invoke("eval", caches / "run", "--test", clean, "--report", tmp_path / "r4", "--no-plots").exit_code == 0
    assert not [m for m in log.messages(logging.WARNING) if "LEAK" in m]


def test_calibration_warns_when_the_threshold_rests_on_few_reals(caches, caplog):
    with Logged(caplog) as log:
        assert invoke("calibrate", caches / "run", "--val", caches / "val").exit_code == 0
    reals = int((FeatureCache.open(caches / "val").column("label") == 0).sum())
    assert reals < 100
    assert any(f"the threshold rests on {reals} validation reals" in m for m in log.messages(logging.WARNING))


def test_extract_requires_a_split_and_writes_each_split_apart(tmp_path):
    tiny = build_tiny_cache(tmp_path / "tiny", images=True)  # its manifest holds train and val rows
    result = invoke("extract", "--manifest", tiny.manifest, "--preset", "debug", "--device", "cpu")
    line = error_line(result)
    assert result.exit_code == 2 and "holds the splits train, val" in line
    assert "pass --split SPLIT (writes cache/SPLIT)" in line and "--all-splits" in line

    out = tmp_path / "caches"
    result = invoke("extract", "--manifest", tiny.manifest, "--preset", "debug", "--device", "cpu", "--all-splits",
                    "--out", out, "--image-size", "32", "--json")
    assert result.exit_code == 0, result.output
    summaries = json.loads(result.stdout)
    assert [s["cache"] for s in summaries] == [str(out / "train"), str(out / "val")]
    rows = manifest_rows()
    for split in ("train", "val"):
        cache = FeatureCache.open(out / split)
        wanted = [i for i, s in zip(rows["sample_id"], rows["split"]) if s == split]
        assert list(cache.column("sample_id")) == wanted and set(cache.column("split")) == {split}
        assert cache.attrs["extract_config"]["split"] == split and cache.pending_blocks() == []
    assert sum(len(FeatureCache.open(out / s)) for s in ("train", "val")) == NUM_SAMPLES


def test_verify_fails_a_create_only_cache_saying_how_many_blocks_are_pending(tmp_path):
    tiny = build_tiny_cache(tmp_path / "tiny", images=True)
    out = tmp_path / "created"
    result = invoke("extract", "--manifest", tiny.manifest, "--split", "train", "--preset", "debug", "--device", "cpu",
                    "--out", out, "--create-only")
    assert result.exit_code == 0, result.output
    blocks = FeatureCache.open(out).num_blocks
    result = invoke("cache", "verify", out, "--json")
    (pending,) = [f for f in json.loads(result.stdout)["errors"] if f["check"] == "status"]
    assert result.exit_code == 1 and pending["message"].startswith(f"incomplete: {blocks} of {blocks} blocks")
    assert pending["count"] == blocks
    assert invoke("cache", "verify", out, "--allow-pending").exit_code == 0


def test_manifest_show_warns_about_an_empty_or_tiny_val_split(tmp_path, caplog):
    from lare2.shared.manifest import split_warnings

    tiny = build_tiny_cache(tmp_path / "tiny", images=False)
    result = invoke("manifest", "show", tiny.manifest, "--json")
    warnings = json.loads(result.stdout)["warnings"]
    reals_in_val = sum(1 for s, g in zip(tiny.rows["split"], tiny.rows["label"]) if s == "val" and g == 0)
    assert result.exit_code == 0 and f"the val split has only {reals_in_val} usable real images (fewer than 100): " \
        "too few to select and calibrate on" in warnings
    with Logged(caplog) as log:
        assert invoke("manifest", "show", tiny.manifest).exit_code == 0
    assert any("too few to select and calibrate on" in m for m in log.messages(logging.WARNING))
    train_only = [{"split": "train", "generator": "g", "label": label, "count": 500, "errors": 0} for label in (0, 1)]
    assert split_warnings(train_only)[0].startswith("no val rows")
    assert split_warnings(train_only + [{**c, "split": "val", "count": 120} for c in train_only]) == []
    assert split_warnings([{**c, "split": "test"} for c in train_only]) == []  # test data only: nothing to train
