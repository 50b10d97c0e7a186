"""Augmented training views of an image: the reference trainer's augmentation list, seeded per sample and view.

``lare2 extract --views K`` stores, besides the evaluation view (the centre crop, docs/method.md §2.2),
K views per image made here. View ``k`` of a sample is a pure function of the image and of
``(sample_seed(run_seed, sample_id), k)``: its draws come from

    rng = np.random.default_rng([sample_seed(run_seed, sample_id), VIEW_STREAM, k])

a stream of its own (the LaRE draws are torch generators seeded with ``sample_seed`` alone, §1.5;
``noise:S`` perturbation steps use ``[seed, NOISE_STREAM, position]``), so batch size, workers,
ranks, array jobs and resumes never change a view. The image is the one both models see: decoded,
then ``perturb``, then ``normalize`` (a views cache of a perturbed split holds views of the
perturbed image). The LaRE map is not augmented: one per image, from the 256-px resize (§1.2).

The draws, all made on every call, in this order, whatever their outcome (so no draw's position in
the stream depends on an earlier outcome)::

    top      = rng.integers(0, H - 224 + 1)       H, W: the image after padding (below)
    left     = rng.integers(0, W - 224 + 1)
    apply    = rng.random() < 0.5                 one operation of the list below, or none
    which    = rng.integers(0, 4)                 0 jpeg, 1 blur, 2 noise, 3 grey
    quality  = rng.integers(50, 96)               JPEG quality, uniform in 50-95
    kernel   = (3, 5, 7)[rng.integers(0, 3)]      Gaussian kernel size
    variance = rng.uniform(3.0, 10.0)             Gaussian noise variance, pixel units (0-255 scale)
    rotate   = rng.random() < 0.33                a quarter-turn rotation ...
    quarters = rng.integers(1, 4)                 ... by 1, 2 or 3 quarter turns, counter-clockwise
    flip     = rng.random() < 0.33                a horizontal (left-right) flip

then, for the noise operation only, ``rng.normal(0, sqrt(variance), (224, 224, 3))`` (float64, [H, W, 3]
order). Applied to the RGB image, uint8 throughout until the last step:

1. **crop**: reflect-101 pad (the edge pixel not repeated; ``pad // 2`` before, the rest after; exactly
   ``backbone_input``'s padding) until both sides are >= 224, then the 224 x 224 crop at ``(top, left)``.
   No resize: a large image is seen as a random crop at full resolution.
2. **one operation** (when ``apply``), on the crop:

   - ``jpeg``: re-encoded with Pillow at ``quality`` (4:2:0 chroma subsampling pinned, baseline) and
     decoded (``lare2.shared.perturbations.jpeg_roundtrip``);
   - ``blur``: separable Gaussian blur with OpenCV's ``cv2.GaussianBlur(x, (kernel, kernel), 0)``
     kernels: with sigma 0 and an odd size <= 7, OpenCV's ``getGaussianKernel`` takes its fixed table
     (``BLUR_KERNELS``: [1 2 1]/4, [1 4 6 4 1]/16, [1 3.5 7 9 7 3.5 1]/32), not the sampled Gaussian of
     sigma = 0.3 ((kernel - 1) / 2 - 1) + 0.8 that it uses for larger sizes; borders reflect-101 (OpenCV's
     default); rows then columns in float64, rounded half up (OpenCV's fixed-point rounding) to uint8;
   - ``noise``: the normal draws added, rounded (halves to even), clipped to 0-255;
   - ``grey``: Pillow's ``convert("L")`` (ITU-R 601-2 luma, ``(19595 R + 38470 G + 7471 B + 2^15) >> 16``),
     copied to the three channels;
3. **rotation** (when ``rotate``): ``np.rot90(x, quarters)``;
4. **flip** (when ``flip``): ``x[:, ::-1]``;
5. **normalisation**: /255 and the ImageNet mean/std, as the evaluation view (``imagenet_normalised``).

Numpy and Pillow only, as the models' own preprocessing; the view tensors are made in the loader's
workers and the backbone runs on them in stage 1 (``lare2.extract.features.compute_images``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

from lare2.extract.images import BACKBONE_SIZE, imagenet_normalised, reflect_pad
from lare2.shared.perturbations import jpeg_roundtrip

VIEW_STREAM = 0x7669657773  # "views" in ASCII: a tag no other seeded stream of lare2 uses
OPERATIONS: tuple[str, ...] = ("jpeg", "blur", "noise", "grey")
"""The operations of step 2, in the order ``which`` indexes them."""
APPLY_P, ROTATE_P, FLIP_P = 0.5, 0.33, 0.33
JPEG_QUALITY = (50, 95)
"""Inclusive range of the re-encoding quality."""
NOISE_VARIANCE = (3.0, 10.0)
"""Range of the noise variance, pixel units."""
BLUR_KERNELS: dict[int, tuple[float, ...]] = {
    3: (0.25, 0.5, 0.25),
    5: (0.0625, 0.25, 0.375, 0.25, 0.0625),
    7: (0.03125, 0.109375, 0.21875, 0.28125, 0.21875, 0.109375, 0.03125),
}
"""OpenCV's ``getGaussianKernel(k, sigma <= 0)`` for k = 3, 5, 7 (its ``small_gaussian_tab``)."""

