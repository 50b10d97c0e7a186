"""Summaries of a feature cache: counts, array sizes, sample rows, one sample's statistics, mean-LaRE stats.

The logic behind ``lare2 cache info / ls / show / stats``; importable without typer. Every report is
a plain dict so that the CLI can print it as a rich table or as JSON.

Legend: N samples, C = chunk_samples; ``lare_4HW`` one LaRE map.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lare2.shared.cache.chunks import folder_bytes, is_variable_string, iter_arrays
from lare2.shared.cache.schema import KNOWN_STATUSES, META_COLUMNS
from lare2.shared.cache.store import FeatureCache
from lare2.shared.errors import InputError
from lare2.shared.jsonio import jsonable
from lare2.shared.logs import progress_bar

LABEL_NAMES = {0: "real", 1: "fake"}


def label_name(label: int) -> str:
    return LABEL_NAMES.get(int(label), str(label))


# ---- info -----------------------------------------------------------------------------------------
def array_info(cache: FeatureCache) -> list[dict]:
    """Shape, dtype, chunking, bytes in memory and on disk, and compression ratio of every array.

    Bytes on disk sum every file under the array's folder; ratio = uncompressed bytes / bytes on
    disk (None for variable-length strings, whose in-memory size zarr does not know). ``pack_file``: the
    shape one file of a packed cache holds (a Zarr shard of many chunks; None: a file per chunk).
    """
    rows = []
    for name, arr in iter_arrays(cache.group):
        on_disk = folder_bytes(cache.path / arr.path)
        nbytes = None if is_variable_string(arr) else int(arr.nbytes)
        rows.append({
            "name": name,
            "shape": list(arr.shape),
            "dtype": str(arr.dtype),
            "chunks": list(arr.chunks),
            "pack_file": list(arr.shards) if arr.shards else None,  # one Zarr shard of a packed cache
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
    config = attrs.get("extract_config") or {}
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
        # what was done to every image before the models (lare2.shared.perturbations); "none" when nothing
        "perturb": config.get("perturb") or "none",
        "normalize": config.get("normalize") or "none",
        # augmented training views per sample (pooled_views / fmap_views, lare2.extract.augment); 0: none
        "views": cache.layout.views,
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
        raise InputError(f"status={status!r}: choose from {list(KNOWN_STATUSES)}")
    if limit is not None and limit < 0:
        raise InputError(f"limit must be >= 0, got {limit}")
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
    """Index of ``sample_id``; a unique prefix is enough. ``InputError`` naming the reason otherwise."""
    ids = cache.column("sample_id")
    exact = np.flatnonzero(ids == sample_id)
    if len(exact):
        return int(exact[0])
    prefixed = [i for i, s in enumerate(ids) if s.startswith(sample_id)]
    if len(prefixed) == 1:
        return prefixed[0]
    if not prefixed:
        raise InputError(f"{cache.path}: no sample with id {sample_id!r}")
    raise InputError(f"{cache.path}: id prefix {sample_id!r} matches {len(prefixed)} samples; give more characters")


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


def image_path(cache: FeatureCache, index: int) -> Path | None:
    """The source image of a sample (manifest root / path), None when the cache records no root."""
    root = (cache.attrs.get("manifest") or {}).get("root")
    if root is None:
        return None
    return Path(root) / str(cache.column("path")[index])


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
    for generator, label in sorted({(str(g), int(y)) for g, y in zip(generators[ok], labels[ok])}):
        values = means[ok & (generators == generator) & (labels == label)]
        groups.append({
            "generator": generator, "label": label, "n": int(len(values)),
            "mean": float(values.mean()), "std": float(values.std()), "median": float(np.median(values)),
            "q05": float(np.quantile(values, 0.05)), "q95": float(np.quantile(values, 0.95)),
            "values": values,
        })
    return {"path": str(cache.path), "ok_samples": int(ok.sum()), "groups": groups}
