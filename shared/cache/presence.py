"""Which chunks of a cache block are stored: Zarr reads an absent chunk as the fill value, so readers ask first.

A missing ``meta/label`` chunk would read as label 0 (real), a missing ``fmap`` chunk as NaN. Every
read of a block therefore checks that the chunks the block must have are stored, and refuses with
a :class:`CacheError` naming the cache, the block and the array otherwise. What a block must have:

- caches written with every chunk stored (``attrs[EVERY_CHUNK_ATTR]``, all caches made by this
  lare2: writes use ``write_empty_chunks``): the manifest columns and ``status`` always (written at
  creation); once any sample of the block is written (status not pending), every array and column;
- older caches (zarr skipped chunks holding only the fill value, so e.g. an all-real ``label`` chunk
  was never stored): the columns that are never the fill value (ids, paths, generators, splits,
  statuses), ``seed`` once written, and the arrays of blocks holding an ok sample.

Plain caches are checked by chunk file (``c/<block>/0/...``); packed caches by the index of each Zarr
shard file, which says which of its inner chunks are stored (empty: offset = nbytes = 2^64 - 1).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import zarr

from lare2.shared.cache.errors import CacheError
from lare2.shared.cache.schema import (
    ALL_ARRAY_NAMES,
    CREATION_COLUMNS,
    NEVER_FILL_COLUMNS,
    STATUS_OK,
    STATUS_PENDING,
    WRITTEN_COLUMNS,
)

EMPTY_CHUNK = np.uint64(2 ** 64 - 1)
"""Offset and size of an inner chunk that a Zarr shard file's index marks absent."""


def storing(arr: zarr.Array) -> zarr.Array:
    """``arr`` writing every chunk, also one holding only the fill value (else an absent chunk proves nothing)."""
    return arr.with_config({"write_empty_chunks": True})


