"""Robustness of a detector to image perturbations: its per-generator figures under each perturbation.

``lare2 eval RUN --test A --test B ... --robustness`` writes ``robustness.json``, ``robustness.csv``
and ``robustness.png`` beside the per-generator report and prints a generator x perturbation table.

Grouping rule (written into ``robustness.json``):

- a test cache's perturbation is the ``perturb`` of its extraction config (``attrs["extract_config"]``,
  ``lare2 extract --perturb``), in canonical form (``jpeg:75.0`` is ``jpeg:75``); none, ``""`` or
  ``none`` is ``clean``;
- the caches with the same perturbation form one group, whatever else differs (e.g. one cache per
  generator, all re-compressed with ``jpeg:75``): a group is one column;
- each group is evaluated on its own, exactly as ``lare2 eval`` on its caches alone would: rows per
  generator by ``lare2.train.report.GROUPING_RULE`` and its mean row, with the run's calibrated
  threshold. Reals are therefore pooled only within a group: a perturbed fake is never ranked
  against clean reals (or the reverse);
- rows are matched across groups by their name (the generator, with the cache's folder name when
  several caches of one group hold it); a generator that a group lacks shows ``-`` there;
- columns: clean first, then single-step perturbations by kind (jpeg, blur, resize, crop, noise), mild
  to strong, then chains of several steps (kind ``chain``) in the order given.

Each cell holds ACC@0.5, ACC at the calibrated threshold, AP and AUC (JSON/CSV: every metric of
``detection_metrics``); the printed table shows one of them (``--metric``) beside ACC.

The plot has one panel per single-step kind present, x = the strength (JPEG quality, resize scale and
crop fraction decrease to the right; blur sigma and noise std increase), the clean group as the
zero-strength point (quality 100, scale and fraction 1, sigma and std 0; its tick says ``clean``),
y = AUC, one line per generator and a dashed one for the mean. Chains appear in the table only.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence, get_args

import numpy as np

from lare2.shared.errors import InputError
from lare2.shared.jsonio import write_json
from lare2.shared.logs import get_logger, output_console
from lare2.shared.perturbations import parse_chain
from lare2.train.report import CLEAN, GROUPING_RULE, TABLE_COLUMNS, ScoredCache, generator_rows, mean_row, percent

logger = get_logger(__name__)

Metric = Literal["auc", "acc", "acc@thr", "ap"]
METRICS: tuple[str, ...] = get_args(Metric)
"""The figures of each cell: ACC at 0.5, ACC at the calibrated threshold, AP, AUC."""
METRIC_LABELS = {"auc": "AUC", "acc": "ACC", "acc@thr": "ACC@thr", "ap": "AP"}
CHAIN = "chain"
ROBUSTNESS_RULE = (
    "one column per perturbation of the test caches' extraction configs (none: clean); caches with the same "
    "perturbation form one group, evaluated alone by grouping_rule (reals pooled only within the group); "
    "rows matched across groups by name; clean, then single steps by kind mild to strong, then chains"
)
CSV_COLUMNS = ("perturb", "kind", "strength", "generator", *METRICS, *(c for c in TABLE_COLUMNS if c not in METRICS),
               "real_acc@thr", "fake_acc@thr", "n_real", "n_fake", "reals_from", "cache")


@dataclass(frozen=True)
class Axis:
    """How one perturbation kind is plotted."""

    label: str
    clean: float
    """The strength that changes nothing: where the clean result is drawn."""
    decreasing: bool
    """Smaller values are stronger (JPEG quality, scale, fraction): the axis runs from high to low."""


AXES: dict[str, Axis] = {
    "jpeg": Axis("JPEG quality", 100.0, True),
    "blur": Axis("Gaussian blur sigma (px)", 0.0, False),
    "resize": Axis("resize scale (down and back up)", 1.0, True),
    "crop": Axis("centre crop, kept fraction of each side", 1.0, True),
    "noise": Axis("Gaussian noise std (pixel units)", 0.0, False),
}
"""The kinds that get a panel, in panel (and column) order."""


@dataclass
class PerturbationGroup:
    """The test caches made with one perturbation, and their per-generator rows."""

    perturb: str
    """Canonical chain text, ``clean`` for none: the column's name."""
    kind: str
    """``clean``, the kind of a single step, or ``chain``."""
    strength: float | None
    """The single step's value (None for clean and chains)."""
    caches: list[ScoredCache] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    mean: dict = field(default_factory=dict)

    def row(self, name: str) -> dict | None:
        if name == "mean":
            return self.mean
        return next((r for r in self.rows if r["generator"] == name), None)

    def to_dict(self) -> dict:
        return {"perturb": self.perturb, "kind": self.kind, "strength": self.strength,
                "caches": [str(c.path) for c in self.caches], "rows": self.rows, "mean": self.mean}


def group_by_perturbation(scored: Sequence[ScoredCache]) -> list[PerturbationGroup]:
    """One group per distinct perturbation, in column order (see the module docstring)."""
    groups: dict[str, PerturbationGroup] = {}
    for cache in scored:
        if cache.perturb not in groups:
            steps = () if cache.perturb == CLEAN else parse_chain(cache.perturb)
            if not steps:
                kind, strength = CLEAN, None
            elif len(steps) == 1:
                kind, strength = steps[0].kind, steps[0].value
            else:
                kind, strength = CHAIN, None
            groups[cache.perturb] = PerturbationGroup(cache.perturb, kind, strength)
        groups[cache.perturb].caches.append(cache)
    return sorted(groups.values(), key=_column_key)  # stable: chains keep the order given


def _column_key(group: PerturbationGroup) -> tuple[int, int, float]:
    if group.kind == CLEAN:
        return 0, 0, 0.0
    if group.kind in AXES:
        axis = AXES[group.kind]
        return 1, list(AXES).index(group.kind), -group.strength if axis.decreasing else group.strength
    return 2, 0, 0.0


