"""SIGTERM/SIGUSR1 stop an extraction after the batch in flight: finished blocks are written, at most the
unfinished block is lost, the exit code says "rerun to resume", and the resumed cache equals one run.

Runs with tiny models on the CPU, one thread per process (bitwise equality, as in test_extract_scale).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lare2.extract.preemption import stop_on_signals
from lare2.extract.run import run_extraction
from lare2.shared.cache import ARRAY_NAMES, FeatureCache
from lare2.shared.cache.verify import verify_cache
from lare2.shared.cli_errors import EXIT_PREEMPTED
from lare2.shared.config import debug
from tests.helpers import one_thread_runs
from tests.helpers.one_thread_runs import cache_contents, image_tree_manifest

NUM_GOOD, CHUNK = 20, 4  # 5 blocks of 4 batches each (batch 1): a signal mostly lands inside a block
SETTINGS = {"chunk_samples": CHUNK, "batch_size": 1, "image_size": 64, "ensemble": 2, "num_workers": 1}


one_thread = one_thread_runs.one_thread  # the fixture, found by name in this module


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return image_tree_manifest(tmp_path_factory.mktemp("preemption"), NUM_GOOD)


def _config(manifest: Path, out: Path):
    return debug(manifest=str(manifest), out=str(out), device="cpu", **SETTINGS)


def _samples_in(cache: FeatureCache, blocks) -> int:
    return sum(len(range(*cache.block_slice(int(b)).indices(len(cache)))) for b in blocks)


def _done_blocks(out: Path) -> int:
    if not (out / "zarr.json").exists():
        return 0
    return int(FeatureCache.open(out).done_blocks().sum())


def test_stop_signals_set_the_request_and_the_old_handlers_come_back():
    def previous(signum, frame):  # a handler of the program around the job
        raise AssertionError("the job's handler should have taken the signal")

    before = signal.signal(signal.SIGUSR1, previous)
    try:
        with stop_on_signals() as stop:
            assert not stop.requested
            os.kill(os.getpid(), signal.SIGUSR1)  # handled between two bytecodes of this thread
            time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
        assert stop.signal == signal.SIGUSR1 and stop.name == "SIGUSR1"  # the first one counts
        assert signal.getsignal(signal.SIGUSR1) is previous
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR1, before)


def test_sigterm_mid_block_loses_at_most_that_block_then_resume_equals_one_run(manifest, tmp_path, one_thread):
    out = tmp_path / "stopped"
    sets = [arg for key, value in SETTINGS.items() for arg in ("--set", f"{key}={value}")]
    # its own process group, signalled whole as a scheduler does: the loader worker gets SIGTERM too
    process = subprocess.Popen([sys.executable, "-m", "lare2.extract", "--manifest", str(manifest), "--out", str(out),
                                "--preset", "debug", *sets, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
                               start_new_session=True)
    deadline = time.monotonic() + 240
    while (done_before := _done_blocks(out)) < 1:
        assert process.poll() is None, f"the run ended before the signal: {process.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "no block was ever done"
        time.sleep(0.002)
    os.killpg(process.pid, signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)

    assert process.returncode == EXIT_PREEMPTED, stderr[-3000:]
    summary = json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])
    cache = FeatureCache.open(out)
    done = cache.done_blocks()
    assert done_before <= done.sum() < cache.num_blocks, f"stopped with {done.sum()} blocks done"
    assert not done[int(done.sum()):].any()  # one process, blocks in order: the done ones are a prefix
    assert summary["stopped"] and "SIGTERM received" in stderr
    # every sample it computed is in a done block, except those of the one unfinished block
    assert summary["computed"] == _samples_in(cache, np.flatnonzero(done))
    assert 0 <= summary["discarded"] < CHUNK
    assert "DataLoader worker" not in stderr  # the worker ignored the signal; the loop shut it down

    resumed = run_extraction(_config(manifest, out))
    assert not resumed.stopped and resumed.skipped_blocks == int(done.sum())
    assert resumed.computed == _samples_in(cache, np.flatnonzero(~done))
    assert verify_cache(out).ok

    reference = tmp_path / "reference"
    run_extraction(_config(manifest, reference))
    got, want = cache_contents(out), cache_contents(reference)
    assert got["done"].all() and got["meta"] == want["meta"]
    for name in ARRAY_NAMES:
        np.testing.assert_array_equal(got["arrays"][name], want["arrays"][name], err_msg=name)
