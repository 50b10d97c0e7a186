"""The rich report of a build that ``lare2 manifest build`` prints: duplicates and unreadable images."""

from __future__ import annotations

import pyarrow.compute as pc

from lare2.shared.logs import console
from lare2.shared.manifest.built import BuiltManifest


def print_build_report(built: BuiltManifest, examples: int = 5) -> None:
    """Duplicates and unreadable images as rich tables, a few examples each, on the log console."""
    from rich.table import Table

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
