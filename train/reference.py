"""A reference ``CLipClassifierWMapV6`` checkpoint as an uncalibrated lare2 run directory (docs/method.md).

``lare2 convert-reference`` writes the run; ``lare2 calibrate`` (``lare2.train.calibration``) then sets its
threshold on a validation cache extracted with the checkpoint's own fine-tuned backbone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from lare2.shared.logs import get_logger
from lare2.shared.provenance import provenance
from lare2.train.checkpoint import CheckpointError, DetectorConfig, save_detector
from lare2.train.models import build_model, egre_config_from_state_dict

logger = get_logger(__name__)

REFERENCE_BACKBONE_FILE = "backbone.safetensors"
"""Where ``convert_reference`` saves a reference checkpoint's fine-tuned backbone (keys ``visual.*``)."""


def split_reference_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(head, backbone) parts of a reference ``CLipClassifierWMapV6`` state dict.

    Unwraps ``{"state_dict": ...}``/``{"model": ...}`` containers and ``module.`` prefixes
    (DataParallel). Backbone keys lose their ``clip_model.`` prefix (``visual.*`` remains).
    """
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    head, backbone = {}, {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        key = key.removeprefix("module.")
        if key.startswith("clip_model."):
            backbone[key.removeprefix("clip_model.")] = value
        else:
            head[key] = value
    return head, backbone


def convert_reference(checkpoint: str | Path, out: str | Path, *, lare_size: int = 32) -> DetectorConfig:
    """Write an uncalibrated lare2 run directory from a reference ``CLipClassifierWMapV6`` checkpoint.

    The head loads with ``strict=True``; the ``clip_model.*`` part goes to ``backbone.safetensors``
    (keys ``visual.*``) for extraction, since the reference fine-tunes its backbone. ``lare_size`` is
    the side of the LaRE map (image size / 8: 32 at the paper's 256 px), which the weights do not fix.
    The run has threshold 0.5, no extraction fingerprint and ``"calibrated": false`` in its config:
    extract a val cache with ``--clip OUT/backbone.safetensors``, then ``lare2 calibrate OUT --val CACHE``.
    """
    from safetensors.torch import save_file

    from lare2.shared.weights import read_state_dict

    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: no such checkpoint file")
    try:
        head, backbone = split_reference_state(read_state_dict(checkpoint))
        model_config = egre_config_from_state_dict(head, (lare_size, lare_size))
    except ValueError as err:  # the file's tensors do not describe a reference head: say which file
        message = str(err) if str(err).startswith(str(checkpoint)) else f"{checkpoint}: {err}"
        raise CheckpointError(message) from err
    model = build_model(model_config)
    try:
        model.load_state_dict(head, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{checkpoint}: head does not load strictly: {' '.join(str(err).split())}") from err
    out.mkdir(parents=True, exist_ok=True)
    if backbone:
        save_file({k: v.contiguous() for k, v in backbone.items()}, str(out / REFERENCE_BACKBONE_FILE))
    config = DetectorConfig(model=model_config, extraction_fingerprint="", threshold=0.5, target_fpr=None,
                            extra={"calibrated": False, "converted_from": str(checkpoint),
                                   "backbone_keys": len(backbone), "provenance": provenance()})
    save_detector(out, model, config)
    logger.info(f"converted {checkpoint} ({len(head)} head tensors, {len(backbone)} backbone tensors) -> {out}; "
                f"uncalibrated: extract val{' with --clip ' + str(out / REFERENCE_BACKBONE_FILE) if backbone else ''}, "
                f"then `lare2 calibrate {out} --val CACHE`")
    return config
