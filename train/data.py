"""Reading a feature cache for training and scoring, block by block.

Training order per epoch, as explicit stages: blocks holding ok samples -> seeded permutation of
the blocks for this epoch -> windows of ``shuffle_blocks`` blocks, dealt to the ranks in turn ->
seeded permutation of the samples inside each window -> a rank's windows read (from disk, or from
RAM when the split is held in memory; inline, or ahead of use by background threads) -> batches cut
from the rank's stream of windows. A block is exactly one Zarr chunk, so each read is contiguous, and
memory holds the window in use plus ``ReadSettings.ahead`` windows being read.

The order depends only on (seed, epoch, world size): how windows are read never changes a batch.

Training views: a ``CacheSplit(..., views=True)`` of a cache extracted with ``--views K`` serves, in
``epoch_batches``, one of the K augmented views of each sample in place of its evaluation view
(``pooled``/``fmap``; ``lare`` has no views): view ``view_choice(seed, epoch, crc32(sample_id), K)``, a
function of (seed, epoch, sample id) alone, so ranks, read workers and memory never change it. The
evaluation view is not a candidate (the reference trains on augmented views only). The order of samples
and batches is the same as without views; ``sequential_batches`` (validation, scoring) always serves the
evaluation view. Blocks are still read whole: the view arrays of the block, then one view per sample.
"""

from __future__ import annotations

import collections
import itertools
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from lare2.shared.cache import STATUS_ERROR, STATUS_PENDING, VIEW_ARRAYS, CacheError, FeatureCache, nonfinite_rows
from lare2.shared.config import identity_fingerprint
from lare2.shared.errors import InputError
from lare2.shared.logs import get_logger

log = get_logger(__name__)


def extraction_fingerprint(cache: FeatureCache) -> str:
    """sha256 of the cache's extraction identity (sorted JSON): equal iff the features are comparable."""
    identity = cache.attrs.get("identity")
    if not isinstance(identity, dict):
        raise CacheError(f"{cache.path}: the cache records no extraction identity (attrs['identity']); "
                         "re-extract it with `lare2 extract`")
    return identity_fingerprint(identity)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic): a bijection that scatters every bit."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def id_keys(sample_ids: Sequence[str]) -> np.ndarray:
    """uint64 [n]: ``zlib.crc32`` of each sample id (UTF-8), the per-sample key of ``view_choice``."""
    return np.fromiter((zlib.crc32(str(i).encode()) for i in sample_ids), dtype=np.uint64, count=len(sample_ids))


def view_choice(seed: int, epoch: int, keys: np.ndarray, views: int) -> np.ndarray:
    """int64 [n]: the training view (0 .. ``views`` - 1) of each sample in ``epoch``, from its ``id_keys``:
    ``m(m(m(seed) ^ epoch) ^ key) % views``, ``m`` = ``_mix64``, all modulo 2^64. Depends on nothing else."""
    mask = (1 << 64) - 1
    base = _mix64(_mix64(np.array([seed & mask], dtype=np.uint64)) ^ np.uint64(epoch & mask))
    return (_mix64(base ^ np.asarray(keys, dtype=np.uint64)) % np.uint64(views)).astype(np.int64)


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
        return Batch(pooled=move(self.pooled), fmap=move(self.fmap), lare=move(self.lare), label=move(self.label),
                     index=self.index)

    def rows(self, lo: int, hi: int) -> "Batch":
        """Rows ``lo:hi`` as views (no copy)."""
        cut = lambda t: None if t is None else t[lo:hi]  # noqa: E731
        return Batch(pooled=cut(self.pooled), fmap=cut(self.fmap), lare=cut(self.lare), label=self.label[lo:hi],
                     index=self.index[lo:hi])


