"""Build the MiniGenImage benchmark: sample the zoo, crop the photographs, write GenImage's layout.

Layout under ``<out>`` (GenImage's: each generator subset has its own real images)::

    ldm-a/train/{ai,nature}/*.png   our train + val splits (the detector trains on ldm-a vs real)
    <generator>/val/{ai,nature}/*.png   our test split, for each of the four generators
    manifest.parquet                 one row per image (columns ``lare2.shared.manifest.COLUMNS``)
    build.json                       the build config and the fingerprints of the zoo's weights

Real images of a split are crops of that split's pool of photographs only (``SPLIT_POOL``). Every file is a PNG
written with fixed settings and every draw is seeded, so a rebuild with the same config gives identical bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from lare2.minigenimage.models import IMAGE_SIZE
from lare2.minigenimage.photos import CLASS_NAMES, photos_of, random_crops
from lare2.minigenimage.sampling import load_sampler, sample
from lare2.minigenimage.zoo import GENERATORS, ZOO_DIR, check_generator, log, read_record
from lare2.shared.errors import InputError
from lare2.shared.seeding import sample_seed
from lare2.shared.settings import make_config, pick_preset

GENIMAGE_FOLDER = {"train": "train", "val": "train", "test": "val"}
"""Our split -> GenImage's folder: GenImage's ``train`` holds our train and val, its ``val`` is our test."""
SPLIT_POOL = {"train": "detector-train", "val": "val", "test": "test"}
"""Our split -> the photograph pool its real images are cropped from (never the zoo's)."""


@dataclass(kw_only=True)
class BuildConfig:
    """What ``lare2 minigenimage build`` writes."""

    out: str = "data/minigenimage"
    """Benchmark folder; the generator folders and the manifest in it are replaced."""
    zoo: str = str(ZOO_DIR)
    """Zoo folder holding the generators' weights."""
    seed: int = 0
    """Seeds every generated image (via its id) and every crop."""
    generators: list[str] = field(default_factory=lambda: list(GENERATORS))
    """Generators whose test split is written."""
    train_generator: str = "ldm-a"
    """The generator of the training split (GenImage trains on one generator)."""
    train_count: int = 240
    """Fake images, and as many real ones, in the training split."""
    val_count: int = 80
    """Fake images, and as many real ones, in the validation split."""
    test_count: int = 120
    """Fake images, and as many real ones, in each generator's test split."""

    def __post_init__(self) -> None:
        for name in [*self.generators, self.train_generator]:
            check_generator(name)
        if min(self.train_count, self.val_count, self.test_count) < 0:
            raise InputError("counts must be >= 0")


# ---- presets: plain functions returning a config ------------------------------------------------
def demo(**overrides: Any) -> BuildConfig:
    """The benchmark of ``make demo``: 240 / 80 / 120 images per class."""
    return make_config(BuildConfig, overrides)


def reduced(**overrides: Any) -> BuildConfig:
    """96 / 40 / 48 images per class: quick, but too small for the detectors to learn well."""
    return make_config(BuildConfig, {"train_count": 96, "val_count": 40, "test_count": 48, **overrides})


def tiny(**overrides: Any) -> BuildConfig:
    """A few images per folder (tests)."""
    return make_config(BuildConfig, {"train_count": 16, "val_count": 8, "test_count": 16, **overrides})


PRESETS: dict[str, Callable[..., BuildConfig]] = {"demo": demo, "reduced": reduced, "tiny": tiny}


def preset(name: str, **overrides: Any) -> BuildConfig:
    """The preset called ``name`` (``demo``, ``reduced``, ``tiny``) with ``overrides``; ``SettingsError`` for an
    unknown preset or key."""
    return pick_preset(PRESETS, name, **overrides)


def png_bytes(pixels_HW3: np.ndarray) -> bytes:
    """PNG with fixed settings (no metadata, zlib level 6): same pixels -> same bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels_HW3, mode="RGB").save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def fake_plan(generator: str, split: str, count: int, seed: int) -> tuple[list[int], list[int]]:
    """Per-image seeds and class indices of ``count`` fakes; classes cycle so that each is equally present."""
    seeds = [sample_seed(seed, f"{generator}/{split}/{i}") for i in range(count)]
    classes = [i % len(CLASS_NAMES) for i in range(count)]
    return seeds, classes


def real_images(generator: str, split: str, count: int, seed: int,
                taken: set[bytes] | None = None) -> list[tuple[str, str, np.ndarray]]:
    """``count`` crops of the split's pool of photographs, spread evenly: (photo name, class, uint8 [H, W, 3]).

    ``taken``: pixels already in the benchmark (updated): no crop is written twice, so sample ids stay unique."""
    photos = photos_of(SPLIT_POOL[split])
    per_photo = [count // len(photos) + (i < count % len(photos)) for i in range(len(photos))]
    crop_seed = sample_seed(seed, f"real/{generator}/{split}")
    taken = set() if taken is None else taken
    out = []
    for photo, n in zip(photos, per_photo):
        for crop in random_crops(photo, n, IMAGE_SIZE, crop_seed, exclude=taken):
            out.append((photo.name, photo.class_name, crop))
    return out


class _Writer:
    """Writes PNGs under ``root`` and collects the manifest rows."""

    def __init__(self, root: Path) -> None:
        self.root, self.rows, self.ids = root, [], {}

    def add(self, rel_path: str, pixels_HW3: np.ndarray, *, label: int, generator: str, split: str,
            class_name: str) -> None:
        data = png_bytes(pixels_HW3)
        sample_id = hashlib.sha256(data).hexdigest()[:32]
        if sample_id in self.ids:  # equal bytes would be one sample twice in a cache
            raise ValueError(f"{rel_path}: same bytes as {self.ids[sample_id]}")
        self.ids[sample_id] = rel_path
        path = self.root / rel_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.rows.append({
            "sample_id": sample_id, "path": rel_path, "label": label,
            "generator": generator, "split": split, "class_name": class_name,
            "width": pixels_HW3.shape[1], "height": pixels_HW3.shape[0], "format": "PNG", "error": "",
        })


def write_manifest(rows: list[dict], path: Path, root: Path, config: BuildConfig) -> None:
    """``manifest.parquet``, rows sorted by path; no time stamp, so rebuilds are byte-identical."""
    from lare2.shared.manifest import COLUMNS, write_manifest as write_parquet

    rows = sorted(rows, key=lambda r: r["path"])
    builder_args = {k: v for k, v in asdict(config).items() if k not in ("out", "zoo")}
    write_parquet(path, {c: [r[c] for r in rows] for c in COLUMNS}, root=root, builder="minigenimage",
                  builder_args=builder_args, record_provenance=False)


def build(config: BuildConfig) -> Path:
    """Write the benchmark; returns the manifest's path."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _build(config)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def _build(config: BuildConfig) -> Path:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    record = read_record(Path(config.zoo))
    writer = _Writer(out)
    taken: set[bytes] = set()  # real crops' pixels, over the whole build
    jobs = [(config.train_generator, "train", config.train_count), (config.train_generator, "val", config.val_count)]
    jobs += [(g, "test", config.test_count) for g in config.generators]
    for generator in dict.fromkeys(g for g, _, _ in jobs):
        shutil.rmtree(out / generator, ignore_errors=True)
        sampler = load_sampler(generator, config.zoo)
        for _, split, count in [j for j in jobs if j[0] == generator]:
            folder = f"{generator}/{GENIMAGE_FOLDER[split]}"
            seeds, classes = fake_plan(generator, split, count, config.seed)
            for i, (pixels, class_index) in enumerate(zip(sample(sampler, seeds, classes), classes)):
                class_name = CLASS_NAMES[class_index]
                writer.add(f"{folder}/ai/{split}_{i:05d}_{class_name}.png", pixels,
                           label=1, generator=generator, split=split, class_name=class_name)
            for i, (photo, class_name, pixels) in enumerate(real_images(generator, split, count, config.seed, taken)):
                writer.add(f"{folder}/nature/{split}_{i:05d}_{photo}.png", pixels,
                           label=0, generator=generator, split=split, class_name=class_name)
            log.info("%s %s: %d fake + %d real images in %s", generator, split, count, count, out / folder)
    manifest = out / "manifest.parquet"
    write_manifest(writer.rows, manifest, out, config)
    zoo_files = {g: record[g]["files"] for g in sorted(set(g for g, _, _ in jobs)) if g in record}
    (out / "build.json").write_text(json.dumps({"config": asdict(config) | {"out": ".", "zoo": "zoo"},
                                                "zoo_files": zoo_files}, indent=2, sort_keys=True) + "\n")
    log.info("manifest: %d rows in %s", len(writer.rows), manifest)
    return manifest
