"""Export a feature cache to WebDataset tar shards, for streaming readers and other tools.

("Shard" here is WebDataset's word for one tar file of records; lare2's own shard is an array-job part.)

One record per sample, ``__key__`` = sample id::

    <id>.lare.npy     [4, 32, 32]     stored dtype (float32)
    <id>.pooled.npy   [D]             stored dtype (float16)
    <id>.fmap.npy     [Cf, 14, 14]    stored dtype
    <id>.json         every metadata column (sample_id, path, label, generator, split,
                      class_name, seed, status, error)

Failed samples have no arrays: with ``status="all"`` they are exported as their json alone.
Beside the shards: ``sizes.json`` ({shard file name: records}, as open_clip's
``get_dataset_size`` reads it) and ``cache_attrs.json`` (the cache's attributes: extraction
config, fingerprints, provenance).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterator

import numpy as np

from lare2.shared.cache.errors import CacheError
from lare2.shared.cache.schema import ARRAY_NAMES, META_COLUMNS, STATUS_ERROR, STATUS_OK, STATUS_PENDING
from lare2.shared.cache.store import FeatureCache, nonfinite_rows, open_cache
from lare2.shared.errors import InputError
from lare2.shared.jsonio import jsonable
from lare2.shared.logs import progress_bar

EXPORT_STATUSES = ("ok", "all")
SHARD_PATTERN = "shard-%06d.tar"


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _open_for_export(cache_path: str | Path, out_dir: Path, status: str, shard_size: int) -> FeatureCache:
    """The cache, once the arguments, the output folder and the sample ids (WebDataset keys) are known to do."""
    if status not in EXPORT_STATUSES:
        raise InputError(f"status={status!r}: choose from {list(EXPORT_STATUSES)}")
    if shard_size < 1:
        raise InputError(f"shard_size must be >= 1, got {shard_size}")
    cache = open_cache(cache_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.glob("*.tar")) or (out_dir / "sizes.json").exists():
        raise FileExistsError(f"{out_dir}: holds an export already (tar shards or sizes.json); choose an empty folder")
    bad_keys = [str(s) for s in cache.column("sample_id") if "." in str(s) or not str(s)]
    if bad_keys:
        # WebDataset splits a member name at the first dot of its base name into key and field
        raise CacheError(f"{cache.path}: sample ids must be non-empty and free of '.' to be WebDataset keys, "
                         f"e.g. {bad_keys[:3]}")
    return cache


def _block_records(cache: FeatureCache, block: int, wanted: set[str]) -> Iterator[tuple[str, dict]]:
    """(status, WebDataset record) of every sample of ``block`` whose status is ``wanted``; arrays for ok samples."""
    sl = cache.block_slice(block)
    block_status = cache.column("status")[sl]
    if not any(s in wanted for s in block_status):
        return
    cache.presence.require([block])  # a missing chunk would export fill values as data
    arrays = cache.read(sl) if STATUS_OK in block_status else {}
    for name, values in arrays.items():
        bad = (block_status == STATUS_OK) & nonfinite_rows(values)
        if bad.any():
            raise CacheError(f"{cache.path}: block {block}: {name} holds NaN/Inf for {int(bad.sum())} samples "
                             f"whose status is ok; `lare2 cache repair {cache.path}` marks it for re-extraction")
    ids = cache.column("sample_id")
    for offset, sample_status in enumerate(block_status):
        if sample_status not in wanted:
            continue
        index = sl.start + offset
        meta = {c: jsonable(cache.column(c)[index]) for c in META_COLUMNS}
        record = {"__key__": str(ids[index]), "json": json.dumps(meta).encode()}
        if sample_status == STATUS_OK:
            record |= {f"{name}.npy": _npy_bytes(arrays[name][offset]) for name in ARRAY_NAMES}
        yield sample_status, record


def export_webdataset(
    cache_path: str | Path,
    out_dir: str | Path,
    *,
    shard_size: int = 1000,
    status: str = "ok",
    progress: bool = False,
) -> dict:
    """Write the cache's samples as WebDataset tar shards of ``shard_size`` records into ``out_dir``; returns a summary.

    ``status="ok"`` exports samples with arrays; ``"all"`` adds failed samples (json only).
    Pending samples (not extracted yet) are never exported; the summary counts them.
    """
    import webdataset as wds

    out_dir = Path(out_dir)
    cache = _open_for_export(cache_path, out_dir, status, shard_size)
    wanted = {STATUS_OK} if status == "ok" else {STATUS_OK, STATUS_ERROR}
    sizes: dict[str, int] = {}
    exported = {STATUS_OK: 0, STATUS_ERROR: 0}
    # tar files close on count only: the byte limit is set out of reach so sizes.json matches shard_size
    writer = wds.ShardWriter(str(out_dir / SHARD_PATTERN), maxcount=shard_size, maxsize=float("inf"), verbose=0)
    try:
        with progress_bar(unit="block", disable=not progress) as bar:
            task = bar.add_task("export", total=cache.num_blocks, rate="")
            for block in range(cache.num_blocks):
                for sample_status, record in _block_records(cache, block, wanted):
                    writer.write(record)
                    tar = Path(writer.fname).name
                    sizes[tar] = sizes.get(tar, 0) + 1
                    exported[sample_status] += 1
                bar.advance(task)
    finally:
        writer.close()
    for tar in out_dir.glob("*.tar"):  # ShardWriter opens its first file before any record
        if tar.name not in sizes:
            tar.unlink()

    (out_dir / "sizes.json").write_text(json.dumps(sizes, indent=2))
    (out_dir / "cache_attrs.json").write_text(json.dumps(cache.attrs, indent=2))
    statuses = cache.column("status")
    return {
        "cache": str(cache.path),
        "out": str(out_dir),
        "status": status,
        "shards": sorted(sizes),
        "sizes": sizes,
        "exported": exported,
        "skipped": {
            "pending": int((statuses == STATUS_PENDING).sum()),
            "error": 0 if status == "all" else int((statuses == STATUS_ERROR).sum()),
        },
    }
