"""Manifests: what to process, one parquet row per image. The schema lives here and only here.

Columns (``MANIFEST_SCHEMA``):

=============  ========  ===================================================================
column         type      meaning
=============  ========  ===================================================================
sample_id      string    first 32 hex characters (128 bits) of the sha256 of the file's
                         bytes; for a file with no bytes to hash (unreadable or empty), the
                         same of ``"lare2:no-content:" + path``, so such rows stay unique
path           string    posix path relative to the manifest's root; a WebDataset member
                         is ``shards/000001.tar::key.jpg`` (shard path, ``::``, member name)
label          int8      0 real, 1 fake
generator      string    the image's generator; real images of a GenImage subset carry that
                         subset's generator name, so per-generator evaluation has both classes
split          string    ``train``, ``val`` or ``test``
class_name     string    first synonym of the ImageNet class read from the GenImage file name
                         (``lare2.shared.classnames``), ``""`` when the name has none
width, height  int32     from the image header as stored (EXIF rotation not applied); 0 when
                         the header could not be read
format         string    Pillow's format name (``PNG``, ``JPEG``, ...), ``""`` if unreadable
error          string    why the file or its header could not be read, ``""`` when fine; such
                         rows are kept so that the extractor records the failure
=============  ========  ===================================================================

Parquet schema metadata: ``lare2.root`` (absolute folder that ``path`` is relative to),
``lare2.builder`` and ``lare2.builder_args`` (JSON), ``lare2.provenance`` (JSON: versions, git
SHA, time), ``lare2.manifest_format``.

Builders hash every file and read only its header with Pillow (never a full decode):

- ``genimage``: ``<root>/<generator>/[<subset>/]{train,val}/{ai,nature}/*``; ``ai`` is fake,
  ``nature`` real, the generator is the top folder. **Splits**: GenImage ``val`` becomes our
  ``test``. GenImage ``train`` becomes our ``train``, except a deterministic held-out fraction
  (``val_fraction``, default 0.05) that becomes our ``val``: an image is held out when
  :func:`holdout_score` of its sample_id (a salted sha256, uniform in [0, 1)) is below the
  fraction. The decision depends on the image's bytes alone, so it is stable when images are added
  or moved, and copies of one image always land in the same split. Model selection and
  calibration use ``val``; ``test`` is never seen before the final evaluation.
- ``folders``: ``<root>/[<generator>/]<split>/{0_real,1_fake}/*``, or ``<root>/{0_real,1_fake}/*``
  with ``split`` given; the generator defaults to the root folder's name.
- ``list``: a text file of ``path<sep>label`` lines (tab, comma or space; detected from the first
  line), paths relative to the list's folder or absolute.
- ``webdataset``: tar shards of ``key.{jpg,png,webp,...}`` members with an optional ``key.cls``
  (``0``/``1``) or ``key.json`` (``{"label": 0, "generator": ..., "split": ..., "class_name": ...}``).

Files that are not images by extension, and hidden files and folders (``.DS_Store``, ``._x.png``),
are skipped. Copies of one image (same sample_id) are reported; within one split only the first
(in path order) is kept, unless ``keep_duplicates`` (a cache then refuses the split: its ids must
be unique).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from lare2.shared.classnames import class_name_from_filename
from lare2.shared.logs import console, get_logger, progress_bar, rate_text

logger = get_logger(__name__)

MANIFEST_FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
LABEL_REAL, LABEL_FAKE = 0, 1
SAMPLE_ID_HEX_CHARS = 32
TAR_MEMBER_SEPARATOR = "::"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz")

GENIMAGE_SPLITS = {"train": "train", "val": "test"}  # GenImage folder -> our split (before hold-out)
GENIMAGE_LABELS = {"nature": LABEL_REAL, "ai": LABEL_FAKE}
FOLDER_LABELS = {"0_real": LABEL_REAL, "1_fake": LABEL_FAKE}
LABEL_WORDS = {"0": LABEL_REAL, "1": LABEL_FAKE, "real": LABEL_REAL, "fake": LABEL_FAKE}

META_ROOT = "lare2.root"
META_BUILDER = "lare2.builder"
META_BUILDER_ARGS = "lare2.builder_args"
META_PROVENANCE = "lare2.provenance"
META_FORMAT = "lare2.manifest_format"

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("label", pa.int8(), nullable=False),
        pa.field("generator", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("class_name", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("format", pa.string(), nullable=False),
        pa.field("error", pa.string(), nullable=False),
    ]
)
COLUMNS = tuple(MANIFEST_SCHEMA.names)


class ManifestError(ValueError):
    """A manifest that cannot be built or read; the message names the file and the reason."""


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
    except Exception as err:  # any header failure (bomb guard, corrupt chunk) is recorded on the row
        return ImageHeader(sample_id=sample_id, error=f"header unreadable: {type(err).__name__}: {err}")


def _row(ref: ImageRef, header: ImageHeader) -> dict:
    return {**asdict(ref), **asdict(header)}


def holdout_score(sample_id: str) -> float:
    """A number in [0, 1) fixed by the sample's id: ``sha256("lare2-val-holdout:" + id)``, first
    48 bits, divided by 2**48. Train images scoring below ``val_fraction`` go to ``val``."""
    digest = hashlib.sha256(f"lare2-val-holdout:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:6], "big") / float(1 << 48)


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


def _describe_file(root: Path, ref: ImageRef) -> dict:
    try:
        data = (root / ref.path).read_bytes()
    except OSError as err:
        return _row(ref, ImageHeader(sample_id=no_content_id(ref.path), error=f"unreadable: {err.strerror or err}"))
    return _row(ref, describe_bytes(data, ref.path))


# ---- walking folders ------------------------------------------------------------------------
def is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _files_under(folder: Path) -> Iterator[Path]:
    """Every non-hidden file below ``folder``, in sorted order."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_under(folder: Path, skipped: list[str]) -> Iterator[Path]:
    for file in _files_under(folder):
        if is_image_name(file.name):
            yield file
        else:
            skipped.append(str(file))


