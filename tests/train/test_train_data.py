"""Epoch batches: one rank sees every ok sample once; several ranks read disjoint windows of blocks
(together, the split once) and take the same number of full steps; the order follows the seed."""

from __future__ import annotations

import numpy as np
import pytest

from lare2.shared.cache import CacheError, CacheLayout
from lare2.train.data import CacheSplit
from tests.helpers.block_reads import blocks_read
from tests.helpers.caches import write_synthetic_cache

LAYOUT = CacheLayout(pooled_dim=8, fmap_shape=(8, 7, 7), lare_shape=(4, 8, 8), chunk_samples=8)
BATCH = 10


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    path = write_synthetic_cache(tmp_path_factory.mktemp("data") / "train", num_samples=203, signal="lare", seed=4,
                                 layout=LAYOUT).path  # 26 blocks, the last one partial
    return CacheSplit(path, ("lare",))


def batches_of(split: CacheSplit, **kwargs) -> tuple[list[np.ndarray], list[int]]:
    """Index arrays of the batches one rank yields, and the blocks it read."""
    with blocks_read(split) as read:
        return [b.index for b in split.epoch_batches(batch_size=BATCH, **kwargs)], read


def test_one_rank_sees_every_ok_sample_once_in_a_seeded_order(split):
    indices, read = batches_of(split, epoch=0, seed=1, shuffle_blocks=4)
    assert len(indices) == split.num_batches(batch_size=BATCH, shuffle_blocks=4) == -(-split.num_ok // BATCH)
    flat = np.concatenate(indices)
    assert sorted(flat.tolist()) == np.flatnonzero(split.ok).tolist()
    assert sorted(read) == split.ok_blocks
    again, _ = batches_of(split, epoch=0, seed=1, shuffle_blocks=4)
    other, _ = batches_of(split, epoch=1, seed=1, shuffle_blocks=4)
    assert np.array_equal(flat, np.concatenate(again)) and not np.array_equal(flat, np.concatenate(other))


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_read_disjoint_blocks_and_take_the_same_full_steps(split, world_size):
    runs = [batches_of(split, epoch=2, seed=5, shuffle_blocks=4, rank=r, world_size=world_size)
            for r in range(world_size)]
    steps = split.num_batches(batch_size=BATCH, shuffle_blocks=4, world_size=world_size, epoch=2, seed=5)
    assert steps >= split.num_ok // BATCH // world_size - 2  # little is dropped to keep the ranks in step
    read_by_rank = [set(read) for _, read in runs]
    union = set().union(*read_by_rank)
    assert sum(len(r) for r in read_by_rank) == len(union)  # no block read by two ranks
    # a rank stops once in step
    assert union <= set(split.ok_blocks) and len(union) >= len(split.ok_blocks) - world_size
    seen = [np.concatenate(indices) for indices, _ in runs]
    for indices, _ in runs:
        assert len(indices) == steps and all(len(b) == BATCH for b in indices)
    assert len(np.unique(np.concatenate(seen))) == sum(len(s) for s in seen)  # no sample on two ranks


def test_more_ranks_than_blocks_is_refused(split):
    with pytest.raises(CacheError, match="fewer than the"):
        next(split.epoch_batches(epoch=0, seed=0, batch_size=BATCH, shuffle_blocks=4, rank=0,
                                 world_size=len(split.ok_blocks) + 1))


@pytest.mark.slow
def test_two_process_training_runs_in_step_to_the_end(tmp_path):
    """A real 2-rank job (torchrun, gloo on CPU): both ranks take the same steps, so none waits forever."""
    import json
    import os
    import subprocess
    import sys

    layout = CacheLayout(pooled_dim=16, fmap_shape=(16, 7, 7), lare_shape=(4, 16, 16), chunk_samples=16)
    write_synthetic_cache(tmp_path / "train", num_samples=200, signal="lare", seed=1, layout=layout)
    write_synthetic_cache(tmp_path / "val", num_samples=64, signal="lare", seed=2, layout=layout)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lare2.train", "train"]
    args = ["--preset", "debug", "--model", "egre", "--train", str(tmp_path / "train"), "--val", str(tmp_path / "val"),
            "--out", str(tmp_path / "run"), "--epochs", "2", "--batch-size", "16", "--device", "cpu",
            "--set", "progress=false", "--set", "head_dim=8"]
    done = subprocess.run([*launch, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    history = json.loads((tmp_path / "run" / "history.json").read_text())["history"]
    split = CacheSplit(tmp_path / "train", ("lare",))
    steps = [split.num_batches(batch_size=16, shuffle_blocks=8, world_size=2, epoch=e, seed=0) for e in (0, 1)]
    assert [h["step"] for h in history] == [steps[0], steps[0] + steps[1]]
    assert (tmp_path / "run" / "config.json").exists()
