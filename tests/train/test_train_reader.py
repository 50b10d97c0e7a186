"""The training reader's read-ahead and in-memory modes never change a batch: index arrays, order, labels and
values equal those of the synchronous reader as it was written before read-ahead (kept here as the reference),
for several epochs, seeds and world sizes; errors read in a worker surface unchanged; memory stays bounded."""

from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest
import torch
import zarr
from lare2.shared.cache import CacheError, CacheLayout
from lare2.shared.settings import SettingsError
from lare2.train.config import debug
from lare2.train.data import Batch, CacheSplit, ReadSettings
from lare2.train.trainer import hold_splits_in_memory
from safetensors.torch import load_file

from tests.helpers.block_reads import blocks_read
from tests.helpers.caches import write_synthetic_cache
from tests.helpers.log_records import Logged

LAYOUT = CacheLayout(pooled_dim=8, fmap_shape=(8, 7, 7), lare_shape=(4, 8, 8), chunk_samples=8, feature_dtype="float16")
NAMES = ("pooled", "fmap", "lare")
# failed samples make blocks of unequal ok counts; block 12 (rows 96-103) holds none and is never read
ERROR_ROWS = (3, 17, 18, 40, 41, 42, *range(96, 104), 150)
MODES = {
    "1 worker, 1 ahead": {"read": ReadSettings(workers=1, ahead=1)},
    "2 workers, 2 ahead": {"read": ReadSettings(workers=2, ahead=2)},
    "in memory, 2 workers": {"read": ReadSettings(workers=2, ahead=2), "in_memory": True},
    "in memory, inline": {"read": ReadSettings(), "in_memory": True},
}


@pytest.fixture(scope="module")
def cache_path(tmp_path_factory):
    # 203 samples: 26 blocks, the last one partial
    return write_synthetic_cache(tmp_path_factory.mktemp("reader") / "train", num_samples=203, signal="lare", seed=4,
                                 layout=LAYOUT, error_rows=ERROR_ROWS).path


def open_split(path, read: ReadSettings = ReadSettings(), in_memory: bool = False) -> CacheSplit:
    split = CacheSplit(path, NAMES, read=read)
    if in_memory:
        split.hold_in_memory()
    return split


# ---- the reference: epoch_batches and sequential_batches as they were before read-ahead, verbatim --------------
def _to_batch(arrays: dict[str, np.ndarray], labels: np.ndarray, index: np.ndarray) -> Batch:
    tensors = {name: torch.from_numpy(np.ascontiguousarray(arrays[name], dtype=np.float32)) for name in arrays}
    return Batch(pooled=tensors.get("pooled"), fmap=tensors.get("fmap"), lare=tensors.get("lare"),
                 label=torch.from_numpy(labels.astype(np.int64)), index=index)


def reference_epoch_batches(split: CacheSplit, *, epoch, seed, batch_size, shuffle_blocks, rank=0, world_size=1):
    rng, windows = split._epoch_windows(epoch, seed, shuffle_blocks, world_size)
    usable = split._steps(windows, batch_size, world_size)
    mine = [w for w in range(len(windows)) if w % world_size == rank]
    pending, pending_index, batch_no = None, np.empty(0, dtype=np.int64), 0
    for w, window_blocks in enumerate(windows):
        order = rng.permutation(sum(split.ok_per_block[b] for b in window_blocks))
        if w % world_size != rank:
            continue
        parts = [split.read_block(b) for b in window_blocks]
        window = {n: np.concatenate([p[0][n] for p in parts])[order] for n in split.names}
        index = np.concatenate([p[1] for p in parts])[order]
        if pending is not None:
            window = {n: np.concatenate([pending[n], window[n]]) for n in split.names}
            index = np.concatenate([pending_index, index])
        full = len(index) if w == mine[-1] else len(index) // batch_size * batch_size
        for lo in range(0, full, batch_size):
            if batch_no >= usable:
                return
            sel = slice(lo, min(lo + batch_size, full))
            yield _to_batch({n: a[sel] for n, a in window.items()}, split.labels[index[sel]], index[sel])
            batch_no += 1
        pending = {n: a[full:] for n, a in window.items()}
        pending_index = index[full:]


