"""The feature cache: one Zarr v3 group per split. The schema lives here and only here.

Layout of a cache at ``PATH`` (N samples, C = ``chunk_samples``)::

    PATH/zarr.json            group attributes: format version, layout, extraction config,
                              identity (the keys that must match to append), model fingerprints,
                              provenance (versions, git SHA, time), counts (after finalise)
    PATH/lare                 [N, 4, 32, 32]        float32, chunks [C, 4, 32, 32]
    PATH/pooled               [N, D]                feature dtype (float16), chunks [C, D]
    PATH/fmap                 [N, Cf, 14, 14]       feature dtype, chunks [C, Cf, 14, 14]
    PATH/pooled_views         [N, K, D]             only with K = views > 0: feature dtype, chunks [C, K, D]
    PATH/fmap_views           [N, K, Cf, 14, 14]    only with K > 0: feature dtype, chunks [C, K, Cf, 14, 14]
    PATH/meta/<column>        [N]                   one array per metadata column, chunks [C]
    PATH/block_done           [ceil(N / C)]         uint8, one chunk per block: 1 = block written

Work is done in *blocks* of C consecutive samples: a block covers exactly one chunk of every
array, so concurrent writers (ranks, array jobs) never touch the same chunk, and a block counts as
done only after all its chunks are written (Zarr's local store writes each chunk atomically via
rename). A failed sample keeps NaN in every array (the fill value) and ``status == "error"``.
Every chunk is stored, fill values included (``presence``): an absent chunk is damage, and reads refuse it.

``pooled``/``fmap`` always hold the *evaluation view* (the centre crop, docs/method.md §2.2). A cache
extracted with ``--views K`` (``layout.views``) also holds K augmented *training views* per sample
(``lare2.extract.augment``), view k of sample i at ``pooled_views[i, k]`` / ``fmap_views[i, k]``; ``lare``
stays one map per sample. Caches without views have no view arrays and read as before; training draws
one view per sample per epoch (``lare2.train.data``), everything else reads the evaluation view.

A packed cache (``lare2.shared.cache.pack``, K blocks per Zarr v3 shard) reads the same and is
read-only for the extractor.
"""

from __future__ import annotations

import collections
import math
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import zarr

from lare2.shared.cache.errors import CacheError, CacheExistsError
from lare2.shared.cache.presence import EVERY_CHUNK_ATTR, ChunkPresence, storing
from lare2.shared.jsonio import jsonable
from lare2.shared.manifest.table import CACHE_COLUMNS, MANIFEST_SCHEMA

CACHE_FORMAT_VERSION = 1
ARRAY_NAMES = ("lare", "pooled", "fmap")
"""The arrays every cache holds: the LaRE map and the evaluation view's features."""
VIEW_ARRAYS = {"pooled": "pooled_views", "fmap": "fmap_views"}
"""Evaluation-view array -> the array of its K augmented views (caches with ``layout.views`` > 0 only)."""

STATUS_PENDING = "pending"
STATUS_OK = "ok"
STATUS_ERROR = "error"
KNOWN_STATUSES = (STATUS_OK, STATUS_ERROR, STATUS_PENDING)

# Metadata columns and their dtypes. The first group comes from the manifest at creation (its schema
# types them); the second is written per block by the extractor.
MANIFEST_COLUMNS: dict[str, str] = {
    c: "str" if pa.types.is_string(MANIFEST_SCHEMA.field(c).type) else str(MANIFEST_SCHEMA.field(c).type)
    for c in CACHE_COLUMNS
}
RESULT_COLUMNS: dict[str, str] = {"seed": "int64", "status": "str", "error": "str"}
META_COLUMNS: dict[str, str] = {**MANIFEST_COLUMNS, **RESULT_COLUMNS}


