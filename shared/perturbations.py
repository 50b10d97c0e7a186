"""Image perturbations and debiasing normalisation: chains of steps such as ``jpeg:75+resize:0.5``.

Two uses, both in ``ExtractConfig`` (docs/method.md §1.2 and §2.2 take the image they leave):

- ``perturb``: a test condition, what happened to the image in the world (re-compressed, blurred,
  downscaled, cropped, noisy), applied to every image of the split. A robustness curve is one
  cache per strength; a perturbed cache has the same ids, seeds and order as the clean one.
- ``normalize``: the detector's own preprocessing, applied to every image of every split and when
  scoring new images, e.g. ``jpeg:96`` so that reals (JPEGs) and fakes (PNGs) reach the models
  with the same compression history and the detector cannot learn the file format.

Per image: decode -> perturb -> normalize -> the LaRE resize (§1.2) and the backbone crop (§2.2).

A chain is its steps joined by ``+``, applied in order; ``""`` or ``none`` is the empty chain. The
steps (``Step.kind:value``), on an RGB image of W x H pixels (``round`` is Python's: halves to even):

``jpeg:Q``    Q an integer in 1-100. Encoded with Pillow in memory (``format="JPEG", quality=Q``,
              4:2:0 chroma subsampling, Pillow's default, pinned; baseline, no optimisation), then
              decoded back to RGB. The result depends on the libjpeg Pillow is built with.
``blur:S``    S > 0: ``ImageFilter.GaussianBlur(radius=S)``; Pillow's radius is the standard
              deviation in pixels (computed as three extended box blurs).
``resize:F``  F in (0, 1]: bicubic resize to ``(max(1, round(W*F)), max(1, round(H*F)))``, then
              bicubic back to W x H (a downscaled copy seen at its original size).
``crop:F``    F in (0, 1]: the centre ``w x h`` crop, ``w = max(1, round(W*F))`` (h alike), left
              ``(W - w) // 2``, top ``(H - h) // 2``; the image gets smaller.
``noise:S``   S in (0, 255]: add Gaussian noise of standard deviation S (pixel units), drawn per
              pixel and channel ([H, W, 3] order) as float64 from ``np.random.default_rng([seed,
              NOISE_STREAM, position])`` (``position``: the step's index in the chain; stage 1's chain
              is perturb followed by normalize), round, clip to 0-255.
              The stream is this step's alone: it never shares draws with the LaRE noise
              (torch generators, §1.5) nor with another noise step.
``size:N``    normalize only, N an integer >= 8: bicubic resize of the short side to N (the long
              side to ``max(N, round(long * N / short))``), then the centre N x N crop (offsets as
              for ``crop``): every image enters the models at one size.

Pillow and numpy only: both stages import this module.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageFilter

from lare2.shared.errors import InputError

KINDS: tuple[str, ...] = ("jpeg", "blur", "resize", "crop", "noise", "size")
"""Step kinds, in the order the help lists them."""
NORMALIZE_ONLY: tuple[str, ...] = ("size",)
"""Kinds only a normalisation may use: a fixed model input size is preprocessing, not a test condition."""
RANGES: dict[str, tuple[str, str]] = {
    "jpeg": ("Q", "an integer quality in 1-100"),
    "blur": ("S", "the Gaussian sigma in pixels, > 0"),
    "resize": ("F", "the scale, in (0, 1]"),
    "crop": ("F", "the kept fraction of each side, in (0, 1]"),
    "noise": ("S", "the Gaussian std in pixel units, in (0, 255]"),
    "size": ("N", "the side in pixels, an integer >= 8"),
}
"""Per kind: the value's letter and range, for help texts and error messages."""
MIN_SIZE = 8
"""Smallest ``size:N``: stage 1 refuses images under 8 px on a side (docs/method.md §5.2)."""
NOISE_STREAM = 0x6E6F697365  # "noise" in ASCII: a tag no other seeded stream of lare2 uses
JPEG_SUBSAMPLING = 2
"""4:2:0 chroma subsampling (Pillow's default), pinned so a Pillow default change cannot move features."""


@dataclass(frozen=True)
class Step:
    """One perturbation or normalisation step (see the module docstring for each kind's definition)."""

    kind: str
    """One of ``KINDS``."""
    value: float
    """The step's strength: JPEG quality, blur sigma, resize scale, crop fraction, noise std, or size."""

    @property
    def text(self) -> str:
        """Canonical spelling, e.g. ``jpeg:75``, ``blur:1``, ``resize:0.5``."""
        number = str(int(self.value)) if float(self.value).is_integer() else repr(float(self.value))
        return f"{self.kind}:{number}"


def _check_value(kind: str, value: float) -> bool:
    if not math.isfinite(value):
        return False
    if kind == "jpeg":
        return value.is_integer() and 1 <= value <= 100
    if kind == "blur":
        return value > 0
    if kind in ("resize", "crop"):
        return 0 < value <= 1
    if kind == "noise":
        return 0 < value <= 255
    return value.is_integer() and value >= MIN_SIZE  # size


