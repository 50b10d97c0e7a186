"""The feature cache on disk: one Zarr v3 group per split, laid out as ``lare2.shared.cache.schema`` says.

Work is done in *blocks* of C = ``chunk_samples`` consecutive samples: a block covers exactly one chunk of
every array, so concurrent writers (ranks, array jobs) never touch the same chunk, and a block counts as
done only after all its chunks are written (Zarr's local store writes each chunk atomically via
rename). A failed sample keeps NaN in every array (the fill value) and ``status == "error"``.
Every chunk is stored, fill values included (``presence``): an absent chunk is damage, and reads refuse it.

Training draws one view per sample per epoch from a cache with views (``lare2.train.data``); everything
else reads the evaluation view. A packed cache (``lare2.shared.cache.pack``, K blocks per Zarr shard
file) reads the same and is read-only for the extractor.
"""

from __future__ import annotations

import collections
import math
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import zarr

from lare2.shared.cache.errors import CacheError, CacheExistsError
from lare2.shared.cache.presence import ChunkPresence, storing
from lare2.shared.cache.schema import (
    ARRAY_NAMES,
    BLOCK_DONE,
    CACHE_FORMAT_VERSION,
    EVERY_CHUNK_ATTR,
    KNOWN_STATUSES,
    MANIFEST_COLUMNS,
    META_COLUMNS,
    STATUS_OK,
    STATUS_PENDING,
    CacheLayout,
    column_values,
)
from lare2.shared.jsonio import jsonable


def nonfinite_rows(values: np.ndarray) -> np.ndarray:
    """Bool [n]: rows of ``values`` [n, ...] holding NaN or Inf (the project's one non-finite check)."""
    flat = values.reshape(len(values), math.prod(values.shape[1:]))  # [n, rest]; also for n = 0
    if values.dtype == np.float16:  # all exponent bits set: ~8x faster than np.isfinite on float16
        return (flat.view(np.uint16) & 0x7C00).max(axis=1, initial=0) == 0x7C00
    return ~np.isfinite(flat).all(axis=1)


def _zarr_dtype(name: str):
    return str if name == "str" else name


def _fill_value(dtype: str):
    if dtype == "str":
        return ""
    if dtype.startswith("float"):
        return np.nan
    return 0


def staging_path(path: Path) -> Path:
    """A hidden sibling folder where a store is built before it is renamed into place."""
    return path.with_name(f".{path.name}.creating-{uuid.uuid4().hex[:8]}")


def create_arrays(group: zarr.Group, n: int, layout: CacheLayout, pack_blocks: int = 1) -> None:
    """Every array of a cache of ``n`` samples, empty; ``pack_blocks`` > 1 stores that many blocks per Zarr
    shard file."""
    c = layout.chunk_samples

    def storage(shape: tuple[int, ...], chunk: int) -> dict:
        # one chunk per block along samples; a Zarr shard file holds pack_blocks chunks
        if pack_blocks == 1:
            return {"chunks": (chunk, *shape)}
        return {"chunks": (chunk, *shape), "shards": (chunk * pack_blocks, *shape)}

    for name in layout.array_names:
        shape = layout.sample_shape(name)
        group.create_array(
            name,
            shape=(n, *shape),
            dtype=layout.dtype(name),
            fill_value=np.nan,
            compressors=zarr.codecs.ZstdCodec(level=3, checksum=True),  # verify detects flipped bits
            dimension_names=("sample", *[f"d{i}" for i in range(len(shape))]),
            **storage(shape, c),
        )
    meta = group.create_group("meta")
    for col, dtype in META_COLUMNS.items():
        meta.create_array(col, shape=(n,), dtype=_zarr_dtype(dtype), fill_value=_fill_value(dtype), **storage((), c))
    group.create_array(BLOCK_DONE, shape=(math.ceil(n / c),), dtype="uint8", fill_value=0, **storage((), 1))


