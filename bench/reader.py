"""Stage 2 reader benchmark: does training wait for the cache? (``measure_reader``; ``bench/run_bench.py`` calls it).

A cache of synthetic samples with the full-size layout (lare [4, 32, 32] float32, pooled [1024] and
fmap [1024, 14, 14] float16, 32 samples per chunk, the cache's Zstd codec) is written, then:

- reader only: samples/s of ``CacheSplit.epoch_batches`` with 0 (inline), 1 and 2 read workers;
- training: samples/s of an EGRE epoch on CPU (``lare2.train.trainer.train_step``, as ``lare2 train``
  runs it; its first ``train_samples``) reading from the cache with read-ahead, and from the same samples
  held in memory; their ratio says how much of the epoch goes to waiting for reads (1.0: none). The
  contenders alternate for ``rounds`` rounds (order reversed every other round) and medians count.

The feature map is rectified noise (about half zeros, as after the backbone's ReLU), so it compresses
about as much as real features (~2x); the page cache is warm (just written).
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root makes ``bench.*`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.timing import median, rounded

BATCH_SIZE = 48
"""The reference recipe's batch (``TrainConfig.batch_size``)."""
SHUFFLE_BLOCKS = 8
"""``TrainConfig.shuffle_blocks``'s default."""
READ_AHEAD = 2
"""``TrainConfig.read_ahead``'s default."""
DISTINCT_BLOCKS = 8
"""Distinct blocks of random values, repeated over the cache: drawing 0.4 MB of noise per sample would dominate."""


def write_full_size_cache(path: Path, samples: int, seed: int = 0):
    """A finished cache of ``samples`` synthetic samples with the full-size layout; half of them fake."""
    from lare2.shared.cache import STATUS_OK, CacheLayout, FeatureCache

    layout = CacheLayout()
    c = layout.chunk_samples
    rng = np.random.default_rng(seed)
    labels = (np.arange(samples) % 2).astype(np.int8)
    rows = {"sample_id": [f"s{i:07d}" for i in range(samples)], "path": [f"bench/{i}.png" for i in range(samples)],
            "label": labels.tolist(), "generator": ["bench"] * samples, "split": ["train"] * samples,
            "class_name": ["goldfish"] * samples}
    cache = FeatureCache.create(path, rows, layout, attrs={"identity": {"bench": "reader"}})
    pool = [{"lare": (0.5 * rng.standard_normal((c, *layout.lare_shape), dtype=np.float32)) ** 2,
             "pooled": rng.standard_normal((c, layout.pooled_dim), dtype=np.float32).astype(np.float16),
             "fmap": np.maximum(rng.standard_normal((c, *layout.fmap_shape), dtype=np.float32), 0).astype(np.float16)}
            for _ in range(DISTINCT_BLOCKS)]
    for block in range(cache.num_blocks):
        sl = cache.block_slice(block)
        n = sl.stop - sl.start
        arrays = {name: values[:n] for name, values in pool[block % DISTINCT_BLOCKS].items()}
        cache.write_block(block, **arrays, seed=list(range(sl.start, sl.stop)), status=[STATUS_OK] * n,
                          error=[""] * n)
    cache.finalize()
    return cache


def _epoch_kwargs(seed: int) -> dict:
    return {"epoch": 0, "seed": seed, "batch_size": BATCH_SIZE, "shuffle_blocks": SHUFFLE_BLOCKS}


def reader_rate(path: Path, workers: int, seed: int = 0) -> float:
    """Samples/s of one epoch of ``epoch_batches`` with nothing else to do (EGRE's inputs: all three arrays)."""
    from lare2.train.data import CacheSplit, ReadSettings

    split = CacheSplit(path, ("pooled", "fmap", "lare"), read=ReadSettings(workers=workers, ahead=READ_AHEAD))
    started = time.perf_counter()
    seen = sum(len(batch) for batch in split.epoch_batches(**_epoch_kwargs(seed)))
    return seen / (time.perf_counter() - started)


