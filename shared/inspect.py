"""Look inside a feature cache and prove it is whole: counts, sizes, sample rows, per-sample
statistics, verification, run-to-run diff and the mean-LaRE picture.

The logic behind ``lare2 cache ...``; importable without typer. Every report is a plain dict (or a
dataclass with ``to_dict``) so that the CLI can print it as a rich table or as JSON.

Legend: N samples, C = chunk_samples, K recomputed samples; ``lare_4HW`` one LaRE map.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import zarr

from lare2.shared.cache import (
    ARRAY_NAMES,
    MANIFEST_COLUMNS,
    META_COLUMNS,
    STATUS_ERROR,
    STATUS_OK,
    STATUS_PENDING,
    CacheError,
    FeatureCache,
)
from lare2.shared.logs import progress_bar

KNOWN_STATUSES = (STATUS_OK, STATUS_ERROR, STATUS_PENDING)
LABEL_NAMES = {0: "real", 1: "fake"}

# Figures: fixed inches x dpi, so a PNG's pixel size is known in advance (and tested).
FIGURE_DPI = 100
SHOW_PANEL_INCHES = (2.56, 3.0)
"""One panel of ``show``'s PNG (width, height): 256 x 300 px at FIGURE_DPI."""
STATS_FIGURE_INCHES = (12.0, 5.0)
"""``stats``' PNG: 1200 x 500 px at FIGURE_DPI."""


# ---- small utilities ------------------------------------------------------------------------------
def jsonable(obj: Any) -> Any:
    """Plain JSON values: numpy scalars -> Python, NaN/Inf -> None, tuples/Paths -> lists/str."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [jsonable(v) for v in obj.tolist()]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def to_json(obj: Any) -> str:
    return json.dumps(jsonable(obj), indent=2)


def open_cache(path: str | Path) -> FeatureCache:
    """Open a cache read-only; ``FileNotFoundError`` when nothing is there, ``CacheError`` when not a cache."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such cache directory")
    return FeatureCache.open(path, mode="r")


def _iter_arrays(group: zarr.Group) -> list[tuple[str, zarr.Array]]:
    """All arrays of the cache, nested ones by their path (``meta/label``), sorted by path."""
    return sorted(((name, node) for name, node in group.members(max_depth=None) if isinstance(node, zarr.Array)),
                  key=lambda item: item[0])


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def folder_file_count(folder: str | Path) -> int:
    """Files under ``folder`` (what inode quotas count)."""
    return sum(1 for f in Path(folder).rglob("*") if f.is_file())


def _chunk_file(cache: FeatureCache, arr: zarr.Array, coords: tuple[int, ...]) -> Path:
    """The file of stored chunk (or shard) ``coords`` (zarr v3 default key encoding: ``c/0/0/0/0``)."""
    return cache.path / arr.path / arr.metadata.encode_chunk_key(coords)


def _samples_per_file(arr: zarr.Array) -> int:
    return (arr.shards or arr.chunks)[0]


