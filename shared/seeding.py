"""Per-sample seeds: a map never depends on batch size, batch composition, rank or order."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch

SEED_BITS = 63  # torch.Generator.manual_seed takes any int; we keep seeds positive int64.


def sample_seed(run_seed: int, sample_id: str) -> int:
    """Seed of one sample's generator, derived from the run seed and the sample's id.

    sha256 of ``"{run_seed}:{sample_id}"``, first 8 bytes, top bit cleared: stable across
    Python versions and processes (unlike ``hash()``), so it can be stored and reproduced.
    """
    digest = hashlib.sha256(f"{run_seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << SEED_BITS) - 1)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch once at the start of a run."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)