def parse_chain(spec: str, *, allow_size: bool = False, what: str = "--perturb") -> tuple[Step, ...]:
    """``"jpeg:75+resize:0.5"`` -> its steps, in order; ``""`` or ``"none"`` -> ``()``.

    ``allow_size``: accept ``size:N`` (normalisations only). A bad part raises ``InputError`` naming
    ``what``, the part, and the kinds or the kind's range."""
    spec = spec.strip()
    if spec.lower() in ("", "none"):
        return ()
    kinds = [k for k in KINDS if allow_size or k not in NORMALIZE_ONLY]
    steps = []
    for part in (p.strip() for p in spec.split("+")):
        kind, sep, number = part.partition(":")
        kind = kind.strip().lower()
        if kind in NORMALIZE_ONLY and not allow_size:
            raise InputError(f"{what} {spec!r}: bad part {part!r}: {kind}:N is a normalisation (--normalize), "
                             f"not a perturbation; a perturbation is one of {', '.join(kinds)}")
        if kind not in kinds:
            raise InputError(f"{what} {spec!r}: bad part {part!r}: expected KIND:VALUE with KIND one of "
                             f"{', '.join(kinds)}, parts joined by '+' (e.g. jpeg:75+resize:0.5), or none")
        try:
            value = float(number) if sep else math.nan
        except ValueError:
            value = math.nan
        if not _check_value(kind, value):
            letter, meaning = RANGES[kind]
            raise InputError(f"{what} {spec!r}: bad part {part!r}: expected {kind}:{letter} with {letter} {meaning}")
        steps.append(Step(kind, value))
    return tuple(steps)


def chain_text(steps: Iterable[Step]) -> str:
    """Canonical spec of a chain (``jpeg:75+resize:0.5``); ``""`` for the empty chain."""
    return "+".join(step.text for step in steps)


# ---- the operations ------------------------------------------------------------------------------
def jpeg_roundtrip(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling=JPEG_SUBSAMPLING)
    with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
        return decoded.convert("RGB")


def _scaled(side: int, fraction: float) -> int:
    return max(1, round(side * fraction))


def centre_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def resize_short_side(image: Image.Image, side: int) -> Image.Image:
    """Short side to ``side`` (bicubic, aspect kept), then the centre ``side x side`` crop."""
    short, long = min(image.size), max(image.size)
    other = max(side, round(long * side / short))
    size = (side, other) if image.width <= image.height else (other, side)
    return centre_crop(image.resize(size, Image.BICUBIC), side, side)


NOISE_BLOCK_VALUES = 1 << 20
"""Noise values drawn at a time (8 MB of float64)."""


def add_noise(image: Image.Image, std: float, seed: int, position: int) -> Image.Image:
    rng = np.random.default_rng([seed, NOISE_STREAM, position])
    pixels_HW3 = np.asarray(image)
    out_HW3 = np.empty_like(pixels_HW3)
    # row blocks draw the same stream as one whole-image draw, without a float64 copy of a large image
    rows = max(1, NOISE_BLOCK_VALUES // (pixels_HW3.shape[1] * 3))
    for top in range(0, pixels_HW3.shape[0], rows):
        block_hW3 = pixels_HW3[top:top + rows].astype(np.float64)
        noisy_hW3 = block_hW3 + rng.normal(0.0, std, size=block_hW3.shape)
        out_HW3[top:top + rows] = np.clip(np.round(noisy_hW3), 0, 255).astype(np.uint8)
    return Image.fromarray(out_HW3, mode="RGB")


def apply_step(image: Image.Image, step: Step, seed: int, position: int) -> Image.Image:
    """One step on an RGB image; ``seed`` and ``position`` matter for ``noise`` only."""
    if step.kind == "jpeg":
        return jpeg_roundtrip(image, int(step.value))
    if step.kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(radius=step.value))
    if step.kind == "resize":
        small = image.resize((_scaled(image.width, step.value), _scaled(image.height, step.value)), Image.BICUBIC)
        return small.resize(image.size, Image.BICUBIC)
    if step.kind == "crop":
        return centre_crop(image, _scaled(image.width, step.value), _scaled(image.height, step.value))
    if step.kind == "noise":
        return add_noise(image, step.value, seed, position)
    if step.kind == "size":
        return resize_short_side(image, int(step.value))
    raise ValueError(f"unknown step kind {step.kind!r}: choose from {', '.join(KINDS)}")


def apply_chain(image: Image.Image, steps: Sequence[Step], seed: int) -> Image.Image:
    """The steps applied in order to an RGB image; deterministic for (image, steps, seed).

    ``seed``: the sample's seed (``sample_seed(run_seed, sample_id)``, docs/method.md §1.5)."""
    for position, step in enumerate(steps):
        image = apply_step(image, step, seed, position)
    return image.convert("RGB") if image.mode != "RGB" else image
