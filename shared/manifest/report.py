"""The rich report of a build that ``lare2 manifest build`` prints: duplicates and unreadable images; the
small-data warnings that ``build`` and ``show`` give."""

from __future__ import annotations

import pyarrow.compute as pc

from lare2.shared.logs import output_console
from lare2.shared.manifest.built import BuiltManifest


def print_build_report(built: BuiltManifest, examples: int = 5) -> None:
    """Duplicates and unreadable images as rich tables, a few examples each, on stderr beside the log."""
    from rich.table import Table

    console = output_console(stderr=True)

    if built.duplicates:
        table = Table(title=f"{len(built.duplicates)} images occur more than once ({built.num_dropped} copies dropped)")
        table.add_column("sample_id", no_wrap=True)
        table.add_column("split(s)")
        table.add_column("copies", overflow="fold")
        table.add_column("dropped", overflow="fold")
        for group in built.duplicates[:examples]:
            table.add_row(group.sample_id[:12], ", ".join(sorted(set(group.splits))), "\n".join(group.paths),
                          "\n".join(group.dropped) or "-")
        console.print(table)
    errors = built.table.filter(pc.not_equal(built.table["error"], ""))
    if errors.num_rows:
        table = Table(title=f"{errors.num_rows} images could not be read (rows kept, `error` set)")
        table.add_column("path", overflow="fold")
        table.add_column("error", overflow="fold")
        for row in errors.slice(0, examples).to_pylist():
            table.add_row(row["path"], row["error"])
        console.print(table)


MIN_SPLIT_IMAGES = 100
"""Fewer usable images of a class than this in a split that training needs (train, val) and the manifest warns."""


def split_warnings(counts: list[dict]) -> list[str]:
    """Warnings for the splits training needs: val missing beside train (selection and calibration need it),
    or a class of train or val with fewer than ``MIN_SPLIT_IMAGES`` usable (error-free) images.

    ``counts``: ``count_rows`` of the manifest. A manifest without train rows (e.g. test data only) gets none."""
    usable: dict[tuple[str, int], int] = {}
    for c in counts:
        usable[c["split"], c["label"]] = usable.get((c["split"], c["label"]), 0) + c["count"] - c["errors"]
    splits = {split for split, _ in usable}
    if "train" not in splits:
        return []
    warnings = []
    if "val" not in splits:
        warnings.append("no val rows: training selects its epoch and calibrates its threshold on a val split; "
                        "hold some out (genimage: --val-fraction) or build one")
    for split in ("train", "val"):
        if split not in splits:
            continue
        for label, name in ((0, "real"), (1, "fake")):
            n = usable.get((split, label), 0)
            if n < MIN_SPLIT_IMAGES:
                warnings.append(f"the {split} split has only {n} usable {name} images (fewer than {MIN_SPLIT_IMAGES}): "
                                "too few to " + ("learn from" if split == "train" else "select and calibrate on"))
    return warnings
