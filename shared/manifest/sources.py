"""Image bytes behind manifest rows: plain files and tar members, content ids, headers, file walks."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from PIL import Image, UnidentifiedImageError

SAMPLE_ID_HEX_CHARS = 32
TAR_MEMBER_SEPARATOR = "::"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz")


# ---- rows -----------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ImageRef:
    """An image to describe: where it is and what the layout says about it."""

    path: str
    """Posix path relative to the root (``shard.tar::member`` for tar members)."""
    label: int
    """0 real, 1 fake."""
    generator: str
    """Generator name (for real images, the generator of the subset they belong to)."""
    split: str
    """``train``, ``val`` or ``test``."""
    class_name: str = ""
    """ImageNet class name; empty when unknown."""


@dataclass(frozen=True, kw_only=True)
class ImageHeader:
    """What the builder learns from a file's bytes."""

    sample_id: str
    width: int = 0
    height: int = 0
    format: str = ""
    error: str = ""


def content_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:SAMPLE_ID_HEX_CHARS]


def no_content_id(path: str) -> str:
    """sample_id of a file with no bytes to hash (unreadable or empty): unique per path."""
    return content_id(f"lare2:no-content:{path}".encode())


def describe_bytes(data: bytes, path: str) -> ImageHeader:
    """Hash ``data`` and read its image header (size, format) without decoding the pixels."""
    if not data:
        return ImageHeader(sample_id=no_content_id(path), error="empty file")
    sample_id = content_id(data)
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            return ImageHeader(sample_id=sample_id, width=width, height=height, format=image.format or "")
    except UnidentifiedImageError:
        return ImageHeader(sample_id=sample_id, error="not an image Pillow can identify")
    except Exception as err:  # noqa: BLE001 - any header failure (bomb guard, corrupt chunk) is recorded on the row
        return ImageHeader(sample_id=sample_id, error=f"header unreadable: {type(err).__name__}: {err}")


def manifest_row(ref: ImageRef, header: ImageHeader) -> dict:
    """One manifest row (column -> value) from what the layout says and what the bytes say."""
    return {**asdict(ref), **asdict(header)}


def describe_file(root: Path, ref: ImageRef) -> dict:
    """The manifest row of a plain file; an unreadable one gets a row with ``error`` set."""
    try:
        data = (root / ref.path).read_bytes()
    except OSError as err:
        header = ImageHeader(sample_id=no_content_id(ref.path), error=f"unreadable: {err.strerror or err}")
        return manifest_row(ref, header)
    return manifest_row(ref, describe_bytes(data, ref.path))


# ---- reading images -------------------------------------------------------------------------
def split_tar_path(path: str) -> tuple[str, str] | None:
    """``("shards/000001.tar", "key.jpg")`` for ``"shards/000001.tar::key.jpg"``, else None."""
    if TAR_MEMBER_SEPARATOR not in path:
        return None
    shard, member = path.split(TAR_MEMBER_SEPARATOR, 1)
    return shard, member


@lru_cache(maxsize=64)
def _tar_index(shard: str, mtime_ns: int, size: int) -> dict[str, tuple[int, int]] | None:
    """Member name -> (data offset, size) of an uncompressed tar; None for a compressed one.

    Cached per (file, mtime, size), so reading many members of one shard scans it once.
    """
    try:
        with tarfile.open(shard, mode="r:") as tar:
            return {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}
    except tarfile.ReadError:
        return None


def _read_tar_member(shard: Path, member: str) -> bytes:
    if not shard.is_file():
        raise FileNotFoundError(f"{shard}: no such tar shard (wanted member {member!r})")
    stat = shard.stat()
    index = _tar_index(str(shard), stat.st_mtime_ns, stat.st_size)
    if index is not None:
        if member not in index:
            raise FileNotFoundError(f"{shard}: no member {member!r} in this tar shard")
        offset, size = index[member]
        with open(shard, "rb") as f:
            f.seek(offset)
            return f.read(size)
    with tarfile.open(shard, mode="r:*") as tar:  # compressed shard: no random access
        try:
            extracted = tar.extractfile(member)
        except KeyError:
            extracted = None
        if extracted is None:
            raise FileNotFoundError(f"{shard}: no member {member!r} in this tar shard")
        return extracted.read()


def read_image_bytes(root: Path | str, path: str) -> bytes:
    """The bytes of a manifest row's image: a plain file, or a member of a tar shard
    (``shards/000001.tar::key.jpg``). Raises FileNotFoundError naming the file when missing."""
    tar_path = split_tar_path(path)
    if tar_path is not None:
        shard, member = tar_path
        return _read_tar_member(Path(root) / shard, member)
    file = Path(root) / path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such image file")
    return file.read_bytes()


# ---- walking folders ------------------------------------------------------------------------
def is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def files_under(folder: Path) -> Iterator[Path]:
    """Every non-hidden file below ``folder``, in sorted order."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def subdirs(folder: Path) -> list[Path]:
    """The non-hidden folders directly in ``folder``, sorted."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def images_under(folder: Path, skipped: list[str]) -> Iterator[Path]:
    """The image files below ``folder`` (sorted); the other files are appended to ``skipped``."""
    for file in files_under(folder):
        if is_image_name(file.name):
            yield file
        else:
            skipped.append(str(file))
