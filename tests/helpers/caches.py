"""Feature caches on disk for tests, written without the extractor (no diffusers, no models).

- ``write_synthetic_cache``: caches whose class is planted in one input path, for tests of stage 2.
  ``signal="lare"``: fakes have a larger reconstruction error on the upper half of the LaRE map; pooled
  features are pure noise and the feature map is a fixed (class-independent) pattern plus noise, so only a
  model that reads the map can tell the classes apart. ``signal="features"``: the pooled embeddings of reals
  and fakes lie apart along a fixed direction; the LaRE map is noise, so only a model that reads the features
  can. Fixed parts (pattern, direction) depend on ``pattern_seed`` only, so train/val/test caches made with
  different ``seed`` values share them.
- ``build_tiny_cache``: a small cache with images and a manifest, for the cache inspection and export tests.
  24 samples in blocks of 4 (6 blocks), three generators: blocks 0-3 done with a mix of ok and error samples,
  block 4 done with errors only (zarr writes no array chunks for it), block 5 pending. Fake samples get larger
  LaRE values than real ones, as a detector would hope. Its ``extract_config`` and identity are the ``debug``
  preset's, with made-up model fingerprints.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from lare2.shared.cache import STATUS_ERROR, STATUS_OK, CacheLayout, FeatureCache
from lare2.shared.config import debug
from lare2.shared.manifest import write_manifest
from lare2.shared.provenance import provenance


# ---- synthetic caches: a planted signal, for stage 2 ------------------------------------------------
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


# ---- the tiny cache: images, a manifest, done / error / pending blocks -----------------------------------
NUM_SAMPLES = 24
CHUNK = 4
LAYOUT = CacheLayout(lare_shape=(4, 32, 32), pooled_dim=16, fmap_shape=(16, 14, 14), chunk_samples=CHUNK)
GENERATORS = ("nature", "sdv14", "adm")  # label 0, 1, 1
ERROR_INDICES = (5, 10, 16, 17, 18, 19)  # 16-19: block 4, all failed
PENDING_BLOCK = 5
IMAGE_SIZE = 24


@dataclass
class TinyCache:
    path: Path
    manifest: Path
    root: Path
    rows: dict
    """Manifest columns of the cached samples, in store order."""

    @property
    def ids(self) -> list[str]:
        return self.rows["sample_id"]


def manifest_rows(n: int = NUM_SAMPLES) -> dict:
    generators = [GENERATORS[i % 3] for i in range(n)]
    return {
        "sample_id": [hashlib.sha256(f"img{i}".encode()).hexdigest()[:16] for i in range(n)],
        "path": [f"{g}/img{i}.png" for i, g in enumerate(generators)],
        "label": [0 if g == "nature" else 1 for g in generators],
        "generator": generators,
        "split": ["val" if i % 5 == 4 else "train" for i in range(n)],
        "class_name": ["tabby cat" if i % 2 else "goldfish" for i in range(n)],
    }


def write_tiny_manifest(path: Path, rows: dict, root: Path) -> None:
    n = len(rows["sample_id"])
    extra = {"width": [IMAGE_SIZE] * n, "height": [IMAGE_SIZE] * n, "format": ["PNG"] * n, "error": [""] * n}
    write_manifest(path, {**rows, **extra}, root=root, builder="folders")


def build_tiny_cache(tmp: Path, name: str = "cache", *, seed: int = 0, images: bool = True,
                     complete: bool = False) -> TinyCache:
    """Write images, a manifest and a cache under ``tmp``; arrays drawn from ``seed``.

    ``complete``: block ``PENDING_BLOCK`` is written too (all ok), so no block is pending."""
    rng = np.random.default_rng(seed)
    rows = manifest_rows()
    root = tmp / "images"
    if images:
        for rel in rows["path"]:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, size=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / rel)
    manifest = tmp / "manifest.parquet"
    write_tiny_manifest(manifest, rows, root)

    cfg = debug(manifest=str(manifest), out=str(tmp / name), chunk_samples=CHUNK)
    fingerprints = {"backbone": "b" * 16, "sd": "5" * 16}
    attrs = {
        "extract_config": cfg.to_dict(),
        "identity": cfg.identity(fingerprints),
        "fingerprints": fingerprints,
        "provenance": provenance(),
        "manifest": {"path": str(manifest), "root": str(root)},
    }
    cache = FeatureCache.create(tmp / name, rows, LAYOUT, attrs)
    labels = np.asarray(rows["label"])
    for block in range(cache.num_blocks):
        if block == PENDING_BLOCK and not complete:
            continue
        sl = cache.block_slice(block)
        n = sl.stop - sl.start
        scale = (1.0 + 2.0 * labels[sl]).reshape(n, 1, 1, 1)  # fakes: larger errors
        lare = rng.gamma(2.0, 0.05, size=(n, *LAYOUT.lare_shape)) * scale
        pooled = rng.normal(size=(n, LAYOUT.pooled_dim))
        fmap = rng.normal(size=(n, *LAYOUT.fmap_shape))
        failed = [i in ERROR_INDICES for i in range(sl.start, sl.stop)]
        for array in (lare, pooled, fmap):
            array[failed] = np.nan
        cache.write_block(
            block, lare=lare, pooled=pooled, fmap=fmap,
            seed=[1000 + i for i in range(sl.start, sl.stop)],
            status=[STATUS_ERROR if f else STATUS_OK for f in failed],
            error=["ImageError: cannot identify image file" if f else "" for f in failed],
        )
    cache.finalize()
    return TinyCache(path=tmp / name, manifest=manifest, root=root, rows=rows)


def ok_indices() -> list[int]:
    done = [i for i in range(NUM_SAMPLES) if i // CHUNK != PENDING_BLOCK]
    return [i for i in done if i not in ERROR_INDICES]
