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
    """The ok samples of one cache, read in chunk-sized blocks."""

    def __init__(self, path: str | Path, names: Sequence[str]) -> None:
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
        if self.num_pending:  # an unfinished extraction: say so, the figures cover only part of the data
            log.warning("%s: %d of %d samples are still pending (extraction not finished) and are left out; "
                        "rerun the extraction to complete the cache", self.path, self.num_pending, len(status))
        self.ok_blocks = [b for b in range(self.cache.num_blocks) if ok[self.cache.block_slice(b)].any()]

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
        arrays = self.cache.read(sl, self.names)
        return {n: a[keep] for n, a in arrays.items()}, np.arange(sl.start, sl.stop)[keep]

    def epoch_batches(self, *, epoch: int, seed: int, batch_size: int, shuffle_blocks: int,
                      rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        """Shuffled batches for one epoch; the order depends only on (seed, epoch)."""
        rng = np.random.default_rng([seed, epoch])
        blocks = [self.ok_blocks[i] for i in rng.permutation(len(self.ok_blocks))]
        total_batches = -(-self.num_ok // batch_size)
        # every rank takes the same number of steps; the last partial round is dropped when world > 1
        usable = total_batches if world_size == 1 else total_batches // world_size * world_size
        pending: dict[str, np.ndarray] | None = None
        pending_index = np.empty(0, dtype=np.int64)
        batch_no = 0
        for start in range(0, len(blocks), shuffle_blocks):
            parts = [self.read_block(b) for b in blocks[start:start + shuffle_blocks]]
            window = {n: np.concatenate([p[0][n] for p in parts]) for n in self.names}
            index = np.concatenate([p[1] for p in parts])
            order = rng.permutation(len(index))
            window, index = {n: a[order] for n, a in window.items()}, index[order]
            if pending is not None:  # samples left over from the previous window lead the next batch
                window = {n: np.concatenate([pending[n], window[n]]) for n in self.names}
                index = np.concatenate([pending_index, index])
            last_window = start + shuffle_blocks >= len(blocks)
            full = len(index) if last_window else len(index) // batch_size * batch_size
            for lo in range(0, full, batch_size):
                if batch_no >= usable:
                    return
                if batch_no % world_size == rank:
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
