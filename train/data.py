"""Reading a feature cache for training and scoring, block by block.

Training order per epoch, as explicit stages: blocks holding ok samples -> seeded permutation of
the blocks for this epoch -> windows of ``shuffle_blocks`` blocks read from disk -> seeded
permutation of the samples inside a window -> batches -> every ``world``-th batch for this rank.
A block is exactly one Zarr chunk, so each read is contiguous and memory holds one window at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from lare2.shared.cache import STATUS_ERROR, STATUS_PENDING, CacheError, FeatureCache
from lare2.shared.config import identity_fingerprint
from lare2.shared.logs import get_logger

log = get_logger(__name__)


def extraction_fingerprint(cache: FeatureCache) -> str:
    """sha256 of the cache's extraction identity (sorted JSON): equal iff the features are comparable."""
    identity = cache.attrs.get("identity")
    if not isinstance(identity, dict):
        raise CacheError(f"{cache.path}: the cache records no extraction identity (attrs['identity']); re-extract it with `lare2 extract`")
    return identity_fingerprint(identity)


@dataclass
class Batch:
    """Float32 input tensors (None for arrays the model does not read), labels and cache row indices."""

    pooled: torch.Tensor | None
    fmap: torch.Tensor | None
    lare: torch.Tensor | None
    label: torch.Tensor
    index: np.ndarray

    def __len__(self) -> int:
        return len(self.index)

    def to(self, device: torch.device | str) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(pooled=move(self.pooled), fmap=move(self.fmap), lare=move(self.lare), label=move(self.label), index=self.index)


def _to_batch(arrays: dict[str, np.ndarray], labels: np.ndarray, index: np.ndarray) -> Batch:
    # fp16 storage -> float32 compute
    tensors = {name: torch.from_numpy(np.ascontiguousarray(arrays[name], dtype=np.float32)) for name in arrays}
    return Batch(
        pooled=tensors.get("pooled"), fmap=tensors.get("fmap"), lare=tensors.get("lare"),
        label=torch.from_numpy(labels.astype(np.int64)), index=index,
    )