@dataclass(frozen=True, kw_only=True)
class CacheLayout:
    """Shapes, dtypes and chunking of a cache; fixed at creation."""

    lare_shape: tuple[int, ...] = (4, 32, 32)
    """Shape of one LaRE map: latent channels x latent height x latent width."""
    pooled_dim: int = 1024
    """Length of the backbone's pooled embedding (CLIP RN50 attention pool: 1024)."""
    fmap_shape: tuple[int, ...] = (1024, 14, 14)
    """Shape of the backbone feature map (CLIP RN50 layer3 at 224 px: 1024 x 14 x 14)."""
    feature_dtype: str = "float16"
    """Storage dtype of ``pooled`` and ``fmap``."""
    lare_dtype: str = "float32"
    """Storage dtype of ``lare``."""
    chunk_samples: int = 32
    """Samples per chunk (and per work block). 32 x fmap float16 = 12.8 MB per chunk."""
    views: int = field(default=0, compare=False)
    """Augmented views per sample in ``pooled_views``/``fmap_views`` (0: no view arrays). Not part of equality:
    the evaluation features, what detectors read and compare, have the same layout with or without views."""

    def __post_init__(self) -> None:
        for name in ("feature_dtype", "lare_dtype"):
            value = getattr(self, name)
            if value not in ("float16", "float32"):
                raise ValueError(f"{name}={value!r}: choose float16 or float32")
        if self.chunk_samples < 1:
            raise ValueError(f"chunk_samples must be >= 1, got {self.chunk_samples}")
        if self.views < 0:
            raise ValueError(f"views must be >= 0, got {self.views}")

    @property
    def array_names(self) -> tuple[str, ...]:
        """Every per-sample array of the cache: ``ARRAY_NAMES``, then the view arrays when ``views`` > 0."""
        return ARRAY_NAMES + (tuple(VIEW_ARRAYS.values()) if self.views else ())

    def sample_shape(self, name: str) -> tuple[int, ...]:
        shapes = {"lare": tuple(self.lare_shape), "pooled": (self.pooled_dim,), "fmap": tuple(self.fmap_shape)}
        if self.views:
            shapes |= {views: (self.views, *shapes[name]) for name, views in VIEW_ARRAYS.items()}
        return shapes[name]

    def dtype(self, name: str) -> str:
        return self.lare_dtype if name == "lare" else self.feature_dtype

    def to_dict(self) -> dict:
        """As stored in the attributes; ``views`` only when > 0 (caches made before views read the same)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k != "views" or v}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CacheLayout":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _zarr_dtype(name: str):
    return str if name == "str" else name


def _fill_value(dtype: str):
    if dtype == "str":
        return ""
    if dtype.startswith("float"):
        return np.nan
    return 0


def column_values(column: str, values: Sequence) -> np.ndarray:
    """``values`` of a metadata column as the store keeps them (strings as ``StringDType``)."""
    dtype = META_COLUMNS[column]
    if dtype == "str":
        return np.asarray(list(values), dtype=object).astype(np.dtypes.StringDType())
    return np.asarray(list(values), dtype=dtype)


def staging_path(path: Path) -> Path:
    """A hidden sibling folder where a store is built before it is renamed into place."""
    return path.with_name(f".{path.name}.creating-{uuid.uuid4().hex[:8]}")


def create_arrays(group: zarr.Group, n: int, layout: CacheLayout, shard_blocks: int = 1) -> None:
    """Every array of a cache of ``n`` samples, empty; ``shard_blocks`` > 1 stores that many blocks per shard."""
    c = layout.chunk_samples

    def storage(shape: tuple[int, ...], chunk: int) -> dict:
        # one chunk per block along samples; a shard holds shard_blocks chunks
        if shard_blocks == 1:
            return {"chunks": (chunk, *shape)}
        return {"chunks": (chunk, *shape), "shards": (chunk * shard_blocks, *shape)}

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
    group.create_array("block_done", shape=(math.ceil(n / c),), dtype="uint8", fill_value=0, **storage((), 1))


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
        group.attrs.update(jsonable({"lare2_cache_format": CACHE_FORMAT_VERSION, "num_samples": n, "layout": layout.to_dict(),
                                     **(attrs or {}), EVERY_CHUNK_ATTR: True}))
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
        if version != CACHE_FORMAT_VERSION:
            raise CacheError(f"{path}: cache format {version!r}, this lare2 reads format {CACHE_FORMAT_VERSION}")
        return cls(path=path, group=group, layout=CacheLayout.from_dict(group.attrs["layout"]))

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
        return self.group["block_done"][:].astype(bool)

    def pending_blocks(self) -> list[int]:
        return [int(b) for b in np.flatnonzero(~self.done_blocks())]

    @property
    def shard_blocks(self) -> int:
        """Blocks per stored shard: 1 for a cache as extracted, K for one packed by :func:`pack_cache`."""
        return int(self.group.attrs.get("packed", {}).get("shard_blocks", 1))

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
        if self.shard_blocks > 1:
            raise CacheError(f"{self.path}: a packed cache is read-only (block {block}); extract into an unpacked cache")
        sl = self.block_slice(block)
        n = sl.stop - sl.start
        given = {"lare": lare, "pooled": pooled, "fmap": fmap, "pooled_views": pooled_views, "fmap_views": fmap_views}
        unexpected = [k for k, v in given.items() if v is not None and k not in self.layout.array_names]
        if unexpected:
            raise CacheError(f"{self.path}: block {block}: the cache has no {', '.join(unexpected)} (made without views)")
        for name in self.layout.array_names:
            values = given[name]
            if values is None:
                raise CacheError(f"{self.path}: block {block}: {name} missing (the cache holds {self.layout.views} views)")
            expected = (n, *self.layout.sample_shape(name))
            if tuple(values.shape) != expected:
                raise CacheError(f"{self.path}: block {block} {name} has shape {tuple(values.shape)}, expected {expected}")
            storing(self.group[name])[sl] = np.asarray(values, dtype=self.layout.dtype(name))
        meta = self.group["meta"]
        storing(meta["seed"])[sl] = np.asarray(seed, dtype=np.int64)
        storing(meta["status"])[sl] = np.asarray(list(status), dtype=np.dtypes.StringDType())
        storing(meta["error"])[sl] = np.asarray(list(error), dtype=np.dtypes.StringDType())
        storing(self.group["block_done"])[block] = 1
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

    def read(self, index: slice | Sequence[int] | np.ndarray, names: Iterable[str] = ARRAY_NAMES) -> dict[str, np.ndarray]:
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
        return pa.table({c: pa.array(list(self.column(c)) if META_COLUMNS[c] == "str" else self.column(c)) for c in columns})

    def ok_mask(self) -> np.ndarray:
        return self.column("status") == STATUS_OK


def open_cache(path: str | Path) -> FeatureCache:
    """Open a cache read-only; ``FileNotFoundError`` when nothing is there, ``CacheError`` when not a cache."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such cache directory")
    return FeatureCache.open(path, mode="r")
