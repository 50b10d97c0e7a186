"""The feature cache: schema (``schema``), store (``store``), packing (``pack``); reports live in submodules.

Importing this package stays light (no matplotlib, torch or diffusers): stage 2 imports it. The
heavier tools are imported by name: ``summary`` (info, ls, show, stats), ``plots`` (PNGs),
``verify``, ``repair``, ``diff``, ``export`` (WebDataset), ``chunks`` (files on disk).
"""

from lare2.shared.cache.errors import CacheError, CacheExistsError, RecomputeUnavailable
from lare2.shared.cache.pack import pack_cache
from lare2.shared.cache.schema import (
    ARRAY_NAMES,
    CACHE_FORMAT_VERSION,
    KNOWN_STATUSES,
    MANIFEST_COLUMNS,
    META_COLUMNS,
    RESULT_COLUMNS,
    STATUS_ERROR,
    STATUS_OK,
    STATUS_PENDING,
    VIEW_ARRAYS,
    CacheLayout,
)
from lare2.shared.cache.store import FeatureCache, nonfinite_rows, open_cache

__all__ = [
    "ARRAY_NAMES",
    "CACHE_FORMAT_VERSION",
    "KNOWN_STATUSES",
    "MANIFEST_COLUMNS",
    "META_COLUMNS",
    "RESULT_COLUMNS",
    "STATUS_ERROR",
    "STATUS_OK",
    "STATUS_PENDING",
    "VIEW_ARRAYS",
    "CacheError",
    "CacheExistsError",
    "CacheLayout",
    "FeatureCache",
    "RecomputeUnavailable",
    "nonfinite_rows",
    "open_cache",
    "pack_cache",
]
