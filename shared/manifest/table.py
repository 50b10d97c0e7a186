"""The manifest table: schema, parquet IO, validation and row selection (pyarrow only).

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

The cache store imports this module, so it stays free of Pillow and of the builders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lare2.shared.atomic import atomic_write
from lare2.shared.errors import InputError, UserError

__all__ = [
    "CACHE_COLUMNS", "COLUMNS", "LABEL_FAKE", "LABEL_REAL", "LABEL_WORDS", "MANIFEST_FORMAT_VERSION", "MANIFEST_SCHEMA",
    "META_BUILDER", "META_BUILDER_ARGS", "META_FORMAT", "META_PROVENANCE", "META_ROOT", "SPLITS", "ManifestError",
    "count_rows", "empty_manifest_error", "parse_label", "read_manifest", "read_manifest_metadata", "read_selection",
    "select_rows", "write_manifest",
]

MANIFEST_FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
LABEL_REAL, LABEL_FAKE = 0, 1
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
CACHE_COLUMNS = ("sample_id", "path", "label", "generator", "split", "class_name")
"""The manifest columns every cache copies per sample (the header columns stay in the manifest)."""


class ManifestError(UserError, ValueError):
    """A manifest that cannot be built or read; the message names the file and the reason."""


def parse_label(value: object, where: str) -> int:
    """0/1 from ``0``, ``1``, ``"0"``, ``"1"``, ``"real"``, ``"fake"`` (any case)."""
    key = str(value).strip().lower()
    if isinstance(value, bool) or key not in LABEL_WORDS:
        raise ManifestError(f"{where}: label {value!r} is not one of 0, 1, real, fake")
    return LABEL_WORDS[key]


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
    with atomic_write(path) as staging:
        pq.write_table(table, staging)
    return path


def empty_manifest_error(path: Path | str) -> ManifestError:
    """The refusal of a manifest without rows: bad input for every command, as each one needs rows."""
    return ManifestError(f"{path}: an empty manifest (0 rows); build it again from a folder of images with "
                         f"`lare2 manifest build KIND SRC -o {path}`")


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
    version = meta.get(META_FORMAT)
    if version != str(MANIFEST_FORMAT_VERSION):
        written = "records no format" if version is None else f"is format {version}, written by another lare2 version"
        raise ManifestError(f"{path}: the manifest {written}; this lare2 reads format {MANIFEST_FORMAT_VERSION}: "
                            "build it again with `lare2 manifest build`")
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
        raise InputError(f"split {split!r}: choose from {SPLITS}")
    if limit is not None and limit < 0:
        raise InputError(f"limit must be >= 0, got {limit}")
    if generators:
        present = set(pc.unique(table["generator"]).to_pylist())
        unknown = sorted(set(generators) - present)
        if unknown:
            raise InputError(f"generators {unknown} are not in the manifest; it has {sorted(present)}")
        table = table.filter(pc.is_in(table["generator"], value_set=pa.array(list(generators), pa.string())))
    if split is not None:
        table = table.filter(pc.equal(table["split"], split))
    return table.slice(0, limit) if limit is not None else table


def read_selection(path: Path | str, *, split: str | None = None, generators: Sequence[str] = (),
                   limit: int | None = None) -> pa.Table:
    """The validated rows of the manifest at ``path`` that :func:`select_rows` picks: the one
    selection the extractor and the cache verifier both take."""
    table, _root = read_manifest(path)
    return select_rows(table, split=split, generators=generators, limit=limit)


def count_rows(table: pa.Table) -> list[dict]:
    """Rows and errors per (split, generator, label), sorted: ``[{split, generator, label, count, errors}]``."""
    with_errors = table.select(["split", "generator", "label"]).append_column(
        "has_error", pc.cast(pc.not_equal(table["error"], ""), pa.int64()))
    grouped = with_errors.group_by(["split", "generator", "label"]).aggregate(
        [("has_error", "count"), ("has_error", "sum")])
    counts = [{"split": r["split"], "generator": r["generator"], "label": int(r["label"]),
               "count": int(r["has_error_count"]), "errors": int(r["has_error_sum"] or 0)} for r in grouped.to_pylist()]
    split_order = {s: i for i, s in enumerate(SPLITS)}
    return sorted(counts,
                  key=lambda c: (split_order.get(c["split"], len(SPLITS)), c["split"], c["generator"], c["label"]))