@dataclass
class FeatureCache:
    """A cache on disk. Create with :meth:`create`, open with :meth:`open`."""

    path: Path
    group: zarr.Group
    layout: CacheLayout
    _meta_cache: dict = field(default_factory=dict, repr=False)
    _presence: ChunkPresence | None = field(default=None, repr=False)

    # ---- creation and opening -------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path,
        rows: Mapping[str, Sequence],
        layout: CacheLayout,
        attrs: Mapping[str, Any] | None = None,
    ) -> "FeatureCache":
        """Create an empty cache for ``rows`` (manifest columns, one entry per sample).

        Refuses to overwrite an existing cache. ``attrs`` (extraction config, identity,
        fingerprints, provenance) are stored as group attributes. The store is built in a
        temporary folder and renamed into place, so a crash never leaves a half-made cache and
        concurrent creators (array jobs) race safely: one wins, the others get
        :class:`CacheExistsError` and open the winner's cache.
        """
        path = Path(path)
        if (path / "zarr.json").exists():
            raise CacheExistsError(f"{path}: a cache already exists here; open it instead of creating it")
        missing = [c for c in MANIFEST_COLUMNS if c not in rows]
        if missing:
            raise CacheError(f"{path}: rows lack the manifest columns {missing}")
        n = len(rows["sample_id"])
        if n == 0:
            raise CacheError(f"{path}: no samples to cache (the manifest selection is empty)")
        ids = list(rows["sample_id"])
        if len(set(ids)) != n:
            dup = sorted(i for i, count in collections.Counter(ids).items() if count > 1)[:5]
            raise CacheError(f"{path}: sample ids must be unique within a cache; duplicates e.g. {dup}")

        path.parent.mkdir(parents=True, exist_ok=True)
        staging = staging_path(path)
        group = zarr.open_group(staging, mode="w-")
        create_arrays(group, n, layout)
        meta = group["meta"]
        for col in META_COLUMNS:
            if col in rows:
                storing(meta[col])[:] = column_values(col, rows[col])
        storing(meta["status"])[:] = np.full(n, STATUS_PENDING, dtype=np.dtypes.StringDType())
        group.attrs.update(jsonable({"lare2_cache_format": CACHE_FORMAT_VERSION, "num_samples": n,
                                     "layout": layout.to_dict(), **(attrs or {}), EVERY_CHUNK_ATTR: True}))
        try:
            os.rename(staging, path)  # atomic; fails if another creator got there first
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if (path / "zarr.json").exists():
                raise CacheExistsError(f"{path}: created concurrently by another job") from None
            raise
        return cls.open(path, mode="r+")

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> "FeatureCache":
        """Open an existing cache (``mode`` "r" or "r+")."""
        path = Path(path)
        if not (path / "zarr.json").exists():
            raise CacheError(f"{path}: not a lare2 cache (no zarr.json); create one with `lare2 extract`")
        try:
            group = zarr.open_group(path, mode=mode)
        except (ValueError, TypeError, KeyError, OSError, zarr.errors.BaseZarrError) as err:  # e.g. a garbled zarr.json
            raise CacheError(f"{path}: damaged cache, zarr.json cannot be read ({type(err).__name__}: {err}); "
                             "re-extract it with `lare2 extract`") from err
        version = group.attrs.get("lare2_cache_format")
        if version is None:
            raise CacheError(f"{path}: a Zarr store but not a lare2 cache (its zarr.json records no "
                             "lare2_cache_format); pass a cache that `lare2 extract` made, or make one with it")
        if version != CACHE_FORMAT_VERSION:
            raise CacheError(f"{path}: cache format {version!r}, written by another lare2 version; this lare2 reads "
                             f"format {CACHE_FORMAT_VERSION}: re-extract it with `lare2 extract`, or read it with the "
                             "lare2 that wrote it")
        return cls(path=path, group=group, layout=stored_layout(path, group.attrs))

    # ---- sizes and blocks -----------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.group.attrs["num_samples"])

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def num_blocks(self) -> int:
        return math.ceil(len(self) / self.layout.chunk_samples)

    def block_slice(self, block: int) -> slice:
        c = self.layout.chunk_samples
        return slice(block * c, min((block + 1) * c, len(self)))

    def done_blocks(self) -> np.ndarray:
        """Bool [num_blocks]: blocks whose samples are all written (ok or error)."""
        return self.group[BLOCK_DONE][:].astype(bool)

    def pending_blocks(self) -> list[int]:
        return [int(b) for b in np.flatnonzero(~self.done_blocks())]

    @property
    def pack_blocks(self) -> int:
        """Blocks per stored file: 1 for a cache as extracted, K for one packed by :func:`pack_cache`."""
        return int(self.group.attrs.get("packed", {}).get("shard_blocks", 1))  # the attribute's name on disk

    # ---- writing --------------------------------------------------------------------------
    def write_block(
        self,
        block: int,
        *,
        lare: np.ndarray,
        pooled: np.ndarray,
        fmap: np.ndarray,
        seed: Sequence[int],
        status: Sequence[str],
        error: Sequence[str],
        pooled_views: np.ndarray | None = None,
        fmap_views: np.ndarray | None = None,
    ) -> None:
        """Write one block's results, then mark it done (the marker is written last).

        Arrays hold one row per sample of the block; rows of failed samples must be NaN. The view arrays
        are required when ``layout.views`` > 0 and refused otherwise.
        """
        if self.pack_blocks > 1:
            raise CacheError(f"{self.path}: a packed cache is read-only (block {block}); "
                             "extract into an unpacked cache")
        sl = self.block_slice(block)
        n = sl.stop - sl.start
        given = {"lare": lare, "pooled": pooled, "fmap": fmap, "pooled_views": pooled_views, "fmap_views": fmap_views}
        unexpected = [k for k, v in given.items() if v is not None and k not in self.layout.array_names]
        if unexpected:
            raise CacheError(f"{self.path}: block {block}: the cache has no {', '.join(unexpected)} "
                             "(made without views)")
        for name in self.layout.array_names:
            values = given[name]
            if values is None:
                raise CacheError(f"{self.path}: block {block}: {name} missing "
                                 f"(the cache holds {self.layout.views} views)")
            expected = (n, *self.layout.sample_shape(name))
            if tuple(values.shape) != expected:
                raise CacheError(f"{self.path}: block {block} {name} has shape {tuple(values.shape)}, "
                                 f"expected {expected}")
            storing(self.group[name])[sl] = np.asarray(values, dtype=self.layout.dtype(name))
        meta = self.group["meta"]
        storing(meta["seed"])[sl] = np.asarray(seed, dtype=np.int64)
        storing(meta["status"])[sl] = np.asarray(list(status), dtype=np.dtypes.StringDType())
        storing(meta["error"])[sl] = np.asarray(list(error), dtype=np.dtypes.StringDType())
        storing(self.group[BLOCK_DONE])[block] = 1
        self._meta_cache.clear()
        self._presence = None

    def finalize(self) -> dict:
        """Counts per status; recorded in the attributes once every block is done.

        Safe when several jobs finish at once: block markers are read before the status column, and a
        block's statuses are written before its marker, so all markers done means the counts are final.
        An unfinished cache gets no record, which a job that counted early could otherwise leave stale.
        """
        complete = bool(self.done_blocks().all())
        status = self.group["meta"]["status"][:]
        counts = {s: int((status == s).sum()) for s in KNOWN_STATUSES}
        if complete:
            self.group.attrs["counts"] = counts
        return counts

    # ---- reading --------------------------------------------------------------------------
    @property
    def presence(self) -> ChunkPresence:
        """Which chunks each block must hold and holds (refreshed after this object writes)."""
        if self._presence is None:
            self._presence = ChunkPresence(self.path, self.group, self.layout.chunk_samples, len(self),
                                           bool(self.group.attrs.get(EVERY_CHUNK_ATTR)))
        return self._presence

    def read(self, index: slice | Sequence[int] | np.ndarray,
             names: Iterable[str] = ARRAY_NAMES) -> dict[str, np.ndarray]:
        """Arrays for ``index`` (a slice or sorted/unsorted integer indices), in the stored dtype.

        ``CacheError`` when a chunk that the rows' blocks must hold is missing (it would read as NaN)."""
        names = tuple(names)
        c = self.layout.chunk_samples
        if isinstance(index, slice):
            start, stop, _ = index.indices(len(self))
            blocks: Iterable[int] = range(start // c, -(-stop // c))
        else:
            blocks = np.unique(np.asarray(index, dtype=np.int64) // c)
        self.presence.require(blocks, names)
        out = {}
        for name in names:
            arr = self.group[name]
            if isinstance(index, slice):
                out[name] = arr[index]
            else:
                idx = np.asarray(index, dtype=np.int64)
                out[name] = arr.get_orthogonal_selection((idx,) + (slice(None),) * (arr.ndim - 1))
        return out

    def column(self, name: str) -> np.ndarray:
        """One metadata column as a numpy array (strings as ``object``); cached until next write."""
        if name not in META_COLUMNS:
            raise KeyError(f"unknown metadata column {name!r}; choose from {list(META_COLUMNS)}")
        if name not in self._meta_cache:
            self.presence.require_column(name)  # an absent chunk would read as fill values (label 0: real)
            values = self.presence.status if name == "status" else self.group["meta"][name][:]
            self._meta_cache[name] = values.astype(object) if META_COLUMNS[name] == "str" else values
        return self._meta_cache[name]

    def metadata(self, columns: Iterable[str] = tuple(META_COLUMNS)) -> pa.Table:
        """Per-sample metadata as a pyarrow table, one row per sample in store order."""
        return pa.table({c: pa.array(list(self.column(c)) if META_COLUMNS[c] == "str" else self.column(c))
                         for c in columns})

    def ok_mask(self) -> np.ndarray:
        return self.column("status") == STATUS_OK


def open_cache(path: str | Path) -> FeatureCache:
    """Open a cache read-only; ``FileNotFoundError`` when nothing is there, ``CacheError`` when not a cache."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such cache directory")
    return FeatureCache.open(path, mode="r")


def stored_layout(path: Path, attrs: Mapping[str, Any]) -> CacheLayout:
    """The cache's ``layout`` attribute as a ``CacheLayout``; ``CacheError`` naming it when missing or altered."""
    try:
        return CacheLayout.from_dict(attrs["layout"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:  # a hand-edited or truncated zarr.json
        raise CacheError(f"{path}: damaged cache, its 'layout' attribute (zarr.json) cannot be read "
                         f"({type(err).__name__}: {err}); re-extract it with `lare2 extract`") from None