class CacheSplit:
    """The ok samples of one cache, read in chunk-sized blocks.

    Refuses (``CacheError``) a cache with pending samples unless ``allow_pending`` (then they are left
    out, with a warning), a block missing a chunk it must hold (``lare2.shared.cache.presence``) and an
    ok sample holding NaN/Inf."""

    def __init__(self, path: str | Path, names: Sequence[str], allow_pending: bool = False) -> None:
        self.cache = FeatureCache.open(path)
        self.path = Path(path)
        self.names = tuple(names)
        ok = self.cache.ok_mask()
        labels = self.cache.column("label").astype(np.int64)
        bad = set(np.unique(labels[ok]).tolist()) - {0, 1}
        if bad:
            raise CacheError(f"{self.path}: labels must be 0 (real) or 1 (fake), found {sorted(bad)}")
        self.ok = ok
        self.labels = labels
        status = self.cache.column("status")
        self.num_pending = int((status == STATUS_PENDING).sum())
        self.num_errors = int((status == STATUS_ERROR).sum())
        if self.num_pending and not allow_pending:
            raise CacheError(f"{self.path}: {self.num_pending} of {len(status)} samples are still pending (extraction not "
                             "finished); rerun the `lare2 extract` command to complete the cache, or pass --allow-pending "
                             "to use the finished part")
        if self.num_pending:  # an unfinished extraction: say so, the figures cover only part of the data
            log.warning("%s: %d of %d samples are still pending (extraction not finished) and are left out; "
                        "rerun the extraction to complete the cache", self.path, self.num_pending, len(status))
        self.ok_per_block = [int(ok[self.cache.block_slice(b)].sum()) for b in range(self.cache.num_blocks)]
        self.ok_blocks = [b for b, count in enumerate(self.ok_per_block) if count]

    @property
    def num_ok(self) -> int:
        return int(self.ok.sum())

    @property
    def fingerprint(self) -> str:
        return extraction_fingerprint(self.cache)

    def read_block(self, block: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Arrays and cache indices of the ok samples of one block."""
        sl = self.cache.block_slice(block)
        keep = self.ok[sl]
        self.cache.presence.require([block])  # every array and column of the block, not only those read here
        arrays = {n: a[keep] for n, a in self.cache.read(sl, self.names).items()}
        for name, values in arrays.items():  # an ok sample never holds NaN: the extractor records those as errors
            bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
            if bad.any():
                sample = self.cache.column("sample_id")[sl][keep][bad][0]
                raise CacheError(f"{self.path}: block {block}: {name} holds NaN/Inf for {int(bad.sum())} samples whose "
                                 f"status is ok (e.g. {sample}); `lare2 cache repair {self.path}` marks the block for "
                                 "re-extraction")
        return arrays, np.arange(sl.start, sl.stop)[keep]

    def _epoch_windows(self, epoch: int, seed: int, shuffle_blocks: int,
                       world_size: int = 1) -> tuple[np.random.Generator, list[list[int]]]:
        """The epoch's shuffled blocks, grouped into windows of ``shuffle_blocks`` (fewer when there are
        too few blocks to give every rank one); the generator that shuffles inside the windows."""
        if len(self.ok_blocks) < world_size:
            raise CacheError(f"{self.path}: {len(self.ok_blocks)} blocks hold ok samples, fewer than the {world_size} "
                             "ranks; train on fewer processes")
        rng = np.random.default_rng([seed, epoch])
        blocks = [self.ok_blocks[i] for i in rng.permutation(len(self.ok_blocks))]
        size = shuffle_blocks if world_size == 1 else max(1, min(shuffle_blocks, len(blocks) // world_size))
        return rng, [blocks[s:s + size] for s in range(0, len(blocks), size)]

    def num_batches(self, *, batch_size: int, shuffle_blocks: int, world_size: int = 1, epoch: int = 0, seed: int = 0) -> int:
        """Batches each rank yields in one epoch: all of them (the last may be partial) on one rank; on
        several, as many full batches as the rank with the fewest samples has, so that all take the same steps."""
        windows = [] if world_size == 1 else self._epoch_windows(epoch, seed, shuffle_blocks, world_size)[1]
        return self._steps(windows, batch_size, world_size)

    def _steps(self, windows: list[list[int]], batch_size: int, world_size: int) -> int:
        if world_size == 1:
            return -(-self.num_ok // batch_size)
        per_rank = [sum(self.ok_per_block[b] for w in windows[r::world_size] for b in w) for r in range(world_size)]
        return min(per_rank) // batch_size

    def epoch_batches(self, *, epoch: int, seed: int, batch_size: int, shuffle_blocks: int,
                      rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        """Shuffled batches for one epoch; the order depends only on (seed, epoch, world_size).

        Windows of ``shuffle_blocks`` blocks go to the ranks in turn, and a rank reads only its own, so
        the ranks together read the split once per epoch. Every rank takes ``num_batches`` steps.
        """
        rng, windows = self._epoch_windows(epoch, seed, shuffle_blocks, world_size)
        usable = self._steps(windows, batch_size, world_size)
        mine = [w for w in range(len(windows)) if w % world_size == rank]
        pending: dict[str, np.ndarray] | None = None
        pending_index = np.empty(0, dtype=np.int64)
        batch_no = 0
        for w, window_blocks in enumerate(windows):
            # every rank draws every window's permutation, so that the generator stays in step across ranks
            order = rng.permutation(sum(self.ok_per_block[b] for b in window_blocks))
            if w % world_size != rank:
                continue
            parts = [self.read_block(b) for b in window_blocks]
            window = {n: np.concatenate([p[0][n] for p in parts])[order] for n in self.names}
            index = np.concatenate([p[1] for p in parts])[order]
            if pending is not None:  # samples left over from the previous window lead the next batch
                window = {n: np.concatenate([pending[n], window[n]]) for n in self.names}
                index = np.concatenate([pending_index, index])
            full = len(index) if w == mine[-1] else len(index) // batch_size * batch_size
            for lo in range(0, full, batch_size):
                if batch_no >= usable:
                    return
                sel = slice(lo, min(lo + batch_size, full))
                yield _to_batch({n: a[sel] for n, a in window.items()}, self.labels[index[sel]], index[sel])
                batch_no += 1
            pending = {n: a[full:] for n, a in window.items()}
            pending_index = index[full:]

    def sequential_batches(self, batch_size: int) -> Iterator[Batch]:
        """All ok samples in store order (scoring and validation)."""
        for block in self.ok_blocks:
            arrays, index = self.read_block(block)
            for lo in range(0, len(index), batch_size):
                sel = slice(lo, lo + batch_size)
                yield _to_batch({n: a[sel] for n, a in arrays.items()}, self.labels[index[sel]], index[sel])