def block_file(arr: zarr.Array, block: int) -> tuple[str, int]:
    """The key of the file holding ``block``'s chunk of ``arr`` (``c/3/0/0/0``), and blocks per such file
    (1, or K in a packed cache). Every array is chunked along samples only, one chunk per block."""
    per_file = (arr.shards or arr.chunks)[0] // arr.chunks[0]
    return arr.metadata.encode_chunk_key((block // per_file,) + (0,) * (arr.ndim - 1)), per_file


def repair_hint(path: Path | str) -> str:
    return (f"`lare2 cache verify {path}` lists every damaged chunk; `lare2 cache repair {path}` marks their blocks "
            "for re-extraction by the same `lare2 extract` command")


class ChunkPresence:
    """What is stored of each block of one cache (a snapshot: reopen after writing)."""

    def __init__(self, path: Path, group: zarr.Group, chunk_samples: int, num_samples: int, every_chunk: bool,
                 status: np.ndarray | None = None) -> None:
        """``status``: the status column as already read (verify passes its own, fill values where unreadable)."""
        self.path = path
        self.chunk_samples = chunk_samples
        self.num_samples = num_samples
        self.num_blocks = -(-num_samples // chunk_samples)
        self.every_chunk = every_chunk
        self.arrays = {name: group[name] for name in ALL_ARRAY_NAMES if name in group}
        meta = group["meta"]
        self.arrays |= {f"meta/{c}": meta[c] for c in (*CREATION_COLUMNS, *WRITTEN_COLUMNS) if c in meta}
        self._files: dict[str, set[str]] = {}
        self._zarr_shard_index: dict[Path, np.ndarray | None] = {}
        if status is None:
            status = self._read_status()
        self.status = status
        """The status column as read for the snapshot (``FeatureCache.column`` reuses it)."""
        per_block = [status[b * chunk_samples:(b + 1) * chunk_samples] for b in range(self.num_blocks)]
        self.written = np.array([bool((s != STATUS_PENDING).any()) for s in per_block], dtype=bool)
        self.has_ok = np.array([bool((s == STATUS_OK).any()) for s in per_block], dtype=bool)

    def _read_status(self) -> np.ndarray:
        absent = [b for b in range(self.num_blocks) if not self.stored("meta/status", b)]
        if absent:
            self.refuse(absent[0], "meta/status", len(absent) - 1)
        try:
            return self.arrays["meta/status"][:]
        except Exception as err:  # noqa: BLE001 - zarr raises the codec's own error type on a bad chunk
            raise CacheError(f"{self.path}: the status column cannot be read ({type(err).__name__}: {err}); "
                             + repair_hint(self.path)) from err

    # ---- what a block must hold -----------------------------------------------------------------
    def expected(self, block: int) -> tuple[str, ...]:
        if self.every_chunk:
            names = [f"meta/{c}" for c in CREATION_COLUMNS]
            if self.written[block]:
                names += [*ALL_ARRAY_NAMES, *(f"meta/{c}" for c in WRITTEN_COLUMNS)]
        else:
            names = [f"meta/{c}" for c in NEVER_FILL_COLUMNS]
            if self.written[block]:
                names.append("meta/seed")
            if self.has_ok[block]:
                names += ALL_ARRAY_NAMES
        return tuple(n for n in names if n in self.arrays)

    # ---- what is stored -------------------------------------------------------------------------
    def stored(self, name: str, block: int) -> bool:
        arr = self.arrays[name]
        key, per_file = block_file(arr, block)
        file = self.path / arr.path / key
        if arr.ndim == 1 and arr.shards is None:  # one listing per column instead of a stat per block
            if name not in self._files:
                folder = self.path / arr.path / "c"
                self._files[name] = {e.name for e in os.scandir(folder) if e.is_file()} if folder.is_dir() else set()
            return key.split("/", 1)[1] in self._files[name]
        if arr.shards is None:
            return file.is_file()
        index = self._inner_chunks(arr, file, per_file)
        return index is not None and bool(index[block % per_file])

    def _inner_chunks(self, arr: zarr.Array, file: Path, per_file: int) -> np.ndarray | None:
        """Bool [chunks per Zarr shard]: which inner chunks the shard file stores (None: no such file)."""
        if file not in self._zarr_shard_index:
            codec = arr.metadata.codecs[0]
            if str(getattr(codec, "index_location", "end")).rsplit(".", 1)[-1] != "end":
                raise CacheError(f"{self.path}: {arr.path} keeps its Zarr shard index at the start; "
                                 "lare2 packs with it at the end")
            size = per_file * 16 + 4  # (offset, nbytes) uint64 per inner chunk + crc32c
            try:
                with open(file, "rb") as f:
                    f.seek(-size, os.SEEK_END)
                    raw = f.read(size)
            except FileNotFoundError:
                self._zarr_shard_index[file] = None
            except OSError as err:  # shorter than its index: damaged
                raise CacheError(f"{self.path}: Zarr shard file {arr.path}/{file.name} is damaged ({err}); "
                                 + repair_hint(self.path)) from err
            else:
                pairs = np.frombuffer(raw[:-4], dtype="<u8").reshape(per_file, 2)
                self._zarr_shard_index[file] = ~((pairs[:, 0] == EMPTY_CHUNK) & (pairs[:, 1] == EMPTY_CHUNK))
        return self._zarr_shard_index[file]

    def missing(self, block: int, names: Iterable[str] | None = None) -> list[str]:
        """Arrays (``lare``, ``meta/label``) whose chunk for ``block`` should be stored and is not."""
        wanted = self.expected(block)
        if names is not None:
            asked = {n if n in ALL_ARRAY_NAMES or n.startswith("meta/") else f"meta/{n}" for n in names}
            wanted = tuple(n for n in wanted if n in asked)
        return [name for name in wanted if not self.stored(name, block)]

    def missing_blocks(self, name: str, blocks: Iterable[int]) -> list[int]:
        """Blocks among ``blocks`` whose chunk of ``name`` should be stored and is not."""
        return [b for b in blocks if name in self.expected(b) and not self.stored(name, b)]

    def chunk_key(self, name: str, block: int) -> str:
        """The file of ``name``'s chunk for ``block`` (``lare/c/3/0/0/0``); in a packed cache whose Zarr shard
        file is there, with the inner chunk (``lare/c/0/0/0/0 (inner chunk 3)``)."""
        arr = self.arrays[name]
        key, per_file = block_file(arr, block)
        if arr.shards is None or not (self.path / arr.path / key).is_file():
            return f"{name}/{key}"
        return f"{name}/{key} (inner chunk {block % per_file})"

    # ---- refusing -------------------------------------------------------------------------------
    def refuse(self, block: int, name: str, also: int = 0) -> None:
        start, stop = block * self.chunk_samples, min((block + 1) * self.chunk_samples, self.num_samples) - 1
        more = f" (and {also} more missing chunks)" if also else ""
        raise CacheError(f"{self.path}: block {block} (samples {start}-{stop}): its {name} chunk "
                         f"({self.chunk_key(name, block)}) is missing and would read as fill values{more}; "
                         + repair_hint(self.path))

    def require(self, blocks: Sequence[int] | Iterable[int], names: Iterable[str] | None = None) -> None:
        """Refuse (``CacheError``) when a chunk of ``names`` (default: all) for one of ``blocks`` is missing."""
        names = None if names is None else tuple(names)
        for block in blocks:
            absent = self.missing(int(block), names)
            if absent:
                self.refuse(int(block), absent[0], len(absent) - 1)

    def require_column(self, name: str) -> None:
        """Refuse when a chunk of one metadata column is missing in any block."""
        key = f"meta/{name}"
        if key not in self.arrays:
            return
        absent = self.missing_blocks(key, range(self.num_blocks))
        if absent:
            self.refuse(absent[0], key, len(absent) - 1)
