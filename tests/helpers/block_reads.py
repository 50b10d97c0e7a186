"""The cache blocks a training reader reads, recorded in order."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from lare2.train.data import CacheSplit


@contextmanager
def blocks_read(split: CacheSplit) -> Iterator[list[int]]:
    """The blocks ``split`` reads inside the ``with``, in the order read (its ``read_block`` wrapped, and
    unwrapped after)."""
    read: list[int] = []
    original = split.read_block

    def recording(block: int):
        read.append(block)
        return original(block)

    split.read_block = recording
    try:
        yield read
    finally:
        del split.read_block
