"""The real photographs of MiniGenImage, their licences, classes and pools, and random multi-scale crops.

Two sources: camera photographs from Debian packages, copied into ``minigenimage/photographs/``
(downscaled; their credits and licences in ``photographs/photos.tsv``, the provenance in
``photographs/README.md``), and 11 images that ship inside scikit-image. ``pools.tsv`` lists them
all with their class and pool (``lare2.minigenimage.pools``: zoo, detector-train, val, test); no
photograph gives crops to two pools.

Classes are coarse (``animal``, ``building``...) so that test photographs share classes with the
zoo's photographs, as GenImage's real and generated images share ImageNet classes.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lare2.minigenimage.pools import POOLS, read_pools
from lare2.shared.errors import InputError, UserError

CROP_SCALES = (0.3, 1.0)
"""A crop's side, as a fraction of the photograph's shorter side, is drawn uniformly from this range."""


@dataclass(frozen=True, kw_only=True)
class Photo:
    """One source photograph: a file inside an installed package (this one included)."""

    name: str
    """Short name, used in file names of the benchmark."""
    package: str
    """Import name of the package shipping the file."""
    file: str
    """Path of the file inside the package (posix)."""
    sha256: str
    """First 16 hex of sha256 of the file bytes; a different file is refused (the benchmark would change)."""
    licence: str
    """Licence or copyright status, as the package documents it (for the Debian photographs read the
    ``notes`` column of ``photographs/photos.tsv`` too: it often states the photographer's terms better)."""
    credit: str
    """Photographer or source, as the package documents it."""
    class_name: str
    """Coarse class: the prompt of conditional generators is ``a photo of a {class_name}``."""
    pool: str
    """``zoo``, ``detector-train``, ``val`` or ``test``."""


PHOTOS: tuple[Photo, ...] = tuple(Photo(**row) for row in read_pools())

CLASS_NAMES: tuple[str, ...] = tuple(sorted({p.class_name for p in PHOTOS}))
"""Class index -> name; conditional generators embed the index (GAN, pixel DDPM) or the prompt (LDMs)."""


def photos_of(pool: str) -> list[Photo]:
    if pool not in POOLS:
        raise InputError(f"pool={pool!r}: choose from {POOLS}")
    return [p for p in PHOTOS if p.pool == pool]


def photo_path(photo: Photo) -> Path:
    """Where the photograph lies on disk, inside its installed package."""
    spec = importlib.util.find_spec(photo.package)
    if spec is None or spec.origin is None:
        hint = {"skimage": "scikit-image", "sklearn": "scikit-learn"}.get(photo.package, photo.package)
        raise FileNotFoundError(f"photo {photo.name!r}: package {photo.package!r} is not installed "
                                f"(pip install {hint})")
    path = Path(spec.origin).parent / photo.file
    if not path.is_file():
        raise FileNotFoundError(f"photo {photo.name!r}: {path} is missing from the installed {photo.package}")
    return path


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def load_photo(photo: Photo) -> Image.Image:
    """The photograph as RGB (grey photographs repeat their channel); refuses a file with other bytes.

    Cached: crops never modify it (``crop`` returns a new image)."""
    path = photo_path(photo)
    if photo.sha256 and file_sha256(path) != photo.sha256:
        raise UserError(f"photo {photo.name!r}: {path} has sha256 {file_sha256(path)}, expected {photo.sha256} "
                        "(another package version ships another file; the benchmark would not be the same)")
    with Image.open(path) as img:
        return img.convert("RGB")


def random_crops(photo: Photo, count: int, size: int, seed: int, *, flip: bool = False,
                 exclude: set[bytes] | None = None) -> np.ndarray:
    """``count`` distinct square crops of random position and scale, resized to ``size`` (bicubic)
    -> uint8 [N, size, size, 3].

    Deterministic from ``(seed, photo.name)``; ``flip`` mirrors half of them left-right (training
    augmentation). A crop whose pixels repeat an earlier one, or one in ``exclude`` (pixel bytes; the
    crops taken are added to it), is drawn again: two draws can land on the same box (e.g. the whole
    of a square photograph), and two files with equal bytes would share a sample id.
    """
    image = load_photo(photo)
    width, height = image.size
    rng = np.random.default_rng([seed, int(hashlib.sha256(photo.name.encode()).hexdigest()[:8], 16)])
    taken = exclude if exclude is not None else set()
    crops_NHW3 = np.empty((count, size, size, 3), dtype=np.uint8)
    i = 0
    while i < count:
        side = int(round(rng.uniform(*CROP_SCALES) * min(width, height)))
        left = int(rng.integers(0, width - side + 1))
        top = int(rng.integers(0, height - side + 1))
        crop = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
        mirror = flip and bool(rng.integers(0, 2))
        pixels_HW3 = np.asarray(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirror else crop)
        if pixels_HW3.tobytes() in taken:
            continue
        taken.add(pixels_HW3.tobytes())
        crops_NHW3[i] = pixels_HW3
        i += 1
    return crops_NHW3


def training_crops(count_per_photo: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Crops of the ``zoo`` photographs, the only ones the generators see: uint8 [N, size, size, 3] and
    class indices int64 [N]."""
    images, labels = [], []
    for photo in photos_of("zoo"):
        images.append(random_crops(photo, count_per_photo, size, seed, flip=True))
        labels.append(np.full(count_per_photo, CLASS_NAMES.index(photo.class_name), dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)