Operation = Literal["none", "jpeg", "blur", "noise", "grey"]


@dataclass(frozen=True)
class ViewDraws:
    """What one view does (see the module docstring); the noise itself is drawn when applied."""

    top: int
    left: int
    operation: Operation
    quality: int
    kernel: int
    variance: float
    quarters: int
    """Quarter turns counter-clockwise, 0-3 (0: no rotation)."""
    flip: bool


def view_rng(seed: int, view: int) -> np.random.Generator:
    """The generator of view ``view`` of the sample whose seed is ``seed`` (``sample_seed(run_seed, sample_id)``)."""
    return np.random.default_rng([seed, VIEW_STREAM, view])


def draw_view(rng: np.random.Generator, height: int, width: int, size: int = BACKBONE_SIZE) -> ViewDraws:
    """The draws of one view of a padded ``height`` x ``width`` image, in the documented order."""
    top = int(rng.integers(0, height - size + 1))
    left = int(rng.integers(0, width - size + 1))
    apply = bool(rng.random() < APPLY_P)
    which = int(rng.integers(0, len(OPERATIONS)))
    quality = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
    kernel = tuple(BLUR_KERNELS)[int(rng.integers(0, len(BLUR_KERNELS)))]
    variance = float(rng.uniform(*NOISE_VARIANCE))
    rotate = bool(rng.random() < ROTATE_P)
    quarters = int(rng.integers(1, 4))
    flip = bool(rng.random() < FLIP_P)
    return ViewDraws(top=top, left=left, operation=OPERATIONS[which] if apply else "none", quality=quality,
                     kernel=kernel, variance=variance, quarters=quarters if rotate else 0, flip=flip)


def gaussian_blur(x_HW3: np.ndarray, kernel: int) -> np.ndarray:
    """uint8 [H, W, 3] blurred with ``BLUR_KERNELS[kernel]``, reflect-101 borders, rounded half up."""
    weights = np.asarray(BLUR_KERNELS[kernel], dtype=np.float64)
    r = kernel // 2
    padded = np.pad(x_HW3.astype(np.float64), ((r, r), (r, r), (0, 0)), mode="reflect")
    height, width = x_HW3.shape[:2]
    rows = sum(w * padded[:, i : i + width] for i, w in enumerate(weights))  # [H + 2r, W, 3]
    both = sum(w * rows[i : i + height] for i, w in enumerate(weights))  # [H, W, 3]
    return np.clip(np.floor(both + 0.5), 0, 255).astype(np.uint8)


def apply_operation(crop_HW3: np.ndarray, draws: ViewDraws, rng: np.random.Generator) -> np.ndarray:
    """Step 2 on a uint8 crop; ``rng`` (positioned after the draws) gives the noise."""
    if draws.operation == "jpeg":
        return np.asarray(jpeg_roundtrip(Image.fromarray(crop_HW3), draws.quality))
    if draws.operation == "blur":
        return gaussian_blur(crop_HW3, draws.kernel)
    if draws.operation == "noise":
        noise_HW3 = rng.normal(0.0, np.sqrt(draws.variance), size=crop_HW3.shape)
        return np.clip(np.round(crop_HW3.astype(np.float64) + noise_HW3), 0, 255).astype(np.uint8)
    if draws.operation == "grey":
        return np.repeat(np.asarray(Image.fromarray(crop_HW3).convert("L"))[..., None], 3, axis=2)
    if draws.operation == "none":
        return crop_HW3
    raise ValueError(f"unknown view operation {draws.operation!r}: choose from none, {', '.join(OPERATIONS)}")


def apply_view(padded_HW3: np.ndarray, draws: ViewDraws, rng: np.random.Generator,
               size: int = BACKBONE_SIZE) -> np.ndarray:
    """Steps 2-4 of one view on a padded uint8 image: crop at the draws' offsets, operation, rotation, flip."""
    x_HW3 = apply_operation(padded_HW3[draws.top : draws.top + size, draws.left : draws.left + size], draws, rng)
    if draws.quarters:
        x_HW3 = np.rot90(x_HW3, draws.quarters)
    if draws.flip:
        x_HW3 = x_HW3[:, ::-1]
    return np.ascontiguousarray(x_HW3)


def view_pixels(image: Image.Image, seed: int, view: int, size: int = BACKBONE_SIZE) -> np.ndarray:
    """View ``view`` of ``image`` before normalisation: uint8 [size, size, 3] (steps 1-4)."""
    rng = view_rng(seed, view)
    padded_HW3 = reflect_pad(np.asarray(image.convert("RGB")), size)
    return apply_view(padded_HW3, draw_view(rng, *padded_HW3.shape[:2], size=size), rng, size)


def view_inputs(image: Image.Image, seed: int, views: int) -> torch.Tensor:
    """[views, 3, 224, 224] float32: views 0..views-1 of ``image``, normalised as the evaluation view."""
    return torch.stack([imagenet_normalised(view_pixels(image, seed, k)) for k in range(views)])
