"""CLIP ModifiedResNet weights, for both stages: files, named seeded towers, and their fingerprint
(docs/method.md §2.3).

``load_tower(spec)`` is what ``extract/clip_resnet.py::load_backbone`` and stage 2's
``--train-backbone-top`` both call, so the same ``spec`` gives the same float32 weights and the
same fingerprint, the one a cache records as ``attrs["fingerprints"]["backbone"]``.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from lare2.shared.clip_blocks import (HEAD_WIDTH, ModifiedResNet, ModifiedResNetConfig, rn50_config, small_config,
                                     tiny_config)
from lare2.shared.errors import InputError, UserError
from lare2.shared.provenance import fingerprint_state_dict
from lare2.shared.weights import read_state_dict

STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
NAMED_BACKBONES = {"random-rn50": rn50_config, "tiny": tiny_config, "small": small_config}
"""Seeded random towers, by name: full-size RN50, and two millisecond ones for tests and the debug preset."""
BACKBONE_REMEDY = (f"pass an RN50.pt TorchScript archive, a state dict ({'/'.join(STATE_DICT_SUFFIXES)}, "
                   f"keys visual.* or bare), or one of {', '.join(repr(n) for n in NAMED_BACKBONES)}")


class BackboneSourceError(UserError, ValueError):
    """A backbone argument that names nothing loadable as a CLIP ModifiedResNet; the message says why."""


class BackboneNotFoundError(BackboneSourceError, FileNotFoundError):
    """No file and no named tower where a backbone argument points."""


def infer_config(state: Mapping[str, Tensor]) -> ModifiedResNetConfig:
    """The architecture of a ModifiedResNet state dict (bare keys), from its tensor shapes.

    Heads cannot be read from shapes; CLIP's convention (embed_dim // 64) is assumed.
    """
    required = ("conv1.weight", "attnpool.positional_embedding", "attnpool.c_proj.weight")
    missing = [k for k in required if k not in state]
    if missing:
        raise KeyError(f"not a CLIP ModifiedResNet state dict: missing {missing}")
    width = state["conv1.weight"].shape[0] * 2
    layers = []
    for stage in range(1, 5):
        blocks = {int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        layers.append(len(blocks))
    positions = state["attnpool.positional_embedding"].shape[0] - 1
    grid = round(positions**0.5)
    embed_dim = width * 32
    return ModifiedResNetConfig(
        layers=tuple(layers), width=width, output_dim=state["attnpool.c_proj.weight"].shape[0],
        heads=max(1, embed_dim // HEAD_WIDTH), image_size=grid * 32,
    )


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files holding a ``code/`` folder; ``torch.save`` zips do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def read_backbone_state(path: Path) -> dict[str, Tensor]:
    """The tensors of a backbone file, keys as stored (``visual.*`` or bare)."""
    suffix = path.suffix.lower()
    if suffix not in STATE_DICT_SUFFIXES:
        raise BackboneSourceError(f"{path}: unsupported backbone file type {suffix!r}; "
                                  f"expected one of {STATE_DICT_SUFFIXES}")
    if suffix != ".safetensors" and _is_torchscript(path):
        # Only the archive's tensors are used; its methods are never called (loading still deserialises it).
        return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    try:
        return read_state_dict(path)
    except InputError as err:
        raise BackboneSourceError(f"{err} (nor as a TorchScript archive)") from None


def visual_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Keep the image tower: ``visual.*`` keys with the prefix stripped, or all keys if none has it."""
    if any(k.startswith("visual.") for k in state):
        return {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    return dict(state)


def load_state_strict(module: nn.Module, state: Mapping[str, Tensor], where: str,
                      what: str = "a CLIP ModifiedResNet") -> None:
    """``load_state_dict(strict=True)`` with an error that names the file, ``what`` it should be and a few offending
    keys."""
    expected = set(module.state_dict())
    # BatchNorm fills a missing num_batches_tracked itself; every other key must match.
    missing = sorted(k for k in expected - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - expected)
    wrong_shape = sorted(k for k in expected & set(state)
                         if tuple(state[k].shape) != tuple(module.state_dict()[k].shape))
    if missing or unexpected or wrong_shape:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        problems = [f"{label} {len(keys)}: {few(keys)}" for label, keys in
                    (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)) if keys]
        raise BackboneSourceError(f"{where}: does not match {what}; " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def build_backbone(config: ModifiedResNetConfig, seed: int = 0) -> ModifiedResNet:
    """A ModifiedResNet with weights drawn from ``seed`` (the global RNG is left untouched).

    Fresh BatchNorm statistics (mean 0, variance 1) let the activations of a random tower shrink
    layer after layer until every image gives the same features; the statistics are therefore
    set from one pass over seeded noise images, rounded to float16 precision so that the weights
    (and their fingerprint) do not depend on the machine's thread count.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ModifiedResNet(config)
        calibrate_batchnorm(model, torch.randn(16, 3, config.image_size, config.image_size))
    return model


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, images_B3HW: Tensor) -> None:
    """Set every BatchNorm's running statistics to those of ``images_B3HW`` flowing through ``model``."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average: one batch gives exactly its statistics
    model.train()
    model(images_B3HW)
    model.eval()
    for norm in norms:
        norm.momentum = 0.1
        norm.running_mean.copy_(norm.running_mean.half().float())
        norm.running_var.copy_(norm.running_var.half().float())


def load_tower(spec: str | Path) -> tuple[ModifiedResNet, str]:
    """A float32 ModifiedResNet (in train mode, with gradients, on the CPU) and the fingerprint of its weights.

    ``spec``: ``RN50.pt`` (OpenAI's TorchScript archive), a state dict (``.pt/.pth/.bin`` read with
    ``weights_only=True``, or ``.safetensors``; keys ``visual.*`` or bare), or a named seeded tower
    (``NAMED_BACKBONES``, seed 0). The fingerprint is a sha256 over the float32 weights, so it is the
    same whichever file format held them. ``BackboneNotFoundError`` / ``ValueError`` name the argument.
    """
    spec = str(spec)
    if spec in NAMED_BACKBONES:
        module = build_backbone(NAMED_BACKBONES[spec]())
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            resolved = str(path.resolve())
            if path.is_dir():
                what = ": a folder, not a weight file"
            elif path.suffix.lower() in STATE_DICT_SUFFIXES or any(sep in spec for sep in ("/", "\\", "~")):
                what = ": no such file" + (f" ({resolved})" if resolved != spec else "")
            else:
                what = f": not a file on disk ({resolved}) nor a named backbone"
            raise BackboneNotFoundError(f"backbone {spec!r} not found{what}; {BACKBONE_REMEDY}")
        state = visual_state(read_backbone_state(path))
        try:
            config = infer_config(state)
        except (KeyError, ValueError) as err:
            raise BackboneSourceError(f"{path}: {err.args[0]}; found keys like {sorted(state)[:5]}") from err
        module = ModifiedResNet(config)
        load_state_strict(module, state, str(path))
    module.float()
    return module, fingerprint_state_dict(module.state_dict())
