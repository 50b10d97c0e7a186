"""Shared fixtures: a small image tree with awkward files, and its manifest."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.bad_images import GALLERY, good_rgb


def write_image_tree(root: Path, n_good: int = 10, with_bad: bool = True) -> Path:
    """``root/gen-x/train/{0_real,1_fake}/`` with ``n_good`` distinct PNGs (+ the bad gallery in 1_fake)."""
    for i in range(n_good):
        label_dir = root / "gen-x" / "train" / ("0_real" if i % 2 == 0 else "1_fake")
        label_dir.mkdir(parents=True, exist_ok=True)
        # GenImage-style names give class prompts: "<imagenet index>_..." -> that class's name
        (label_dir / f"{i % 3 + 1}_img_{i:03d}.png").write_bytes(good_rgb(seed=i, size=(40 + 3 * i, 36 + 2 * i)))
    if with_bad:
        for name, (data, _) in GALLERY.items():
            (root / "gen-x" / "train" / "1_fake" / name).write_bytes(data)
    return root


def build_manifest(images: Path, out: Path) -> Path:
    from lare2.shared.manifest import build_folders, write_built

    return write_built(out, build_folders(images, progress=False))


@pytest.fixture
def image_manifest(tmp_path) -> Path:
    images = write_image_tree(tmp_path / "images")
    return build_manifest(images, tmp_path / "manifest.parquet")