def reference_sequential_batches(split: CacheSplit, batch_size: int):
    for block in split.ok_blocks:
        arrays, index = split.read_block(block)
        for lo in range(0, len(index), batch_size):
            sel = slice(lo, lo + batch_size)
            yield _to_batch({n: a[sel] for n, a in arrays.items()}, split.labels[index[sel]], index[sel])


def assert_same_batches(got: list[Batch], want: list[Batch]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.index.dtype == w.index.dtype and np.array_equal(g.index, w.index)
        assert g.label.dtype == w.label.dtype and torch.equal(g.label, w.label)
        for name in NAMES:
            a, b = getattr(g, name), getattr(w, name)
            assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape and torch.equal(a, b), name


# ---- the same batches, however they are read ---------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["inline", *MODES])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_batches_equal_the_synchronous_reference(cache_path, mode, world_size):
    reference = open_split(cache_path)
    split = open_split(cache_path, **MODES.get(mode, {}))
    for epoch, seed, batch_size, shuffle_blocks in ((0, 0, 10, 4), (1, 0, 16, 3), (2, 7, 7, 1), (0, 3, 48, 8)):
        for rank in range(world_size):
            kwargs = dict(epoch=epoch, seed=seed, batch_size=batch_size, shuffle_blocks=shuffle_blocks, rank=rank,
                          world_size=world_size)
            got = list(split.epoch_batches(**kwargs))
            assert len(got) == split.num_batches(batch_size=batch_size, shuffle_blocks=shuffle_blocks,
                                                 world_size=world_size, epoch=epoch, seed=seed)
            assert_same_batches(got, list(reference_epoch_batches(reference, **kwargs)))
    for batch_size in (3, 8, 64):
        assert_same_batches(list(split.sequential_batches(batch_size)),
                            list(reference_sequential_batches(reference, batch_size)))


def test_read_ahead_is_bounded_and_stops_with_the_consumer(cache_path):
    split = open_split(cache_path, ReadSettings(workers=2, ahead=2))
    with blocks_read(split) as read:
        windows, _ = split.epoch_windows(epoch=0, seed=0, batch_size=4, shuffle_blocks=2)
        batches = split.epoch_batches(epoch=0, seed=0, batch_size=4, shuffle_blocks=2)
        next(batches)
        time.sleep(0.3)  # time for the workers to run ahead as far as they may
        # the window in use and two ahead, read first block first
        assert read and set(read) <= {b for w in windows[:1 + 2] for b in w.blocks}
        batches.close()  # an abandoned epoch (stop_after_steps) shuts its readers down
    assert not [t for t in threading.enumerate() if t.name.startswith("lare2-read")]


# ---- errors surface unchanged --------------------------------------------------------------------------------------
def damaged_copy(cache_path, tmp_path, damage: str) -> tuple:
    """A copy of the cache with one block damaged: ``nan`` in an ok sample's fmap, or its ``lare`` chunk deleted."""
    path = tmp_path / damage
    shutil.copytree(cache_path, path)
    group = zarr.open_group(path, mode="r+")
    block = 6  # rows 48-55, all ok
    if damage == "nan":
        group["fmap"][block * LAYOUT.chunk_samples + 2, 0, 0, 0] = np.nan
    else:
        arr = group["lare"]
        (path / "lare" / arr.metadata.encode_chunk_key((block, 0, 0, 0))).unlink()
    return path, block


def first_error(make_batches) -> CacheError:
    with pytest.raises(CacheError) as caught:
        for _ in make_batches():
            pass
    assert type(caught.value) is CacheError
    return caught.value


@pytest.mark.parametrize("damage", ["nan", "missing chunk"])
def test_a_damaged_block_raises_the_same_cache_error_with_read_ahead(cache_path, tmp_path, damage):
    path, block = damaged_copy(cache_path, tmp_path, damage)
    kwargs = dict(epoch=0, seed=0, batch_size=10, shuffle_blocks=4)
    want = str(first_error(lambda: reference_epoch_batches(open_split(path), **kwargs)))
    assert f"block {block}" in want and ("NaN/Inf" in want if damage == "nan" else "is missing" in want)
    for read in (ReadSettings(), ReadSettings(workers=1, ahead=1), ReadSettings(workers=2, ahead=3)):
        assert str(first_error(lambda: open_split(path, read).epoch_batches(**kwargs))) == want
        assert str(first_error(lambda: open_split(path, read).sequential_batches(16))) == want
        with pytest.raises(CacheError) as caught:  # held in memory: refused as it is loaded
            open_split(path, read, in_memory=True)
        assert str(caught.value) == want
    assert not [t for t in threading.enumerate() if t.name.startswith("lare2-read")]


# ---- in memory: within a budget, logged either way ----------------------------------------------------------------
def test_in_memory_holds_what_fits_and_says_why_not(cache_path, caplog):
    needed = open_split(cache_path).memory_bytes()
    per_sample = 8 * 2 + 8 * 7 * 7 * 2 + 4 * 8 * 8 * 4  # pooled + fmap float16, lare float32
    assert needed == per_sample * (203 - len(ERROR_ROWS))

    train, val = open_split(cache_path), open_split(cache_path)
    with Logged(caplog) as logged:  # room for one split: the training split comes first
        hold_splits_in_memory(debug(in_memory="auto", memory_budget_gb=1.5 * needed / 1e9), [train, val])
    assert train.in_memory and not val.in_memory
    held, refused = logged.messages()
    assert "held in memory" in held and str(cache_path) in held
    assert "over the" in refused and "GB left of the" in refused and "read from the cache" in refused

    with pytest.raises(ValueError, match="over the .* in-memory budget; raise --set memory_budget_gb"):
        hold_splits_in_memory(debug(in_memory="on", memory_budget_gb=needed / 2 / 1e9), [open_split(cache_path)])
    split = open_split(cache_path)
    hold_splits_in_memory(debug(in_memory="off", memory_budget_gb=1000.0), [split])
    assert not split.in_memory
    hold_splits_in_memory(debug(in_memory="on"), [split])  # the default budget: half the memory available
    assert split.in_memory


def test_reader_settings_are_checked():
    with pytest.raises(SettingsError, match="read_ahead=0"):
        debug(read_ahead=0)
    with pytest.raises(SettingsError, match="read_workers=-1"):
        debug(read_workers=-1)
    with pytest.raises(SettingsError, match="in_memory"):
        debug(in_memory="maybe")


def test_training_gives_the_same_weights_however_it_reads(tmp_path):
    from lare2.train.cli import main

    layout = CacheLayout(pooled_dim=16, fmap_shape=(16, 7, 7), lare_shape=(4, 16, 16), chunk_samples=16)
    write_synthetic_cache(tmp_path / "train", num_samples=96, signal="lare", seed=1, layout=layout)
    write_synthetic_cache(tmp_path / "val", num_samples=64, signal="lare", seed=2, layout=layout)
    weights = {}
    for name, reading in (("inline", ["read_workers=0", "in_memory=off"]),
                          ("ahead", ["read_workers=2", "in_memory=off"]),
                          ("memory", ["read_workers=1", "in_memory=on"])):
        args = ["train", "--preset", "debug", "--train", str(tmp_path / "train"), "--val", str(tmp_path / "val"),
                "--out", str(tmp_path / name), "--epochs", "2", "--set", "progress=false", "--set", "head_dim=8",
                "--set", "shuffle_blocks=2"]
        assert main(args + [a for setting in reading for a in ("--set", setting)]) == 0
        weights[name] = load_file(tmp_path / name / "model.safetensors")
    for name in ("ahead", "memory"):
        assert all(torch.equal(weights[name][k], weights["inline"][k]) for k in weights["inline"]), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batches_for_cuda_are_pinned_and_equal(cache_path):
    from lare2.train.trainer import read_settings

    read = read_settings(debug(read_workers=2), torch.device("cuda"))
    assert read.pin_device == f"cuda:{torch.cuda.current_device()}"
    kwargs = dict(epoch=1, seed=2, batch_size=10, shuffle_blocks=4)
    got = list(open_split(cache_path, read).epoch_batches(**kwargs))
    assert all(b.fmap.is_pinned() and b.label.is_pinned() for b in got)
    assert_same_batches(got, list(reference_epoch_batches(open_split(cache_path), **kwargs)))
    on_gpu = [b.to("cuda") for b in got]
    torch.cuda.synchronize()
    assert all(torch.equal(g.fmap.cpu(), b.fmap) for g, b in zip(on_gpu, got))
