"""Cache writes beside the model: what the background writer (``lare2.extract.block_writer``) sustains.

Three ways to write the full-size layout's blocks (32 samples; ``fmap`` [1024, 14, 14] handed over in
float32, stored float16 with Zstd), each timed on a cache of its own:

- ``inline``: ``FeatureCache.write_block`` in the loop's thread, as extraction did before the writer
  (the model waits for every write);
- ``thread``: the ``BlockWriter`` thread the extractor uses;
- ``process``: the same queue of depth 2 with one writer process (each block pickled through a pipe).

For each: the writer's capacity (samples/s with nothing else to do), and the rate of a stand-in
extraction whose model makes ``model_images_per_s`` (400: the H200 goal) by sleeping for each
block, as a GPU-bound loop waits on the device with the GIL released. With the model's time hidden
the stand-in runs at min(model, writer); inline, it runs at 1 / (1/model + 1/writer).
"""

from __future__ import annotations

import multiprocessing
import shutil
import tempfile
import time
from pathlib import Path
from collections.abc import Callable

import numpy as np

from bench.timing import median

MODEL_IMAGES_PER_S = 400.0
"""The stand-in model's rate: the stage-1 goal for one H200."""


def full_size_block(chunk_samples: int, source: Path | None = None, seed: int = 0) -> dict:
    """A block as the extractor hands it over (float32 arrays of the full-size layout, seeds, statuses, errors):
    the first block of the cache ``source`` repeated to ``chunk_samples`` rows, as ``bench.host.tiled_cache``
    (real features), or without one synthetic values: a ReLU of Gaussian noise for ``fmap``, which compresses
    a little less (1.7x) and more slowly than RN50 maps (1.96x), so it gives a lower bound."""
    from lare2.shared.cache import STATUS_OK, CacheLayout, FeatureCache

    if source is not None:
        src = FeatureCache.open(source)
        tiled = np.arange(chunk_samples) % len(range(*src.block_slice(0).indices(len(src))))
        arrays = {name: v[tiled].astype(np.float32) for name, v in src.read(src.block_slice(0)).items()}
        return {**arrays, **{col: list(src.column(col)[tiled]) for col in ("seed", "status", "error")}}
    layout, rng, n = CacheLayout(), np.random.default_rng(seed), chunk_samples
    return {"lare": (0.5 * rng.standard_normal((n, *layout.lare_shape), dtype=np.float32)) ** 2,
            "pooled": rng.standard_normal((n, layout.pooled_dim), dtype=np.float32),
            "fmap": np.maximum(rng.standard_normal((n, *layout.fmap_shape), dtype=np.float32), 0),
            "seed": list(range(n)), "status": [STATUS_OK] * n, "error": [""] * n}


def _empty_cache(path: Path, blocks: int):
    from lare2.shared.cache import CacheLayout, FeatureCache

    n = blocks * CacheLayout().chunk_samples
    rows = {"sample_id": [f"s{i:07d}" for i in range(n)], "path": ["x.png"] * n, "label": [0] * n,
            "generator": ["x"] * n, "split": ["train"] * n, "class_name": ["goldfish"] * n}
    return FeatureCache.create(path, rows, CacheLayout(), {})


def _write_in_process(path: str, blocks: multiprocessing.Queue, ready) -> None:
    from lare2.shared.cache import FeatureCache

    cache = FeatureCache.open(path, mode="r+")
    ready.set()
    while (item := blocks.get()) is not None:
        cache.write_block(item[0], **item[1])


def _writers() -> dict[str, Callable]:
    """name -> fn(cache, block values, blocks, model_s): seconds to hand ``blocks`` blocks over and write them all,
    sleeping ``model_s`` per block before each handover (the stand-in model)."""
    from lare2.extract.block_writer import BlockWriter

    def inline(cache, values, blocks, model_s):
        started = time.perf_counter()
        for b in range(blocks):
            time.sleep(model_s)
            cache.write_block(b, **values)
        return time.perf_counter() - started

    def thread(cache, values, blocks, model_s):
        started = time.perf_counter()
        with BlockWriter(cache) as writer:
            for b in range(blocks):
                time.sleep(model_s)
                writer.put(b, values)
        return time.perf_counter() - started

    def process(cache, values, blocks, model_s):
        context = multiprocessing.get_context("spawn")  # a fork would copy the loop's CUDA state
        queue, ready = context.Queue(maxsize=2), context.Event()
        worker = context.Process(target=_write_in_process, args=(str(cache.path), queue, ready))
        worker.start()
        ready.wait()  # imports and the store opened before the clock starts, as in a long-lived writer
        started = time.perf_counter()
        for b in range(blocks):
            time.sleep(model_s)
            queue.put((b, values))
        queue.put(None)
        worker.join()
        return time.perf_counter() - started

    return {"inline": inline, "thread": thread, "process": process}


def measure_writer(folder: Path | None = None, *, source: Path | None = None, blocks: int = 16, repeats: int = 3,
                   model_images_per_s: float = MODEL_IMAGES_PER_S) -> dict:
    """Writer capacity and stand-in extraction rate (samples/s, medians of ``repeats`` alternating rounds) of
    each way to write; ``blocks`` full-size blocks per timing (from ``source``, see ``full_size_block``), written
    into fresh caches under ``folder``."""
    from lare2.shared.cache import CacheLayout

    c = CacheLayout().chunk_samples
    values = full_size_block(c, source)
    model_s = c / model_images_per_s
    writers = _writers()
    seconds: dict[str, list[float]] = {f"{name}_{mode}": [] for name in writers for mode in ("alone", "with_model")}
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        for round_ in range(repeats):
            for name, write in list(writers.items())[::1 if round_ % 2 == 0 else -1]:  # drifting load hits all alike
                for mode, sleep_s in (("alone", 0.0), ("with_model", model_s)):
                    cache = _empty_cache(Path(tmp) / f"{name}-{mode}-{round_}", blocks)
                    seconds[f"{name}_{mode}"].append(write(cache, values, blocks, sleep_s))
                    shutil.rmtree(cache.path)  # ~120 MB each
    rate = {key: round(blocks * c / median(s), 1) for key, s in seconds.items()}
    return {"blocks": blocks, "chunk_samples": c, "values": "real block of the source cache" if source else "synthetic",
            "repeats": repeats, "model_images_per_s": model_images_per_s,
            "writer_samples_per_s": {name: rate[f"{name}_alone"] for name in writers},
            "extraction_samples_per_s": {name: rate[f"{name}_with_model"] for name in writers},
            "seconds": {key: [round(v, 3) for v in s] for key, s in seconds.items()}}


if __name__ == "__main__":
    import json

    print(json.dumps(measure_writer(), indent=2))  # python -m bench.writer, from the repository root
