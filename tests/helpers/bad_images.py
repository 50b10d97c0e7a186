"""A gallery of awkward image files, as bytes, for decoding and extraction tests."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def _png(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _jpeg(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def good_rgb(seed: int = 0, size: tuple[int, int] = (48, 40)) -> bytes:
    rng = np.random.default_rng(seed)
    return _png(Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)))


def truncated() -> bytes:
    data = _jpeg(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    return data[: len(data) // 2]


def cmyk() -> bytes:
    return _jpeg(Image.new("CMYK", (32, 24), (10, 200, 30, 5)))


def sixteen_bit() -> bytes:
    ramp_HW = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (24, 1))
    return _png(Image.fromarray(ramp_HW))


def palette_alpha() -> bytes:
    image = Image.new("P", (32, 32), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    image.paste(1, (8, 8, 24, 24))
    return _png(image, transparency=0)


def one_pixel() -> bytes:
    return _png(Image.new("RGB", (1, 1), (5, 6, 7)))


def exif_rotated() -> bytes:
    """40 wide x 20 high, left half red; EXIF orientation 6 shows it 20 wide x 40 high."""
    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, :20, 0] = 255
    image = Image.fromarray(array)
    exif = Image.Exif()
    exif[0x0112] = 6
    return _jpeg(image, exif=exif.tobytes())


def decompression_bomb(side: int = 100_000) -> bytes:
    """A small PNG whose header declares side x side pixels."""
    data = bytearray(_png(Image.new("L", (8, 8))))
    ihdr = 8  # signature, then the IHDR chunk: length(4) type(4) data(13) crc(4)
    body = bytearray(data[ihdr + 8 : ihdr + 8 + 13])
    body[0:8] = struct.pack(">II", side, side)
    data[ihdr + 8 : ihdr + 8 + 13] = body
    data[ihdr + 21 : ihdr + 25] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(body)) & 0xFFFFFFFF)
    return bytes(data)


# name -> (bytes, expected outcome: "ok" or a substring of the recorded reason)
GALLERY = {
    "zero_byte.png": (b"", "empty file"),
    "truncated.jpg": (truncated(), "decode"),
    "not_an_image.png": (b"this is a text file, not a picture\n" * 4, "not an image"),
    "cmyk.jpg": (cmyk(), "ok"),
    "sixteen_bit.png": (sixteen_bit(), "ok"),
    "palette_alpha.png": (palette_alpha(), "ok"),
    "one_pixel.png": (one_pixel(), "too small"),
    "exif_rotated.jpg": (exif_rotated(), "ok"),
    "bomb.png": (decompression_bomb(), "decompression bomb"),
}
