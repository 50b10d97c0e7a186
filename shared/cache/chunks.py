"""Where a cache's arrays and chunks lie on disk: array listing, chunk files, file and byte counts."""

from __future__ import annotations

import math
from pathlib import Path

import zarr

from lare2.shared.cache.store import FeatureCache


def iter_arrays(group: zarr.Group) -> list[tuple[str, zarr.Array]]:
    """All arrays of the cache, nested ones by their path (``meta/label``), sorted by path."""
    return sorted(((name, node) for name, node in group.members(max_depth=None) if isinstance(node, zarr.Array)),
                  key=lambda item: item[0])


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def folder_file_count(folder: str | Path) -> int:
    """Files under ``folder`` (what inode quotas count)."""
    return sum(1 for f in Path(folder).rglob("*") if f.is_file())


def chunk_file(cache: FeatureCache, arr: zarr.Array, coords: tuple[int, ...]) -> Path:
    """The file of stored chunk (or shard) ``coords`` (zarr v3 default key encoding: ``c/0/0/0/0``)."""
    return cache.path / arr.path / arr.metadata.encode_chunk_key(coords)


def samples_per_file(arr: zarr.Array) -> int:
    return (arr.shards or arr.chunks)[0]


def block_chunk_coords(arr: zarr.Array, block: int) -> tuple[int, ...]:
    # every array of a cache is stored along samples only: block b is in file (b // blocks per file, 0, ..., 0)
    return (block // (samples_per_file(arr) // arr.chunks[0]),) + (0,) * (arr.ndim - 1)


def file_count(arr: zarr.Array) -> int:
    return math.ceil(arr.shape[0] / samples_per_file(arr))


def is_variable_string(arr: zarr.Array) -> bool:
    return arr.dtype.kind in ("T", "O", "U")
