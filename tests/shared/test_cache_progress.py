"""``lare2 cache progress``: blocks and samples per shard, the rate from the done marks, the shards left."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from lare2.cli import app
from lare2.shared.cache import CacheLayout, FeatureCache
from lare2.shared.cache.progress import array_spec, cache_progress, missing_shards

LAYOUT = CacheLayout(lare_shape=(4, 2, 2), pooled_dim=3, fmap_shape=(2, 14, 14), chunk_samples=4)
NUM_SAMPLES = 30  # 8 blocks, the last of 2 samples
NOW = 1_800_000_000.0


def _rows(n: int) -> dict:
    return {"sample_id": [f"s{i:03d}" for i in range(n)], "path": [f"{i}.png" for i in range(n)],
            "label": [i % 2 for i in range(n)], "generator": ["g"] * n, "split": ["train"] * n, "class_name": [""] * n}


def _write(cache: FeatureCache, block: int) -> None:
    sl = cache.block_slice(block)
    n = sl.stop - sl.start
    cache.write_block(block, lare=np.zeros((n, *LAYOUT.lare_shape)), pooled=np.zeros((n, LAYOUT.pooled_dim)),
                      fmap=np.zeros((n, *LAYOUT.fmap_shape)), seed=[1] * n, status=["ok"] * n, error=[""] * n)


def _mark_time(cache: FeatureCache, block: int, when: float) -> None:
    os.utime(cache.path / "block_done" / "c" / str(block), (when, when))


@pytest.fixture
def cache(tmp_path) -> FeatureCache:
    """3 shards (as created by `--create-only --num-shards 3`); blocks 0, 1, 3, 4 and 7 done."""
    cache = FeatureCache.create(tmp_path / "train", _rows(NUM_SAMPLES), LAYOUT, {"extract_config": {"num_shards": 3}})
    for block, seconds_ago in ((0, 900), (3, 100), (1, 80), (4, 40), (7, 20)):
        _write(cache, block)
        _mark_time(cache, block, NOW - seconds_ago)
    return cache


def test_counts_per_shard_rate_eta_and_missing_shards(cache):
    report = cache_progress(cache.path, now=NOW)
    assert report.num_shards == 3  # as recorded at creation
    assert (report.blocks_done, report.blocks, report.samples_done, report.samples) == (5, 8, 18, 30)
    # shard s owns blocks b % 3 == s: shard 0 {0, 3, 6}, shard 1 {1, 4, 7 (2 samples)}, shard 2 {2, 5}
    assert [(s.blocks_done, s.blocks, s.samples_done, s.samples) for s in report.shards] == [
        (2, 3, 8, 12), (3, 3, 10, 10), (0, 2, 0, 8)]
    # marks of the last 10 min: blocks 3, 1, 4, 7 at -100, -80, -40, -20 s; after the first: 4 + 4 + 2 samples in 80 s
    assert report.recent_marks == 4
    assert report.samples_per_s == pytest.approx(10 / 80)
    assert report.eta_s == pytest.approx(12 / (10 / 80))
    assert report.last_done_age_s == pytest.approx(20)
    assert report.missing_shards == [0, 2] and report.array == "0,2"
    assert not report.complete


def test_another_number_of_shards_and_a_complete_cache(cache):
    report = cache_progress(cache.path, num_shards=8, now=NOW)
    assert report.missing_shards == [2, 5, 6] and report.array == "2,5-6"
    assert [s.blocks_done for s in report.shards] == [1, 1, 0, 1, 1, 0, 0, 1]
    for block in (2, 5, 6):
        _write(cache, block)
    done = cache_progress(cache.path, now=NOW + 10_000)
    assert done.complete and done.eta_s == 0 and done.array == "" and done.missing_shards == []
    assert done.samples_per_s is None and done.recent_marks == 0  # nothing in the last 10 min of that clock


def test_rate_unknown_until_two_recent_marks(tmp_path):
    fresh = FeatureCache.create(tmp_path / "fresh", _rows(8), LAYOUT)
    report = cache_progress(fresh.path, now=NOW)
    assert report.num_shards == 1 and report.samples_per_s is None and report.eta_s is None
    assert report.last_done_age_s is None and report.array == "0"


@pytest.mark.parametrize("indices,spec", [([], ""), ([3], "3"), ([1, 4, 5, 6], "1,4-6"), ([6, 5, 4, 1, 1], "1,4-6"),
                                          ([0, 1, 2, 3], "0-3"), ([0, 2, 4], "0,2,4"), ([9, 10, 12, 13], "9-10,12-13")])
def test_array_spec(indices, spec):
    assert array_spec(indices) == spec


def test_missing_shards_are_those_with_a_pending_block():
    done = np.array([1, 1, 0, 1, 1, 1, 0, 1], dtype=bool)
    assert missing_shards(done, 3) == [0, 2]
    assert missing_shards(done, 1) == [0]
    assert missing_shards(np.ones(4, dtype=bool), 2) == []


def test_cli_table_json_and_errors(cache, tmp_path):
    shown = CliRunner().invoke(app, ["cache", "progress", str(cache.path)])
    assert shown.exit_code == 0, shown.output
    assert "5/8 blocks, 18/30 samples done (60.0%), 3 shards" in shown.output
    assert "--array=0,2" in shown.output and "ETA" in shown.output
    as_json = CliRunner().invoke(app, ["cache", "progress", str(cache.path), "--num-shards", "2", "--json"])
    assert as_json.exit_code == 0, as_json.output
    document = json.loads(as_json.output)
    assert document["num_shards"] == 2 and document["array"] == "0-1" and len(document["shards"]) == 2
    assert document["samples_done"] == 18 and document["complete"] is False
    missing = CliRunner().invoke(app, ["cache", "progress", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "error:" in missing.output and "nothing" in missing.output
    bad = CliRunner().invoke(app, ["cache", "progress", str(cache.path), "--num-shards", "0"])
    assert bad.exit_code == 2 and "--num-shards 0" in bad.output
