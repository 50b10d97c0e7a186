"""What a ``bench.json`` holds beyond the figures: when, where and by what each section was measured.

``make bench`` rewrites ``bench.json`` as it measures. A section that a run skips by its options
(``bench.run_bench.SKIPPABLE_SECTIONS``: the full-size timings, the full-size DIRE-style / LaRE ratio,
cache creation, the stage-2 reader) is carried over from the file it replaces rather than dropped,
marked with the date, commit and command of the run that did measure it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path


def read_previous(path: Path) -> dict:
    """The figures already at ``path`` (a ``bench.json``); {} when there are none or they cannot be read."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def measured_record(results: dict) -> dict:
    """When, at which commit and by which command the run ``results`` measured its figures."""
    return {"date": results.get("date"), "commit": results.get("commit"), "command": results.get("command"),
            "load_average": results.get("load_average_at_start")}


def carry_forward(previous: dict, results: dict, sections: Iterable[tuple[str, ...]]) -> dict:
    """``results`` with each section of ``sections`` (key paths) that it lacks and ``previous`` has, copied from
    ``previous`` and marked ``"measured"``: the date, commit and command of the run that measured it (kept when
    the section already came from an earlier run). ``results`` itself is not changed."""
    merged = json.loads(json.dumps(results))  # a deep copy
    for *parents, name in sections:
        old = previous
        for key in parents:
            old = old.get(key, {})
        section = old.get(name)
        if not isinstance(section, dict):
            continue
        new = merged
        for key in parents:
            new = new.setdefault(key, {})
        if name not in new:
            new[name] = section if "measured" in section else {**section, "measured": _measured_of(section, previous)}
    return merged


def _measured_of(section: dict, previous: dict) -> dict:
    """The run that measured ``section`` of ``previous``: the file's own run, or the section's date and command
    when it was remeasured on its own (``--only-reader`` before sections carried a ``"measured"`` record)."""
    if "date" in section:
        return {"date": section["date"], "commit": None, "command": section.get("command"),
                "load_average": section.get("load_average")}
    return measured_record(previous)
