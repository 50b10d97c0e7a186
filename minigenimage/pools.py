"""Which photograph serves whom: four disjoint pools, chosen once by a seeded, class-stratified rule.

- ``zoo``: the generators of the zoo train on crops of these, and on nothing else;
- ``detector-train``: the detector's training reals (photographs no generator has seen);
- ``val``: the detector's model selection and calibration;
- ``test``: GenImage's ``val`` folders; seen by nobody in training.

The rule: within each class, photographs are ordered by ``sha256("<seed>:<name>")``; the classes'
lists are concatenated (classes in sorted order) and dealt out along one cycle of 20 slots that
holds each pool in proportion to ``POOL_SHARES`` (7 zoo, 5 detector-train, 3 val, 5 test), so every
class is spread over the pools in about those proportions. Photographs of one subject (``SUBJECT_GROUPS``,
e.g. two photographs of the Taj Mahal) count as one and go to one pool. The result is written once
into ``pools.tsv`` (``python -m lare2.minigenimage.pools --write``); a test checks that the table is
what the rule gives.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping

POOLS = ("zoo", "detector-train", "val", "test")
POOL_SHARES = {"zoo": 7, "detector-train": 5, "val": 3, "test": 5}
POOL_SEED = 0
POOLS_FILE = Path(__file__).parent / "pools.tsv"
POOL_COLUMNS = ("name", "pool", "class_name", "package", "file", "sha256", "licence", "credit")

SUBJECT_GROUPS: Mapping[str, str] = {
    "gcompris-qt-data__details-tajmahal": "taj-mahal",
    "gcompris-qt-data__monument-tajmahal": "taj-mahal",
    "gcompris-qt-data__details-gizahpyramids": "giza",
    "gcompris-qt-data__monument-greatpyramidofgiza": "giza",
}
"""Different photographs of one view: they share a pool, so no view is seen on both sides."""


def pool_cycle() -> list[str]:
    """The 20-slot cycle: each slot goes to the pool furthest behind its share (ties: ``POOLS`` order)."""
    total = sum(POOL_SHARES.values())
    dealt = dict.fromkeys(POOLS, 0)
    cycle = []
    for slot in range(1, total + 1):
        pool = max(POOLS, key=lambda p: POOL_SHARES[p] * slot / total - dealt[p])
        dealt[pool] += 1
        cycle.append(pool)
    return cycle


def assign_pools(classes: Mapping[str, str], seed: int = POOL_SEED) -> dict[str, str]:
    """``{photo name: class}`` -> ``{photo name: pool}`` by the rule above."""
    units: dict[str, list[str]] = defaultdict(list)  # subject (a photo or a group) -> its photographs
    for name in classes:
        units[SUBJECT_GROUPS.get(name, name)].append(name)
    by_class: dict[str, list[str]] = defaultdict(list)
    for unit, names in units.items():
        unit_classes = {classes[n] for n in names}
        if len(unit_classes) != 1:
            raise ValueError(f"subject group {unit!r} mixes classes {sorted(unit_classes)}")
        by_class[unit_classes.pop()].append(unit)
    order = [unit for cls in sorted(by_class)
             for unit in sorted(by_class[cls], key=lambda u: hashlib.sha256(f"{seed}:{u}".encode()).hexdigest())]
    cycle = pool_cycle()
    return {name: cycle[i % len(cycle)] for i, unit in enumerate(order) for name in units[unit]}


def read_pools(path: Path = POOLS_FILE) -> list[dict[str, str]]:
    """The committed table: one row per photograph, columns ``POOL_COLUMNS``."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or tuple(rows[0]) != POOL_COLUMNS:
        raise ValueError(f"{path}: expected the columns {POOL_COLUMNS}")
    return rows


def write_pools(rows: Iterable[Mapping[str, str]], path: Path = POOLS_FILE) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=POOL_COLUMNS, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: (POOLS.index(r["pool"]), r["class_name"], r["name"])))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Re-deal the pools of pools.tsv by the rule (changes the benchmark).")
    parser.add_argument("--write", action="store_true", help="rewrite pools.tsv (otherwise print the counts)")
    args = parser.parse_args(argv)
    rows = read_pools()
    pools = assign_pools({r["name"]: r["class_name"] for r in rows})
    rows = [{**r, "pool": pools[r["name"]]} for r in rows]
    if args.write:
        write_pools(rows)
    for pool in POOLS:
        print(pool, sum(r["pool"] == pool for r in rows))


if __name__ == "__main__":
    main()