def train_rate(path: Path, *, in_memory: bool, workers: int = 2, seed: int = 0,
               steps: int | None = None) -> tuple[float, float]:
    """(samples/s of one EGRE training epoch on CPU, or of its first ``steps`` steps; seconds spent loading the
    split into memory first)."""
    import torch
    from accelerate import Accelerator

    from lare2.train.data import CacheSplit, ReadSettings
    from lare2.train.models import ModelConfig, build_model
    from lare2.train.trainer import train_step

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(seed)
    model = build_model(ModelConfig(kind="egre"))  # full-size dims: pooled 1024, fmap 1024 x 14 x 14, LaRE 4 x 32 x 32
    trainable = [p for p in model.parameters() if p.requires_grad]
    model, optimizer = accelerator.prepare(model, torch.optim.Adam(trainable, lr=1e-4))
    model.train()
    split = CacheSplit(path, type(accelerator.unwrap_model(model)).input_names,
                       read=ReadSettings(workers=workers, ahead=READ_AHEAD))
    started = time.perf_counter()
    if in_memory:
        split.hold_in_memory()
    load_seconds = time.perf_counter() - started
    seen = 0
    started = time.perf_counter()
    for batch in itertools.islice(split.epoch_batches(**_epoch_kwargs(seed)), steps):  # no batch read beyond
        train_step(model, batch.to(accelerator.device), optimizer, accelerator, trainable, grad_clip=5.0)
        seen += len(batch)
    return seen / (time.perf_counter() - started), load_seconds


def measure_reader(folder: Path, samples: int = 4096, seed: int = 0, *, train_samples: int | None = 1024,
                   rounds: int = 3) -> dict:
    """Reader and training throughput on a full-size synthetic cache of ``samples`` samples written under ``folder``.

    The contenders take turns, in an order reversed every other round (``bench.timing``), and medians are
    reported: the reader with 0, 1, 2 workers, and training from the cache vs from memory, whose ratio is
    the median of the per-round ratios. Each training run stops after ``train_samples`` samples (whole
    batches; None: the whole epoch): EGRE trains at ~25 samples/s on 2 CPU cores."""
    import torch

    folder = Path(folder)
    started = time.perf_counter()
    cache = write_full_size_cache(folder / "reader-cache", samples, seed)
    write_seconds = time.perf_counter() - started
    reader_runs: dict[int, list[float]] = {0: [], 1: [], 2: []}
    for r in range(rounds):
        for workers in (0, 1, 2) if r % 2 == 0 else (2, 1, 0):
            reader_runs[workers].append(reader_rate(cache.path, workers, seed))
    steps = None if train_samples is None else max(1, train_samples // BATCH_SIZE)
    runs: dict[bool, list[float]] = {False: [], True: []}
    for r in range(rounds):
        for held in (False, True) if r % 2 == 0 else (True, False):
            rate, load_seconds = train_rate(cache.path, in_memory=held, seed=seed, steps=steps)
            runs[held].append(rate)
    ratios = [c / m for c, m in zip(runs[False], runs[True])]
    return {"reader_samples_per_s": {str(w): round(median(v), 1) for w, v in reader_runs.items()},
            "train_from_cache_samples_per_s": round(median(runs[False]), 1),
            "train_in_memory_samples_per_s": round(median(runs[True]), 1),
            "cache_over_memory_ratio": round(median(ratios), 3),
            "samples": samples, "batch_size": BATCH_SIZE,
            "settings": {"shuffle_blocks": SHUFFLE_BLOCKS, "read_ahead": READ_AHEAD, "train_read_workers": 2,
                         "chunk_samples": cache.layout.chunk_samples, "torch_threads": torch.get_num_threads()},
            "rounds": {"reader": {str(w): rounded(v, 1) for w, v in reader_runs.items()},
                       "from_cache": rounded(runs[False], 1), "in_memory": rounded(runs[True], 1),
                       "ratio": rounded(ratios)},
            "write_seconds": round(write_seconds, 1), "in_memory_load_seconds": round(load_seconds, 2),
            "train_steps": min(steps or math.inf, math.ceil(samples / BATCH_SIZE))}


if __name__ == "__main__":  # .venv/bin/python bench/reader.py [SAMPLES [TRAIN_SAMPLES]]
    with tempfile.TemporaryDirectory(prefix="lare2-reader-") as tmp:
        sizes = [int(a) for a in sys.argv[1:3]]
        train = {"train_samples": sizes[1]} if len(sizes) > 1 else {}
        print(json.dumps(measure_reader(Path(tmp), *sizes[:1], **train), indent=2))
