"""Pack a finished cache into files of many blocks each (Zarr v3 shards): far fewer files, same values.

A finished cache can be *packed* (:func:`pack_cache`, ``lare2 cache pack``): the same arrays, chunks
and attributes, with K blocks per Zarr v3 shard file, so one file holds K chunks. A cache of N samples
then takes ~13 N / (C K) files instead of ~13 N / C (GenImage's 2.68 M images: ~1.1 M files at C = 32,
~17k at K = 64), which cluster file systems and copies need. Readers see no difference. A packed cache
is read-only for the extractor: writing a block would rewrite its whole file, which concurrent writers
would race on. ("Shard" alone in lare2 means an array-job part, ``--shard-index``; lare2 calls Zarr's shards
*packed files*: ``lare2 cache pack --pack-blocks``, ``pack_file`` in ``cache info``. The attribute
``packed.shard_blocks`` keeps the name it was written with, so caches packed before still read.)
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import zarr

from lare2.shared.cache.errors import CacheError, CacheExistsError
from lare2.shared.cache.presence import storing
from lare2.shared.cache.schema import BLOCK_DONE, EVERY_CHUNK_ATTR, META_COLUMNS
from lare2.shared.cache.store import FeatureCache, create_arrays, staging_path
from lare2.shared.jsonio import jsonable


def pack_cache(source: str | Path, out: str | Path, pack_blocks: int = 64, progress: bool = True) -> FeatureCache:
    """Copy a finished cache to ``out`` with ``pack_blocks`` blocks per Zarr shard file (see the module docstring).

    Values, chunks, metadata and attributes are copied as they are (``packed`` is added to the
    attributes). Refuses a cache with pending blocks (a packed one cannot be appended to), an existing
    ``out``, and a cache with a missing chunk (``presence``). Written file by file into a hidden folder,
    renamed into place at the end.
    """
    from lare2.shared.logs import progress_bar

    if pack_blocks < 2:
        raise CacheError(f"blocks per packed file must be >= 2, got {pack_blocks}")
    src = FeatureCache.open(source)
    out = Path(out)
    if out.exists():
        raise CacheExistsError(f"{out}: already exists; choose a new folder for the packed cache")
    pending = src.pending_blocks()
    if pending:
        raise CacheError(f"{src.path}: {len(pending)} of {src.num_blocks} blocks are still pending (e.g. block "
                         f"{pending[0]}); finish `lare2 extract` before packing (a packed cache cannot be appended to)")
    if src.pack_blocks > 1:
        raise CacheError(f"{src.path}: already packed ({src.pack_blocks} blocks per Zarr shard file)")
    n, c = len(src), src.layout.chunk_samples
    src.presence.require(range(src.num_blocks))  # the copy would store an absent chunk's fill values as data
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(out)
    group = zarr.open_group(staging, mode="w-")
    try:
        create_arrays(group, n, src.layout, pack_blocks)
        names = [*src.layout.array_names, *(f"meta/{col}" for col in META_COLUMNS)]
        samples_per_file = c * pack_blocks
        with progress_bar(unit="file", disable=not progress) as bar:
            task = bar.add_task(f"pack {src.path.name}", total=math.ceil(n / samples_per_file), rate="")
            for start in range(0, n, samples_per_file):  # whole files: each Zarr shard file is written once
                window = slice(start, min(start + samples_per_file, n))
                for name in names:
                    storing(group[name])[window] = src.group[name][window]
                bar.advance(task)
        storing(group[BLOCK_DONE])[:] = src.group[BLOCK_DONE][:]
        # "shard_blocks": the attribute's name on disk (caches packed before keep reading)
        group.attrs.update(jsonable({**src.attrs, "packed": {"shard_blocks": pack_blocks, "source": str(src.path)},
                                     EVERY_CHUNK_ATTR: True}))
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return FeatureCache.open(out)
