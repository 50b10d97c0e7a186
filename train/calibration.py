"""The decision threshold, set on validation reals: the rule, the calibrated config, and ``lare2 calibrate``.

Training calibrates its best epoch with ``calibrated_config_for``; ``lare2 calibrate`` re-calibrates a run
from a validation cache (``calibrate_run``). That works on a converted reference checkpoint
(``lare2 convert-reference``: uncalibrated, no extraction fingerprint yet, which it then adopts from the
cache) and on a trained run (re-calibrated, e.g. for another ``--target-fpr``; the cache must come from the
run's own extraction). A cache of other dimensions, or another extraction than a trained run's, is refused.

Convention: label 1 = fake, 0 = real; an image is called fake when ``p_fake > threshold``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
from torch import nn

from lare2.shared.config import ExtractConfig, current_keys
from lare2.shared.errors import InputError
from lare2.shared.logs import get_logger
from lare2.shared.provenance import provenance
from lare2.train.checkpoint import CheckpointError, DetectorConfig, check_compatible, load_detector, save_detector
from lare2.train.data import CacheSplit
from lare2.train.metrics import detection_metrics
from lare2.train.models import ModelConfig
from lare2.train.reference import REFERENCE_BACKBONE_FILE
from lare2.train.scoring import SCORING_READ, score_split
from lare2.train.split_safety import check_calibration_cache

logger = get_logger(__name__)

DEFAULT_TARGET_FPR = 0.05
MIN_CALIBRATION_REALS = 100
"""Fewer validation reals than this and calibration warns: the threshold's FPR rests on a handful of images."""


def calibrate_threshold(real_scores: np.ndarray, target_fpr: float) -> float:
    """The smallest observed real score ``t`` with ``mean(real_scores > t) <= target_fpr``.

    Chosen on validation reals only: the k-th smallest real score, k = ceil((1 - target_fpr) * n),
    leaves at most ``n - k <= target_fpr * n`` reals above it (ties only lower the rate).
    """
    scores = np.sort(np.asarray(real_scores, dtype=np.float64))
    if scores.size == 0:
        raise InputError("cannot calibrate a threshold: the validation split has no real images with status ok")
    if not 0.0 < target_fpr < 1.0:
        raise InputError(f"target_fpr must be in (0, 1), got {target_fpr}")
    k = max(1, math.ceil((1.0 - target_fpr) * scores.size - 1e-9))
    return float(scores[k - 1])


def calibrated_config_for(model: nn.Module, model_config: ModelConfig, val_split: CacheSplit, target_fpr: float,
                          extra: dict) -> DetectorConfig:
    """A detector config for already-trained weights, calibrated on ``val_split`` reals."""
    labels, scores, _ = score_split(model.eval(), val_split)
    n_real = int((labels == 0).sum())
    if n_real < MIN_CALIBRATION_REALS:
        logger.warning(f"the threshold rests on {n_real} validation reals of {val_split.path} (fewer than "
                       f"{MIN_CALIBRATION_REALS}): its false positive rate is a coarse estimate; "
                       "calibrate on a larger val split")
    threshold = calibrate_threshold(scores[labels == 0], target_fpr)
    val_metrics = detection_metrics(labels, scores, threshold)
    val_metrics["fpr@thr"] = float((scores[labels == 0] > threshold).mean())
    # what scoring new images must recompute, exactly as the features the detector was calibrated on
    stored_extraction = val_split.cache.attrs.get("extract_config")
    return DetectorConfig(model=model_config, extraction_fingerprint=val_split.fingerprint,
                          extraction=ExtractConfig.from_dict(stored_extraction) if stored_extraction else None,
                          threshold=threshold, target_fpr=target_fpr, val_metrics=val_metrics,
                          extra={**extra, "model_fingerprints": dict(val_split.cache.attrs.get("fingerprints") or {}),
                                 "extraction_identity": dict(val_split.cache.attrs.get("identity") or {}),
                                 "provenance": provenance()})


def is_calibrated(config: DetectorConfig) -> bool:
    """False for a converted checkpoint that ``lare2 calibrate`` has not seen yet."""
    return bool(config.extra.get("calibrated", True)) and bool(config.extraction_fingerprint)


def calibrate_run(run_dir: str | Path, val: str | Path, target_fpr: float | None = None,
                  allow_pending: bool = False, allow_overlap: bool = False) -> DetectorConfig:
    """Score ``val``'s ok samples with the run's detector, set the threshold for ``target_fpr``
    (default: the run's own, else 0.05) on its reals and rewrite ``config.json``. A test cache, or one
    holding the run's training samples, is refused unless ``allow_overlap`` (``check_calibration_cache``)."""
    run_dir = Path(run_dir)
    model, config = load_detector(run_dir)
    # read ahead as `lare2 eval` reads test caches: the next blocks load while a batch is scored
    split = CacheSplit(val, type(model).input_names, allow_pending=allow_pending, read=SCORING_READ)
    # an uncalibrated conversion adopts the cache's extraction; anything else must match its own
    expected = (config if is_calibrated(config)
                else dataclasses.replace(config, extraction_fingerprint=split.fingerprint))
    check_compatible(expected, split.fingerprint, split.cache.layout, val, identity=split.cache.attrs.get("identity"))
    check_calibration_cache(split.cache, config.train_ids_digest, config.extra.get("train_cache"), allow_overlap)
    labels = split.labels[split.ok]
    if not ((labels == 0).any() and (labels == 1).any()):
        raise CheckpointError(f"{val}: calibration needs ok samples of both classes, "
                              f"has {int((labels == 0).sum())} real and {int((labels == 1).sum())} fake")
    backbone = run_dir / REFERENCE_BACKBONE_FILE
    used = current_keys(split.cache.attrs.get("extract_config") or {}).get("clip", "")
    if backbone.exists() and (not used or Path(used).resolve() != backbone.resolve()):
        clip_used = f"with --clip {used!r}" if used else "with no recorded --clip"
        logger.warning(f"{val} was extracted {clip_used}, not the checkpoint's fine-tuned {backbone}: "
                       f"the threshold is set on other features. Extract val with --clip {backbone} "
                       "and calibrate again.")
    fpr = target_fpr if target_fpr is not None else (config.target_fpr or DEFAULT_TARGET_FPR)
    calibrated = calibrated_config_for(model, config.model, split, fpr, extra={})
    calibrated.train, calibrated.train_ids_digest = config.train, config.train_ids_digest
    calibrated.extra = {**config.extra, **calibrated.extra, "calibrated": True, "val_cache": str(val)}
    save_detector(run_dir, model, calibrated)
    logger.info(f"{run_dir}: threshold {calibrated.threshold:.4g} for {fpr:.0%} FPR on "
                f"{calibrated.val_metrics['n_real']} reals of {val}")
    return calibrated
