"""What a JPEG's header says about how it was saved: the IJG quality estimated from its luminance
quantisation table, and its chroma subsampling. Both are read from ``Image.open`` (no pixel decoded);
the bias audit (:mod:`.audit`) reports them per group and feeds them to its metadata-only classifier.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from PIL import Image, JpegImagePlugin

SUBSAMPLING_NAMES = {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}
"""``PIL.JpegImagePlugin.get_sampling`` -> name; other JPEGs are ``gray`` (one component) or ``other``."""

# IJG / JPEG Annex K luminance quantisation table, row-major (the order of Pillow's ``image.quantization``)
IJG_LUMINANCE = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
], dtype=np.int64)


def ijg_quantization_table(quality: int, base: np.ndarray = IJG_LUMINANCE, baseline: bool = True) -> np.ndarray:
    """The table libjpeg's ``jpeg_set_quality(quality)`` writes: ``base`` scaled by 5000/Q below 50 and
    200 - 2Q from 50 (integer), rounded, clamped to 1..255 (``baseline``, 8-bit entries) or 1..32767."""
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return np.clip((base * scale + 50) // 100, 1, 255 if baseline else 32767)


# every Q's luminance table, both clamps: (2, 100, 64); row q - 1 is quality q
_IJG_TABLES = np.stack([np.stack([ijg_quantization_table(q, baseline=b) for q in range(1, 101)])
                       for b in (True, False)])


def estimate_jpeg_quality(quantization: Mapping[int, Sequence[int]] | None) -> int | None:
    """The IJG quality (1..100) whose luminance table is nearest to table 0 of ``quantization``.

    Nearest: smallest sum of absolute differences to the IJG table at that quality (baseline or
    16-bit clamp, whichever is closer); ties go to the higher quality. A file written by libjpeg
    (Pillow, most software) gets back exactly the quality it was saved with; one from an encoder
    with its own tables (Photoshop, some cameras) gets its nearest IJG equivalent. None when there
    is no luminance table (not a JPEG)."""
    if not quantization or 0 not in quantization or len(quantization[0]) != 64:
        return None
    table = np.asarray(quantization[0], dtype=np.int64)
    distance = np.abs(_IJG_TABLES - table).sum(axis=2).min(axis=0)  # (100,) per quality
    return int(100 - np.argmin(distance[::-1]))  # the last (highest) quality among the nearest


def jpeg_subsampling(image: Image.Image) -> str | None:
    """``4:4:4``, ``4:2:2``, ``4:2:0``, ``gray`` or ``other`` for a JPEG; None for any other format."""
    if not isinstance(image, JpegImagePlugin.JpegImageFile):
        return None
    sampling = JpegImagePlugin.get_sampling(image)
    if sampling in SUBSAMPLING_NAMES:
        return SUBSAMPLING_NAMES[sampling]
    return "gray" if getattr(image, "layers", 0) == 1 else "other"
