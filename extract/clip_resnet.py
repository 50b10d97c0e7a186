"""Stage 1's CLIP image backbone (docs/method.md §2): a frozen ModifiedResNet and its preprocessing constants.

The tower itself (blocks, configs, ``ModifiedResNet``) lives in ``shared/clip_blocks.py`` and its
weights (files, seeded named towers, fingerprint) in ``shared/clip_weights.py``, because stage 2's
``--train-backbone-top`` builds its last stage from the same definition and weights. This module
re-exports them under the names stage 1 has always used and adds ``load_backbone``: the frozen
tower on a device, with stage 1's error types.

Shapes: B batch, C channels, H x W spatial.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from lare2.extract.models import ModelNotFoundError, ModelSourceError  # torch only: diffusers loads lazily
from lare2.shared.clip_blocks import (  # noqa: F401 - stage 1's public names
    BOTTLENECK_EXPANSION,
    HEAD_WIDTH,
    AttentionPool2d,
    BackboneOutput,
    Bottleneck,
    ModifiedResNet,
    ModifiedResNetConfig,
    rn50_config,
    small_config,
    tiny_config,
)
from lare2.shared.clip_weights import (  # noqa: F401 - stage 1's public names
    BACKBONE_REMEDY,
    NAMED_BACKBONES,
    STATE_DICT_SUFFIXES,
    BackboneNotFoundError,
    BackboneSourceError,
    build_backbone,
    calibrate_batchnorm,
    infer_config,
    load_state_strict,
    load_tower,
    visual_state,
)
from lare2.shared.clip_weights import read_backbone_state as _read_backbone_state

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(x01_B3HW: Tensor) -> Tensor:
    """ImageNet mean/std normalisation of images in [0, 1] (the reference training code's constants)."""
    mean = torch.tensor(IMAGENET_MEAN, device=x01_B3HW.device, dtype=x01_B3HW.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x01_B3HW.device, dtype=x01_B3HW.dtype).view(1, 3, 1, 1)
    return (x01_B3HW - mean) / std


def read_backbone_state(path: Path) -> dict[str, Tensor]:
    """The tensors of a backbone file, keys as stored (``visual.*`` or bare); ``ModelSourceError`` for a wrong file
    type."""
    try:
        return _read_backbone_state(path)
    except BackboneSourceError as err:
        raise ModelSourceError(str(err)) from None


def load_backbone(
    spec: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[ModifiedResNet, str]:
    """A frozen ModifiedResNet in eval mode and the fingerprint of its weights.

    ``spec``: ``RN50.pt`` (OpenAI's TorchScript archive), a state dict (``.pt/.pth/.bin`` read with
    ``weights_only=True``, or ``.safetensors``; keys ``visual.*`` or bare), ``random-rn50`` (full
    size, seeded random), ``tiny`` or ``small`` (``shared/clip_weights.py::load_tower``). The fingerprint
    is taken over float32 weights, so it is the same whichever file format held them and whatever
    ``dtype`` the module runs in.
    """
    try:
        module, fingerprint = load_tower(spec)
    except BackboneNotFoundError as err:
        raise ModelNotFoundError(str(err)) from None
    except BackboneSourceError as err:
        raise ModelSourceError(str(err)) from err.__cause__
    module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return module, fingerprint
