"""The four layout builders: a dataset folder, list or tar shards -> a :class:`BuiltManifest`.

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
are skipped. Copies of one image are handled as :mod:`lare2.shared.manifest.built` describes.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import Callable, Mapping

from lare2.shared.classnames import class_name_from_filename
from lare2.shared.errors import InputError
from lare2.shared.logs import get_logger, progress_bar
from lare2.shared.manifest.built import (
    BuiltManifest,
    check_split,
    describe_all,
    finish_build,
    holdout_score,
    ordered_map,
    require_folder,
)
from lare2.shared.manifest.sources import (
    TAR_EXTENSIONS,
    TAR_MEMBER_SEPARATOR,
    ImageHeader,
    ImageRef,
    describe_bytes,
    files_under,
    images_under,
    is_image_name,
    manifest_row,
    subdirs,
)
from lare2.shared.manifest.table import LABEL_FAKE, LABEL_REAL, LABEL_WORDS, SPLITS, ManifestError, parse_label

logger = get_logger(__name__)

GENIMAGE_SPLITS = {"train": "train", "val": "test"}  # GenImage folder -> our split (before hold-out)
GENIMAGE_LABELS = {"nature": LABEL_REAL, "ai": LABEL_FAKE}
FOLDER_LABELS = {"0_real": LABEL_REAL, "1_fake": LABEL_FAKE}


def build_genimage(src: Path | str, *, val_fraction: float = 0.05, keep_duplicates: bool = False,
                   workers: int = 8, progress: bool = True) -> BuiltManifest:
    """GenImage layout: ``<src>/<generator>/[<subset>/]{train,val}/{ai,nature}/*``.

    GenImage ``val`` -> ``test``; GenImage ``train`` -> ``train``, and the images whose
    :func:`holdout_score` is below ``val_fraction`` -> ``val``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ManifestError(f"val_fraction must be in [0, 1), got {val_fraction}")
    root = require_folder(Path(src))
    refs, skipped = [], []
    for generator_dir in subdirs(root):
        split_dirs = [d for d in subdirs(generator_dir) if d.name in GENIMAGE_SPLITS]
        split_dirs += [d for sub in subdirs(generator_dir) if sub.name not in GENIMAGE_SPLITS
                       for d in subdirs(sub) if d.name in GENIMAGE_SPLITS]
        if not split_dirs:
            logger.warning("%s: no train/ or val/ folder (GenImage layout), skipped", generator_dir)
        for split_dir in split_dirs:
            for label_dir in subdirs(split_dir):
                if label_dir.name not in GENIMAGE_LABELS:
                    logger.warning("%s: not ai/ or nature/, skipped", label_dir)
                    continue
                for file in images_under(label_dir, skipped):
                    refs.append(ImageRef(path=file.relative_to(root).as_posix(), label=GENIMAGE_LABELS[label_dir.name],
                                         generator=generator_dir.name, split=GENIMAGE_SPLITS[split_dir.name],
                                         class_name=class_name_from_filename(file.name)))
    rows = describe_all(root, refs, workers, progress)
    for row in rows:
        if row["split"] == "train" and holdout_score(row["sample_id"]) < val_fraction:
            row["split"] = "val"
    args = {"src": str(src), "val_fraction": val_fraction, "keep_duplicates": keep_duplicates}
    return finish_build(rows, root=root, builder="genimage", builder_args=args, skipped=skipped,
                        keep_duplicates=keep_duplicates, src=Path(src))


def build_folders(src: Path | str, *, generator: str | None = None, split: str | None = None,
                  keep_duplicates: bool = False, workers: int = 8, progress: bool = True) -> BuiltManifest:
    """``<src>/[<generator>/]<split>/{0_real,1_fake}/*`` or ``<src>/{0_real,1_fake}/*`` with ``split``.

    ``generator`` (default: the name of ``src``) names rows that have no generator folder;
    ``split`` names rows that have no split folder.
    """
    root = require_folder(Path(src))
    check_split(split, "--split")
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
        for file in images_under(label_dir, skipped):
            refs.append(ImageRef(path=file.relative_to(root).as_posix(), label=FOLDER_LABELS[label_dir.name],
                                 generator=row_generator, split=row_split,
                                 class_name=class_name_from_filename(file.name)))
    rows = describe_all(root, refs, workers, progress)
    args = {"src": str(src), "generator": generator, "split": split, "keep_duplicates": keep_duplicates}
    return finish_build(rows, root=root, builder="folders", builder_args=args, skipped=skipped,
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
    check_split(split, "--split")
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
    rows = describe_all(root, refs, workers, progress)
    args = {"src": str(src), "generator": generator, "split": split, "label": label, "keep_duplicates": keep_duplicates}
    return finish_build(rows, root=root, builder="list", builder_args=args, skipped=skipped,
                        keep_duplicates=keep_duplicates, src=list_file)


def _member_key(name: str) -> tuple[str, str]:
    """WebDataset key and extension: ``a/b.c.jpg`` -> (``a/b``, ``c.jpg``)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _shard_rows(root: Path, shard: Path, defaults: Mapping[str, object]) -> tuple[list[dict], list[str]]:
    """:func:`_read_shard_rows`; a shard that is no tar (or a truncated one) is a ManifestError naming it."""
    try:
        return _read_shard_rows(root, shard, defaults)
    except tarfile.ReadError as err:
        reason = " ".join(str(err).split())  # tarfile lists each method it tried, one per line
        raise ManifestError(f"{shard}: not a readable tar shard ({reason}); rewrite it, or move it out of the "
                            "folder") from None


def _read_shard_rows(root: Path, shard: Path, defaults: Mapping[str, object]) -> tuple[list[dict], list[str]]:
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
                member_path = f"{shard_path}{TAR_MEMBER_SEPARATOR}{member.name}"
                images.append((key, member.name, describe_bytes(data, member_path)))
            elif ext == "cls":
                label_text = tar.extractfile(member).read().decode().strip()
                sidecars.setdefault(key, {})["label"] = parse_label(label_text, where)
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
        check_split(str(info["split"]), where)
        class_name = str(info.get("class_name") or class_name_from_filename(member))
        ref = ImageRef(path=f"{shard_path}{TAR_MEMBER_SEPARATOR}{member}", label=int(info["label"]),
                       generator=str(info["generator"]), split=str(info["split"]), class_name=class_name)
        rows.append(manifest_row(ref, header))
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
        root = require_folder(src_path)
        shards = [f for f in files_under(root) if f.name.endswith(TAR_EXTENSIONS)]
    if not shards:
        raise ManifestError(f"{src}: no tar shards ({', '.join(TAR_EXTENSIONS)}) found")
    check_split(split, "--split")
    if label is not None:
        label = parse_label(label, "--label")
    defaults = {"generator": generator or (src_path.resolve().parent.name if src_path.is_file() else root.name),
                "split": split, "label": label}
    rows, skipped = [], []
    with progress_bar("shard", disable=not progress) as bar:
        task = bar.add_task("reading shards", total=len(shards), rate="")
        for shard_rows, shard_skipped in ordered_map(lambda s: _shard_rows(root, s, defaults), shards, workers):
            rows += shard_rows
            skipped += shard_skipped
            bar.update(task, advance=1, rate=f"{len(rows)} img")
    args = {"src": str(src), "generator": generator, "split": split, "label": label, "keep_duplicates": keep_duplicates}
    return finish_build(rows, root=root, builder="webdataset", builder_args=args, skipped=skipped,
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
        raise InputError(f"unknown manifest builder {kind!r}; choose from {sorted(BUILDERS)}")
    return BUILDERS[kind](src, **options)
