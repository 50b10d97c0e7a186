"""Splits never leak: training and validation share no sample and never come from a test split; a test
cache that shares samples with the run's training cache is reported loudly.

A cache counts as test data when its extraction selected the ``test`` split or any of its samples has
``split == "test"``. The run records a digest of its training cache's sample ids
(``DetectorConfig.train_ids_digest``); ``lare2 eval`` compares it, and counts the shared ids when the
training cache is still at its recorded path. ``--allow-overlap`` is for those who mean it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

import numpy as np

from lare2.shared.cache import CacheError, FeatureCache
from lare2.shared.logs import get_logger

log = get_logger(__name__)
TEST_SPLIT = "test"


def ids_digest(ids: Iterable[str]) -> str:
    """sha256 of the sorted sample ids (one per line): equal iff two caches hold the same samples."""
    return hashlib.sha256("\n".join(sorted(map(str, ids))).encode()).hexdigest()[:16]


def cache_ids(cache: FeatureCache) -> np.ndarray:
    return np.asarray(cache.column("sample_id"), dtype=str)


def test_split_reason(cache: FeatureCache) -> str | None:
    """Why the cache holds test data (None when it does not)."""
    if (cache.attrs.get("extract_config") or {}).get("split") == TEST_SPLIT:
        return "was extracted from the test split"
    in_test = int((cache.column("split") == TEST_SPLIT).sum())
    return f"holds {in_test} samples of the test split" if in_test else None


def check_train_val(train: FeatureCache, val: FeatureCache, allow_overlap: bool = False) -> None:
    """Refuse a training or validation cache holding test data, and train and val sharing any sample id."""
    if allow_overlap:
        return
    for cache, role in ((train, "training"), (val, "validation")):
        reason = test_split_reason(cache)
        if reason:
            raise CacheError(f"{cache.path}: the {role} cache {reason}; test data must never train or select a model "
                             "(extract --split train / --split val), or pass --allow-overlap if you mean it")
    shared = np.intersect1d(cache_ids(train), cache_ids(val))
    if len(shared):
        same = " (the same cache?)" if len(shared) == len(train) else ""
        raise CacheError(f"{val.path}: shares {len(shared)} sample ids with the training cache {train.path}{same}, "
                         f"e.g. {shared[0]}; validate on another split (extract --split val), or pass --allow-overlap "
                         "if you mean it")


def warn_test_overlap(test: FeatureCache, train_digest: str | None, train_path: str | None,
                      allow_overlap: bool = False) -> int:
    """Warn loudly when ``test`` shares sample ids with the run's training cache; returns how many
    (-1: all, by digest)."""
    ids = cache_ids(test)
    shared = -1 if train_digest and ids_digest(ids) == train_digest else 0
    if shared == 0 and train_path and (Path(train_path) / "zarr.json").is_file():
        try:
            train_ids = cache_ids(FeatureCache.open(train_path))
        except CacheError:
            train_ids = np.empty(0, dtype=str)
        if train_digest is None or ids_digest(train_ids) == train_digest:  # still the cache the run trained on
            shared = len(np.intersect1d(ids, train_ids))
    if shared:
        what = "is the run's training cache (same sample ids)" if shared < 0 else f"shares {shared} sample ids with " \
               f"the run's training cache {train_path}"
        message = f"{test.path} {what}: its figures measure memory, not detection"
        if allow_overlap:
            log.info("%s (--allow-overlap)", message)
        else:
            log.warning("LEAK: %s; evaluate on a test split extracted apart (extract --split test)", message)
    return shared
