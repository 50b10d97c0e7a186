"""Prove a feature cache whole, or list why it is not: structure, chunks, values, statuses, ids,
manifest, fingerprints and, optionally, recomputed samples.

The logic behind ``lare2 cache verify``; importable without typer. Legend: N samples, K recomputed samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from lare2.shared.cache.chunks import iter_arrays
from lare2.shared.cache.errors import CacheError, RecomputeUnavailable
from lare2.shared.cache.presence import ChunkPresence, block_file
from lare2.shared.cache.schema import (
    BLOCK_DONE,
    EVERY_CHUNK_ATTR,
    KNOWN_STATUSES,
    MANIFEST_COLUMNS,
    META_COLUMNS,
    STATUS_OK,
    STATUS_PENDING,
)
from lare2.shared.cache.store import FeatureCache, nonfinite_rows, open_cache
from lare2.shared.errors import InputError
from lare2.shared.jsonio import jsonable
from lare2.shared.logs import progress_bar
from lare2.shared.manifest import read_selection


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
    damaged: dict[int, set[str]] = field(default_factory=dict)
    """Blocks whose chunks are missing, unreadable or inconsistent: block -> what (``lare``, ``meta/label``,
    ``values``, ``status``, ``manifest``); what ``lare2 cache repair`` resets."""

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

    def damage(self, block: int, what: str) -> None:
        self.damaged.setdefault(int(block), set()).add(what)

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "ok": self.ok,
            "errors": [f.to_dict() for f in self.errors],
            "warnings": [f.to_dict() for f in self.warnings],
            "checked": jsonable(self.checked),
            "recompute": jsonable(self.recompute),
            "damaged_blocks": {str(b): sorted(w) for b, w in sorted(self.damaged.items())},
        }


RecomputeFn = Callable[..., Mapping[str, np.ndarray]]
"""``fn(cache_path, indices, sd=None, clip=None, device="auto", compute_dtype=None)
-> {"lare": [K,...], "pooled": ..., "fmap": ...}``,
as ``lare2.extract.run.recompute_samples`` (shared/ never imports the extractor: callers pass it)."""


def _read_whole(name: str, arr, chunk_samples: int, report: VerifyReport,
                unreadable: list[str]) -> tuple[np.ndarray, int]:
    """A small array (a metadata column, the block markers) read whole, or chunk by chunk when a chunk cannot
    be decoded: fill values there, each bad chunk named in ``unreadable``. Returns the values and chunks read."""
    try:
        return arr[:], arr.nchunks
    except Exception:  # noqa: BLE001 - a decode error somewhere: read chunk by chunk below to name the bad ones
        pass
    values = np.full(arr.shape, arr.fill_value, dtype=arr.dtype)
    chunk = arr.chunks[0]  # a block per chunk (block_done: one marker per chunk)
    blocks = -(-arr.shape[0] // chunk)
    for b in range(blocks):
        sl = slice(b * chunk, min((b + 1) * chunk, arr.shape[0]))
        try:
            values[sl] = arr[sl]
        except Exception as err:  # noqa: BLE001 - zarr raises the codec's own error type
            unreadable.append(f"{name}/{block_file(arr, b)[0]} ({err})")
            report.damage(b * chunk // chunk_samples, name)
    return values, blocks


def _scan_values(cache: FeatureCache, arrays: dict, presence: ChunkPresence, ok: np.ndarray, report: VerifyReport,
                 unreadable: list[str], progress: bool) -> tuple[dict[str, list[int]], int]:
    """Read every chunk of the per-sample arrays, block by block: unreadable chunks go to ``unreadable``; returns
    the ok samples holding NaN/Inf per array ({name: [sample index]}) and the chunks read."""
    nonfinite: dict[str, list[int]] = {name: [] for name in cache.layout.array_names}
    chunks_read = 0
    with progress_bar(unit="block", disable=not progress) as bar:
        task = bar.add_task("verify", total=cache.num_blocks, rate="")
        for block in range(cache.num_blocks):
            sl = cache.block_slice(block)
            for name in cache.layout.array_names:
                arr = arrays.get(name)
                if arr is None:
                    continue
                chunks_read += 1
                try:
                    values = arr[sl]
                except Exception as err:  # noqa: BLE001 - zarr raises the codec's own error type on a bad chunk
                    unreadable.append(f"{presence.chunk_key(name, block)} ({err})")
                    report.damage(block, name)
                    continue
                bad = [sl.start + int(i) for i in np.flatnonzero(ok[sl] & nonfinite_rows(values))]
                nonfinite[name] += bad
                if bad:
                    report.damage(block, "values")
            bar.advance(task)
    return nonfinite, chunks_read


def _check_chunks_and_values(
    cache: FeatureCache, report: VerifyReport, progress: bool
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Read every chunk; flag missing and unreadable ones and non-finite values in ok samples.

    Returns the metadata columns ({column: [N]}, strings as ``object``) and the block markers
    [num_blocks] as read, fill values where a chunk was unreadable, for the checks that follow
    (which must not read the damaged store again).
    """
    group = cache.group
    arrays = dict(iter_arrays(group))
    unreadable: list[str] = []
    chunks_read = 0
    small: dict[str, np.ndarray] = {}  # metadata + block markers
    for name, arr in arrays.items():
        if name not in cache.layout.array_names:
            small[name], read = _read_whole(name, arr, cache.layout.chunk_samples, report, unreadable)
            chunks_read += read

    columns = {c: small[f"meta/{c}"].astype(object if dtype == "str" else small[f"meta/{c}"].dtype)
               for c, dtype in META_COLUMNS.items()}
    status, ids = columns["status"], columns["sample_id"]
    done = small[BLOCK_DONE].astype(bool)
    # an absent chunk reads as fill values (label 0, NaN): every chunk a block must hold has to be stored
    presence = ChunkPresence(cache.path, group, cache.layout.chunk_samples, len(cache),
                             bool(cache.attrs.get(EVERY_CHUNK_ATTR)), status=status)
    missing: list[str] = []
    for block in range(cache.num_blocks):
        for name in presence.missing(block):
            missing.append(presence.chunk_key(name, block))  # a missing Zarr shard file: once for its blocks
            report.damage(block, name)
    missing = list(dict.fromkeys(missing))
    ok = status == STATUS_OK
    nonfinite, read = _scan_values(cache, arrays, presence, ok, report, unreadable, progress)
    chunks_read += read

    if missing:
        blocks = sorted({b for b, what in report.damaged.items() if what - {"values"}})
        report.add("chunks", "error", f"{len(missing)} chunks missing on disk (they would read as fill values; "
                   f"blocks {_some(blocks)})", missing)
    if unreadable:
        report.add("chunks", "error", f"{len(unreadable)} chunks cannot be read (corrupt)", unreadable)
    for name, rows in nonfinite.items():
        if rows:
            report.add("values", "error", f"{name}: NaN/Inf in {len(rows)} ok samples", [str(ids[i]) for i in rows])
    report.checked["chunks_read"] = chunks_read
    report.checked["ok_samples_scanned"] = int(ok.sum())
    return columns, done


