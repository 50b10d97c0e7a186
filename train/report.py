"""Per-generator evaluation of a trained detector on test caches: table, JSON, CSV, PNG plots.

Grouping rule (written into every report):
- every ``--test`` cache is read; its ok samples are grouped by the ``generator`` column;
- a group with fake images is one row: its fakes plus its own reals; when the group has no
  reals, the reals of the whole cache are pooled in; when the cache has none, the reals of all
  test caches; ``reals_from`` in the row says which (``generator``, ``cache``, ``all tests``);
- a group with reals only gets a row with its real ACC and is left out of the mean;
- the mean row is the unweighted mean over rows with fakes (NaN-aware), with summed counts.
The decision threshold is the detector's, calibrated on validation reals; test labels never set it.

Every report also writes ``predictions.parquet``: one row per scored (ok) sample of every test cache,
with its ``sample_id``, ``path``, ``generator``, ``label``, ``p_fake``, ``decision`` (``p_fake >
threshold``), ``cache`` and ``perturb`` (the cache's perturbation, ``clean`` for none), for error analysis.
``--robustness`` adds the generator x perturbation table of ``lare2.train.robustness``.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from lare2.shared.atomic import atomic_write
from lare2.shared.errors import InputError
from lare2.shared.jsonio import write_json
from lare2.shared.logs import get_logger, output_console
from lare2.shared.perturbations import chain_text, parse_chain
from lare2.train.checkpoint import check_compatible, load_detector
from lare2.train.data import CacheSplit
from lare2.train.metrics import detection_metrics
from lare2.train.scoring import SCORING_READ, score_split
from lare2.train.split_safety import warn_test_overlap

logger = get_logger(__name__)

GROUPING_RULE = (
    "one row per generator with fakes in a test cache; reals from the same generator, else the same cache, "
    "else all test caches (pooled reals: ACC is balanced, the mean of real and fake ACC); "
    "reals-only generators are reported but left out of the mean; mean = unweighted over rows with fakes"
)
TABLE_COLUMNS = ("acc", "real_acc", "fake_acc", "ap", "auc", "tpr@0.01fpr", "tpr@0.05fpr", "acc@thr")
HEADERS = {"generator": "generator", "acc": "ACC", "real_acc": "real", "fake_acc": "fake", "ap": "AP", "auc": "AUC",
           "tpr@0.01fpr": "TPR@1%", "tpr@0.05fpr": "TPR@5%", "acc@thr": "ACC@thr", "n_real": "#real", "n_fake": "#fake",
           "reals_from": "reals from"}


CLEAN = "clean"
PREDICTION_COLUMNS = ("sample_id", "path", "generator", "label", "p_fake", "decision", "cache", "perturb")


@dataclass
class ScoredCache:
    """Scores of the ok samples of one test cache; the per-sample arrays are aligned, in store order."""

    path: Path
    labels: np.ndarray
    scores: np.ndarray
    generators: np.ndarray
    num_errors: int
    sample_ids: np.ndarray
    """The ``sample_id`` column at the scored rows."""
    paths: np.ndarray
    """The ``path`` column (image path as the manifest gave it) at the scored rows."""
    perturb: str = CLEAN
    """The perturbation its images went through before extraction (canonical chain text, ``clean`` for none)."""


def perturbation_of(cache_attrs: Mapping[str, Any], source: str | Path = "cache") -> str:
    """Canonical text of the perturbation recorded in a cache's extraction config, ``clean`` for none
    (caches written before perturbations existed have no ``perturb`` key: clean).

    Canonical (parsed and re-written), so that ``jpeg:75`` and ``jpeg:75.0`` name one group."""
    spec = str((cache_attrs.get("extract_config") or {}).get("perturb") or "").strip()
    if not spec:
        return CLEAN
    return chain_text(parse_chain(spec, what=f"{source}: extract_config perturb")) or CLEAN


def score_caches(run_dir: str | Path, test_paths: Sequence[str | Path], batch_size: int = 256, device: str = "cpu",
                 allow_pending: bool = False, allow_overlap: bool = False):
    """Load the detector and score every test cache (refusing caches from another extraction or unfinished
    ones unless ``allow_pending``; warning loudly about one that shares samples with the training cache)."""
    model, config = load_detector(run_dir, device=device)
    scored = []
    for path in test_paths:
        # scoring reads the cache block by block: two threads read ahead, as in training (same values, same order)
        split = CacheSplit(path, type(model).input_names, allow_pending=allow_pending, read=SCORING_READ)
        check_compatible(config, split.fingerprint, split.cache.layout, path,
                         identity=split.cache.attrs.get("identity"))
        warn_test_overlap(split.cache, config.train_ids_digest, config.extra.get("train_cache"), allow_overlap)
        perturb = perturbation_of(split.cache.attrs, path)
        labels, scores, index = score_split(model, split, batch_size)
        meta = {name: np.asarray(split.cache.column(name)[index], dtype=object)
                for name in ("generator", "sample_id", "path")}
        status = split.cache.column("status")
        scored.append(ScoredCache(path=Path(path), labels=labels, scores=scores, generators=meta["generator"],
                                  num_errors=int((status == "error").sum()), sample_ids=meta["sample_id"],
                                  paths=meta["path"], perturb=perturb))
        logger.info(f"{path}: scored {len(labels)} ok samples "
                    f"({scored[-1].num_errors} with extraction errors left out)")
    return model, config, scored


def generator_rows(scored: Sequence[ScoredCache],
                   threshold: float) -> tuple[list[dict], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Metric rows per (cache, generator) following GROUPING_RULE, and the (labels, scores) behind each."""
    all_real_scores = np.concatenate([c.scores[c.labels == 0] for c in scored]) if scored else np.empty(0)
    names = [str(g) for c in scored for g in dict.fromkeys(c.generators)]
    rows, curves = [], {}
    for cache in scored:
        cache_reals = cache.scores[cache.labels == 0]
        for generator in dict.fromkeys(cache.generators):
            in_group = cache.generators == generator
            fakes = cache.scores[in_group & (cache.labels == 1)]
            reals = cache.scores[in_group & (cache.labels == 0)]
            reals_from = "generator"
            if fakes.size and not reals.size:
                reals, reals_from = (cache_reals, "cache") if cache_reals.size else (all_real_scores, "all tests")
            name = _row_name(str(generator), cache.path, names, [c.path for c in scored])
            labels = np.concatenate([np.zeros(reals.size, np.int64), np.ones(fakes.size, np.int64)])
            scores = np.concatenate([reals, fakes])
            row = {"generator": name, "cache": str(cache.path),
                   "reals_from": reals_from if fakes.size else "reals only",
                   **detection_metrics(labels, scores, threshold, balanced=reals_from != "generator")}
            rows.append(row)
            curves[name] = (labels, scores)
    return rows, curves


