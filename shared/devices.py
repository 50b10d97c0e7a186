"""Device names as users write them: ``auto`` (CUDA when present), ``cpu`` or ``cuda``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

from lare2.shared.errors import InputError

if TYPE_CHECKING:
    import torch

DeviceName = Literal["auto", "cpu", "cuda"]
DEVICES: tuple[str, ...] = get_args(DeviceName)


def resolve_device(name: str) -> "torch.device":
    """``auto`` -> CUDA when torch sees a device, else CPU; ``cuda`` without one is a usage error."""
    import torch

    if name not in DEVICES:
        raise InputError(f"device {name!r}: choose from {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda': this torch build sees no CUDA device; use --device auto or cpu")
    return torch.device(name)