def robustness_groups(scored: Sequence[ScoredCache], threshold: float) -> list[PerturbationGroup]:
    """The groups with their rows and mean row, each computed from that group's caches alone."""
    groups = group_by_perturbation(scored)
    for group in groups:
        group.rows, _ = generator_rows(group.caches, threshold)
        group.mean = mean_row(group.rows)
    return groups


def row_names(groups: Sequence[PerturbationGroup]) -> list[str]:
    """Every row name of any group, in order of first appearance (clean first); the mean row not included."""
    return list(dict.fromkeys(r["generator"] for g in groups for r in g.rows))


def _cell(row: dict | None, metric: str) -> str:
    if row is None:
        return "-"
    # the chosen figure beside an accuracy: ACC at 0.5, or at the calibrated threshold when ACC is the one chosen
    second = "acc@thr" if metric == "acc" else "acc"
    return f"{METRIC_LABELS[metric]} {percent(row[metric])} / {METRIC_LABELS[second]} {percent(row[second])}"


def print_robustness(groups: Sequence[PerturbationGroup], metric: str, threshold: float) -> None:
    from rich.markup import escape
    from rich.table import Table

    second = "ACC@thr" if metric == "acc" else "ACC"
    table = Table(title=f"robustness: {METRIC_LABELS[metric]} / {second} (%) per generator and perturbation; "
                        f"calibrated threshold {threshold:.4g}")
    table.add_column("generator", justify="left")
    for group in groups:
        table.add_column(escape(group.perturb), justify="right")
    names = row_names(groups)
    for name in names:  # escaped: "sd [test]" is a row name, not rich markup
        table.add_row(escape(name), *[_cell(g.row(name), metric) for g in groups], end_section=name == names[-1])
    table.add_row("mean", *[_cell(g.mean, metric) for g in groups])
    output_console().print(table)  # piped: as wide as the table needs, so that no cell wraps onto two lines


def write_robustness_csv(groups: Sequence[PerturbationGroup], path: Path) -> Path:
    """Long format: one line per (perturbation, row), the mean rows included; every metric."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for group in groups:
            for row in [*group.rows, group.mean]:
                writer.writerow({**row, "perturb": group.perturb, "kind": group.kind,
                                 "strength": "" if group.strength is None else f"{group.strength:g}"})
    return path


def write_robustness_plot(groups: Sequence[PerturbationGroup], path: Path) -> Path | None:
    """``robustness.png``: AUC against strength, one panel per single-step kind; None when there is none."""
    kinds = [k for k in AXES if any(g.kind == k for g in groups)]
    if not kinds:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clean = next((g for g in groups if g.kind == CLEAN), None)
    # generators with fakes somewhere: a reals-only row has no AUC
    names = [n for n in row_names(groups) if any((r := g.row(n)) is not None and r["n_fake"] for g in groups)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds) + 1.5, 4.2), squeeze=False, sharey=True)
    lowest = 100.0
    for ax, kind in zip(axes[0], kinds):
        axis = AXES[kind]
        points = sorted([(g.strength, g) for g in groups if g.kind == kind] + ([(axis.clean, clean)] if clean else []),
                        key=lambda p: p[0])
        xs = [x for x, _ in points]
        for name in [*names, "mean"]:
            ys = [100 * r["auc"] if (r := g.row(name)) is not None and not math.isnan(r["auc"]) else np.nan
                  for _, g in points]
            lowest = min(lowest, np.nanmin(ys)) if np.isfinite(ys).any() else lowest
            style = {"color": "black", "linestyle": "--", "linewidth": 2} if name == "mean" else {}
            ax.plot(xs, ys, marker="o", label=name, **style)
        ax.set_xticks(xs, ["clean" if g is clean else f"{x:g}" for x, g in points])
        if axis.decreasing:  # stronger to the right
            ax.invert_xaxis()
        ax.set(xlabel=axis.label, title=kind)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("AUC (%)")
    axes[0][0].set_ylim(max(0.0, min(50.0, lowest - 5)), 101)
    axes[0][-1].legend(loc="lower left", fontsize="small")
    fig.suptitle("AUC under perturbation, per generator")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def robustness_report(scored: Sequence[ScoredCache], threshold: float, report_dir: Path, *, metric: str = "auc",
                      plots: bool = True, run: str = "") -> dict:
    """Group ``scored`` by perturbation, print the table, write robustness.json/.csv (+ .png); the JSON document."""
    if metric not in METRICS:
        raise InputError(f"--metric {metric}: choose from {', '.join(METRICS)}")
    groups = robustness_groups(scored, threshold)
    note = ""
    if all(g.kind == CLEAN for g in groups):
        note = ("every test cache is clean (no perturb in its extraction config): the table has one column; "
                "extract perturbed copies of the test split with `lare2 extract --perturb jpeg:75` (or blur:1, ...) "
                "and pass them with --test too")
        logger.warning(f"robustness: {note}")
    report = {
        "run": run, "threshold": threshold, "robustness_rule": ROBUSTNESS_RULE, "grouping_rule": GROUPING_RULE,
        "metrics": list(METRICS), "shown": metric, "decision": "acc@thr: fake when p_fake > threshold; acc at 0.5",
        "perturbations": [g.to_dict() for g in groups], "note": note,
    }
    write_json(report_dir / "robustness.json", report)
    write_robustness_csv(groups, report_dir / "robustness.csv")
    print_robustness(groups, metric, threshold)
    if plots and write_robustness_plot(groups, report_dir / "robustness.png") is None:
        logger.info("robustness.png not written: no test cache has a single-step perturbation to plot "
                    "(clean or chains only)")
    return report
