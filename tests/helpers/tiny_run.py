"""A tiny trained run for tests and benchmarks that score new images: tiny models, a few PNGs, one epoch."""

from __future__ import annotations

import zlib
from pathlib import Path

from tests.helpers.bad_images import good_rgb


def image_seed(split: str, index: int) -> int:
    """The same pixels on every run (``hash()`` of a str is salted per process)."""
    return zlib.crc32(f"{split}/{index}".encode()) % 1000


def write_split_images(images: Path, split: str, count: int) -> list[Path]:
    """``count`` GenImage-style PNGs under ``images/gen-x/SPLIT/{0_real,1_fake}/`` (their names give class prompts)."""
    paths = []
    for i in range(count):
        folder = images / "gen-x" / split / ("0_real" if i % 2 == 0 else "1_fake")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i % 5 + 1}_{split}_{i}.png"
        path.write_bytes(good_rgb(seed=image_seed(split, i), size=(32 + i % 9, 40)))
        paths.append(path)
    return paths


def build_tiny_run(root: Path, n_test: int = 6) -> tuple[Path, list[Path]]:
    """(run folder, test images not seen in training): the tiny SD and backbone, class prompts, egre, one epoch.

    An image whose name gives no class is refused (``classless_prompt=refuse``), as in the paper's setting."""
    from lare2.extract.run import run_extraction
    from lare2.shared.config import debug
    from lare2.shared.manifest import build_folders, write_built
    from lare2.train.config import debug as train_debug
    from lare2.train.trainer import run_training

    images = root / "images"
    for split, count in (("train", 8), ("val", 6)):
        write_split_images(images, split, count)
    manifest = write_built(root / "manifest.parquet", build_folders(images, progress=False))
    for split in ("train", "val"):
        run_extraction(debug(manifest=str(manifest), out=str(root / "cache" / split), split=split, device="cpu",
                             chunk_samples=4, ensemble=2, classless_prompt="refuse"))
    run_training(train_debug(model="egre", train=str(root / "cache/train"), val=str(root / "cache/val"),
                             out=str(root / "run"), epochs=1))
    return root / "run", write_split_images(images, "test", n_test)
