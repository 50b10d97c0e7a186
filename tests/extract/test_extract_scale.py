"""Stage 1 at cluster scale, with tiny models on the CPU: the cache is the same whatever the split.

One reference run, then the same selection extracted by 2 processes (``torchrun``), by 3 array-job
shards out of order (and at once), and by runs SIGKILLed at random points and resumed: every cache
must equal the reference sample by sample, bit for bit. Bitwise equality holds because a batch
never spans two blocks (same block -> same batches) and every run uses one CPU thread per process
(the thread count changes the rounding of batched kernels by ~1e-7 relative).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lare2.extract.plan import shard_blocks
from lare2.extract.run import rank_blocks, remove_stale_staging, run_extraction, staging_folders
from lare2.shared.cache import ARRAY_NAMES, STATUS_PENDING, FeatureCache
from lare2.shared.config import debug
from tests.helpers import one_thread_runs
from tests.helpers.bad_images import truncated
from tests.helpers.one_thread_runs import cache_contents, image_tree_manifest, one_torch_thread

NUM_GOOD, CHUNK = 16, 3  # + 1 broken image = 17 samples = 6 blocks, the last one short
SETTINGS = {"chunk_samples": CHUNK, "batch_size": 2, "image_size": 64, "ensemble": 2, "num_workers": 0}
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _config(manifest: Path, out: Path, **overrides):
    return debug(**{"manifest": str(manifest), "out": str(out), "device": "cpu", **SETTINGS, **overrides})


def _cli_args(manifest: Path, out: Path, *extra: str) -> list[str]:
    sets = [arg for key, value in SETTINGS.items() for arg in ("--set", f"{key}={value}")]
    return ["--manifest", str(manifest), "--out", str(out), "--preset", "debug", *sets, "--json", *extra]


def _subprocess_env() -> dict[str, str]:
    return {**os.environ, **ONE_THREAD_ENV}


def _last_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


one_thread = one_thread_runs.one_thread  # the fixture, found by name in this module


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    broken = {"gen-x/train/1_fake/5_broken.jpg": truncated()}  # an error row, the same everywhere
    return image_tree_manifest(tmp_path_factory.mktemp("scale"), NUM_GOOD, extra_files=broken)


@pytest.fixture(scope="module")
def reference(manifest) -> dict:
    """One uninterrupted single-process run: arrays + metadata of every sample."""
    out = manifest.parent / "reference"
    with one_torch_thread():
        summary = run_extraction(_config(manifest, out))
    cache = FeatureCache.open(out)
    assert summary.computed == len(cache) == NUM_GOOD + 1 and summary.failed == 1
    assert cache.num_blocks == 6 and len(range(*cache.block_slice(5).indices(len(cache)))) == 2
    return _contents(out)


def _contents(path: Path) -> dict:
    return {**cache_contents(path), "counts": FeatureCache.open(path).attrs.get("counts")}


def _assert_same_cache(path: Path, reference: dict) -> None:
    got = _contents(path)
    assert got["done"].all()
    assert got["meta"] == reference["meta"]  # ids, paths, labels, seeds, status and errors, in order
    assert got["counts"] == reference["counts"] == {"ok": NUM_GOOD, "error": 1, "pending": 0}
    for name in ARRAY_NAMES:
        assert got["arrays"][name].dtype == reference["arrays"][name].dtype
        np.testing.assert_array_equal(got["arrays"][name], reference["arrays"][name], err_msg=name)  # NaN == NaN here


def _samples_in(cache: FeatureCache, blocks) -> int:
    return sum(len(range(*cache.block_slice(b).indices(len(cache)))) for b in blocks)


# ---- the split of the work ------------------------------------------------------------------------
@pytest.mark.parametrize("num_blocks,num_shards,world", [(6, 1, 1), (6, 3, 2), (83, 4, 8), (5, 8, 3)])
def test_shards_and_ranks_partition_the_blocks(num_blocks, num_shards, world):
    owners: dict[int, tuple[int, int]] = {}
    for shard in range(num_shards):
        pending = shard_blocks(num_blocks, num_shards, shard)
        shares = [rank_blocks(pending, rank, world) for rank in range(world)]
        assert max(map(len, shares)) - min(map(len, shares)) <= 1  # balanced
        for rank, share in enumerate(shares):
            for block in share:
                assert block not in owners, f"block {block} given to {owners[block]} and {(shard, rank)}"
                owners[block] = (shard, rank)
    assert sorted(owners) == list(range(num_blocks))


# ---- array jobs -----------------------------------------------------------------------------------
def test_array_shards_out_of_order_equal_one_run(manifest, reference, tmp_path, one_thread):
    out = tmp_path / "sharded"
    created = run_extraction(_config(manifest, out, num_shards=3, shard_index=0), create_only=True)  # before the array
    assert created.computed == 0 and created.counts == {"ok": 0, "error": 0, "pending": NUM_GOOD + 1}
    assert not FeatureCache.open(out).done_blocks().any()
    for step, shard in enumerate((2, 0, 1)):
        summary = run_extraction(_config(manifest, out, num_shards=3, shard_index=shard))
        cache = FeatureCache.open(out)
        owned = shard_blocks(cache.num_blocks, 3, shard)
        assert summary.computed == _samples_in(cache, owned) and summary.skipped_blocks == 0
        done_so_far = [b for s in (2, 0, 1)[: step + 1] for b in shard_blocks(cache.num_blocks, 3, s)]
        assert sorted(np.flatnonzero(cache.done_blocks())) == sorted(done_so_far)  # nothing of other shards
        assert summary.counts[STATUS_PENDING] == len(cache) - _samples_in(cache, done_so_far)
    _assert_same_cache(out, reference)

    again = run_extraction(_config(manifest, out, num_shards=3, shard_index=1))  # a retried array task
    assert again.computed == 0 and again.skipped_blocks == len(shard_blocks(6, 3, 1))
    _assert_same_cache(out, reference)


@pytest.mark.slow
def test_concurrent_array_jobs_race_to_create_one_store(manifest, reference, tmp_path):
    out = tmp_path / "concurrent"
    jobs = [subprocess.Popen([sys.executable, "-m", "lare2.extract", *_cli_args(manifest, out, "--num-shards", "3",
                                                                             "--shard-index", str(shard))],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_subprocess_env())
            for shard in (1, 2, 0)]
    results = [job.communicate(timeout=300) for job in jobs]
    for job, (stdout, stderr) in zip(jobs, results):
        assert job.returncode == 0, stderr[-3000:]
    assert sum(_last_json(stdout)["computed"] for stdout, _ in results) == NUM_GOOD + 1  # each block once
    assert staging_folders(out) == []  # the creators that lost the race cleaned up after themselves
    # no recount here: whichever job counted last, only a count of the finished cache was recorded
    _assert_same_cache(out, reference)


# ---- several processes ----------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_equal_one_process(manifest, reference, tmp_path):
    out = tmp_path / "two_processes"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lare2.extract"]
    done = subprocess.run([*launch, *_cli_args(manifest, out)], capture_output=True, text=True, timeout=300,
                          env=_subprocess_env())
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1  # only the main process reports
    assert summaries[0]["processes"] == 2  # a real 2-rank job (gloo), not two copies of a 1-process job
    assert summaries[0]["computed"] == NUM_GOOD + 1 and summaries[0]["failed"] == 1  # summed over ranks, each once
    _assert_same_cache(out, reference)


# ---- SIGKILL and resume ---------------------------------------------------------------------------
def _kill_when(process: subprocess.Popen, ready, delay: float = 0.0, timeout: float = 240.0) -> None:
    """Poll ``ready()`` until true, wait ``delay`` seconds, then SIGKILL the process."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"the run ended before the kill point: {process.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "the kill point never came"
        time.sleep(0.002)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL


def _done_count(out: Path):
    cache = None

    def count() -> int:
        nonlocal cache
        if cache is None:
            if not (out / "zarr.json").exists():
                return 0
            cache = FeatureCache.open(out)
        return int(cache.group["block_done"][:].sum())

    return count


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_sigkill_during_extraction_then_rerun_equals_one_run(manifest, reference, tmp_path, seed, one_thread):
    rng = random.Random(seed)
    out = tmp_path / f"killed_{seed}"
    kill_after = rng.randint(1, 4)  # blocks done (of 6) before the kill ...
    extra_wait = rng.uniform(0.0, 0.05)  # ... and then a moment more: the kill lands anywhere in the next block
    process = subprocess.Popen([sys.executable, "-m", "lare2.extract", *_cli_args(manifest, out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_subprocess_env())
    done_count = _done_count(out)
    _kill_when(process, lambda: done_count() >= kill_after, delay=extra_wait)

    cache = FeatureCache.open(out)
    done = cache.done_blocks()
    assert kill_after <= done.sum() < cache.num_blocks, f"killed after {done.sum()} blocks"
    missing = _samples_in(cache, np.flatnonzero(~done))

    rerun = run_extraction(_config(manifest, out))
    assert rerun.computed == missing  # done blocks are never recomputed, the rest exactly once
    assert rerun.skipped_blocks == int(done.sum())
    _assert_same_cache(out, reference)


@pytest.mark.slow
def test_sigkill_during_cache_creation_then_rerun(manifest, reference, tmp_path, one_thread):
    out = tmp_path / "killed_creating"
    process = subprocess.Popen([sys.executable, "-m", "lare2.extract", *_cli_args(manifest, out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_subprocess_env())
    _kill_when(process, lambda: bool(staging_folders(out)))
    assert not (out / "zarr.json").exists()  # the half-made store was never renamed into place
    (leftover,) = staging_folders(out)
    for folder, _, _ in os.walk(leftover):  # as if it was killed long ago
        os.utime(folder, (time.time() - 7200, time.time() - 7200))

    fresh = out.with_name(f".{out.name}.creating-0123abcd")  # a concurrent creator still at work: left alone
    fresh.mkdir()
    rerun = run_extraction(_config(manifest, out))
    assert rerun.computed == NUM_GOOD + 1
    assert staging_folders(out) == [fresh]
    _assert_same_cache(out, reference)


def test_stale_staging_is_removed_and_fresh_kept(tmp_path):
    out = tmp_path / "cache"
    stale, fresh = (tmp_path / f".cache.creating-{tag}" for tag in ("aaaa0000", "bbbb1111"))
    for folder in (stale, fresh):
        (folder / "meta" / "status" / "c").mkdir(parents=True)
    (tmp_path / ".other.creating-cccc2222").mkdir()  # another cache's: not ours to judge
    old = time.time() - 7200
    for folder, _, _ in os.walk(stale):
        os.utime(folder, (old, old))
    os.utime(fresh, (old, old))  # its top is old, but a chunk was written deep inside a moment ago
    assert remove_stale_staging(out, older_than_s=3600) == [stale]
    assert not stale.exists() and fresh.exists() and (tmp_path / ".other.creating-cccc2222").exists()
    assert staging_folders(out) == [fresh]
