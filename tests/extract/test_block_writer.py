"""The background cache writer: the same files and done marks as writing each block in the loop, and a
failed write stops it and surfaces in the caller's thread."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from lare2.extract.block_writer import BlockWriter
from lare2.shared.cache import STATUS_ERROR, STATUS_OK, FeatureCache
from tests.helpers.caches import LAYOUT, manifest_rows

NUM_SAMPLES = 22  # blocks of 4: 6 blocks, the last one short


def _block_values(cache: FeatureCache, block: int) -> dict:
    """A block as the extractor hands it over: float32 arrays, NaN rows for its failed samples."""
    sl = cache.block_slice(block)
    n = sl.stop - sl.start
    rng = np.random.default_rng(block)
    values = {name: rng.standard_normal((n, *LAYOUT.sample_shape(name)), dtype=np.float32)
              for name in LAYOUT.array_names}
    failed = [i for i in range(n) if (sl.start + i) % 5 == 3]
    for array in values.values():
        array[failed] = np.nan
    return {**values, "seed": list(range(sl.start, sl.stop)),
            "status": [STATUS_ERROR if i in failed else STATUS_OK for i in range(n)],
            "error": ["cannot identify image file" if i in failed else "" for i in range(n)]}


def _new_cache(path: Path) -> FeatureCache:
    return FeatureCache.create(path, manifest_rows(NUM_SAMPLES), LAYOUT, {"identity": {"test": "writer"}})


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("depth", [1, 2])
def test_background_writes_equal_writes_in_the_loop(tmp_path, depth):
    inline, background = _new_cache(tmp_path / "inline"), _new_cache(tmp_path / "background")
    order = [2, 0, 5, 1, 4]  # block 3 left pending, as another rank's
    for block in order:
        inline.write_block(block, **_block_values(inline, block))
    with BlockWriter(background, depth=depth) as writer:
        for block in order:
            writer.put(block, _block_values(background, block))
    assert writer.written == order and writer.pending == 0

    reopened = FeatureCache.open(background.path)
    assert reopened.done_blocks().tolist() == [True, True, True, False, True, True]
    assert _digests(background.path) == _digests(inline.path)  # every chunk file and done mark, byte for byte
    for name in LAYOUT.array_names:
        np.testing.assert_array_equal(reopened.read(slice(0, 12), [name])[name],
                                      FeatureCache.open(inline.path).read(slice(0, 12), [name])[name])


def test_a_failed_write_stops_the_writer_and_is_raised_in_the_loop(tmp_path):
    cache = _new_cache(tmp_path / "cache")
    # block 2's error column cannot be written (its chunk file is a folder now): a disk-level failure after
    # every array chunk of the block, just before its done mark
    chunk = tmp_path / "cache" / "meta" / "error" / "c" / "2"
    chunk.unlink(missing_ok=True)
    (chunk / "in-the-way").mkdir(parents=True)

    writer = BlockWriter(cache, depth=1)
    with pytest.raises(OSError) as raised:
        for block in range(cache.num_blocks):  # fails at a later put, or at close
            writer.put(block, _block_values(cache, block))
        writer.close()
    assert any("block 2" in note for note in getattr(raised.value, "__notes__", []))
    assert writer.written == [0, 1]  # nothing after the failure is written
    done = FeatureCache.open(cache.path).done_blocks()
    assert done.tolist() == [True, True, False, False, False, False]  # no done mark without all the chunks


def test_an_error_in_the_loop_still_writes_the_finished_blocks(tmp_path):
    cache = _new_cache(tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt), BlockWriter(cache, depth=2) as writer:
        writer.put(0, _block_values(cache, 0))
        writer.put(1, _block_values(cache, 1))
        raise KeyboardInterrupt  # e.g. the model failing in the loop's thread
    assert writer.written == [0, 1]
    assert FeatureCache.open(cache.path).done_blocks().tolist() == [True, True, False, False, False, False]


def test_nothing_is_written_through_a_closed_writer(tmp_path):
    cache = _new_cache(tmp_path / "cache")
    writer = BlockWriter(cache)
    writer.close()
    with pytest.raises(RuntimeError, match="closed cache writer"):
        writer.put(0, _block_values(cache, 0))
    assert not FeatureCache.open(cache.path).done_blocks().any()