def _block_chunk_coords(arr: zarr.Array, block: int) -> tuple[int, ...]:
    # every array of a cache is stored along samples only: block b is in file (b // blocks per file, 0, ..., 0)
    return (block // (_samples_per_file(arr) // arr.chunks[0]),) + (0,) * (arr.ndim - 1)


def _file_count(arr: zarr.Array) -> int:
    return math.ceil(arr.shape[0] / _samples_per_file(arr))


def _is_variable_string(arr: zarr.Array) -> bool:
    return arr.dtype.kind in ("T", "O", "U")


def label_name(label: int) -> str:
    return LABEL_NAMES.get(int(label), str(label))


# ---- info -----------------------------------------------------------------------------------------
def array_info(cache: FeatureCache) -> list[dict]:
    """Shape, dtype, chunking, bytes in memory and on disk, and compression ratio of every array.

    Bytes on disk sum every file under the array's folder; ratio = uncompressed bytes / bytes on
    disk (None for variable-length strings, whose in-memory size zarr does not know).
    """
    rows = []
    for name, arr in _iter_arrays(cache.group):
        on_disk = _folder_bytes(cache.path / arr.path)
        nbytes = None if _is_variable_string(arr) else int(arr.nbytes)
        rows.append({
            "name": name,
            "shape": list(arr.shape),
            "dtype": str(arr.dtype),
            "chunks": list(arr.chunks),
            "shards": list(arr.shards) if arr.shards else None,
            "nbytes": nbytes,
            "bytes_on_disk": on_disk,
            "compression_ratio": (nbytes / on_disk) if nbytes is not None and on_disk else None,
        })
    return rows


def count_groups(cache: FeatureCache) -> list[dict]:
    """Sample counts per split x generator x label x status, sorted."""
    table = cache.metadata(columns=("split", "generator", "label", "status"))
    keys = ["split", "generator", "label", "status"]
    grouped = table.group_by(keys).aggregate([([], "count_all")]).rename_columns([*keys, "count"])
    return sorted(grouped.to_pylist(), key=lambda r: (r["split"], r["generator"], r["label"], r["status"]))


def status_counts(cache: FeatureCache) -> dict[str, int]:
    status = cache.column("status")
    counts = {s: int((status == s).sum()) for s in KNOWN_STATUSES}
    other = int(len(status) - sum(counts.values()))
    if other:
        counts["unknown"] = other
    return counts


def cache_info(cache: FeatureCache) -> dict:
    """Everything ``lare2 cache info`` shows."""
    attrs = cache.attrs
    done = cache.done_blocks()
    return {
        "path": str(cache.path),
        "format": attrs.get("lare2_cache_format"),
        "num_samples": len(cache),
        "layout": attrs.get("layout"),
        "status_counts": status_counts(cache),
        "recorded_counts": attrs.get("counts"),
        "blocks": {"total": cache.num_blocks, "done": int(done.sum()), "pending": int((~done).sum())},
        "groups": count_groups(cache),
        "arrays": array_info(cache),
        "extract_config": attrs.get("extract_config"),
        "identity": attrs.get("identity"),
        "fingerprints": attrs.get("fingerprints"),
        "provenance": attrs.get("provenance"),
        "manifest": attrs.get("manifest"),
    }


# ---- ls and show ----------------------------------------------------------------------------------
def list_samples(
    cache: FeatureCache,
    *,
    generator: str | None = None,
    label: int | None = None,
    status: str | None = None,
    split: str | None = None,
    limit: int | None = 20,
) -> dict:
    """Metadata rows matching every given filter, in store order: ``{"matching": n, "rows": [...]}``."""
    if status is not None and status not in KNOWN_STATUSES:
        raise ValueError(f"status={status!r}: choose from {list(KNOWN_STATUSES)}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    keep = np.ones(len(cache), dtype=bool)
    for column, wanted in (("generator", generator), ("label", label), ("status", status), ("split", split)):
        if wanted is not None:
            keep &= cache.column(column) == wanted
    indices = np.flatnonzero(keep)
    shown = indices if limit is None else indices[:limit]
    rows = [{"index": int(i), **sample_metadata(cache, int(i))} for i in shown]
    return {"matching": int(len(indices)), "rows": rows}


def sample_metadata(cache: FeatureCache, index: int) -> dict:
    return {c: jsonable(cache.column(c)[index]) for c in META_COLUMNS}


def find_sample(cache: FeatureCache, sample_id: str) -> int:
    """Index of ``sample_id``; a unique prefix is enough. ``KeyError`` naming the reason otherwise."""
    ids = cache.column("sample_id")
    exact = np.flatnonzero(ids == sample_id)
    if len(exact):
        return int(exact[0])
    prefixed = [i for i, s in enumerate(ids) if s.startswith(sample_id)]
    if len(prefixed) == 1:
        return prefixed[0]
    if not prefixed:
        raise KeyError(f"{cache.path}: no sample with id {sample_id!r}")
    raise KeyError(f"{cache.path}: id prefix {sample_id!r} matches {len(prefixed)} samples; give more characters")


def sample_summary(cache: FeatureCache, index: int) -> dict:
    """Metadata, per-channel LaRE statistics and feature norms of one sample.

    Statistics are None for samples without arrays (status error or pending).
    """
    arrays = cache.read([index])
    lare_4HW = arrays["lare"][0].astype(np.float64)
    pooled_D = arrays["pooled"][0].astype(np.float64)  # float16 squares overflow; norms in float64
    fmap_Chw = arrays["fmap"][0].astype(np.float64)
    has_arrays = bool(np.isfinite(lare_4HW).all() and np.isfinite(pooled_D).all() and np.isfinite(fmap_Chw).all())
    summary: dict = {"index": index, "metadata": sample_metadata(cache, index), "has_arrays": has_arrays}
    if not has_arrays:
        summary["lare"] = None
        summary["features"] = None
        return summary
    flat_4P = lare_4HW.reshape(lare_4HW.shape[0], -1)
    summary["lare"] = {
        "mean": float(lare_4HW.mean()),
        "channels": [
            {"channel": c, "mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max())}
            for c, v in enumerate(flat_4P)
        ],
    }
    gap_C = fmap_Chw.reshape(fmap_Chw.shape[0], -1).mean(axis=1)
    summary["features"] = {
        "pooled_l2": float(np.linalg.norm(pooled_D)),
        "fmap_l2": float(np.linalg.norm(fmap_Chw)),
        "fmap_gap_l2": float(np.linalg.norm(gap_C)),
    }
    return summary


def show_figure_pixels(num_panels: int) -> tuple[int, int]:
    """(width, height) in pixels of ``show``'s PNG with ``num_panels`` panels."""
    return round(SHOW_PANEL_INCHES[0] * num_panels * FIGURE_DPI), round(SHOW_PANEL_INCHES[1] * FIGURE_DPI)


def image_path(cache: FeatureCache, index: int) -> Path | None:
    """The source image of a sample (manifest root / path), None when the cache records no root."""
    root = (cache.attrs.get("manifest") or {}).get("root")
    if root is None:
        return None
    return Path(root) / str(cache.column("path")[index])


def render_sample_png(cache: FeatureCache, index: int, out: str | Path) -> dict:
    """Save the source image beside its LaRE map, one panel per latent channel.

    When the image is not at hand only the LaRE panels are drawn; the returned dict says so
    (``image_shown``, ``image_note``) and gives the PNG's pixel size.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    lare_4HW = cache.read([index], names=("lare",))["lare"][0].astype(np.float32)
    source = image_path(cache, index)
    image = None
    if source is None:
        note = "the cache records no manifest root"
    elif not source.is_file():
        note = f"image not found: {source}"
    else:
        with Image.open(source) as im:
            image = np.asarray(im.convert("RGB"))
        note = str(source)

    channels = lare_4HW.shape[0]
    panels = channels + (image is not None)
    fig = Figure(figsize=(SHOW_PANEL_INCHES[0] * panels, SHOW_PANEL_INCHES[1]), dpi=FIGURE_DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    first = 0
    if image is not None:
        axes[0].imshow(image)
        axes[0].set_title("image", fontsize=9)
        first = 1
    finite = lare_4HW[np.isfinite(lare_4HW)]
    # one colour scale for all channels so that they compare; the 99th percentile keeps outliers from washing it out
    vmax = float(np.percentile(finite, 99)) if finite.size else 1.0
    for c in range(channels):
        ax = axes[first + c]
        ax.imshow(lare_4HW[c], cmap="magma", vmin=0.0, vmax=vmax or 1.0, interpolation="nearest")
        ax.set_title(f"LaRE channel {c}", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    meta = sample_metadata(cache, index)
    caption = f"{meta['sample_id']}  {meta['generator']}  {label_name(meta['label'])}  {meta['status']}"
    if image is None:
        caption += f"  ({note})"
    fig.suptitle(caption, fontsize=8)
    fig.savefig(out, dpi=FIGURE_DPI)
    return {"png": str(out), "pixels": list(show_figure_pixels(panels)), "image_shown": image is not None, "image_note": note}


# ---- verify ---------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class Finding:
    """One problem (``error``) or caveat (``warning``) found by :func:`verify_cache`."""

    check: str
    """Which check: structure, chunks, values, status, ids, counts, manifest, fingerprints, recompute."""
    severity: str
    """``error`` (the cache is not whole / not trustworthy) or ``warning`` (incomplete or skipped)."""
    message: str
    """One line for people."""
    items: list = field(default_factory=list)
    """What it concerns: chunk keys, sample ids, block numbers."""

    def to_dict(self) -> dict:
        return {"check": self.check, "severity": self.severity, "message": self.message,
                "count": len(self.items), "items": jsonable(self.items)}


@dataclass(kw_only=True)
class VerifyReport:
    """What :func:`verify_cache` found."""

    path: str
    """The cache."""
    findings: list[Finding] = field(default_factory=list)
    """Problems and caveats, in the order found."""
    checked: dict = field(default_factory=dict)
    """What was looked at: chunks read, ok samples scanned, manifest rows, recomputed samples."""
    recompute: dict | None = None
    """Per-array comparison of recomputed samples, when ``recompute`` was asked and ran."""

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def add(self, check: str, severity: str, message: str, items: Sequence = ()) -> None:
        self.findings.append(Finding(check=check, severity=severity, message=message, items=list(items)))

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "ok": self.ok,
            "errors": [f.to_dict() for f in self.errors],
            "warnings": [f.to_dict() for f in self.warnings],
            "checked": jsonable(self.checked),
            "recompute": jsonable(self.recompute),
        }


RecomputeFn = Callable[..., Mapping[str, np.ndarray]]
"""``fn(cache_path, indices, sd_model=None, backbone=None, device="auto", compute_dtype=None)
-> {"lare": [K,...], "pooled": ..., "fmap": ...}``,
as ``lare2.extract.run.recompute_samples`` (shared/ never imports the extractor: callers pass it)."""


class RecomputeUnavailable(RuntimeError):
    """Raised by a recompute function when the extractor, the models or the device are not at hand."""


def manifest_selection(path: str | Path, extract_config: Mapping[str, Any] | None) -> pa.Table:
    """The rows of the manifest at ``path`` that an extraction with ``extract_config`` takes
    (its split, generators and limit)."""
    from lare2.shared.manifest import read_manifest, select_rows

    cfg = extract_config or {}
    table, _root = read_manifest(path)
    return select_rows(table, split=cfg.get("split"), generators=list(cfg.get("generators") or []), limit=cfg.get("limit"))


def _check_chunks_and_values(
    cache: FeatureCache, report: VerifyReport, progress: bool
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Read every chunk; flag missing and unreadable ones and non-finite values in ok samples.

    Returns the metadata columns ({column: [N]}, strings as ``object``) and the block markers
    [num_blocks] as read, fill values where a chunk was unreadable, for the checks that follow
    (which must not read the damaged store again).
    """
    group = cache.group
    arrays = dict(_iter_arrays(group))
    unreadable: list[str] = []
    missing: list[str] = []
    chunks_read = 0

    # metadata + block markers: read each array whole (small); on failure locate the bad chunks
    small: dict[str, np.ndarray] = {}
    for name, arr in arrays.items():
        if name in ARRAY_NAMES:
            continue
        try:
            small[name] = arr[:]
            chunks_read += arr.nchunks
            continue
        except Exception:  # a decode error somewhere: read chunk by chunk below to name the bad ones
            pass
        values = np.full(arr.shape, arr.fill_value, dtype=arr.dtype)
        chunk = arr.chunks[0]
        for b in range(arr.nchunks):
            sl = slice(b * chunk, min((b + 1) * chunk, arr.shape[0]))
            try:
                values[sl] = arr[sl]
            except Exception as err:
                unreadable.append(f"{name}/{arr.metadata.encode_chunk_key(_block_chunk_coords(arr, b))} ({err})")
            chunks_read += 1
        small[name] = values

    columns = {c: small[f"meta/{c}"].astype(object if dtype == "str" else small[f"meta/{c}"].dtype)
               for c, dtype in META_COLUMNS.items()}
    status, ids = columns["status"], columns["sample_id"]
    done = small["block_done"].astype(bool)
    for name in ("meta/sample_id", "meta/status"):  # never all-fill, so every chunk must be on disk
        arr = arrays.get(name)
        if arr is not None:
            missing += [f"{name}/{arr.metadata.encode_chunk_key((b,))}" for b in range(_file_count(arr))
                        if not _chunk_file(cache, arr, (b,)).is_file()]

    nonfinite: dict[str, list[int]] = {name: [] for name in ARRAY_NAMES}
    ok = status == STATUS_OK
    with progress_bar(unit="block", disable=not progress) as bar:
        task = bar.add_task("verify", total=cache.num_blocks, rate="")
        for block in range(cache.num_blocks):
            sl = cache.block_slice(block)
            block_ok = ok[sl]
            for name in ARRAY_NAMES:
                arr = arrays.get(name)
                if arr is None:
                    continue
                coords = _block_chunk_coords(arr, block)
                key = f"{name}/{arr.metadata.encode_chunk_key(coords)}"
                # zarr skips writing chunks that hold only the fill value (NaN): a block of failed
                # samples has no file, a block with an ok sample must have one
                if done[block] and block_ok.any() and not _chunk_file(cache, arr, coords).is_file():
                    missing.append(key)
                chunks_read += 1
                try:
                    values = arr[sl]
                except Exception as err:  # zarr raises the codec's own error type on a bad chunk
                    unreadable.append(f"{key} ({err})")
                    continue
                rows_finite = np.isfinite(values.reshape(len(values), -1)).all(axis=1)
                nonfinite[name] += [sl.start + int(i) for i in np.flatnonzero(block_ok & ~rows_finite)]
            bar.advance(task)

    if missing:
        report.add("chunks", "error", f"{len(missing)} chunks missing on disk", missing)
    if unreadable:
        report.add("chunks", "error", f"{len(unreadable)} chunks cannot be read (corrupt)", unreadable)
    for name, rows in nonfinite.items():
        if rows:
            report.add("values", "error", f"{name}: NaN/Inf in {len(rows)} ok samples", [str(ids[i]) for i in rows])
    report.checked["chunks_read"] = chunks_read
    report.checked["ok_samples_scanned"] = int(ok.sum())
    return columns, done


def _check_structure(cache: FeatureCache, report: VerifyReport) -> bool:
    """Arrays present with the layout's shapes; False when reading on would be meaningless."""
    n = len(cache)
    arrays = dict(_iter_arrays(cache.group))
    whole = True
    expected = {name: (n, *cache.layout.sample_shape(name)) for name in ARRAY_NAMES}
    expected |= {f"meta/{c}": (n,) for c in META_COLUMNS}
    expected["block_done"] = (cache.num_blocks,)
    for name, shape in expected.items():
        if name not in arrays:
            report.add("structure", "error", f"array {name} is missing", [name])
            whole = False
        elif tuple(arrays[name].shape) != shape:
            report.add("structure", "error", f"array {name} has shape {tuple(arrays[name].shape)}, expected {shape}", [name])
            whole = False
    return whole


def _check_status(cache: FeatureCache, report: VerifyReport, status: np.ndarray, done: np.ndarray) -> None:
    unknown = sorted({str(s) for s in status if s not in KNOWN_STATUSES})
    if unknown:
        report.add("status", "error", f"unknown status values {unknown}", unknown)
    pending_blocks = [int(b) for b in np.flatnonzero(~done)]
    if pending_blocks:
        pending_samples = sum(cache.block_slice(b).stop - cache.block_slice(b).start for b in pending_blocks)
        report.add("status", "warning", f"incomplete: {len(pending_blocks)} of {cache.num_blocks} blocks "
                   f"({pending_samples} samples) not extracted yet", pending_blocks)
    stale = [int(b) for b in np.flatnonzero(done) if (status[cache.block_slice(int(b))] == STATUS_PENDING).any()]
    if stale:
        report.add("status", "error", f"{len(stale)} blocks marked done still hold pending samples", stale)
    recorded = cache.attrs.get("counts")
    if recorded is not None and not pending_blocks:
        actual = {s: int((status == s).sum()) for s in KNOWN_STATUSES}
        differing = {k: (recorded.get(k), v) for k, v in actual.items() if recorded.get(k, 0) != v}
        if differing:
            report.add("counts", "error", f"recorded counts differ from the status column (recorded, actual): {differing}",
                       sorted(differing))


def _check_ids(report: VerifyReport, ids: np.ndarray) -> None:
    empty = int((ids == "").sum())
    if empty:
        report.add("ids", "error", f"{empty} samples have an empty id", [int(i) for i in np.flatnonzero(ids == "")])
    values, counts = np.unique(ids[ids != ""].astype(str), return_counts=True)
    duplicates = [str(v) for v in values[counts > 1]]
    if duplicates:
        report.add("ids", "error", f"{len(duplicates)} sample ids occur more than once", duplicates)


def _check_manifest(cache: FeatureCache, report: VerifyReport, manifest: Path, columns: dict[str, np.ndarray]) -> None:
    table = manifest_selection(manifest, cache.attrs.get("extract_config"))
    report.checked["manifest"] = str(manifest)
    report.checked["manifest_rows"] = table.num_rows
    wanted = table.column("sample_id").to_pylist()
    counts: dict[str, int] = {}
    for sample_id in wanted:
        counts[sample_id] = counts.get(sample_id, 0) + 1
    duplicated = sorted(k for k, v in counts.items() if v > 1)
    if duplicated:
        report.add("manifest", "error", f"{len(duplicated)} ids occur more than once in the manifest", duplicated)
    in_cache = {str(s): i for i, s in enumerate(columns["sample_id"])}
    missing = [s for s in counts if s not in in_cache]
    extra = sorted(s for s in in_cache if s not in counts)
    if missing:
        report.add("manifest", "error", f"{len(missing)} manifest rows are missing from the cache", missing)
    if extra:
        report.add("manifest", "error", f"{len(extra)} cache samples are not in the manifest", extra)
    # the manifest columns of samples present on both sides must agree
    mismatched: dict[str, list[str]] = {}
    rows = {c: table.column(c).to_pylist() for c in MANIFEST_COLUMNS if c != "sample_id"}
    stored = {c: columns[c] for c in rows}
    for r, sample_id in enumerate(wanted):
        i = in_cache.get(sample_id)
        if i is None:
            continue
        for column, values in rows.items():
            if jsonable(stored[column][i]) != jsonable(values[r]):
                mismatched.setdefault(column, []).append(sample_id)
    for column, sample_ids in mismatched.items():
        report.add("manifest", "error", f"column {column!r} differs from the manifest for {len(sample_ids)} samples", sample_ids)


def _check_fingerprints(cache: FeatureCache, report: VerifyReport) -> None:
    attrs = cache.attrs
    fingerprints, identity = attrs.get("fingerprints"), attrs.get("identity")
    if not fingerprints or identity is None:
        report.add("fingerprints", "warning", "the cache records no model fingerprints or identity")
        return
    in_identity = {k.removeprefix("fingerprint."): v for k, v in identity.items() if k.startswith("fingerprint.")}
    differing = sorted(k for k in set(in_identity) | set(fingerprints) if in_identity.get(k) != fingerprints.get(k))
    if differing:
        report.add("fingerprints", "error", "identity and fingerprints disagree on "
                   + ", ".join(f"{k} ({in_identity.get(k)} vs {fingerprints.get(k)})" for k in differing), differing)


def compare_recomputed(cache: FeatureCache, indices: np.ndarray, recomputed: Mapping[str, np.ndarray],
                       tolerance: float = 0.0) -> dict:
    """Comparison of recomputed rows with the stored ones, per array: bit for bit, or with ``tolerance`` > 0,
    a sample matches when its largest difference is at most ``tolerance`` x its largest stored magnitude.

    Recomputed values are cast to the stored dtype first (as the writer does).
    """
    ids = cache.column("sample_id")
    stored = cache.read(indices)
    result = {}
    for name in ARRAY_NAMES:
        if name not in recomputed:
            result[name] = {"compared": False, "mismatched": [], "max_abs_diff": None}
            continue
        new = np.asarray(recomputed[name]).astype(stored[name].dtype)
        old = stored[name]
        if new.shape != old.shape:
            raise ValueError(f"recomputed {name} has shape {new.shape}, the cache holds {old.shape}")
        k = len(old)
        diff = np.abs(old.astype(np.float64) - new.astype(np.float64))
        if tolerance > 0:
            scale = [np.nanmax(np.abs(old[i].astype(np.float64)), initial=0.0) for i in range(k)]
            same = [np.array_equal(np.isnan(old[i]), np.isnan(new[i]))
                    and np.nanmax(diff[i], initial=0.0) <= tolerance * scale[i] for i in range(k)]
        else:  # bytes, not values: NaN == NaN and -0.0 != 0.0, as "bit for bit" means
            same = [old[i].tobytes() == new[i].tobytes() for i in range(k)]
        result[name] = {
            "compared": True,
            "mismatched": [str(ids[indices[i]]) for i in range(k) if not same[i]],
            "max_abs_diff": float(np.nanmax(diff)) if np.isfinite(diff).any() else 0.0,
        }
    return result


def _check_recompute(cache: FeatureCache, report: VerifyReport, k: int, seed: int, recompute_fn: RecomputeFn | None,
                     sd_model: str | None, backbone: str | None, device: str = "auto", compute_dtype: str | None = None,
                     tolerance: float = 0.0) -> None:
    if any(f.check == "chunks" for f in report.errors):
        report.add("recompute", "warning", "skipped: the cache has missing or unreadable chunks")
        return
    ok_indices = np.flatnonzero(cache.ok_mask())
    if not len(ok_indices):
        report.add("recompute", "warning", "skipped: no ok samples to recompute")
        return
    indices = np.sort(np.random.default_rng(seed).choice(ok_indices, size=min(k, len(ok_indices)), replace=False))
    if recompute_fn is None:
        report.add("recompute", "warning", "skipped: no extractor was given to recompute with")
        return
    try:
        recomputed = recompute_fn(cache.path, [int(i) for i in indices], sd_model=sd_model, backbone=backbone,
                                  device=device, compute_dtype=compute_dtype)
    except (RecomputeUnavailable, OSError, CacheError) as err:  # models or device not at hand, other weights
        report.add("recompute", "warning", f"skipped: {err}")
        return
    result = compare_recomputed(cache, indices, recomputed, tolerance)
    report.recompute = {"indices": [int(i) for i in indices], "tolerance": tolerance, "arrays": result}
    report.checked["recomputed_samples"] = len(indices)
    for name, r in result.items():
        if r["mismatched"]:
            report.add("recompute", "error", f"{name}: {len(r['mismatched'])} of {len(indices)} recomputed samples differ "
                       f"(max abs diff {r['max_abs_diff']:.3g})", r["mismatched"])


def verify_cache(
    path: str | Path,
    *,
    manifest: str | Path | None = None,
    recompute: int = 0,
    seed: int = 0,
    recompute_fn: RecomputeFn | None = None,
    sd_model: str | None = None,
    backbone: str | None = None,
    device: str = "auto",
    compute_dtype: str | None = None,
    tolerance: float = 0.0,
    progress: bool = False,
) -> VerifyReport:
    """Prove a cache whole, or list why it is not.

    Checks: every array present with the right shape; every chunk readable (and on disk where
    data was written); no NaN/Inf in ok samples; statuses consistent with the block markers and
    the recorded counts; ids non-empty and unique; metadata equal to the manifest selection
    (``manifest``, default the one recorded in the cache when it exists); identity fingerprints
    equal to the recorded fingerprints; with ``recompute`` K > 0, K random ok samples re-extracted
    with ``recompute_fn`` (see :data:`RecomputeFn`) on ``device`` match bit for bit (or within
    ``tolerance``, relative, for another device or ``compute_dtype``); it is skipped, with a
    warning saying why, when the function is None or raises :class:`RecomputeUnavailable`,
    ``OSError`` (weights not found) or ``CacheError`` (other weights than the cache's).
    Pending blocks are a warning (incomplete), not an error.
    """
    cache = open_cache(path)
    report = VerifyReport(path=str(cache.path))
    if not _check_structure(cache, report):
        return report
    columns, done = _check_chunks_and_values(cache, report, progress)
    status, ids = columns["status"], columns["sample_id"]
    _check_status(cache, report, status, done)
    _check_ids(report, ids)
    recorded = (cache.attrs.get("manifest") or {}).get("path")
    if manifest is not None:
        _check_manifest(cache, report, Path(manifest), columns)
    elif recorded and Path(recorded).is_file():
        _check_manifest(cache, report, Path(recorded), columns)
    else:
        report.add("manifest", "warning", "skipped: no manifest given and the recorded one "
                   f"({recorded or 'none'}) is not at hand")
    _check_fingerprints(cache, report)
    if recompute > 0:
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}")
        _check_recompute(cache, report, recompute, seed, recompute_fn, sd_model, backbone, device, compute_dtype, tolerance)
    return report


# ---- diff -----------------------------------------------------------------------------------------
def _read_rows(cache: FeatureCache, indices: np.ndarray, name: str) -> np.ndarray:
    """Rows ``indices`` of one array; a plain slice when they are consecutive (much faster in zarr)."""
    if len(indices) and indices[-1] - indices[0] + 1 == len(indices) and (np.diff(indices) == 1).all():
        return cache.read(slice(int(indices[0]), int(indices[-1]) + 1), names=(name,))[name]
    return cache.read(indices, names=(name,))[name]


def _rows_equal_bytes(x_BP: np.ndarray, y_BP: np.ndarray) -> np.ndarray:
    """Bool [B]: rows identical bit for bit (so NaN rows of failed samples compare equal)."""
    unsigned = np.dtype(f"u{x_BP.dtype.itemsize}")
    return (x_BP.view(unsigned) == y_BP.view(unsigned)).all(axis=1)


def diff_caches(path_a: str | Path, path_b: str | Path, *, atol: float = 0.0) -> dict:
    """Sample-by-sample comparison of two caches, matched by sample id.

    Per array: the largest absolute difference, how many samples differ by more than ``atol``, the
    sample with the largest difference, and samples NaN on one side only. Also ids present on one
    side only, differing metadata and differing identity. ``agree`` is True when nothing differs.
    """
    a, b = open_cache(path_a), open_cache(path_b)
    ids_a, ids_b = a.column("sample_id"), b.column("sample_id")
    where_b = {str(s): i for i, s in enumerate(ids_b)}
    in_a = set(map(str, ids_a))
    only_a = [str(s) for s in ids_a if str(s) not in where_b]
    only_b = [str(s) for s in ids_b if str(s) not in in_a]
    pairs_a = np.array([i for i, s in enumerate(ids_a) if str(s) in where_b], dtype=np.int64)
    pairs_b = np.array([where_b[str(ids_a[i])] for i in pairs_a], dtype=np.int64)

    metadata = {}
    for column in META_COLUMNS:
        if column == "sample_id":
            continue
        va, vb = a.column(column)[pairs_a], b.column(column)[pairs_b]
        differing = [str(ids_a[pairs_a[i]]) for i in np.flatnonzero(va != vb)]
        if differing:
            metadata[column] = differing

    from lare2.shared.config import diff_identity

    arrays = {}
    for name in ARRAY_NAMES:
        shape_a, shape_b = a.layout.sample_shape(name), b.layout.sample_shape(name)
        if shape_a != shape_b:
            arrays[name] = {"comparable": False, "reason": f"sample shapes differ: {shape_a} vs {shape_b}"}
            continue
        max_diff, worst, differing, nan_one_side = 0.0, None, [], []
        c = a.layout.chunk_samples
        for start in range(0, len(pairs_a), c):  # one A chunk's worth at a time: memory stays bounded
            ia, ib = pairs_a[start:start + c], pairs_b[start:start + c]
            raw_a = _read_rows(a, ia, name).reshape(len(ia), -1)  # [B, P] stored dtype
            raw_b = _read_rows(b, ib, name).reshape(len(ib), -1)
            # two runs that agree hold identical bytes: only other rows need arithmetic
            if raw_a.dtype == raw_b.dtype:
                unequal = np.flatnonzero(~_rows_equal_bytes(raw_a, raw_b))
            else:
                unequal = np.arange(len(ia))
            if not len(unequal):
                continue
            va, vb = raw_a[unequal].astype(np.float64), raw_b[unequal].astype(np.float64)
            nan_a, nan_b = np.isnan(va), np.isnan(vb)
            one_side = (nan_a != nan_b).any(axis=1)
            per_sample = np.where(nan_a | nan_b, 0.0, np.abs(va - vb)).max(axis=1, initial=0.0)
            nan_one_side += [str(ids_a[ia[unequal[i]]]) for i in np.flatnonzero(one_side)]
            differing += [str(ids_a[ia[unequal[i]]]) for i in np.flatnonzero(per_sample > atol)]
            if per_sample.max() > max_diff:
                max_diff = float(per_sample.max())
                worst = str(ids_a[ia[unequal[int(per_sample.argmax())]]])
        arrays[name] = {"comparable": True, "max_abs_diff": max_diff, "worst_sample": worst,
                        "samples_differing": differing, "nan_on_one_side": nan_one_side}

    identity = {k: list(v) for k, v in diff_identity(a.attrs.get("identity") or {}, b.attrs.get("identity") or {}).items()}
    agree = not (only_a or only_b or metadata) and all(
        r["comparable"] and not r["samples_differing"] and not r["nan_on_one_side"] for r in arrays.values())
    return {
        "a": str(a.path), "b": str(b.path), "atol": atol, "agree": agree,
        "compared": int(len(pairs_a)), "only_in_a": only_a, "only_in_b": only_b,
        "metadata_differs": metadata, "arrays": arrays, "identity_differs": identity,
    }


# ---- stats ----------------------------------------------------------------------------------------
def mean_lare(cache: FeatureCache, *, progress: bool = False) -> np.ndarray:
    """Mean of each sample's LaRE map, float64 [N]; NaN for samples without a map. Reads chunk by chunk."""
    out = np.full(len(cache), np.nan)
    with progress_bar(unit="block", disable=not progress) as bar:
        task = bar.add_task("mean LaRE", total=cache.num_blocks, rate="")
        for block in range(cache.num_blocks):
            sl = cache.block_slice(block)
            lare_B4HW = cache.read(sl, names=("lare",))["lare"]
            out[sl] = lare_B4HW.reshape(len(lare_B4HW), -1).astype(np.float64).mean(axis=1)
            bar.advance(task)
    return out


def lare_stats(cache: FeatureCache, *, progress: bool = False) -> dict:
    """Mean LaRE per sample, summarised per generator x label over ok samples, with the values."""
    means = mean_lare(cache, progress=progress)
    ok = cache.ok_mask() & np.isfinite(means)
    generators, labels = cache.column("generator"), cache.column("label")
    groups = []
    for generator, label in sorted({(str(g), int(l)) for g, l in zip(generators[ok], labels[ok])}):
        values = means[ok & (generators == generator) & (labels == label)]
        groups.append({
            "generator": generator, "label": label, "n": int(len(values)),
            "mean": float(values.mean()), "std": float(values.std()), "median": float(np.median(values)),
            "q05": float(np.quantile(values, 0.05)), "q95": float(np.quantile(values, 0.95)),
            "values": values,
        })
    return {"path": str(cache.path), "ok_samples": int(ok.sum()), "groups": groups}


def stats_figure_pixels() -> tuple[int, int]:
    return round(STATS_FIGURE_INCHES[0] * FIGURE_DPI), round(STATS_FIGURE_INCHES[1] * FIGURE_DPI)


def render_stats_png(stats: dict, out: str | Path) -> dict:
    """Violins (left) and histograms (right) of mean LaRE per generator x label; log scale."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=STATS_FIGURE_INCHES, dpi=FIGURE_DPI)
    FigureCanvasAgg(fig)
    violins, hists = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    groups = [g for g in stats["groups"] if g["n"]]
    if not groups:
        for ax in (violins, hists):
            ax.text(0.5, 0.5, "no ok samples", ha="center", va="center", transform=ax.transAxes)
    else:
        # mean squared errors are positive and span decades: compare them on a log scale
        logs = [np.log10(np.maximum(np.asarray(g["values"]), 1e-12)) for g in groups]
        names = [f"{g['generator']}\n{label_name(g['label'])} (n={g['n']})" for g in groups]
        colours = ["tab:blue" if g["label"] == 0 else "tab:red" for g in groups]
        positions = np.arange(1, len(groups) + 1)
        if all(len(v) > 1 for v in logs):
            parts = violins.violinplot(logs, positions=positions, showmedians=True)
            for body, colour in zip(parts["bodies"], colours):
                body.set_facecolor(colour)
                body.set_alpha(0.5)
        for p, v, colour in zip(positions, logs, colours):
            violins.scatter(np.full(len(v), p), v, s=4, color=colour, alpha=0.6)
        violins.set_xticks(positions, names, fontsize=7)
        violins.set_ylabel("log10 mean LaRE")
        violins.set_title("mean LaRE per generator and label", fontsize=10)
        bins = np.linspace(min(v.min() for v in logs), max(v.max() for v in logs) + 1e-9, 40)
        for v, name in zip(logs, names):
            hists.hist(v, bins=bins, histtype="step", label=name.replace("\n", " "))
        hists.set_xlabel("log10 mean LaRE")
        hists.set_ylabel("samples")
        hists.legend(fontsize=6)
    fig.suptitle(str(stats["path"]), fontsize=8)
    fig.savefig(out, dpi=FIGURE_DPI)
    return {"png": str(out), "pixels": list(stats_figure_pixels())}
