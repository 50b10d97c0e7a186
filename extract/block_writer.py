"""Cache block writes beside the model: one background thread, at most ``depth`` finished blocks waiting.

The extraction loop hands each finished block to :meth:`BlockWriter.put` and goes on with the next
batch; the thread writes the blocks in the order given through ``FeatureCache.write_block``, which
writes every chunk of a block (atomically, by rename) and its done mark last. So the store sees the
same files and the same done-mark order as when the loop wrote each block itself, only later, and a
kill at any moment still leaves only whole, marked blocks or unmarked ones (a rerun redoes those).

A thread, not a process: the write's cost is the float32 -> storage dtype cast, Zstd compression and
the chunk files, and numpy's casts, numcodecs' Zstd and file writes all release the GIL, so the
thread runs beside the model's Python (kernel launches) at full speed. A process would first copy
each block through a pipe (at full size 26 MB of float32: 32 samples x (lare 4 x 32 x 32 + pooled 1024
+ fmap 1024 x 14 x 14) x 4 bytes, fmap alone 25.7 MB) and open its own store, for the same overlap
(``bench/writer.py`` measures both).

Errors: the first write that fails stops the writer (later blocks are not written); the failure is
raised, unchanged, in the extraction loop at its next ``check``/``put`` or at ``close``, which also
waits for the blocks still queued: what ``put`` accepted is written before ``close`` returns.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Mapping
from typing import Any

from lare2.shared.cache import FeatureCache

WRITER_DEPTH = 2
"""Finished blocks that may wait for the writer: the loop blocks only when the writer is this far behind.
Memory: the block being written + ``WRITER_DEPTH`` (each 26 MB of float32 at full size: 32 x 803 kB ``fmap`` + the
rest)."""


class BlockWriter:
    """Writes finished blocks of ``cache`` in a background thread, in order; a context manager that closes it."""

    def __init__(self, cache: FeatureCache, depth: int = WRITER_DEPTH) -> None:
        if depth < 1:
            raise ValueError(f"writer depth must be >= 1 block, got {depth}")
        self.cache = cache
        self.written: list[int] = []
        """Blocks written (done mark included), in order."""
        self._queue: queue.Queue[tuple[int, Mapping[str, Any]] | None] = queue.Queue(maxsize=depth)
        self._accepted = 0
        self._failure: BaseException | None = None
        self._reported = False
        self._thread = threading.Thread(target=self._run, name="lare2-block-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._failure is not None:
                continue  # keep taking blocks so that put() never waits on a dead writer; write none of them
            block, values = item
            try:
                self.cache.write_block(block, **values)
            except BaseException as err:  # noqa: BLE001 - handed to the loop's thread, raised there
                err.add_note(f"while writing block {block} of {self.cache.path} (cache writer thread)")
                self._failure = err
            else:
                self.written.append(block)

    @property
    def pending(self) -> int:
        """Blocks accepted by ``put`` and not yet written (queued, or being written)."""
        return self._accepted - len(self.written)

    def check(self) -> None:
        """Raise the writer's failure, once, if a write has failed."""
        if self._failure is not None and not self._reported:
            self._reported = True
            raise self._failure

    def put(self, block: int, values: Mapping[str, Any]) -> None:
        """Queue ``block`` (``FeatureCache.write_block``'s keyword arguments); waits while ``depth`` blocks wait."""
        self.check()
        if not self._thread.is_alive():
            raise RuntimeError(f"internal: block {block} handed to a closed cache writer")
        self._queue.put((block, values))
        self._accepted += 1

    def close(self) -> None:
        """Write every block still queued, stop the thread, then raise a failure if a write failed."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self.check()

    def __enter__(self) -> BlockWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
            return
        try:  # the loop failed: still write the finished blocks (they are whole), then let its error through
            self.close()
        except BaseException as failure:  # noqa: BLE001
            exc.add_note(f"the cache writer failed too: {type(failure).__name__}: {failure}")
