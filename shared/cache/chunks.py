"""Where a cache's arrays lie on disk: the array listing, and the files and bytes under a folder."""

from __future__ import annotations

from pathlib import Path

import zarr


def iter_arrays(group: zarr.Group) -> list[tuple[str, zarr.Array]]:
    """All arrays of the cache, nested ones by their path (``meta/label``), sorted by path."""
    return sorted(((name, node) for name, node in group.members(max_depth=None) if isinstance(node, zarr.Array)),
                  key=lambda item: item[0])


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def folder_file_count(folder: str | Path) -> int:
    """Files under ``folder`` (what inode quotas count)."""
    return sum(1 for f in Path(folder).rglob("*") if f.is_file())


def is_variable_string(arr: zarr.Array) -> bool:
    return arr.dtype.kind in ("T", "O", "U")
