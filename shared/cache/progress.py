"""How far an extraction has come: blocks and samples done per shard, the rate, an ETA, the shards left.

``lare2 cache progress PATH`` reads only the done marks (``block_done``, one chunk file per block,
written last and atomically by ``FeatureCache.write_block``), so it is safe and cheap to run while
an array of jobs writes the cache. Shard ``s`` of ``num_shards`` owns the blocks with
``block % num_shards == s`` (``lare2.extract.run.shard_blocks``); ``num_shards`` defaults to the
number the cache was created with (``lare2 extract --create-only --num-shards N`` and
``--submit slurm`` record it).

The rate comes from the modification times of the done marks of the last ``window_s`` seconds:
the samples of every mark after the first, over the time from the first to the last. It covers all
tasks at once, so it is the array's rate. The shards that still have pending blocks are also given
in the form ``sbatch --array=`` takes (``1,4-6``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from lare2.shared.cache.store import FeatureCache

RATE_WINDOW_S = 600.0
"""Done marks younger than this (seconds) give the rate."""


@dataclass
class ShardProgress:
    shard: int
    blocks_done: int
    blocks: int
    samples_done: int
    samples: int


@dataclass
class Progress:
    path: str
    num_shards: int
    blocks_done: int
    blocks: int
    samples_done: int
    samples: int
    samples_per_s: float | None
    """Samples per second from the recent done marks; None when fewer than two are recent (or a packed cache)."""
    eta_s: float | None
    """Seconds until every pending sample is done at that rate (0 when complete)."""
    recent_marks: int
    """Done marks in the rate's window."""
    last_done_age_s: float | None
    """Seconds since the newest done mark."""
    missing_shards: list[int]
    array: str
    """``missing_shards`` as ``sbatch --array=`` takes it; "" when none."""
    shards: list[ShardProgress] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.blocks_done == self.blocks


def array_spec(indices: Iterable[int]) -> str:
    """Task indices in the ``--array=`` form, runs of consecutive ones as ``a-b``: ``[1, 4, 5, 6]`` -> ``1,4-6``."""
    parts: list[str] = []
    ordered = sorted({int(i) for i in indices})
    start = previous = None
    for index in ordered + [None]:
        if start is not None and (index is None or index != previous + 1):
            parts.append(str(start) if start == previous else f"{start}-{previous}")
            start = None
        if index is not None and start is None:
            start = index
        previous = index
    return ",".join(parts)


def missing_shards(done: np.ndarray, num_shards: int) -> list[int]:
    """Shards (``block % num_shards``) holding at least one block not done; ``done`` is bool [num_blocks]."""
    pending = np.flatnonzero(~np.asarray(done, dtype=bool))
    return sorted({int(b) % num_shards for b in pending})


def recorded_num_shards(cache: FeatureCache) -> int:
    """The number of shards the cache was created with (1 when it was made by one job)."""
    return int((cache.attrs.get("extract_config") or {}).get("num_shards") or 1)


def done_mark_times(cache: FeatureCache, done: np.ndarray) -> np.ndarray:
    """Float [num_blocks]: when each done block's mark was written (Unix time); NaN for pending blocks and in a
    packed cache (whose marks share one shard file)."""
    times = np.full(len(done), np.nan)
    if cache.pack_blocks > 1:
        return times
    marks = cache.group["block_done"]
    folder = cache.path / marks.path
    for block in np.flatnonzero(done):
        try:
            times[block] = os.stat(folder / marks.metadata.encode_chunk_key((int(block),))).st_mtime
        except FileNotFoundError:  # damage; verify names it
            pass
    return times


def block_sizes(cache: FeatureCache) -> np.ndarray:
    """Int [num_blocks]: samples per block (the last one may be short)."""
    sizes = np.full(cache.num_blocks, cache.layout.chunk_samples, dtype=np.int64)
    sizes[-1] = len(cache) - cache.layout.chunk_samples * (cache.num_blocks - 1)
    return sizes


def recent_rate(times: np.ndarray, sizes: np.ndarray, now: float, window_s: float) -> tuple[float | None, int]:
    """(samples per second over the done marks of the last ``window_s`` seconds, how many marks that is)."""
    recent = np.flatnonzero(times >= now - window_s)
    if len(recent) < 2:
        return None, len(recent)
    order = recent[np.argsort(times[recent])]
    span = float(times[order[-1]] - times[order[0]])
    if span <= 0:
        return None, len(recent)
    return float(sizes[order[1:]].sum()) / span, len(recent)  # the first mark starts the clock


def cache_progress(path: str | Path, num_shards: int | None = None, *, window_s: float = RATE_WINDOW_S,
                   now: float | None = None) -> Progress:
    """Progress of the cache at ``path`` split into ``num_shards`` shards (default: as recorded at creation)."""
    from lare2.shared.errors import InputError

    cache = FeatureCache.open(path)
    shards = recorded_num_shards(cache) if num_shards is None else num_shards
    if shards < 1:
        raise InputError(f"--num-shards {shards}: expected a number >= 1")
    now = time.time() if now is None else now
    done = cache.done_blocks()
    sizes = block_sizes(cache)
    times = done_mark_times(cache, done)
    rate, recent = recent_rate(times, sizes, now, window_s)
    owner = np.arange(cache.num_blocks) % shards
    per_shard = [ShardProgress(shard=s, blocks_done=int(done[owner == s].sum()), blocks=int((owner == s).sum()),
                               samples_done=int(sizes[done & (owner == s)].sum()), samples=int(sizes[owner == s].sum()))
                 for s in range(shards)]
    samples_done = int(sizes[done].sum())
    pending = len(cache) - samples_done
    missing = missing_shards(done, shards)
    finite = times[np.isfinite(times)]
    return Progress(path=str(cache.path), num_shards=shards, blocks_done=int(done.sum()), blocks=cache.num_blocks,
                    samples_done=samples_done, samples=len(cache), samples_per_s=rate,
                    eta_s=0.0 if pending == 0 else (pending / rate if rate else None), recent_marks=recent,
                    last_done_age_s=float(now - finite.max()) if len(finite) else None,
                    missing_shards=missing, array=array_spec(missing), shards=per_shard)


def duration_text(seconds: float | None) -> str:
    """``95`` -> ``1 min 35 s``; ``None`` -> ``unknown``."""
    if seconds is None:
        return "unknown"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def summary_lines(progress: Progress) -> list[str]:
    """The report in words: totals, rate and ETA, and the shards left as an ``--array=`` value."""
    share = 100.0 * progress.samples_done / progress.samples
    lines = [f"{progress.path}: {progress.blocks_done}/{progress.blocks} blocks, {progress.samples_done}/"
             f"{progress.samples} samples done ({share:.1f}%), {progress.num_shards} shards"]
    if progress.complete:
        lines.append("complete: every block is done")
        return lines
    last = ("no block done yet" if progress.last_done_age_s is None
            else f"last block done {duration_text(progress.last_done_age_s)} ago")
    if progress.samples_per_s is None:
        lines.append(f"rate: unknown (fewer than two blocks done in the last {duration_text(RATE_WINDOW_S)}); {last}")
    else:
        lines.append(f"rate: {progress.samples_per_s:.3g} samples/s over the last {progress.recent_marks} done blocks; "
                     f"ETA {duration_text(progress.eta_s)}; {last}")
    lines.append(f"shards with pending blocks: --array={progress.array}")
    return lines