def _row_name(generator: str, cache_path: Path, generator_names: list[str], cache_paths: list[Path]) -> str:
    """The generator's name; when several caches hold it, with its cache's folder name, or the full
    path when two caches share a folder name (names key the plots' curves, so they must be unique)."""
    if generator_names.count(generator) == 1:
        return generator
    if [p.name for p in cache_paths].count(cache_path.name) == 1:
        return f"{generator} [{cache_path.name}]"
    return f"{generator} [{cache_path}]"


def mean_row(rows: Sequence[dict]) -> dict:
    with_fakes = [r for r in rows if r["n_fake"] > 0]
    out: dict = {"generator": "mean", "cache": "", "reals_from": ""}
    for key in (*TABLE_COLUMNS, "real_acc@thr", "fake_acc@thr"):
        values = np.array([r[key] for r in with_fakes], dtype=np.float64)
        out[key] = float(np.nanmean(values)) if values.size and np.isfinite(values).any() else float("nan")
    out["n_real"] = sum(r["n_real"] for r in with_fakes)
    out["n_fake"] = sum(r["n_fake"] for r in with_fakes)
    return out


def percent(value) -> str:
    """A metric in %, one decimal, "-" for NaN; counts and names as they are."""
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{100 * value:.1f}"
    return str(value)


def print_table(rows: Sequence[dict], mean: dict, threshold: float) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"per-generator metrics (%); calibrated threshold {threshold:.4g}")
    for col in ("generator", *TABLE_COLUMNS, "n_real", "n_fake", "reals_from"):
        table.add_column(HEADERS[col], justify="left" if col in ("generator", "reals_from") else "right")
    for row in [*rows, mean]:
        # escaped: a row name such as "sd [test]" would otherwise be read as rich markup and lose its cache
        cells = [escape(percent(row[c])) for c in ("generator", *TABLE_COLUMNS, "n_real", "n_fake", "reals_from")]
        table.add_row(*cells, end_section=row is rows[-1] if rows else False)
    # the table is the command's output: stdout, and not squeezed to 80 columns when piped
    output_console().print(table)


