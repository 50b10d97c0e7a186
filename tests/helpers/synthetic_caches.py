"""Test fixture: synthetic feature caches whose class is planted in one input path, for tests of stage 2.

``signal="lare"``: fakes have a larger reconstruction error on the upper half of the LaRE map;
pooled features are pure noise and the feature map is a fixed (class-independent) pattern plus
noise, so only a model that reads the map can tell the classes apart.
``signal="features"``: the pooled embeddings of reals and fakes lie apart along a fixed direction; the
LaRE map is noise, so only a model that reads the features can.
Fixed parts (pattern, direction) depend on ``pattern_seed`` only, so train/val/test caches made
with different ``seed`` values share them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from lare2.shared.cache import CacheLayout, FeatureCache

SIGNALS = ("lare", "features", "none")


def write_synthetic_cache(
    path: str | Path,
    *,
    num_samples: int,
    signal: str,
    seed: int,
    layout: CacheLayout,
    generators: Sequence[str] = ("synthetic",),
    fake_fraction: float = 0.5,
    pattern_seed: int = 1234,
    lare_shift: float = 1.0,
    feature_shift: float = 20.0,
    identity: dict | None = None,
    error_rows: Sequence[int] = (),
) -> FeatureCache:
    """Create and fill a cache of ``num_samples`` samples; ``error_rows`` are recorded as failed (NaN)."""
    if signal not in SIGNALS:
        raise ValueError(f"signal={signal!r}: choose from {SIGNALS}")
    rng = np.random.default_rng(seed)
    fixed = np.random.default_rng(pattern_seed)
    C, H, W = layout.fmap_shape
    L, h, w = layout.lare_shape
    pattern_CHW = fixed.normal(size=(C, H, W)).astype(np.float32)
    direction_D = fixed.normal(size=layout.pooled_dim)
    direction_D /= np.linalg.norm(direction_D)

    labels = (rng.random(num_samples) < fake_fraction).astype(np.int8)
    gens = [generators[i % len(generators)] for i in range(num_samples)]
    rows = {
        "sample_id": [f"s{seed}-{i:06d}" for i in range(num_samples)],
        "path": [f"synthetic/{seed}/{i}.png" for i in range(num_samples)],
        "label": labels.tolist(),
        "generator": gens,
        "split": ["synthetic"] * num_samples,
        "class_name": ["thing"] * num_samples,
    }
    identity = identity or {"synthetic": True, "pattern_seed": pattern_seed}
    cache = FeatureCache.create(path, rows, layout, attrs={"identity": identity})

    pooled = rng.normal(size=(num_samples, layout.pooled_dim)).astype(np.float32)
    fmap = pattern_CHW[None] + 0.3 * rng.normal(size=(num_samples, C, H, W)).astype(np.float32)
    lare = 0.5 * rng.normal(size=(num_samples, L, h, w)).astype(np.float32) ** 2
    fake = labels.astype(bool)
    if signal == "lare":
        lare[fake, :, : h // 2, :] += lare_shift
    elif signal == "features":
        # centred: reals at -shift/2, fakes at +shift/2 along the direction, so no bias has to be learnt
        pooled += np.where(fake, 0.5, -0.5)[:, None] * feature_shift * direction_D.astype(np.float32)
    status = np.array(["ok"] * num_samples, dtype=object)
    error = np.array([""] * num_samples, dtype=object)
    for i in error_rows:
        pooled[i], fmap[i], lare[i] = np.nan, np.nan, np.nan
        status[i], error[i] = "error", "synthetic failure"

    for block in range(math.ceil(num_samples / layout.chunk_samples)):
        sl = cache.block_slice(block)
        cache.write_block(block, lare=lare[sl], pooled=pooled[sl], fmap=fmap[sl], seed=list(range(sl.start, sl.stop)),
                          status=list(status[sl]), error=list(error[sl]))
    cache.finalize()
    return cache