def _join(pieces: list[Batch]) -> Batch:
    """One batch of ``pieces`` in order; a single piece is returned as it is (pinned memory stays pinned)."""
    if len(pieces) == 1:
        return pieces[0]

    def cat(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
        if parts[0] is None:
            return None
        out = torch.empty((sum(len(p) for p in parts), *parts[0].shape[1:]), dtype=parts[0].dtype,
                          pin_memory=parts[0].is_pinned())
        return torch.cat(parts, out=out)

    return Batch(pooled=cat([p.pooled for p in pieces]), fmap=cat([p.fmap for p in pieces]),
                 lare=cat([p.lare for p in pieces]), label=cat([p.label for p in pieces]),
                 index=np.concatenate([p.index for p in pieces]))


@dataclass(frozen=True, kw_only=True)
class ReadSettings:
    """How a split's windows are read: inline when their first batch is due, or ahead by background threads."""

    workers: int = 0
    """Background threads that read, check and decode the next windows while the current one is consumed
    (zarr's codecs and torch's casts release the GIL); 0 reads each window inline, when it is due."""
    ahead: int = 2
    """Windows read beyond the one in use when ``workers`` > 0: memory holds up to 2 + ``ahead`` float32 windows
    (the one in use, the one before while a batch spans both, those being read)."""
    pin_device: str | None = None
    """CUDA device (``cuda:1``) whose host-to-device copies the windows are pinned for; None: pageable memory."""

    def __post_init__(self) -> None:
        if self.workers < 0 or self.ahead < 1:
            raise InputError(f"read workers must be >= 0 and read-ahead >= 1 window, "
                             f"got {self.workers} and {self.ahead}")


@dataclass(frozen=True, eq=False)
class Window:
    """Blocks read together, and the order their ok samples are served in."""

    blocks: tuple[int, ...]
    """Cache blocks, in read order; their ok samples are concatenated."""
    order: np.ndarray | None
    """Permutation of the concatenated ok samples; None keeps store order."""
    draw: tuple[int, int] | None = None
    """(seed, epoch) whose ``view_choice`` picks each sample's training view; None: the evaluation view."""


def _cut(windows: Iterator[Batch], batch_size: int, carry: bool, limit: int | None) -> Iterator[Batch]:
    """Batches of ``batch_size`` cut from consecutive windows; ``carry``: a window's last samples lead the next
    batch (else each window ends with its own partial batch). The stream's last batch may be partial.
    Stops after ``limit`` batches without pulling another window."""
    if limit == 0:
        return
    pieces: list[Batch] = []
    filled = made = 0
    for window in windows:
        lo = 0
        while lo < len(window):
            take = min(batch_size - filled, len(window) - lo)
            pieces.append(window.rows(lo, lo + take))
            filled, lo = filled + take, lo + take
            if filled == batch_size or (not carry and lo == len(window)):
                yield _join(pieces)
                pieces, filled, made = [], 0, made + 1
                if made == limit:
                    return
    if pieces:
        yield _join(pieces)


class _Scratch(threading.local):
    """A float32 block buffer per thread and sample shape: casting into memory already touched avoids page faults."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[int, ...], torch.Tensor] = {}

    def rows(self, n: int, sample_shape: tuple[int, ...]) -> torch.Tensor:
        buffer = self.buffers.get(sample_shape)
        if buffer is None or len(buffer) < n:
            buffer = self.buffers[sample_shape] = torch.empty((n, *sample_shape), dtype=torch.float32)
        return buffer[:n]


class CacheSplit:
    """The ok samples of one cache, read in chunk-sized blocks.

    Refuses (``CacheError``) a cache with pending samples unless ``allow_pending`` (then they are left
    out, with a warning), a block missing a chunk it must hold (``lare2.shared.cache.presence``) and an
    ok sample holding NaN/Inf. ``read`` says how windows are read; it never changes a batch. ``views``: serve
    training views in ``epoch_batches`` when the cache has them (module docstring); they are then read, and
    held in memory, besides the evaluation view."""

    def __init__(self, path: str | Path, names: Sequence[str], allow_pending: bool = False,
                 read: ReadSettings = ReadSettings(), views: bool = False) -> None:
        self.cache = FeatureCache.open(path)
        self.path = Path(path)
        self.names = tuple(names)
        self.read = read
        self.num_views = self.cache.layout.views if views else 0
        """Training views per sample served by ``epoch_batches`` (0: the evaluation view)."""
        self.view_names = {n: VIEW_ARRAYS[n] for n in self.names if n in VIEW_ARRAYS} if self.num_views else {}
        """Evaluation array -> its views array, for the arrays read that have views."""
        self._keys = id_keys(self.cache.column("sample_id")) if self.view_names else None
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
            raise CacheError(f"{self.path}: {self.num_pending} of {len(status)} samples are still pending "
                             "(extraction not finished); rerun the `lare2 extract` command to complete the cache, "
                             "or pass --allow-pending to use the finished part")
        if self.num_pending:  # an unfinished extraction: say so, the figures cover only part of the data
            log.warning("%s: %d of %d samples are still pending (extraction not finished) and are left out; "
                        "rerun the extraction to complete the cache", self.path, self.num_pending, len(status))
        self.ok_per_block = [int(ok[self.cache.block_slice(b)].sum()) for b in range(self.cache.num_blocks)]
        self.ok_blocks = [b for b, count in enumerate(self.ok_per_block) if count]
        self._resident: dict[int, tuple[dict[str, np.ndarray], np.ndarray]] | None = None
        self._scratch = _Scratch()

    @property
    def num_ok(self) -> int:
        return int(self.ok.sum())

    @property
    def fingerprint(self) -> str:
        return extraction_fingerprint(self.cache)

    # ---- blocks: from disk, or from RAM -------------------------------------------------------
    @property
    def read_names(self) -> tuple[str, ...]:
        """The arrays read per block: ``names``, then the views arrays of those served with views."""
        return self.names + tuple(self.view_names.values())

    def read_block(self, block: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Arrays (``read_names``, storage dtypes) and cache indices of the ok samples of one block."""
        if self._resident is not None:
            return self._resident[block]
        sl = self.cache.block_slice(block)
        keep = self.ok[sl]
        self.cache.presence.require([block])  # every array and column of the block, not only those read here
        every = bool(keep.all())
        arrays = {n: a if every else a[keep] for n, a in self.cache.read(sl, self.read_names).items()}
        for name, values in arrays.items():  # an ok sample never holds NaN: the extractor records those as errors
            bad = nonfinite_rows(values)
            if bad.any():
                sample = self.cache.column("sample_id")[sl][keep][bad][0]
                raise CacheError(f"{self.path}: block {block}: {name} holds NaN/Inf for {int(bad.sum())} samples whose "
                                 f"status is ok (e.g. {sample}); `lare2 cache repair {self.path}` marks the block for "
                                 "re-extraction")
        return arrays, np.arange(sl.start, sl.stop)[keep]

    @property
    def in_memory(self) -> bool:
        return self._resident is not None

    def memory_bytes(self) -> int:
        """Bytes the ok samples of ``read_names`` take in RAM at their storage dtypes (what ``hold_in_memory``
        keeps)."""
        layout = self.cache.layout
        per_sample = sum(int(np.prod(layout.sample_shape(n))) * np.dtype(layout.dtype(n)).itemsize
                         for n in self.read_names)
        return self.num_ok * per_sample

    def hold_in_memory(self) -> None:
        """Read every ok block once (checked as always, with ``read.workers`` threads) and serve reads from RAM."""
        if self._resident is not None:
            return
        with ThreadPoolExecutor(max(1, self.read.workers), thread_name_prefix="lare2-load") as pool:
            self._resident = dict(zip(self.ok_blocks, pool.map(self.read_block, self.ok_blocks)))

    # ---- windows: read, permuted and cast to float32 ------------------------------------------
    def _window_buffers(self, window: Window) -> tuple[Batch, list[tuple[int, int, np.ndarray | None]]]:
        """The window as an unfilled batch (float32, pinned when ``read.pin_device``; labels and indices set) and
        its fill tasks: (block, first read row, rows the block's ok samples go to (None: in order), view draw)."""
        starts = np.cumsum([0] + [self.ok_per_block[b] for b in window.blocks])
        # the cache rows read_block returns, known without reading
        index = np.concatenate([np.flatnonzero(self.ok[sl]) + sl.start
                                for sl in map(self.cache.block_slice, window.blocks)])
        # where each read sample goes: position[j] = i such that order[i] = j
        position = None if window.order is None else np.argsort(window.order)
        if window.order is not None:
            index = index[window.order]
        pin = self.read.pin_device is not None
        tensors = {name: torch.empty((len(index), *self.cache.layout.sample_shape(name)), dtype=torch.float32,
                                     pin_memory=pin)
                   for name in self.names}
        label = torch.from_numpy(self.labels[index])
        out = Batch(pooled=tensors.get("pooled"), fmap=tensors.get("fmap"), lare=tensors.get("lare"),
                    label=label.pin_memory() if pin else label, index=index)
        tasks = [(b, int(at), None if position is None else position[at:stop], window.draw)
                 for b, at, stop in zip(window.blocks, starts[:-1], starts[1:])]
        return out, tasks

    def _fill(self, out: Batch, block: int, at: int, position: np.ndarray | None,
              draw: tuple[int, int] | None = None) -> None:
        """Read one block and cast its ok samples into their rows of ``out`` (threads fill disjoint rows);
        with ``draw``, each sample's training view ``view_choice(*draw, ...)`` in place of its evaluation view."""
        arrays, index = self.read_block(block)
        if draw is not None and self.view_names:
            picked = view_choice(*draw, self._keys[index], self.num_views)
            arrays = arrays | {name: arrays[views][np.arange(len(index)), picked]
                               for name, views in self.view_names.items()}
        for name in self.names:
            values = arrays[name]
            part = torch.from_numpy(values)  # fp16 storage -> float32 compute, by torch: ~10x numpy's cast
            if position is None:
                getattr(out, name)[at:at + len(part)].copy_(part)
            else:
                scratch = self._scratch.rows(len(part), tuple(part.shape[1:]))
                scratch.copy_(part)
                getattr(out, name).index_copy_(0, torch.from_numpy(position), scratch)

    def _loaded(self, windows: list[Window]) -> Iterator[Batch]:
        """``windows`` read in order: inline, or by ``read.workers`` threads with ``read.ahead`` windows in flight.

        The threads take the blocks of the windows in flight in order, so the window due next is read by all of
        them. A block's error (``CacheError`` for a missing chunk or NaN) is raised here, unchanged, when its
        window is due, first block first, as inline."""
        if self.read.workers == 0 or len(windows) < 2:
            for window in windows:
                out, tasks = self._window_buffers(window)
                for task in tasks:
                    self._fill(out, *task)
                yield out
            return
        device = self.read.pin_device
        # pinning from a thread whose current device is another would start a CUDA context there
        bind = (lambda: torch.cuda.set_device(device)) if device is not None else None
        pool = ThreadPoolExecutor(self.read.workers, thread_name_prefix="lare2-read", initializer=bind)

        def submit(window: Window) -> tuple[Batch, list[Future]]:
            out, tasks = self._window_buffers(window)
            return out, [pool.submit(self._fill, out, *task) for task in tasks]

        upcoming = iter(windows)
        in_flight = collections.deque(submit(w) for w in itertools.islice(upcoming, self.read.ahead + 1))
        try:
            while in_flight:
                out, filling = in_flight.popleft()
                for done in filling:
                    done.result()
                yield out
                del out  # the consumer keeps what it still needs: memory stays bounded
                following = next(upcoming, None)
                if following is not None:
                    in_flight.append(submit(following))
        finally:  # finished, failed or abandoned (generator closed): stop reading what is no longer wanted
            pool.shutdown(wait=True, cancel_futures=True)

    # ---- epochs --------------------------------------------------------------------------------
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

    def num_batches(self, *, batch_size: int, shuffle_blocks: int, world_size: int = 1, epoch: int = 0,
                    seed: int = 0) -> int:
        """Batches each rank yields in one epoch: all of them (the last may be partial) on one rank; on
        several, as many full batches as the rank with the fewest samples has, so that all take the same steps."""
        windows = [] if world_size == 1 else self._epoch_windows(epoch, seed, shuffle_blocks, world_size)[1]
        return self._steps(windows, batch_size, world_size)

    def _steps(self, windows: list[list[int]], batch_size: int, world_size: int) -> int:
        if world_size == 1:
            return -(-self.num_ok // batch_size)
        per_rank = [sum(self.ok_per_block[b] for w in windows[r::world_size] for b in w) for r in range(world_size)]
        return min(per_rank) // batch_size

    def epoch_windows(self, *, epoch: int, seed: int, batch_size: int, shuffle_blocks: int, rank: int = 0,
                      world_size: int = 1) -> tuple[list[Window], int]:
        """This rank's windows for one epoch, as many as its ``num_batches`` batches need, and that number."""
        rng, windows = self._epoch_windows(epoch, seed, shuffle_blocks, world_size)
        steps = self._steps(windows, batch_size, world_size)
        mine: list[Window] = []
        samples = 0
        for w, window_blocks in enumerate(windows):
            # every rank draws every window's permutation, so that the generator stays in step across ranks
            order = rng.permutation(sum(self.ok_per_block[b] for b in window_blocks))
            if w % world_size == rank and samples < steps * batch_size:
                mine.append(Window(tuple(window_blocks), order, (seed, epoch) if self.view_names else None))
                samples += len(order)
        return mine, steps

    def epoch_batches(self, *, epoch: int, seed: int, batch_size: int, shuffle_blocks: int,
                      rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        """Shuffled batches for one epoch; the order depends only on (seed, epoch, world_size), the training
        view of each sample (a ``views`` split) only on (seed, epoch, sample id).

        Windows of ``shuffle_blocks`` blocks go to the ranks in turn, and a rank reads only its own, so
        the ranks together read the split once per epoch. A window's last samples lead the next batch.
        Every rank takes ``num_batches`` steps.
        """
        windows, steps = self.epoch_windows(epoch=epoch, seed=seed, batch_size=batch_size,
                                            shuffle_blocks=shuffle_blocks, rank=rank, world_size=world_size)
        return _cut(self._loaded(windows), batch_size, carry=True, limit=steps)

    def sequential_batches(self, batch_size: int) -> Iterator[Batch]:
        """All ok samples in store order (scoring and validation); a batch never spans two blocks."""
        windows = [Window((block,), None) for block in self.ok_blocks]
        return _cut(self._loaded(windows), batch_size, carry=False, limit=None)
