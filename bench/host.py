"""Host-side capacity of stage 1: what one loader worker decodes and preprocesses per second, and
what the main process writes to the cache per second, against the GPU's model rate.

A loader worker (``extract/loader.py``, ``ManifestImages``) decodes each JPEG once and makes both
model inputs from it: the 256 px LaRE input (``lare_input``: bicubic resize, [-1, 1]) and the
224 px backbone crop (``backbone_input``: centre crop, ImageNet normalisation). The images here are
500 x 375 quality-75 JPEGs (ImageNet's typical size) made from the MiniGenImage photographs.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from bench.timing import alternate, median, rounded

if TYPE_CHECKING:
    from lare2.shared.cache import FeatureCache

IMAGENET_LIKE_SIZE = (500, 375)
IMAGENET_LIKE_QUALITY = 75


def imagenet_like_jpegs(count: int, size: tuple[int, int] = IMAGENET_LIKE_SIZE, quality: int = IMAGENET_LIKE_QUALITY,
                        seed: int = 0) -> list[bytes]:
    """``count`` JPEG files (bytes) of ``size``: the detector-train photographs fitted to it (random
    centring, half of them mirrored), saved at ``quality``."""
    from lare2.minigenimage.photos import load_photo, photos_of
    from PIL import Image, ImageOps

    photos = photos_of("detector-train")
    rng = np.random.default_rng(seed)
    files = []
    for i in range(count):
        image = ImageOps.fit(load_photo(photos[i % len(photos)]), size, Image.Resampling.BICUBIC,
                             centering=(float(rng.uniform()), float(rng.uniform())))
        if rng.integers(0, 2):
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        files.append(buffer.getvalue())
    return files


def worker_steps(image_size: int = 256) -> dict[str, Callable[[bytes], object]]:
    """What a loader worker does per file, cumulatively: decode; decode + each input; decode + both
    (a worker's sample)."""
    from lare2.extract.images import backbone_input, decode_rgb, lare_input

    def both(image) -> tuple[torch.Tensor, torch.Tensor]:
        return lare_input(image, image_size), backbone_input(image)

    return {
        "decode": decode_rgb,
        "decode_lare_input": lambda data: lare_input(decode_rgb(data), image_size),
        "decode_backbone_input": lambda data: backbone_input(decode_rgb(data)),
        "decode_both": lambda data: both(decode_rgb(data)),
    }


def measure_worker(files: list[bytes], *, repeats: int, image_size: int = 256) -> dict:
    """Images/s of each ``worker_steps`` step in one thread (a loader worker is one process), alternated."""
    steps = worker_steps(image_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step in steps.values():  # warm-up
            step(files[0])
        seconds = alternate({name: lambda _, s=step: [s(f) for f in files] for name, step in steps.items()}, repeats)
    finally:
        torch.set_num_threads(threads)
    return {"images": len(files), "repeats": repeats, "threads": 1,
            "jpeg": {"width": IMAGENET_LIKE_SIZE[0], "height": IMAGENET_LIKE_SIZE[1], "quality": IMAGENET_LIKE_QUALITY,
                     "mean_kb": round(float(np.mean([len(f) for f in files])) / 1e3, 1)},
            "images_per_s": {name: round(len(files) / median(s), 1) for name, s in seconds.items()},
            "seconds": {name: rounded(s) for name, s in seconds.items()}}


def tiled_cache(source: Path, folder: Path, blocks: int) -> tuple[FeatureCache, float]:
    """A cache of ``blocks`` blocks in the layout of the cache ``source`` (the full-size one in ``make bench``),
    each a copy of its first block (real features, so the codec sees real data), handed to
    ``FeatureCache.write_block`` in float32 as ``run_extraction`` does; returns it and the seconds the writes took."""
    from lare2.shared.cache import FeatureCache

    src = FeatureCache.open(source)
    c = src.layout.chunk_samples
    m = len(range(*src.block_slice(0).indices(len(src))))
    tiled = np.arange(c) % m  # a short source fills a whole block by repetition
    block = {name: values[tiled].astype(np.float32) for name, values in src.read(src.block_slice(0)).items()}
    meta = {col: list(src.column(col)[tiled]) for col in ("seed", "status", "error")}
    n = blocks * c
    rows = {"sample_id": [f"s{i:07d}" for i in range(n)], "path": ["x.png"] * n, "label": [0] * n,
            "generator": ["x"] * n, "split": ["train"] * n, "class_name": ["goldfish"] * n}
    cache = FeatureCache.create(folder, rows, src.layout, {})
    started = time.perf_counter()
    for b in range(blocks):
        cache.write_block(b, **block, **meta)
    return cache, time.perf_counter() - started


def cache_write_figures(cache: FeatureCache, seconds: float) -> dict:
    """Samples/s and raw MB/s of the block writes of ``tiled_cache`` (what the main process does per finished block)."""
    from lare2.shared.cache import ARRAY_NAMES

    layout, n = cache.layout, len(cache)
    raw = sum(int(np.prod(layout.sample_shape(name))) * np.dtype(layout.dtype(name)).itemsize for name in ARRAY_NAMES)
    return {"samples": n, "chunk_samples": layout.chunk_samples, "seconds": round(seconds, 2),
            "samples_per_s": round(n / seconds, 1), "raw_mb_per_s": round(n * raw / seconds / 1e6, 1),
            "layout": layout.to_dict(), "torch_threads": torch.get_num_threads()}


def workers_needed(worker: dict, writes: dict | None, gpu_images_per_s: float, gpu_source: str) -> dict:
    """Loader workers (and writer processes) per GPU: the GPU's model rate over the per-worker rate, rounded up."""
    per_worker = worker["images_per_s"]["decode_both"]
    result = {"gpu_images_per_s": gpu_images_per_s, "gpu_source": gpu_source,
              "loader_workers": math.ceil(gpu_images_per_s / per_worker),
              "loader_workers_exact": round(gpu_images_per_s / per_worker, 2)}
    if writes:
        result["cache_writers"] = math.ceil(gpu_images_per_s / writes["samples_per_s"])
        result["cache_write_share_of_one_process"] = round(gpu_images_per_s / writes["samples_per_s"], 2)
    return result
