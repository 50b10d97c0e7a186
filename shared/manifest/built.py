"""What a build returns (rows, duplicates, skipped files) and the steps every builder shares.

Copies of one image (same sample_id) are reported; within one split only the first (in path
order) is kept, unless ``keep_duplicates`` (a cache then refuses the split: its ids must be unique).
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from lare2.shared.logs import get_logger, progress_bar, rate_text
from lare2.shared.manifest.sources import ImageRef, describe_file
from lare2.shared.manifest.table import MANIFEST_SCHEMA, SPLITS, ManifestError, write_manifest

logger = get_logger(__name__)


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


def write_built(path: Path | str, built: BuiltManifest) -> Path:
    return write_manifest(path, built.table, root=built.root, builder=built.builder, builder_args=built.builder_args)


def holdout_score(sample_id: str) -> float:
    """A number in [0, 1) fixed by the sample's id: ``sha256("lare2-val-holdout:" + id)``, first
    48 bits, divided by 2**48. Train images scoring below ``val_fraction`` go to ``val``."""
    digest = hashlib.sha256(f"lare2-val-holdout:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:6], "big") / float(1 << 48)


# ---- checking a builder's arguments ---------------------------------------------------------
def require_folder(src: Path) -> Path:
    if not src.exists():
        raise ManifestError(f"{src}: no such folder")
    if not src.is_dir():
        raise ManifestError(f"{src}: not a folder")
    return src.resolve()


def check_split(split: str | None, where: str) -> str | None:
    if split is not None and split not in SPLITS:
        raise ManifestError(f"{where}: split {split!r} is not one of {SPLITS}")
    return split


# ---- describing many images -----------------------------------------------------------------
_T = TypeVar("_T")
_R = TypeVar("_R")


def ordered_map(fn: Callable[[_T], _R], items: Iterable[_T], workers: int) -> Iterator[_R]:
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


def map_with_progress(fn: Callable[[_T], _R], items: Sequence[_T], workers: int, what: str, progress: bool) -> list[_R]:
    """``ordered_map`` into a list, behind a progress bar titled ``what`` (images/s, ETA)."""
    results: list[_R] = []
    start = time.monotonic()
    with progress_bar("img", disable=not progress) as bar:
        task = bar.add_task(what, total=len(items), rate="")
        for result in ordered_map(fn, items, workers):
            results.append(result)
            bar.update(task, advance=1, rate=rate_text(len(results), time.monotonic() - start))
    return results


def describe_all(root: Path, refs: Sequence[ImageRef], workers: int, progress: bool) -> list[dict]:
    """The manifest rows of ``refs`` (plain files under ``root``), hashed on ``workers`` threads."""
    return map_with_progress(lambda ref: describe_file(root, ref), refs, workers, "hashing images", progress)


# ---- finishing a build ----------------------------------------------------------------------
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


def finish_build(rows: list[dict], *, root: Path, builder: str, builder_args: dict, skipped: list[str],
                 keep_duplicates: bool, src: Path) -> BuiltManifest:
    """The :class:`BuiltManifest` of a builder's rows: duplicates dropped, what happened logged."""
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
