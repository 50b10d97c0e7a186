"""``lare2 calibrate``: set a run's decision threshold from a validation cache.

Works on a converted reference checkpoint (``lare2 convert-reference``: uncalibrated, no extraction
fingerprint yet, which it then adopts from the cache) and on a trained run (re-calibrated, e.g. for
another ``--target-fpr``; the cache must come from the run's own extraction). A cache of other
dimensions, or another extraction than a trained run's, is refused.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lare2.shared.logs import get_logger
from lare2.train.checkpoint import CheckpointError, DetectorConfig, check_compatible, load_detector, save_detector
from lare2.train.data import CacheSplit
from lare2.train.trainer import REFERENCE_BACKBONE_FILE, calibrated_config_for

logger = get_logger(__name__)

DEFAULT_TARGET_FPR = 0.05


def is_calibrated(config: DetectorConfig) -> bool:
    """False for a converted checkpoint that ``lare2 calibrate`` has not seen yet."""
    return bool(config.extra.get("calibrated", True)) and bool(config.extraction_fingerprint)


def calibrate_run(run_dir: str | Path, val: str | Path, target_fpr: float | None = None,
                  allow_pending: bool = False) -> DetectorConfig:
    """Score ``val``'s ok samples with the run's detector, set the threshold for ``target_fpr``
    (default: the run's own, else 0.05) on its reals and rewrite ``config.json``."""
    run_dir = Path(run_dir)
    model, config = load_detector(run_dir)
    split = CacheSplit(val, type(model).input_names, allow_pending=allow_pending)
    # an uncalibrated conversion adopts the cache's extraction; anything else must match its own
    expected = config if is_calibrated(config) else dataclasses.replace(config, extraction_fingerprint=split.fingerprint)
    check_compatible(expected, split.fingerprint, split.cache.layout, val)
    labels = split.labels[split.ok]
    if not ((labels == 0).any() and (labels == 1).any()):
        raise CheckpointError(f"{val}: calibration needs ok samples of both classes, has {int((labels == 0).sum())} real "
                              f"and {int((labels == 1).sum())} fake")
    backbone = run_dir / REFERENCE_BACKBONE_FILE
    used = (split.cache.attrs.get("extract_config") or {}).get("backbone", "")
    if backbone.exists() and (not used or Path(used).resolve() != backbone.resolve()):
        logger.warning(f"{val} was extracted with backbone {used!r}, not the checkpoint's fine-tuned {backbone}: "
                       f"the threshold is set on other features. Extract val with --clip {backbone} and calibrate again.")
    fpr = target_fpr if target_fpr is not None else (config.target_fpr or DEFAULT_TARGET_FPR)
    calibrated = calibrated_config_for(model, config.model, split, fpr, extra={})
    calibrated.train, calibrated.train_ids_digest = config.train, config.train_ids_digest
    calibrated.extra = {**config.extra, **calibrated.extra, "calibrated": True, "val_cache": str(val)}
    save_detector(run_dir, model, calibrated)
    logger.info(f"{run_dir}: threshold {calibrated.threshold:.4g} for {fpr:.0%} FPR on "
                f"{calibrated.val_metrics['n_real']} reals of {val}")
    return calibrated