def _require_folder(src: Path) -> Path:
    if not src.exists():
        raise ManifestError(f"{src}: no such folder")
    if not src.is_dir():
        raise ManifestError(f"{src}: not a folder")
    return src.resolve()


def _check_split(split: str | None, where: str) -> str | None:
    if split is not None and split not in SPLITS:
        raise ManifestError(f"{where}: split {split!r} is not one of {SPLITS}")
    return split


def parse_label(value: object, where: str) -> int:
    """0/1 from ``0``, ``1``, ``"0"``, ``"1"``, ``"real"``, ``"fake"`` (any case)."""
    key = str(value).strip().lower()
    if isinstance(value, bool) or key not in LABEL_WORDS:
        raise ManifestError(f"{where}: label {value!r} is not one of 0, 1, real, fake")
    return LABEL_WORDS[key]


# ---- the result of a build ------------------------------------------------------------------
@dataclass(kw_only=True)
class DuplicateGroup:
    """Rows sharing one sample_id (copies of one image)."""

    sample_id: str
    paths: list[str]
    """Every copy, in path order."""
    splits: list[str]
    """Split of each copy."""
    dropped: list[str] = field(default_factory=list)
    """Copies removed (later copies within one split)."""


@dataclass(kw_only=True)
class BuiltManifest:
    """A built manifest, not yet written: the rows, their root and what happened on the way."""

    table: pa.Table
    root: Path
    builder: str
    builder_args: dict
    duplicates: list[DuplicateGroup] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    """Files passed over because their extension is not an image's."""

    @property
    def num_errors(self) -> int:
        return int(pc.sum(pc.not_equal(self.table["error"], "")).as_py() or 0)

    @property
    def num_dropped(self) -> int:
        return sum(len(g.dropped) for g in self.duplicates)


_T = TypeVar("_T")
_R = TypeVar("_R")


