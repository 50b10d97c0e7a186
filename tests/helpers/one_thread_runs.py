"""Extractions compared bit for bit: torch on one thread (the thread count changes the rounding of batched
kernels by ~1e-7 relative), a manifest of a few distinct PNGs, and a cache's contents to compare."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import pytest
import torch


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one thread inside the ``with``; the thread count before it restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """In-process runs use one thread, like each process of the subprocess runs."""
    with one_torch_thread():
        yield


def image_tree_manifest(folder: Path, n_good: int, extra_files: Mapping[str, bytes] | None = None) -> Path:
    """``folder/manifest.parquet`` of ``folder/images``: ``n_good`` distinct PNGs of one generator's train
    split, plus ``extra_files`` (path under ``images`` -> bytes)."""
    from tests.conftest import build_manifest, write_image_tree

    images = write_image_tree(folder / "images", n_good=n_good, with_bad=False)
    for name, data in (extra_files or {}).items():
        (images / name).write_bytes(data)
    return build_manifest(images, folder / "manifest.parquet")


def cache_contents(path: Path) -> dict:
    """The cache at ``path``: every sample's arrays, the metadata rows and the done marks."""
    from lare2.shared.cache import FeatureCache

    cache = FeatureCache.open(path)
    return {"arrays": cache.read(slice(None)), "meta": cache.metadata().to_pylist(), "done": cache.done_blocks()}
