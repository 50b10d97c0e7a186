"""Files written whole or not at all: the one atomic file writer of the project."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` (``<path>.tmp``) to write to; renamed onto ``path`` when the block ends
    (atomic within one file system), removed when the block or the rename raises: a crash never leaves half a
    file at ``path``, nor a stray ``.tmp`` beside it.

    ``with atomic_write(out / "weights.safetensors") as tmp: save_file(state, str(tmp))``
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        tmp.replace(path)  # fails e.g. onto a folder, or when the folder went away: no .tmp stays behind either
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