def write_plots(curves: dict[str, tuple[np.ndarray, np.ndarray]], rows: Sequence[dict], report_dir: Path) -> list[Path]:
    """``roc.png`` (one ROC curve per generator with both classes) and ``acc_ap.png`` (bars per generator)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    written = []
    fig, ax = plt.subplots(figsize=(6, 6))
    for (name, (labels, scores)), row in zip(curves.items(), rows):
        if row["n_real"] and row["n_fake"]:
            fpr, tpr, _ = roc_curve(labels, scores)
            ax.plot(fpr, tpr, label=f"{name} (AUC {100 * row['auc']:.1f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false positive rate (reals called fake)", ylabel="true positive rate (fakes caught)",
           title="ROC per generator", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(report_dir / "roc.png", dpi=120)
    plt.close(fig)
    written.append(report_dir / "roc.png")

    shown = [r for r in rows if r["n_fake"]]
    x = np.arange(len(shown))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(shown) + 2), 4))
    for offset, key, label in ((-0.2, "acc", "ACC@0.5"), (0.2, "ap", "AP")):
        ax.bar(x + offset, [100 * np.nan_to_num(r[key]) for r in shown], width=0.4, label=label)
    ax.set_xticks(x, [r["generator"] for r in shown], rotation=30, ha="right")
    ax.set(ylabel="%", ylim=(0, 100), title="ACC and AP per generator")
    ax.legend()
    fig.tight_layout()
    fig.savefig(report_dir / "acc_ap.png", dpi=120)
    plt.close(fig)
    written.append(report_dir / "acc_ap.png")
    return written


def write_predictions(scored: Sequence[ScoredCache], threshold: float, path: Path) -> Path:
    """``predictions.parquet``: one row per scored sample (PREDICTION_COLUMNS), caches in the order given."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def strings(values) -> pa.Array:
        return pa.array([str(v) for v in values], pa.string())

    lengths = [len(c.labels) for c in scored]
    labels = np.concatenate([c.labels for c in scored]) if scored else np.empty(0, np.int64)
    p_fake = np.concatenate([c.scores for c in scored]) if scored else np.empty(0)
    table = pa.table({
        "sample_id": strings(v for c in scored for v in c.sample_ids),
        "path": strings(v for c in scored for v in c.paths),
        "generator": strings(v for c in scored for v in c.generators),
        "label": pa.array(labels.astype(np.int8), pa.int8()),
        "p_fake": pa.array(p_fake, pa.float64()),
        "decision": pa.array(p_fake > threshold, pa.bool_()),  # the report's rule: fake when p_fake > threshold
        "cache": strings(str(c.path) for c, n in zip(scored, lengths) for _ in range(n)),
        "perturb": strings(c.perturb for c, n in zip(scored, lengths) for _ in range(n)),
    })
    with atomic_write(path) as tmp:  # renamed into place: a crash never leaves half a file
        pq.write_table(table, tmp)
    return path


def table_caches(scored: Sequence[ScoredCache]) -> tuple[list[ScoredCache], str]:
    """The caches of the per-generator table, and why when not all: reals and fakes of different
    perturbations must never be ranked together, so with several perturbations the table holds the
    clean caches only (the robustness table has the rest); without a clean one, all, with a warning."""
    kinds = list(dict.fromkeys(c.perturb for c in scored))
    if len(kinds) == 1:
        return list(scored), ""
    clean = [c for c in scored if c.perturb == CLEAN]
    if clean:
        note = (f"per-generator table: the {len(clean)} clean test caches only; the perturbed ones "
                f"({', '.join(k for k in kinds if k != CLEAN)}) are in the robustness table (--robustness)")
        logger.info(note)
        return clean, note
    note = (f"per-generator table: test caches under different perturbations ({', '.join(kinds)}) pooled; "
            "pass them with --robustness for one column per perturbation")
    logger.warning(note)
    return list(scored), note


def evaluate(run_dir: str | Path, test_paths: Sequence[str | Path], report_dir: str | Path | None = None,
             batch_size: int = 256, device: str = "cpu", plots: bool = True, allow_pending: bool = False,
             allow_overlap: bool = False, robustness: bool = False, metric: str = "auc") -> dict:
    """Score every test cache, print the per-generator table, write metrics.json/.csv, predictions.parquet
    (+ plots); with ``robustness`` also the generator x perturbation table (``metric``: the figure it shows)."""
    if not test_paths:
        raise InputError("no test caches given (--test)")
    report_dir = Path(report_dir) if report_dir else Path(run_dir) / "report"
    _, config, scored = score_caches(run_dir, test_paths, batch_size, device, allow_pending, allow_overlap)
    tabled, table_note = table_caches(scored)
    rows, curves = generator_rows(tabled, config.threshold)
    mean = mean_row(rows)
    report = {
        "run": str(run_dir), "threshold": config.threshold, "target_fpr": config.target_fpr,
        "extraction_fingerprint": config.extraction_fingerprint, "model": config.model.kind,
        "grouping_rule": GROUPING_RULE, "decision": "fake when p_fake > threshold; acc/real_acc/fake_acc at 0.5",
        "extraction_errors": {str(c.path): c.num_errors for c in scored}, "rows": rows, "mean": mean,
        "table_caches": [str(c.path) for c in tabled], "table_note": table_note,
    }
    report_dir.mkdir(parents=True, exist_ok=True)
    write_json(report_dir / "metrics.json", report)
    columns = ["generator", *TABLE_COLUMNS, "real_acc@thr", "fake_acc@thr", "n_real", "n_fake", "reals_from", "cache"]
    with open(report_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows([*rows, mean])
    write_predictions(scored, config.threshold, report_dir / "predictions.parquet")
    print_table(rows, mean, config.threshold)
    if plots:
        write_plots(curves, rows, report_dir)
    if robustness:
        # robustness builds on this module's rows, so it is imported here rather than at the top (a cycle)
        from lare2.train.robustness import robustness_report

        report["robustness"] = robustness_report(scored, config.threshold, report_dir, metric=metric, plots=plots,
                                                 run=str(run_dir))
    logger.info(f"report -> {report_dir}")
    return report