def _ordered_map(fn: Callable[[_T], _R], items: Iterable[_T], workers: int) -> Iterator[_R]:
    """``map(fn, items)`` on a thread pool, in order, with a bounded number of items in flight."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        in_flight: deque = deque()
        for item in items:
            in_flight.append(pool.submit(fn, item))
            if len(in_flight) >= 8 * workers:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()



def _describe_all(root: Path, refs: Sequence[ImageRef], workers: int, progress: bool) -> list[dict]:
    rows = []
    start = time.monotonic()
    with progress_bar("img", disable=not progress) as bar:
        task = bar.add_task("hashing images", total=len(refs), rate="")
        for row in _ordered_map(lambda ref: _describe_file(root, ref), refs, workers):
            rows.append(row)
            bar.update(task, advance=1, rate=rate_text(len(rows), time.monotonic() - start))
    return rows


def _drop_duplicates(rows: list[dict], keep_duplicates: bool) -> tuple[list[dict], list[DuplicateGroup]]:
    """Rows in path order; within a split only the first copy of an image is kept."""
    rows = sorted(rows, key=lambda r: r["path"])
    by_id: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_id.setdefault(row["sample_id"], []).append(i)
    groups, drop = [], set()
    for sample_id, indices in by_id.items():
        if len(indices) < 2:
            continue
        group = DuplicateGroup(sample_id=sample_id, paths=[rows[i]["path"] for i in indices],
                               splits=[rows[i]["split"] for i in indices])
        seen_splits: set[str] = set()
        for i in indices:
            if rows[i]["split"] in seen_splits and not keep_duplicates:
                drop.add(i)
                group.dropped.append(rows[i]["path"])
            seen_splits.add(rows[i]["split"])
        groups.append(group)
    return [r for i, r in enumerate(rows) if i not in drop], groups


def _finish(rows: list[dict], *, root: Path, builder: str, builder_args: dict, skipped: list[str],
            keep_duplicates: bool, src: Path) -> BuiltManifest:
    if not rows:
        raise ManifestError(f"{src}: no images found ({builder} layout; see `lare2 manifest build --help`)")
    kept, groups = _drop_duplicates(rows, keep_duplicates)
    built = BuiltManifest(table=pa.Table.from_pylist(kept, schema=MANIFEST_SCHEMA), root=root, builder=builder,
                          builder_args=builder_args, duplicates=groups, skipped=skipped)
    if skipped:
        logger.info("skipped %d files that are not images by extension (e.g. %s)", len(skipped), skipped[0])
    if groups:
        across = sum(len(set(g.splits)) > 1 for g in groups)
        logger.warning("%d images occur more than once (%d in several splits); %s", len(groups), across,
                       "all copies kept: a cache needs unique ids per split" if keep_duplicates
                       else f"dropped {built.num_dropped} later copies within a split")
    if built.num_errors:
        logger.warning("%d images could not be read; their rows are kept with `error` set", built.num_errors)
    return built


# ---- builders -------------------------------------------------------------------------------
def build_genimage(src: Path | str, *, val_fraction: float = 0.05, keep_duplicates: bool = False,
                   workers: int = 8, progress: bool = True) -> BuiltManifest:
    """GenImage layout: ``<src>/<generator>/[<subset>/]{train,val}/{ai,nature}/*``.

    GenImage ``val`` -> ``test``; GenImage ``train`` -> ``train``, and the images whose
    :func:`holdout_score` is below ``val_fraction`` -> ``val``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ManifestError(f"val_fraction must be in [0, 1), got {val_fraction}")
    root = _require_folder(Path(src))
    refs, skipped = [], []
    for generator_dir in _subdirs(root):
        split_dirs = [d for d in _subdirs(generator_dir) if d.name in GENIMAGE_SPLITS]
        split_dirs += [d for sub in _subdirs(generator_dir) if sub.name not in GENIMAGE_SPLITS
                       for d in _subdirs(sub) if d.name in GENIMAGE_SPLITS]
        if not split_dirs:
            logger.warning("%s: no train/ or val/ folder (GenImage layout), skipped", generator_dir)
        for split_dir in split_dirs:
            for label_dir in _subdirs(split_dir):
                if label_dir.name not in GENIMAGE_LABELS:
                    logger.warning("%s: not ai/ or nature/, skipped", label_dir)
                    continue
                for file in _images_under(label_dir, skipped):
                    refs.append(ImageRef(path=file.relative_to(root).as_posix(), label=GENIMAGE_LABELS[label_dir.name],
                                         generator=generator_dir.name, split=GENIMAGE_SPLITS[split_dir.name],
                                         class_name=class_name_from_filename(file.name)))
    rows = _describe_all(root, refs, workers, progress)
    for row in rows:
        if row["split"] == "train" and holdout_score(row["sample_id"]) < val_fraction:
            row["split"] = "val"
    args = {"src": str(src), "val_fraction": val_fraction, "keep_duplicates": keep_duplicates}
    return _finish(rows, root=root, builder="genimage", builder_args=args, skipped=skipped,
                   keep_duplicates=keep_duplicates, src=Path(src))


def build_folders(src: Path | str, *, generator: str | None = None, split: str | None = None,
                  keep_duplicates: bool = False, workers: int = 8, progress: bool = True) -> BuiltManifest:
    """``<src>/[<generator>/]<split>/{0_real,1_fake}/*`` or ``<src>/{0_real,1_fake}/*`` with ``split``.

    ``generator`` (default: the name of ``src``) names rows that have no generator folder;
    ``split`` names rows that have no split folder.
    """
    root = _require_folder(Path(src))
    _check_split(split, "--split")
    default_generator = generator or root.name
    refs, skipped = [], []
    label_dirs = [Path(d) / name for d, dirnames, _ in os.walk(root) for name in dirnames if name in FOLDER_LABELS]
    for label_dir in sorted(label_dirs):
        parents = label_dir.relative_to(root).parts[:-1]
        if any(p.startswith(".") for p in parents):
            continue
        split_positions = [i for i, p in enumerate(parents) if p in SPLITS]
        if split_positions:
            at = split_positions[0]
            row_split = parents[at]
            row_generator = parents[at - 1] if at >= 1 else default_generator
        elif split is not None and not parents:
            row_split, row_generator = split, default_generator
        else:
            raise ManifestError(f"{label_dir}: no split folder ({', '.join(SPLITS)}) above it and no --split "
                                "for a flat <src>/{0_real,1_fake} layout")
        for file in _images_under(label_dir, skipped):
            refs.append(ImageRef(path=file.relative_to(root).as_posix(), label=FOLDER_LABELS[label_dir.name],
                                 generator=row_generator, split=row_split, class_name=class_name_from_filename(file.name)))
    rows = _describe_all(root, refs, workers, progress)
    args = {"src": str(src), "generator": generator, "split": split, "keep_duplicates": keep_duplicates}
    return _finish(rows, root=root, builder="folders", builder_args=args, skipped=skipped,
                   keep_duplicates=keep_duplicates, src=Path(src))


def _detect_separator(line: str) -> str | None:
    """Tab, comma, or None (whitespace), from the first data line of a list."""
    if "\t" in line:
        return "\t"
    return "," if "," in line else None


def _list_entries(list_file: Path, label: int | None) -> list[tuple[str, int]]:
    """(path as written, label) per data line; blank lines, ``#`` comments and a header skipped."""
    entries, separator = [], ""
    for number, line in enumerate(list_file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if separator == "":
            separator = _detect_separator(line)
        fields = [f.strip() for f in line.rsplit(separator, 1)] if separator else line.strip().rsplit(None, 1)
        where = f"{list_file}:{number}"
        if len(fields) == 2 and fields[1].lower() == "label" and not entries:
            continue  # header line "path,label"
        if len(fields) == 2 and fields[1].lower() in LABEL_WORDS:
            entries.append((fields[0], parse_label(fields[1], where)))
        elif label is not None:
            entries.append((line.strip(), label))
        else:
            raise ManifestError(f"{where}: expected 'path<sep>label' (label 0/1/real/fake), got {line!r}")
    return entries


def build_list(src: Path | str, *, generator: str | None = None, split: str | None = None,
               label: int | None = None, keep_duplicates: bool = False, workers: int = 8,
               progress: bool = True) -> BuiltManifest:
    """A text file of ``path<sep>label`` lines (tab, comma or space).

    Paths are relative to the list's folder, or absolute. ``split`` is required; ``generator``
    defaults to the list file's stem; ``label`` is used for lines that carry none.
    """
    list_file = Path(src)
    if not list_file.is_file():
        raise ManifestError(f"{list_file}: no such list file")
    if split is None:
        raise ManifestError(f"{list_file}: a list gives no split; pass --split ({', '.join(SPLITS)})")
    _check_split(split, "--split")
    if label is not None:
        label = parse_label(label, "--label")
    entries = _list_entries(list_file, label)
    base = list_file.resolve().parent
    absolute = [(Path(os.path.normpath(base / p)), lab) for p, lab in entries]  # base / abs == abs
    skipped = [str(p) for p, _ in absolute if not is_image_name(p.name)]
    absolute = [(p, lab) for p, lab in absolute if is_image_name(p.name)]
    inside = all(p.is_relative_to(base) for p, _ in absolute)
    root = base if inside or not absolute else Path(os.path.commonpath([str(p.parent) for p, _ in absolute]))
    name = generator or list_file.stem
    refs = [ImageRef(path=p.relative_to(root).as_posix(), label=lab, generator=name, split=split,
                     class_name=class_name_from_filename(p.name)) for p, lab in absolute]
    rows = _describe_all(root, refs, workers, progress)
    args = {"src": str(src), "generator": generator, "split": split, "label": label, "keep_duplicates": keep_duplicates}
    return _finish(rows, root=root, builder="list", builder_args=args, skipped=skipped,
                   keep_duplicates=keep_duplicates, src=list_file)


def _member_key(name: str) -> tuple[str, str]:
    """WebDataset key and extension: ``a/b.c.jpg`` -> (``a/b``, ``c.jpg``)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _shard_rows(root: Path, shard: Path, defaults: Mapping[str, object]) -> tuple[list[dict], list[str]]:
    """Rows of one shard's image members; labels and fields from ``key.cls`` / ``key.json``."""
    shard_path = shard.relative_to(root).as_posix()
    images: list[tuple[str, str, ImageHeader]] = []  # (key, member, header)
    sidecars: dict[str, dict] = {}
    skipped = []
    with tarfile.open(shard, mode="r:*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = _member_key(member.name)
            where = f"{shard}::{member.name}"
            if is_image_name(member.name.rpartition("/")[2]):
                data = tar.extractfile(member).read()
                images.append((key, member.name, describe_bytes(data, f"{shard_path}{TAR_MEMBER_SEPARATOR}{member.name}")))
            elif ext == "cls":
                sidecars.setdefault(key, {})["label"] = parse_label(tar.extractfile(member).read().decode().strip(), where)
            elif ext == "json":
                try:
                    info = json.loads(tar.extractfile(member).read())
                except json.JSONDecodeError as err:
                    raise ManifestError(f"{where}: not valid JSON ({err})") from err
                if not isinstance(info, dict):
                    raise ManifestError(f"{where}: expected a JSON object, got {type(info).__name__}")
                fields = {k: info[k] for k in ("generator", "split", "class_name") if k in info}
                if "label" in info:
                    fields["label"] = parse_label(info["label"], where)
                sidecar = sidecars.setdefault(key, {})
                sidecar.update({k: v for k, v in fields.items() if k != "label" or "label" not in sidecar})
            else:
                skipped.append(where)
    rows = []
    for key, member, header in images:
        info = {**defaults, **sidecars.get(key, {})}
        where = f"{shard}::{member}"
        if info.get("label") is None:
            raise ManifestError(f"{where}: no label (no {key}.cls or {key}.json 'label') and no --label given")
        if info.get("split") is None:
            raise ManifestError(f"{where}: no split ({key}.json 'split') and no --split given")
        _check_split(str(info["split"]), where)
        class_name = str(info.get("class_name") or class_name_from_filename(member))
        ref = ImageRef(path=f"{shard_path}{TAR_MEMBER_SEPARATOR}{member}", label=int(info["label"]),
                       generator=str(info["generator"]), split=str(info["split"]), class_name=class_name)
        rows.append(_row(ref, header))
    return rows, skipped


def build_webdataset(src: Path | str, *, generator: str | None = None, split: str | None = None,
                     label: int | None = None, keep_duplicates: bool = False, workers: int = 8,
                     progress: bool = True) -> BuiltManifest:
    """Tar shards (a folder searched recursively, or one ``.tar``) of image members.

    Labels (and optionally generator, split, class_name) come from ``key.cls`` / ``key.json``;
    ``generator`` (default: the folder's name), ``split`` and ``label`` fill in what they lack.
    """
    src_path = Path(src)
    if src_path.is_file():
        root, shards = src_path.resolve().parent, [src_path.resolve()]
    else:
        root = _require_folder(src_path)
        shards = [f for f in _files_under(root) if f.name.endswith(TAR_EXTENSIONS)]
    if not shards:
        raise ManifestError(f"{src}: no tar shards ({', '.join(TAR_EXTENSIONS)}) found")
    _check_split(split, "--split")
    if label is not None:
        label = parse_label(label, "--label")
    defaults = {"generator": generator or (src_path.resolve().parent.name if src_path.is_file() else root.name),
                "split": split, "label": label}
    rows, skipped = [], []
    with progress_bar("shard", disable=not progress) as bar:
        task = bar.add_task("reading shards", total=len(shards), rate="")
        for shard_rows, shard_skipped in _ordered_map(lambda s: _shard_rows(root, s, defaults), shards, workers):
            rows += shard_rows
            skipped += shard_skipped
            bar.update(task, advance=1, rate=f"{len(rows)} img")
    args = {"src": str(src), "generator": generator, "split": split, "label": label, "keep_duplicates": keep_duplicates}
    return _finish(rows, root=root, builder="webdataset", builder_args=args, skipped=skipped,
                   keep_duplicates=keep_duplicates, src=src_path)


BUILDERS: dict[str, Callable[..., BuiltManifest]] = {
    "genimage": build_genimage,
    "folders": build_folders,
    "list": build_list,
    "webdataset": build_webdataset,
}


def build_manifest(kind: str, src: Path | str, **options) -> BuiltManifest:
    """Build with the named builder (``genimage``, ``folders``, ``list``, ``webdataset``)."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown manifest builder {kind!r}; choose from {sorted(BUILDERS)}")
    return BUILDERS[kind](src, **options)


# ---- writing, reading, selecting ------------------------------------------------------------
def write_manifest(path: Path | str, rows: pa.Table | Mapping[str, Sequence], *, root: Path | str,
                   builder: str, builder_args: Mapping | None = None, record_provenance: bool = True) -> Path:
    """Write rows (a table or column lists with the manifest columns) as parquet, atomically.

    ``record_provenance=False`` leaves out the time and git SHA, for byte-identical rebuilds.
    """
    from lare2.shared.provenance import provenance

    path = Path(path)
    table = rows if isinstance(rows, pa.Table) else pa.table(dict(rows))
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise ManifestError(f"{path}: rows lack the manifest columns {missing}")
    table = table.select(list(COLUMNS)).cast(MANIFEST_SCHEMA)
    metadata = {
        META_FORMAT: str(MANIFEST_FORMAT_VERSION),
        META_ROOT: str(Path(root).resolve()),
        META_BUILDER: builder,
        META_BUILDER_ARGS: json.dumps(dict(builder_args or {}), default=str),
        META_PROVENANCE: json.dumps(provenance() if record_provenance else {}),
    }
    table = table.replace_schema_metadata(metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.writing")
    pq.write_table(table, staging)
    os.replace(staging, path)
    return path


def write_built(path: Path | str, built: BuiltManifest) -> Path:
    return write_manifest(path, built.table, root=built.root, builder=built.builder, builder_args=built.builder_args)


def read_manifest_metadata(path: Path | str) -> dict:
    """``{"root", "builder", "builder_args", "provenance", "format"}`` of a manifest."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such manifest file")
    try:
        raw = pq.read_schema(path).metadata or {}
    except pa.ArrowInvalid as err:
        raise ManifestError(f"{path}: not a parquet file ({err})") from err
    meta = {k.decode(): v.decode() for k, v in raw.items()}
    if META_ROOT not in meta:
        raise ManifestError(f"{path}: not a lare2 manifest (no '{META_ROOT}' in the parquet metadata); "
                            "build one with `lare2 manifest build`")
    if meta.get(META_FORMAT) != str(MANIFEST_FORMAT_VERSION):
        raise ManifestError(f"{path}: manifest format {meta.get(META_FORMAT)!r}, this lare2 reads {MANIFEST_FORMAT_VERSION}")
    return {
        "root": meta[META_ROOT],
        "builder": meta.get(META_BUILDER, ""),
        "builder_args": json.loads(meta.get(META_BUILDER_ARGS, "{}")),
        "provenance": json.loads(meta.get(META_PROVENANCE, "{}")),
        "format": int(meta[META_FORMAT]),
    }


def read_manifest(path: Path | str, root: Path | str | None = None) -> tuple[pa.Table, Path]:
    """The manifest's rows and the folder its paths are relative to.

    ``root`` replaces the recorded root (the images moved, or another machine mounts them elsewhere).
    """
    meta = read_manifest_metadata(path)
    table = pq.read_table(path)
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise ManifestError(f"{path}: not a lare2 manifest; missing columns {missing}")
    wrong = [f"{c}: {table.schema.field(c).type} (want {MANIFEST_SCHEMA.field(c).type})"
             for c in COLUMNS if table.schema.field(c).type != MANIFEST_SCHEMA.field(c).type]
    if wrong:
        raise ManifestError(f"{path}: columns of the wrong type: {wrong}")
    return table, Path(root) if root is not None else Path(meta["root"])


def select_rows(table: pa.Table, split: str | None = None, generators: Sequence[str] = (),
                limit: int | None = None) -> pa.Table:
    """Rows of one split (None = all) and of the given generators (empty = all), first ``limit``."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split {split!r}: choose from {SPLITS}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if generators:
        present = set(pc.unique(table["generator"]).to_pylist())
        unknown = sorted(set(generators) - present)
        if unknown:
            raise ValueError(f"generators {unknown} are not in the manifest; it has {sorted(present)}")
        table = table.filter(pc.is_in(table["generator"], value_set=pa.array(list(generators), pa.string())))
    if split is not None:
        table = table.filter(pc.equal(table["split"], split))
    return table.slice(0, limit) if limit is not None else table


def count_rows(table: pa.Table) -> list[dict]:
    """Rows and errors per (split, generator, label), sorted: ``[{split, generator, label, count, errors}]``."""
    with_errors = table.select(["split", "generator", "label"]).append_column(
        "has_error", pc.cast(pc.not_equal(table["error"], ""), pa.int64()))
    grouped = with_errors.group_by(["split", "generator", "label"]).aggregate([("has_error", "count"), ("has_error", "sum")])
    counts = [{"split": r["split"], "generator": r["generator"], "label": int(r["label"]),
               "count": int(r["has_error_count"]), "errors": int(r["has_error_sum"] or 0)} for r in grouped.to_pylist()]
    split_order = {s: i for i, s in enumerate(SPLITS)}
    return sorted(counts, key=lambda c: (split_order.get(c["split"], len(SPLITS)), c["split"], c["generator"], c["label"]))


# ---- reports --------------------------------------------------------------------------------
def print_build_report(built: BuiltManifest, examples: int = 5) -> None:
    """Duplicates and unreadable images as rich tables, a few examples each, on the log console."""
    from rich.table import Table

    if built.duplicates:
        table = Table(title=f"{len(built.duplicates)} images occur more than once ({built.num_dropped} copies dropped)")
        table.add_column("sample_id", no_wrap=True)
        table.add_column("split(s)")
        table.add_column("copies", overflow="fold")
        table.add_column("dropped", overflow="fold")
        for group in built.duplicates[:examples]:
            table.add_row(group.sample_id[:12], ", ".join(sorted(set(group.splits))), "\n".join(group.paths),
                          "\n".join(group.dropped) or "-")
        console.print(table)
    errors = built.table.filter(pc.not_equal(built.table["error"], ""))
    if errors.num_rows:
        table = Table(title=f"{errors.num_rows} images could not be read (rows kept, `error` set)")
        table.add_column("path", overflow="fold")
        table.add_column("error", overflow="fold")
        for row in errors.slice(0, examples).to_pylist():
            table.add_row(row["path"], row["error"])
        console.print(table)
