"""Splits never leak: training and validation share no sample and never come from a test split; a test
cache that shares samples with the run's training cache is reported loudly.

A cache counts as test data when its extraction selected the ``test`` split or any of its samples has
``split == "test"``. The run records a digest of its training cache's sample ids
(``DetectorConfig.train_ids_digest``); ``lare2 eval`` compares it, and counts the shared ids when the
training cache is still at its recorded path. ``lare2 calibrate`` refuses a test cache and one holding
the run's training samples, as ``lare2 train`` refuses them for validation. ``--allow-overlap`` is for
those who mean it.
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


def shared_training_ids(cache: FeatureCache, train_digest: str | None, train_path: str | None) -> int:
    """How many of ``cache``'s sample ids the run trained on: -1 when they are exactly its training ids
    (by digest), else the ids shared with the training cache when it is still at ``train_path`` (0 when
    it is not at hand, or has changed since)."""
    ids = cache_ids(cache)
    if train_digest and ids_digest(ids) == train_digest:
        return -1
    if not train_path or not (Path(train_path) / "zarr.json").is_file():
        return 0
    try:
        train_ids = cache_ids(FeatureCache.open(train_path))
    except CacheError:
        return 0
    if train_digest is not None and ids_digest(train_ids) != train_digest:  # no longer the cache the run trained on
        return 0
    return len(np.intersect1d(ids, train_ids))


def _overlap_text(shared: int, train_path: str | None) -> str:
    if shared < 0:
        return "is the run's training cache (same sample ids)"
    return f"shares {shared} sample ids with the run's training cache {train_path}"


def warn_test_overlap(test: FeatureCache, train_digest: str | None, train_path: str | None,
                      allow_overlap: bool = False) -> int:
    """Warn loudly when ``test`` shares sample ids with the run's training cache; returns how many
    (-1: all, by digest)."""
    shared = shared_training_ids(test, train_digest, train_path)
    if shared:
        message = f"{test.path} {_overlap_text(shared, train_path)}: its figures measure memory, not detection"
        if allow_overlap:
            log.info("%s (--allow-overlap)", message)
        else:
            log.warning("LEAK: %s; evaluate on a test split extracted apart (extract --split test)", message)
    return shared


def check_calibration_cache(val: FeatureCache, train_digest: str | None, train_path: str | None,
                            allow_overlap: bool = False) -> None:
    """Refuse to set a run's threshold on test data (the test figures would then rest on a choice made on
    the test split) or on the run's own training samples (their scores are the model's memory, so the
    false positive rate would not hold on new images), as ``check_train_val`` refuses them for validation."""
    if allow_overlap:
        return
    remedy = "calibrate on a validation split (extract --split val), or pass --allow-overlap if you mean it"
    reason = test_split_reason(val)
    if reason:
        raise CacheError(f"{val.path}: the calibration cache {reason}: test data must never set the threshold; "
                         f"{remedy}")
    shared = shared_training_ids(val, train_digest, train_path)
    if shared:
        raise CacheError(f"{val.path}: the calibration cache {_overlap_text(shared, train_path)}: a threshold set on "
                         f"training samples does not hold on new images; {remedy}")