def _some(items: Sequence, shown: int = 10) -> str:
    return ", ".join(map(str, items[:shown])) + (f" and {len(items) - shown} more" if len(items) > shown else "")


def _check_structure(cache: FeatureCache, report: VerifyReport) -> bool:
    """Arrays present with the layout's shapes; False when reading on would be meaningless."""
    n = len(cache)
    arrays = dict(iter_arrays(cache.group))
    whole = True
    expected = {name: (n, *cache.layout.sample_shape(name)) for name in cache.layout.array_names}
    expected |= {f"meta/{c}": (n,) for c in META_COLUMNS}
    expected[BLOCK_DONE] = (cache.num_blocks,)
    for name, shape in expected.items():
        if name not in arrays:
            report.add("structure", "error", f"array {name} is missing", [name])
            whole = False
        elif tuple(arrays[name].shape) != shape:
            report.add("structure", "error", f"array {name} has shape {tuple(arrays[name].shape)}, expected {shape}",
                       [name])
            whole = False
    return whole


def _check_status(cache: FeatureCache, report: VerifyReport, status: np.ndarray, done: np.ndarray,
                  allow_pending: bool = False) -> None:
    unknown = sorted({str(s) for s in status if s not in KNOWN_STATUSES})
    if unknown:
        report.add("status", "error", f"unknown status values {unknown}", unknown)
        for i in np.flatnonzero([s not in KNOWN_STATUSES for s in status]):
            report.damage(int(i) // cache.layout.chunk_samples, "status")
    pending_blocks = [int(b) for b in np.flatnonzero(~done)]
    if pending_blocks:
        pending_samples = sum(cache.block_slice(b).stop - cache.block_slice(b).start for b in pending_blocks)
        message = (f"incomplete: {len(pending_blocks)} of {cache.num_blocks} blocks ({pending_samples} samples) "
                   "not extracted yet")
        if allow_pending:
            report.add("status", "warning", message, pending_blocks)
        else:
            report.add("status", "error", f"{message}; rerun `lare2 extract` to finish it "
                       "(--allow-pending accepts a cache still being written)", pending_blocks)
    stale = [int(b) for b in np.flatnonzero(done) if (status[cache.block_slice(int(b))] == STATUS_PENDING).any()]
    for block in stale:
        report.damage(block, "status")
    if stale:
        report.add("status", "error", f"{len(stale)} blocks marked done still hold pending samples", stale)
    recorded = cache.attrs.get("counts")
    if recorded is not None and not pending_blocks:
        actual = {s: int((status == s).sum()) for s in KNOWN_STATUSES}
        differing = {k: (recorded.get(k), v) for k, v in actual.items() if recorded.get(k, 0) != v}
        if differing:
            report.add("counts", "error",
                       f"recorded counts differ from the status column (recorded, actual): {differing}",
                       sorted(differing))


def _check_ids(report: VerifyReport, ids: np.ndarray, chunk_samples: int) -> None:
    empty = int((ids == "").sum())
    for i in np.flatnonzero(ids == ""):
        report.damage(int(i) // chunk_samples, "meta/sample_id")
    if empty:
        report.add("ids", "error", f"{empty} samples have an empty id", [int(i) for i in np.flatnonzero(ids == "")])
    values, counts = np.unique(ids[ids != ""].astype(str), return_counts=True)
    duplicates = [str(v) for v in values[counts > 1]]
    if duplicates:
        report.add("ids", "error", f"{len(duplicates)} sample ids occur more than once", duplicates)


def _check_manifest(cache: FeatureCache, report: VerifyReport, manifest: Path, columns: dict[str, np.ndarray]) -> None:
    cfg = cache.attrs.get("extract_config") or {}  # the rows that extraction took: its split, generators, limit
    table = read_selection(manifest, split=cfg.get("split"), generators=list(cfg.get("generators") or []),
                           limit=cfg.get("limit"))
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
    for sample_id in extra:
        report.damage(in_cache[sample_id] // cache.layout.chunk_samples, "manifest")
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
                report.damage(i // cache.layout.chunk_samples, f"meta/{column}")
    for column, sample_ids in mismatched.items():
        report.add("manifest", "error", f"column {column!r} differs from the manifest for {len(sample_ids)} samples",
                   sample_ids)


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
                   + ", ".join(f"{k} ({in_identity.get(k) or 'none'} vs {fingerprints.get(k) or 'none'})"
                               for k in differing), differing)


def compare_recomputed(cache: FeatureCache, indices: np.ndarray, recomputed: Mapping[str, np.ndarray],
                       tolerance: float = 0.0) -> dict:
    """Comparison of recomputed rows with the stored ones, per array: bit for bit, or with ``tolerance`` > 0,
    a sample matches when its largest difference is at most ``tolerance`` x its largest stored magnitude.

    Recomputed values are cast to the stored dtype first (as the writer does).
    """
    ids = cache.column("sample_id")
    stored = cache.read(indices, cache.layout.array_names)
    result = {}
    for name in cache.layout.array_names:
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
                     sd: str | None, clip: str | None, device: str = "auto", compute_dtype: str | None = None,
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
        recomputed = recompute_fn(cache.path, [int(i) for i in indices], sd=sd, clip=clip,
                                  device=device, compute_dtype=compute_dtype)
    except (RecomputeUnavailable, OSError, CacheError) as err:  # models or device not at hand, other weights
        report.add("recompute", "warning", f"skipped: {err}")
        return
    result = compare_recomputed(cache, indices, recomputed, tolerance)
    report.recompute = {"indices": [int(i) for i in indices], "tolerance": tolerance, "arrays": result}
    report.checked["recomputed_samples"] = len(indices)
    for name, r in result.items():
        if r["mismatched"]:
            report.add("recompute", "error", f"{name}: {len(r['mismatched'])} of {len(indices)} recomputed samples "
                       f"differ (max abs diff {r['max_abs_diff']:.3g})", r["mismatched"])


def verify_cache(
    path: str | Path,
    *,
    manifest: str | Path | None = None,
    recompute: int = 0,
    seed: int = 0,
    recompute_fn: RecomputeFn | None = None,
    sd: str | None = None,
    clip: str | None = None,
    device: str = "auto",
    compute_dtype: str | None = None,
    tolerance: float = 0.0,
    progress: bool = False,
    allow_pending: bool = False,
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
    Pending blocks are an error (incomplete), a warning with ``allow_pending``. ``report.damaged`` lists
    the blocks that ``lare2 cache repair`` resets.
    """
    cache = open_cache(path)
    report = VerifyReport(path=str(cache.path))
    if not _check_structure(cache, report):
        return report
    columns, done = _check_chunks_and_values(cache, report, progress)
    status, ids = columns["status"], columns["sample_id"]
    _check_status(cache, report, status, done, allow_pending)
    _check_ids(report, ids, cache.layout.chunk_samples)
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
            raise InputError(f"tolerance must be >= 0, got {tolerance}")
        _check_recompute(cache, report, recompute, seed, recompute_fn, sd, clip, device, compute_dtype,
                         tolerance)
    return report
