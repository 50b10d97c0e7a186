"""The feature cache's schema, in one place: array names, shapes and dtypes, metadata columns, statuses.

Layout of a cache at ``PATH`` (N samples, C = ``chunk_samples``)::

    PATH/zarr.json            group attributes: format version, layout, extraction config,
                              identity (the keys that must match to append), model fingerprints,
                              provenance (versions, git SHA, time), counts (after finalise)
    PATH/lare                 [N, 4, 32, 32]        float32, chunks [C, 4, 32, 32]
    PATH/pooled               [N, D]                feature dtype (float16), chunks [C, D]
    PATH/fmap                 [N, Cf, 14, 14]       feature dtype, chunks [C, Cf, 14, 14]
    PATH/pooled_views         [N, K, D]             only with K = views > 0: feature dtype, chunks [C, K, D]
    PATH/fmap_views           [N, K, Cf, 14, 14]    only with K > 0: feature dtype, chunks [C, K, Cf, 14, 14]
    PATH/meta/<column>        [N]                   one array per metadata column (``META_COLUMNS``), chunks [C]
    PATH/block_done           [ceil(N / C)]         uint8, one chunk per block: 1 = block written

``pooled``/``fmap`` always hold the *evaluation view* (the centre crop, docs/method.md §2.2). A cache
extracted with ``--views K`` (``layout.views``) also holds K augmented *training views* per sample
(``lare2.extract.augment``), view k of sample i at ``pooled_views[i, k]`` / ``fmap_views[i, k]``; ``lare``
stays one map per sample. Caches without views have no view arrays and read as before.

The store (``lare2.shared.cache.store``), the chunk checks (``presence``), the reports and the readers of
both stages import these names; none redefines them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa

from lare2.shared.manifest.table import CACHE_COLUMNS, MANIFEST_SCHEMA

CACHE_FORMAT_VERSION = 1
"""``attrs["lare2_cache_format"]``: the format this lare2 reads and writes."""
EVERY_CHUNK_ATTR = "every_chunk_stored"
"""Cache attribute: True when every chunk was written, fill values included (``write_empty_chunks``)."""

# ---- arrays -------------------------------------------------------------------------------------
ARRAY_NAMES = ("lare", "pooled", "fmap")
"""The arrays every cache holds: the LaRE map and the evaluation view's features."""
VIEW_ARRAYS = {"pooled": "pooled_views", "fmap": "fmap_views"}
"""Evaluation-view array -> the array of its K augmented views (caches with ``layout.views`` > 0 only)."""
ALL_ARRAY_NAMES = ARRAY_NAMES + tuple(VIEW_ARRAYS.values())
"""Every per-sample array a cache may hold; the view arrays exist only in caches extracted with views."""
BLOCK_DONE = "block_done"
"""The per-block marker array: 1 once every chunk of the block is written."""

# ---- statuses -----------------------------------------------------------------------------------
STATUS_PENDING = "pending"
STATUS_OK = "ok"
STATUS_ERROR = "error"
KNOWN_STATUSES = (STATUS_OK, STATUS_ERROR, STATUS_PENDING)

# ---- metadata columns ---------------------------------------------------------------------------
# The first group comes from the manifest at creation (its schema types them); the second is written
# per block by the extractor.
MANIFEST_COLUMNS: dict[str, str] = {
    c: "str" if pa.types.is_string(MANIFEST_SCHEMA.field(c).type) else str(MANIFEST_SCHEMA.field(c).type)
    for c in CACHE_COLUMNS
}
RESULT_COLUMNS: dict[str, str] = {"seed": "int64", "status": "str", "error": "str"}
META_COLUMNS: dict[str, str] = {**MANIFEST_COLUMNS, **RESULT_COLUMNS}
"""Every metadata column (``meta/<column>``) and its dtype (``str``: variable-length strings)."""
CREATION_COLUMNS = (*MANIFEST_COLUMNS, "status")
"""Columns written for every sample when the cache is created (status ``pending``)."""
WRITTEN_COLUMNS = tuple(c for c in RESULT_COLUMNS if c not in CREATION_COLUMNS)
"""Columns written per block by the extractor, after creation."""
NEVER_FILL_COLUMNS = ("sample_id", "path", "generator", "split", "status")
"""Columns never equal to the fill value: stored even by caches made before every chunk was kept."""


def column_values(column: str, values: Sequence) -> np.ndarray:
    """``values`` of a metadata column as the store keeps them (strings as ``StringDType``)."""
    dtype = META_COLUMNS[column]
    if dtype == "str":
        return np.asarray(list(values), dtype=object).astype(np.dtypes.StringDType())
    return np.asarray(list(values), dtype=dtype)


# ---- shapes and dtypes --------------------------------------------------------------------------
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
