"""Decode one image robustly and prepare both model inputs.

Decisions (README "Bad images"):
- EXIF orientation is applied (the image as a viewer shows it).
- Alpha is dropped (RGBA/LA/P-with-transparency -> RGB), as converting to RGB does everywhere else.
- 16-bit greyscale is scaled to 8 bit (value / 257), not clipped.
- Images declaring more than ``max_pixels`` pixels are refused before decoding (decompression bomb).
- Images smaller than ``MIN_SIDE`` px on a side carry no content to judge and are refused.
A refused or unreadable image raises :class:`ImageError` with the reason; the caller records it.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

from lare2.extract.clip_resnet import IMAGENET_MEAN, IMAGENET_STD
from lare2.shared.config import MAX_IMAGE_PIXELS
from lare2.shared.errors import InputError

MIN_SIDE = 8
BACKBONE_SIZE = 224


class ImageError(InputError):
    """An image that cannot be used; the message is the reason stored in the cache (or in a scored row)."""


def decode_rgb(data: bytes, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Bytes -> an RGB PIL image (EXIF-rotated), or :class:`ImageError` saying why not."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    pillow_limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow's own guard, else it refuses at its default first
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(f"declares {width}x{height} = {width * height} pixels, over the limit of "
                                 f"{max_pixels} (decompression bomb guard)")
            image.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageError(f"decompression bomb: {err}") from None
    except Image.DecompressionBombWarning as err:
        raise ImageError(f"decompression bomb: {err}") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not an image Pillow can identify") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageError(f"cannot decode: {err}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit  # a process-wide setting: leave it as found
    return oriented_rgb(image)


def oriented_rgb(image: Image.Image) -> Image.Image:
    """A decoded image -> RGB as a viewer shows it (EXIF-rotated), or :class:`ImageError` when too small."""
    if min(image.size) < MIN_SIDE:
        raise ImageError(f"too small: {image.size[0]}x{image.size[1]} (minimum side {MIN_SIDE} px)")
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as err:  # noqa: BLE001 - malformed EXIF must not lose an otherwise good image
        warnings.warn(f"EXIF orientation ignored: {err}")
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image, dtype=np.float64)
        scale = 257.0 if image.mode.startswith("I;16") or values.max() > 255 else 1.0
        image = Image.fromarray(np.clip(np.round(values / scale), 0, 255).astype(np.uint8))
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def lare_input(image: Image.Image, size: int) -> torch.Tensor:
    """[3, size, size] float32 in [-1, 1]: resize ignoring aspect (bicubic), /255, (x - 0.5) * 2."""
    resized = image.resize((size, size), Image.BICUBIC)
    x_HW3 = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0)
    return ((x_HW3 - 0.5) * 2.0).permute(2, 0, 1).contiguous()


def reflect_pad(x_HW3: np.ndarray, size: int = BACKBONE_SIZE) -> np.ndarray:
    """Reflect-101 pad (the edge pixel not repeated) until both sides are >= ``size``: ``pad // 2`` before,
    the rest after."""
    height, width = x_HW3.shape[:2]
    pad_h, pad_w = max(size - height, 0), max(size - width, 0)
    if not (pad_h or pad_w):
        return x_HW3
    # numpy's "reflect" mirrors without repeating the edge pixel, i.e. BORDER_REFLECT_101.
    padding = ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0))
    return np.pad(x_HW3, padding, mode="reflect")


def imagenet_normalised(x_HW3: np.ndarray) -> torch.Tensor:
    """[H, W, 3] pixels 0-255 -> [3, H, W] float32: /255, then ImageNet mean/std (docs/method.md §2.2)."""
    x_HW3 = np.asarray(x_HW3, dtype=np.float32) / 255.0
    x_HW3 = (x_HW3 - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x_HW3.transpose(2, 0, 1)))


def backbone_input(image: Image.Image, size: int = BACKBONE_SIZE) -> torch.Tensor:
    """[3, size, size] float32: reflect-101 pad to >= size, centre crop, ImageNet mean/std. No resize."""
    x_HW3 = reflect_pad(np.asarray(image), size)
    height, width = x_HW3.shape[:2]
    top, left = (height - size) // 2, (width - size) // 2
    return imagenet_normalised(x_HW3[top : top + size, left : left + size])
