"""``lare2 extract --submit slurm`` against a real scheduler (a private single-node SLURM).

The array of 2 shards is submitted as a user would; while it runs, one task is requeued by the
scheduler (as a preemption does) and the other gets the time-limit warning (``USR1`` to its shell,
as ``--signal=B:USR1@120`` sends it), on which the job script stops the extraction and requeues the
task itself. Both come back and finish their shards without redoing their done blocks, and the
cache equals a one-process extraction bit for bit and verifies. Then one block is damaged and
``cache repair`` resets it: ``--only-missing`` submits exactly that block's shard, and the cache
is whole again.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from typer.testing import CliRunner

from lare2.cli import app
from lare2.extract.run import run_extraction
from lare2.extract.submit import job_folder
from lare2.shared.cache import ARRAY_NAMES
from lare2.shared.cache.progress import cache_progress
from lare2.shared.config import debug
from tests.helpers import slurm as slurm_fixtures
from tests.helpers.one_thread_runs import cache_contents, image_tree_manifest, one_torch_thread
from tests.helpers.slurm import Slurm

private_slurm = slurm_fixtures.private_slurm  # the fixture, found by name in this module
pytestmark = pytest.mark.slow

NUM_IMAGES, SHARDS = 64, 2  # one sample per block: 32 blocks per shard (a few seconds), so a task is caught mid-run
SETTINGS = {"chunk_samples": 1, "batch_size": 1, "image_size": 64, "ensemble": 2, "num_workers": 0}
TASK_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return image_tree_manifest(tmp_path_factory.mktemp("slurm"), NUM_IMAGES)


@pytest.fixture(scope="module")
def reference(manifest) -> dict:
    """One uninterrupted one-process extraction, one thread (as each task runs)."""
    out = manifest.parent / "reference"
    with one_torch_thread():
        run_extraction(debug(manifest=str(manifest), out=str(out), device="cpu", **SETTINGS))
    return cache_contents(out)


def _assert_equals_reference(out: Path, reference: dict) -> None:
    got = cache_contents(out)
    assert got["done"].all()
    assert got["meta"] == reference["meta"]
    for name in ARRAY_NAMES:
        np.testing.assert_array_equal(got["arrays"][name], reference["arrays"][name], err_msg=name)
    verified = CliRunner().invoke(app, ["cache", "verify", str(out)])
    assert verified.exit_code == 0, verified.output


def _submit(manifest: Path, out: Path, *args: str) -> tuple[str, str]:
    sets = [arg for key, value in SETTINGS.items() for arg in ("--set", f"{key}={value}")]
    result = CliRunner().invoke(app, ["extract", "--manifest", str(manifest), "--out", str(out), "--preset", "debug",
                                      "--device", "cpu", *sets, "--submit", "slurm", *args])
    assert result.exit_code == 0, result.output
    found = re.search(r"submitted array job (\d+): --array=(\S+) of", result.output)
    assert found, result.output
    assert f"lare2 cache progress {out} --num-shards {SHARDS}" in result.output
    return found.group(1), found.group(2)


def _interrupt_mid_run(out: Path, interrupts: dict[int, Callable[[], object]], slurm: Slurm,
                       job: str) -> dict[int, int]:
    """Interrupt each shard's task as soon as it has done a block and not all, watching ``cache progress`` as the
    array runs; {shard: its blocks done at that moment}."""
    caught: dict[int, int] = {}
    deadline = time.monotonic() + TASK_TIMEOUT_S
    while len(caught) < len(interrupts):
        progress = cache_progress(out)
        for shard, interrupt in interrupts.items():
            done, blocks = progress.shards[shard].blocks_done, progress.shards[shard].blocks
            if shard not in caught and 0 < done:
                assert done < blocks, f"shard {shard} finished before it could be interrupted: {progress.shards}"
                interrupt()
                caught[shard] = done
        assert time.monotonic() < deadline, f"no progress: {slurm.tasks(job)}\n{slurm.logs()}"
        time.sleep(0.05)
    return caught


def _runs(log: Path) -> list[tuple[int, int]]:
    """(images computed, blocks already done) of each run a task log records."""
    text = log.read_text()
    runs = re.findall(r"computed (\d+) images?.*?(\d+)\s+blocks?\s+w(?:as|ere)\s+already\s+done", text, flags=re.DOTALL)
    return [(int(a), int(b)) for a, b in runs]


def test_submit_requeue_only_missing(private_slurm, manifest, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", private_slurm.env["SLURM_CONF"])
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # sbatch passes the environment on: one thread per task
        monkeypatch.setenv(name, "1")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "cache" / "train"

    job, array = _submit(manifest, out, "--array", str(SHARDS))
    assert array == "0-1" and (out / "zarr.json").exists()
    scripts = list(job_folder(out).glob("extract-*.sbatch"))
    assert len(scripts) == 1 and "#SBATCH --array=0-1\n" in scripts[0].read_text()  # kept beside the cache

    caught = _interrupt_mid_run(out, {
        0: lambda: private_slurm.run("scancel", "--batch", "--signal=USR1", f"{job}_0"),  # the time-limit warning
        1: lambda: private_slurm.run("scontrol", "requeue", f"{job}_1"),  # taken back, as a preemption does
    }, private_slurm, job)
    # task 1, requeued by the scheduler, waits 120 s unless released; task 0's script requeued and released itself
    private_slurm.release(f"{job}_1")
    states = private_slurm.wait_until_done(job, TASK_TIMEOUT_S)
    assert states == {f"{job}_0": "COMPLETED", f"{job}_1": "COMPLETED"}, private_slurm.logs()

    per_shard = len(reference["done"]) // SHARDS
    for shard in (0, 1):
        log = job_folder(out) / "logs" / f"{job}_{shard}.out"
        text = log.read_text()
        assert "run 2," in text, text  # requeued: a second run of the same task, appended to its log
        last_computed, already_done = _runs(log)[-1]
        assert already_done >= caught[shard] and 0 < last_computed < per_shard, text  # it did not start over
    requeued_itself = (job_folder(out) / "logs" / f"{job}_0.out").read_text()
    assert "requeueing this task" in requeued_itself and "early restart failed" not in requeued_itself
    _assert_equals_reference(out, reference)

    # damage one block of shard 1; repair marks it for re-extraction; only that shard is submitted again
    damaged = 3
    chunk = next((out / "fmap" / "c" / str(damaged)).rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    chunk.unlink()
    repaired = CliRunner().invoke(app, ["cache", "repair", str(out)])
    assert repaired.exit_code == 0 and f"block {damaged}" in repaired.output, repaired.output
    assert cache_progress(out).missing_shards == [damaged % SHARDS]
    again, array = _submit(manifest, out, "--only-missing")  # the shard count from the submit record
    assert array == str(damaged % SHARDS)
    states = private_slurm.wait_until_done(again, TASK_TIMEOUT_S)
    assert states == {f"{again}_{damaged % SHARDS}": "COMPLETED"}, private_slurm.logs()
    assert _runs(job_folder(out) / "logs" / f"{again}_{damaged % SHARDS}.out") == [(1, per_shard - 1)]
    _assert_equals_reference(out, reference)
