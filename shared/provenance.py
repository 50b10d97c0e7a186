"""What made a cache or a run: package versions, git SHA, time, model fingerprints."""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import subprocess
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

TRACKED_PACKAGES = ("lare2", "torch", "diffusers", "transformers", "accelerate", "zarr", "numpy", "pillow")


def package_versions(names: Iterable[str] = TRACKED_PACKAGES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_sha(path: Path | str | None = None) -> str:
    """SHA of the checkout holding this package ("unknown" outside a git checkout), "+dirty" if modified."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def provenance() -> dict:
    """The record written beside every cache and run."""
    return {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "versions": package_versions(),
    }


def fingerprint_state_dict(state: Mapping[str, "object"]) -> str:
    """sha256 over sorted parameter names, shapes, dtypes and raw bytes; stable across processes.

    Accepts torch tensors or numpy arrays. Two models with identical weights share a fingerprint
    whatever file format they were loaded from.
    """
    h = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        if hasattr(value, "detach"):  # torch tensor; bf16 has no numpy dtype, so view as bytes
            value = value.detach().cpu().contiguous()
            raw = value.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes() if value.numel() else b""
            dtype, shape = str(value.dtype), tuple(value.shape)
        else:
            arr = np.ascontiguousarray(value)
            raw, dtype, shape = arr.tobytes(), str(arr.dtype), arr.shape
        h.update(f"{name}|{dtype}|{shape}|".encode())
        h.update(raw)
    return h.hexdigest()[:16]
