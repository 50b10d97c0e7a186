"""The real photographs of MiniGenImage: files that ship inside installed packages, their licences,
classes and splits, and random multi-scale crops of them.

Every photograph belongs to exactly one split, so no photograph gives patches to two splits:

- ``train``: the generators of the zoo train on these crops, and so does the detector (real class);
- ``val``: the detector's model selection and calibration; no generator sees them;
- ``test``: GenImage's ``val`` folders; neither the generators nor the detector see them in training.

Classes are coarse (``person``, ``sky``...) so that test photographs share classes with training
photographs, as GenImage's real and generated images share ImageNet classes.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("train", "val", "test")
CROP_SCALES = (0.3, 1.0)
"""A crop's side, as a fraction of the photograph's shorter side, is drawn uniformly from this range."""


@dataclass(frozen=True, kw_only=True)
class Photo:
    """One source photograph inside an installed package."""

    name: str
    """Short name, used in file names of the benchmark."""
    package: str
    """Import name of the package shipping the file."""
    file: str
    """Path of the file inside the package (posix)."""
    sha256: str
    """First 16 hex of sha256 of the file bytes; a different file is refused (the benchmark would change)."""
    licence: str
    """Licence or copyright status, as the package documents it."""
    credit: str
    """Photographer or source, as the package documents it."""
    class_name: str
    """Coarse class: the prompt of conditional generators is ``a photo of a {class_name}``."""
    split: str
    """``train``, ``val`` or ``test``."""


def _photo(name: str, package: str, file: str, sha256: str, licence: str, credit: str, class_name: str, split: str) -> Photo:
    return Photo(name=name, package=package, file=file, sha256=sha256, licence=licence, credit=credit,
                 class_name=class_name, split=split)


# Licences are those the packages document: skimage.data docstrings, sklearn/datasets/images/README.txt,
# matplotlib's sample_data. Stereo partners (motorcycle_right), drawings, text pages and tiny images are left out.
PHOTOS: tuple[Photo, ...] = (
    _photo("astronaut", "skimage", "data/astronaut.png", "88431cd9653ccd53", "public domain (NASA)", "NASA, Eileen Collins", "person", "train"),
    _photo("chelsea", "skimage", "data/chelsea.png", "596aa1e7cb875eb7", "CC0", "Stefan van der Walt", "animal", "train"),
    _photo("coffee", "skimage", "data/coffee.png", "cc02f8ca188b167c", "CC0", "Rachel Michetti", "object", "train"),
    _photo("coins", "skimage", "data/coins.png", "f8d773fc9cfa6f4d", "no known copyright restrictions", "Brooklyn Museum", "object", "train"),
    _photo("rocket", "skimage", "data/rocket.jpg", "c2dd0de7c538df8d", "public domain (SpaceX)", "SpaceX", "sky", "train"),
    _photo("hubble", "skimage", "data/hubble_deep_field.jpg", "3a19c5dd8a927a93", "public domain (NASA)", "NASA / HubbleSite", "sky", "train"),
    _photo("ihc", "skimage", "data/ihc.png", "f8dd1aa387ddd1f4", "no known copyright restrictions", "CMMI", "microscopy", "train"),
    _photo("brick", "skimage", "data/brick.png", "7966caf324f6ba84", "CC0", "CC0Textures", "texture", "train"),
    _photo("grass", "skimage", "data/grass.png", "b6b6022426b38936", "CC0", "linolafett (DeviantArt)", "texture", "train"),
    _photo("china", "sklearn", "datasets/images/china.jpg", "8378025ad2519d64", "CC BY 2.0", "danielbuechele (Flickr)", "scene", "train"),
    _photo("camera", "skimage", "data/camera.png", "b0793d2adda0fa6a", "CC0", "Lav Varshney", "person", "val"),
    _photo("clock", "skimage", "data/clock_motion.png", "f029226b28b642e8", "public domain", "Stefan van der Walt", "object", "val"),
    _photo("motorcycle", "skimage", "data/motorcycle_left.png", "db18e9c415761740", "Middlebury 2014 stereo benchmark (research use)", "Scharstein et al., Middlebury College", "object", "val"),
    _photo("grace_hopper", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "a8ca6d734765703b", "public domain (US Navy)", "US Navy", "person", "test"),
    _photo("moon", "skimage", "data/moon.png", "78739619d11f7eb9", "public domain", "scikit-image data", "sky", "test"),
    _photo("gravel", "skimage", "data/gravel.png", "c48615b451bf1e60", "CC0", "CC0Textures", "texture", "test"),
    _photo("retina", "skimage", "data/retina.jpg", "38a07f36f27f095e", "CC0", "Mikael Haggstrom (Wikimedia)", "microscopy", "test"),
    _photo("cell", "skimage", "data/cell.png", "8d23a7fb81f7cc87", "CC0", "Paul Muller et al.", "microscopy", "test"),
    _photo("flower", "sklearn", "datasets/images/flower.jpg", "a77f6ec41e353afd", "CC BY 2.0", "vultilion (Flickr)", "scene", "test"),
)

CLASS_NAMES: tuple[str, ...] = tuple(sorted({p.class_name for p in PHOTOS}))
"""Class index -> name; conditional generators embed the index (GAN, pixel DDPM) or the prompt (LDMs)."""


def photos_of(split: str) -> list[Photo]:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: choose from {SPLITS}")
    return [p for p in PHOTOS if p.split == split]


def photo_path(photo: Photo) -> Path:
    """Where the photograph lies on disk, inside its installed package."""
    spec = importlib.util.find_spec(photo.package)
    if spec is None or spec.origin is None:
        hint = {"skimage": "scikit-image", "sklearn": "scikit-learn"}.get(photo.package, photo.package)
        raise FileNotFoundError(f"photo {photo.name!r}: package {photo.package!r} is not installed (pip install {hint})")
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
        raise ValueError(f"photo {photo.name!r}: {path} has sha256 {file_sha256(path)}, expected {photo.sha256} "
                         "(another package version ships another file; the benchmark would not be the same)")
    with Image.open(path) as img:
        return img.convert("RGB")


def random_crops(photo: Photo, count: int, size: int, seed: int, *, flip: bool = False) -> np.ndarray:
    """``count`` square crops of random position and scale, resized to ``size`` (bicubic) -> uint8 [N, size, size, 3].

    Deterministic from ``(seed, photo.name)``; ``flip`` mirrors half of them left-right (training augmentation).
    """
    image = load_photo(photo)
    width, height = image.size
    rng = np.random.default_rng([seed, int(hashlib.sha256(photo.name.encode()).hexdigest()[:8], 16)])
    crops_NHW3 = np.empty((count, size, size, 3), dtype=np.uint8)
    for i in range(count):
        side = int(round(rng.uniform(*CROP_SCALES) * min(width, height)))
        left = int(rng.integers(0, width - side + 1))
        top = int(rng.integers(0, height - side + 1))
        crop = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
        mirror = flip and bool(rng.integers(0, 2))
        crops_NHW3[i] = np.asarray(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirror else crop)
    return crops_NHW3


def training_crops(count_per_photo: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Crops of the ``train`` photographs for the zoo: uint8 [N, size, size, 3] and class indices int64 [N]."""
    images, labels = [], []
    for photo in photos_of("train"):
        images.append(random_crops(photo, count_per_photo, size, seed, flip=True))
        labels.append(np.full(count_per_photo, CLASS_NAMES.index(photo.class_name), dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)
