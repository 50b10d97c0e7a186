"""Reading weight files: safetensors preferred; pickles only with ``weights_only=True``."""

from __future__ import annotations

from pathlib import Path

import torch

from lare2.shared.errors import InputError


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a torch pickle (``.ckpt``/``.pt``/``.pth``/``.bin``).

    A pickle is loaded with ``weights_only=True`` (no code runs); a ``{"state_dict": ...}``
    wrapper, as Lightning and many training scripts write, is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weight file")
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file and the reason
        reason = str(err).splitlines()[0]
        raise InputError(f"{path}: cannot read as a weights-only torch checkpoint ({reason})") from err
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InputError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return state
