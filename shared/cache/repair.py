"""Repair a damaged cache: mark every block with a missing, unreadable or inconsistent chunk as not done.

``lare2 cache repair PATH`` runs the checks of ``verify``; each block it finds damaged (``VerifyReport.damaged``)
gets its manifest columns back from the manifest the cache was made from (the selection its
``extract_config`` recorded: split, generators, limit), status ``pending``, seed 0, no error, NaN arrays
and its done marker cleared. Rerunning the same ``lare2 extract`` then recomputes exactly those blocks
(and any never extracted), giving the cache an undamaged run would have made.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from lare2.shared.cache.errors import CacheError
from lare2.shared.cache.presence import storing
from lare2.shared.cache.schema import BLOCK_DONE, MANIFEST_COLUMNS, STATUS_PENDING, column_values
from lare2.shared.cache.store import FeatureCache
from lare2.shared.cache.verify import verify_cache
from lare2.shared.manifest import read_selection


def _manifest_rows(cache: FeatureCache, manifest: Path, damaged: list[int]) -> dict[str, list]:
    """The manifest columns of every sample, from the selection the cache was made from; refuses another selection."""
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: the manifest {cache.path} was made from is not at hand "
                                "(needed to restore its metadata columns); pass it with --manifest")
    cfg = cache.attrs.get("extract_config") or {}
    table = read_selection(manifest, split=cfg.get("split"), generators=list(cfg.get("generators") or []),
                           limit=cfg.get("limit"))
    rows = {c: table.column(c).to_pylist() for c in MANIFEST_COLUMNS}
    ids = rows["sample_id"]
    digest = (cache.attrs.get("manifest") or {}).get("digest")
    same = len(ids) == len(cache) and (digest is None
                                       or hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16] == digest)
    if same and digest is None:  # no digest recorded: the undamaged blocks' ids must be the manifest's
        stored = cache.group["meta"]["sample_id"][:].astype(object)
        intact = np.ones(len(cache), dtype=bool)
        for block in damaged:
            intact[cache.block_slice(block)] = False
        same = bool((stored[intact] == np.asarray(ids, dtype=object)[intact]).all())
    if not same:
        raise CacheError(f"{manifest}: its selection (split={cfg.get('split') or 'all'}, {len(ids)} rows) is not "
                         f"the one {cache.path} was made from ({len(cache)} samples); pass the original with "
                         "--manifest")
    return rows


def _reset_block(cache: FeatureCache, block: int, rows: dict[str, list]) -> None:
    sl = cache.block_slice(block)
    n = sl.stop - sl.start
    storing(cache.group[BLOCK_DONE])[block] = 0  # first: a kill part way leaves a block to recompute, not a done one
    meta = cache.group["meta"]
    for column in MANIFEST_COLUMNS:
        storing(meta[column])[sl] = column_values(column, rows[column][sl])
    storing(meta["seed"])[sl] = np.zeros(n, dtype=np.int64)
    storing(meta["error"])[sl] = column_values("error", [""] * n)
    for name in cache.layout.array_names:
        nan_rows = np.full((n, *cache.layout.sample_shape(name)), np.nan, cache.layout.dtype(name))
        storing(cache.group[name])[sl] = nan_rows
    storing(meta["status"])[sl] = column_values("status", [STATUS_PENDING] * n)


def repair_cache(path: str | Path, *, manifest: str | Path | None = None, dry_run: bool = False,
                 progress: bool = False) -> dict:
    """Reset the damaged blocks of the cache at ``path`` (see the module docstring); ``dry_run`` only reports them.

    ``manifest``: default the one recorded in the cache. Refuses a packed cache (read-only: repair its
    source and pack again) and a cache whose arrays themselves are missing (re-extract it)."""
    cache = FeatureCache.open(path)
    if cache.pack_blocks > 1:
        source = (cache.attrs.get("packed") or {}).get("source", "its source")
        raise CacheError(f"{cache.path}: a packed cache is read-only; repair {source} and pack it again")
    recorded = (cache.attrs.get("manifest") or {}).get("path")
    manifest_path = Path(manifest) if manifest is not None else Path(recorded) if recorded else None
    report = verify_cache(path, manifest=manifest_path if manifest_path and manifest_path.is_file() else None,
                          allow_pending=True, progress=progress)
    structural = [f.message for f in report.errors if f.check == "structure"]
    if structural:
        raise CacheError(f"{cache.path}: {structural[0]}; beyond repair, re-extract it with `lare2 extract`")
    damaged = sorted(report.damaged)
    c = cache.layout.chunk_samples
    summary = {
        "path": str(cache.path), "dry_run": dry_run, "manifest": str(manifest_path) if manifest_path else None,
        "damaged": {str(b): sorted(report.damaged[b]) for b in damaged},
        "samples": {str(b): [b * c, cache.block_slice(b).stop - 1] for b in damaged},
        "reset": [], "pending_before": [int(b) for b in np.flatnonzero(~report_done(cache))],
        "other_errors": [f.message for f in report.errors if not _block_finding(f)],
    }
    if not damaged or dry_run:
        return summary
    if manifest_path is None:
        raise CacheError(f"{cache.path}: records no manifest to restore its metadata columns from; "
                         "pass it with --manifest")
    rows = _manifest_rows(cache, manifest_path, damaged)
    writable = FeatureCache.open(path, mode="r+")
    for block in damaged:
        _reset_block(writable, block, rows)
        summary["reset"].append(block)
    writable.group.attrs.pop("counts", None)  # recorded again when the rerun finishes the cache
    return summary


def report_done(cache: FeatureCache) -> np.ndarray:
    try:
        return cache.done_blocks()
    except Exception:  # noqa: BLE001 - an unreadable marker chunk: verify reports it, repair resets the block
        return np.zeros(cache.num_blocks, dtype=bool)


def _block_finding(finding) -> bool:
    """Findings that repair resolves by resetting blocks (the rest, e.g. fingerprints or counts, it cannot)."""
    return finding.check in ("chunks", "values", "status", "ids", "manifest", "counts")
