"""Run-to-run comparison of two caches, sample by sample, matched by sample id."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lare2.shared.cache.schema import META_COLUMNS
from lare2.shared.cache.store import FeatureCache, open_cache


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
    for name in dict.fromkeys([*a.layout.array_names, *b.layout.array_names]):  # the view arrays too
        if name not in a.layout.array_names or name not in b.layout.array_names:
            arrays[name] = {"comparable": False, "reason": f"views: {a.layout.views} vs {b.layout.views}"}
            continue
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

    differing = diff_identity(a.attrs.get("identity") or {}, b.attrs.get("identity") or {})
    identity = {k: list(v) for k, v in differing.items()}
    agree = not (only_a or only_b or metadata) and all(
        r["comparable"] and not r["samples_differing"] and not r["nan_on_one_side"] for r in arrays.values())
    return {
        "a": str(a.path), "b": str(b.path), "atol": atol, "agree": agree,
        "compared": int(len(pairs_a)), "only_in_a": only_a, "only_in_b": only_b,
        "metadata_differs": metadata, "arrays": arrays, "identity_differs": identity,
    }
