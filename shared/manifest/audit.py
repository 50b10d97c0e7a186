"""Bias audit of a manifest before training: can the label be told from file metadata alone?

GenImage's real images are ImageNet JPEGs while most of its fakes are PNGs of a few fixed sizes, so a
detector can learn "JPEG or not" and "which size" instead of generation artefacts (Grommelt et al.,
"Fake or JPEG? Revealing Common Biases in Generated Image Detection Datasets", arXiv 2403.17608).
:func:`audit_manifest` reads every image's header (never the pixels) and reports, per
(split, generator, label): file formats, width and height, the JPEG quality estimated from the
quantisation tables (:mod:`.jpeg_header`), chroma subsampling and bytes per pixel. Then it
fits a cross-validated classifier on those metadata alone (:func:`metadata_shortcut`); a CV ROC AUC
above :data:`SHORTCUT_AUC_BOUND` means the label leaks through the files, and the feature groups
that carry it are named, each by its own CV AUC.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from lare2.shared.errors import InputError
from lare2.shared.logs import output_console, progress_bar
from lare2.shared.manifest.built import map_with_progress
from lare2.shared.manifest.jpeg_header import estimate_jpeg_quality, jpeg_subsampling
from lare2.shared.manifest.sources import read_image_bytes, split_tar_path
from lare2.shared.manifest.table import SPLITS, ManifestError, empty_manifest_error, read_manifest, select_rows

SHORTCUT_AUC_BOUND = 0.75
"""CV ROC AUC of the metadata-only classifier above which the audit reports a shortcut.

Chance is 0.5; under no leak the CV AUC scatters around it with a standard error of about
``sqrt((n0 + n1 + 1) / (12 n0 n1))`` (Hanley & McNeil), 0.065 at 40 images per class and 0.02 at 500,
so 0.75 is ~4 standard errors above chance from 40 images per class up: noise does not reach it. And
0.75 is far below what the biased GenImage subsets give (format and size alone separate them almost
perfectly, AUC near 1, Grommelt et al.): a detector trained there can score as well as that without
looking at any pixel, so its test numbers say little about generation artefacts. Below the bound a
weaker leak may remain; the per-feature AUCs in the report show it."""

FEATURE_GROUPS = ("format", "width", "height", "jpeg_quality", "subsampling", "bytes_per_pixel")
"""The metadata the classifier sees; one-hot columns (``format=PNG``) belong to the group before ``=``."""
CV_FOLDS = 5
CLASSIFIER_MAX_ROWS = 50_000
"""A stratified sample of at most this many images trains the classifier (header reading is the slow part)."""


# ---- image headers --------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ImageMeta:
    """What the audit learns from one image's header and file size."""

    path: str
    label: int
    generator: str
    split: str
    format: str = ""
    width: int = 0
    height: int = 0
    jpeg_quality: int | None = None
    """Estimated IJG quality; None for a non-JPEG."""
    subsampling: str | None = None
    """Chroma subsampling of a JPEG; None for a non-JPEG."""
    file_bytes: int = 0
    error: str = ""
    """Why the file or its header could not be read; ``""`` when fine."""

    @property
    def bytes_per_pixel(self) -> float:
        return self.file_bytes / (self.width * self.height) if self.width and self.height else 0.0


def read_image_meta(root: Path, row: Mapping) -> ImageMeta:
    """The :class:`ImageMeta` of a manifest row, from the header only (``Image.open`` decodes nothing);
    an unreadable file gets ``error`` set."""
    known = {"path": row["path"], "label": int(row["label"]), "generator": row["generator"], "split": row["split"]}
    try:
        if split_tar_path(row["path"]) is None:
            source: Path | io.BytesIO = root / row["path"]
            file_bytes = source.stat().st_size
        else:  # a tar member: its bytes are its size
            data = read_image_bytes(root, row["path"])
            source, file_bytes = io.BytesIO(data), len(data)
        with Image.open(source) as image:
            return ImageMeta(**known, format=image.format or "", width=image.size[0], height=image.size[1],
                             jpeg_quality=estimate_jpeg_quality(getattr(image, "quantization", None)),
                             subsampling=jpeg_subsampling(image), file_bytes=file_bytes)
    except OSError as err:  # missing, unreadable, not an image: counted and named, never a crash
        unidentified = isinstance(err, UnidentifiedImageError)
        reason = "not an image Pillow can identify" if unidentified else err.strerror or str(err)
        return ImageMeta(**known, error=f"unreadable: {reason}")
    except Exception as err:  # noqa: BLE001 - a header Pillow chokes on (bomb guard, bad marker) is recorded too
        return ImageMeta(**known, error=f"header unreadable: {type(err).__name__}: {err}")


def read_all_meta(root: Path, rows: Sequence[Mapping], workers: int = 8, progress: bool = True) -> list[ImageMeta]:
    """:func:`read_image_meta` of every row, on ``workers`` threads, in order."""
    return map_with_progress(lambda row: read_image_meta(root, row), rows, workers, "reading headers", progress)


# ---- statistics per group -------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Spread:
    min: float
    median: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread | None:
        if not len(values):
            return None
        return cls(min=float(np.min(values)), median=float(np.median(values)), max=float(np.max(values)))


def _shares(values: Sequence[str]) -> dict[str, float]:
    """Value -> share, most common first."""
    return {value: n / len(values) for value, n in Counter(values).most_common()}


@dataclass(frozen=True, kw_only=True)
class GroupStats:
    """The metadata of one (split, generator, label) group; shares and spreads over its readable images."""

    split: str
    generator: str
    label: int
    count: int
    unreadable: int
    formats: dict[str, float]
    """Pillow format -> share of the readable images, most common first."""
    width: Spread | None
    height: Spread | None
    distinct_sizes: int
    most_common_size: str
    """``WxH``; ``""`` when nothing was readable."""
    most_common_size_share: float
    jpeg_quality: Spread | None
    """Estimated IJG quality over the group's JPEGs; None without JPEGs."""
    most_common_jpeg_quality: int | None
    subsampling: dict[str, float]
    """Chroma subsampling -> share of the group's JPEGs."""
    bytes_per_pixel: Spread | None


def group_stats(metas: Sequence[ImageMeta]) -> list[GroupStats]:
    """One :class:`GroupStats` per (split, generator, label), in split order then by name and label."""
    groups: dict[tuple[str, str, int], list[ImageMeta]] = {}
    for meta in metas:
        groups.setdefault((meta.split, meta.generator, meta.label), []).append(meta)
    split_order = {s: i for i, s in enumerate(SPLITS)}
    stats = []
    for (split, generator, label), members in sorted(groups.items(),
                                                     key=lambda kv: (split_order.get(kv[0][0], 9), kv[0])):
        ok = [m for m in members if not m.error]
        jpegs = [m for m in ok if m.jpeg_quality is not None]
        sizes = Counter(f"{m.width}x{m.height}" for m in ok)
        top_size, top_count = sizes.most_common(1)[0] if sizes else ("", 0)
        qualities = Counter(m.jpeg_quality for m in jpegs)
        stats.append(GroupStats(
            split=split, generator=generator, label=label, count=len(members), unreadable=len(members) - len(ok),
            formats=_shares([m.format for m in ok]), width=Spread.of([m.width for m in ok]),
            height=Spread.of([m.height for m in ok]), distinct_sizes=len(sizes), most_common_size=top_size,
            most_common_size_share=top_count / len(ok) if ok else 0.0,
            jpeg_quality=Spread.of([m.jpeg_quality for m in jpegs]),
            most_common_jpeg_quality=qualities.most_common(1)[0][0] if jpegs else None,
            subsampling=_shares([m.subsampling for m in jpegs if m.subsampling]),
            bytes_per_pixel=Spread.of([m.bytes_per_pixel for m in ok])))
    return stats


# ---- the metadata-only classifier -----------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class FeatureAUC:
    feature: str
    """A name of :data:`FEATURE_GROUPS`."""
    auc: float
    """CV ROC AUC of the classifier on this feature group alone (0.5 when it is constant)."""


@dataclass(frozen=True, kw_only=True)
class ShortcutResult:
    """Can the label be predicted from metadata alone? ``auc`` None: too few images of a class to cross-validate."""

    auc: float | None
    bound: float
    shortcut: bool
    features: list[str]
    """The feature groups that carry the shortcut, strongest first (empty without one)."""
    feature_aucs: list[FeatureAUC]
    """Every group's own CV AUC, highest first."""
    folds: int
    num_images: int
    """Readable images the classifier was cross-validated on (at most :data:`CLASSIFIER_MAX_ROWS`)."""
    chance_se: float | None
    """Standard error of the CV AUC when nothing leaks: read ``auc`` against 0.5 +- 3 of these."""
    classifier: str = "HistGradientBoostingClassifier"
    note: str = ""


def metadata_features(metas: Sequence[ImageMeta]) -> tuple[np.ndarray, list[str]]:
    """(images, columns) float matrix of :data:`FEATURE_GROUPS` (format and subsampling one-hot, a
    missing JPEG quality NaN) and the column names."""
    from sklearn.feature_extraction import DictVectorizer

    def features(m: ImageMeta) -> dict:
        row = {"format": m.format, "width": m.width, "height": m.height, "bytes_per_pixel": m.bytes_per_pixel,
               "jpeg_quality": math.nan if m.jpeg_quality is None else m.jpeg_quality}
        return row | ({"subsampling": m.subsampling} if m.subsampling else {})

    vectorizer = DictVectorizer(sparse=False, separator="=")
    return vectorizer.fit_transform([features(m) for m in metas]), list(vectorizer.get_feature_names_out())


def _classifier(seed: int):
    """The seeded gradient-boosting classifier every CV AUC of the audit is measured with."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    # trees catch "exactly 512x512" as well as "JPEG or not"; small leaves so 40 images per class suffice
    return HistGradientBoostingClassifier(max_iter=50, max_leaf_nodes=15, min_samples_leaf=10, early_stopping=False,
                                          random_state=seed)


def _varying_columns(X: np.ndarray) -> np.ndarray:
    """bool (columns,): the columns that take more than one value. A constant column (e.g. JPEG quality, all
    NaN in a PNG-only manifest) carries nothing, and the trees' binning refuses one without a finite value."""
    return np.array([not np.array_equal(c, c[0:1].repeat(len(c)), equal_nan=True) for c in X.T], dtype=bool)


def cv_aucs(X: np.ndarray, y: np.ndarray, subsets: Mapping[str, np.ndarray], *, folds: int, seed: int,
            workers: int = 1, progress: bool = False) -> dict[str, float]:
    """ROC AUC of the classifier's out-of-fold probabilities on each column subset of ``X`` (images, columns);
    ``subsets``: name -> bool (columns,). Every subset sees the same seeded stratified folds.

    A subset without a varying column is 0.5 unfitted; subsets left with the same varying columns are fitted
    once (in a PNG-only manifest of one size, every group but bytes per pixel is constant). The fits run on
    ``workers`` threads, each with one OpenMP thread: OpenMP teams contending for busy cores made one fit of
    80 images take seconds. A progress bar counts the fits."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold
    from threadpoolctl import ThreadpoolController

    splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(X, y))
    varying = _varying_columns(X)
    columns_of = {name: tuple(np.flatnonzero(mask & varying)) for name, mask in subsets.items()}
    distinct = sorted({cols for cols in columns_of.values() if cols})
    proba = {cols: np.empty(len(y)) for cols in distinct}  # out-of-fold p(fake) per distinct column set
    controller = ThreadpoolController()

    def fit_fold(cols: tuple[int, ...], fold: int) -> np.ndarray:
        train, test = splits[fold]
        with controller.limit(limits=1, user_api="openmp"):
            model = _classifier(seed).fit(X[np.ix_(train, cols)], y[train])
            return model.predict_proba(X[np.ix_(test, cols)])[:, 1]

    with ThreadPoolExecutor(max(1, workers)) as pool, progress_bar(unit="fit", disable=not progress) as bar:
        task = bar.add_task("metadata classifier", total=len(distinct) * folds, rate="")
        pending = {pool.submit(fit_fold, cols, fold): (cols, fold) for cols in distinct for fold in range(folds)}
        for done in as_completed(pending):
            cols, fold = pending[done]
            proba[cols][splits[fold][1]] = done.result()
            bar.advance(task)
    return {name: float(roc_auc_score(y, proba[cols])) if cols else 0.5 for name, cols in columns_of.items()}


def metadata_shortcut(metas: Sequence[ImageMeta], *, bound: float = SHORTCUT_AUC_BOUND, seed: int = 0, workers: int = 1,
                      progress: bool = False) -> ShortcutResult:
    """Cross-validate (stratified, seeded, :data:`CV_FOLDS` folds or as many as the smaller class has
    images) a gradient-boosting classifier that predicts the label from the readable images'
    metadata, then each feature group alone. ``shortcut`` when the CV AUC exceeds ``bound``; the named
    features are the groups whose own AUC does too, or the strongest one when only their combination does.
    ``workers`` threads fit the folds (:func:`cv_aucs`)."""
    if not 0.5 < bound < 1.0:
        raise InputError(f"shortcut bound must be in (0.5, 1), got {bound}")
    ok = [m for m in metas if not m.error]
    y = np.array([m.label for m in ok], dtype=np.int64)
    n_fake, n_real = int(y.sum()), int(len(y) - y.sum())
    folds = min(CV_FOLDS, n_real, n_fake)
    if folds < 2:
        return ShortcutResult(auc=None, bound=bound, shortcut=False, features=[], feature_aucs=[], folds=0,
                              num_images=len(ok), chance_se=None,
                              note=f"not cross-validated: {n_real} readable real and {n_fake} fake images "
                                   "(needs at least 2 of each)")
    if len(ok) > CLASSIFIER_MAX_ROWS:
        from sklearn.model_selection import train_test_split

        ok, _ = train_test_split(ok, train_size=CLASSIFIER_MAX_ROWS, stratify=y, random_state=seed)
        y = np.array([m.label for m in ok], dtype=np.int64)
        n_fake, n_real = int(y.sum()), int(len(y) - y.sum())
    X, columns = metadata_features(ok)
    group_of = np.array([c.split("=")[0] for c in columns])
    subsets = {"all": np.ones(len(columns), dtype=bool)} | {g: group_of == g for g in FEATURE_GROUPS}
    aucs = cv_aucs(X, y, subsets, folds=folds, seed=seed, workers=workers, progress=progress)
    auc = aucs["all"]
    per_group = [FeatureAUC(feature=g, auc=aucs[g]) for g in FEATURE_GROUPS]
    per_group.sort(key=lambda f: (-f.auc, FEATURE_GROUPS.index(f.feature)))
    shortcut = auc > bound
    named = ([f.feature for f in per_group if f.auc > bound] or [per_group[0].feature]) if shortcut else []
    chance_se = math.sqrt((n_real + n_fake + 1) / (12 * n_real * n_fake))
    note = ""
    if shortcut and per_group[0].auc <= bound:
        note = "no feature alone exceeds the bound; together they do"
    elif bound < 0.5 + 3 * chance_se:
        note = f"few images: chance alone reaches AUC {0.5 + 3 * chance_se:.2f} (3 standard errors)"
    return ShortcutResult(auc=auc, bound=bound, shortcut=shortcut, features=named, feature_aucs=per_group, folds=folds,
                          num_images=len(ok), chance_se=chance_se, note=note)


# ---- the audit ------------------------------------------------------------------------------
@dataclass(kw_only=True)
class AuditReport:
    """Everything ``lare2 manifest audit`` reports; :meth:`to_json` is its ``--json`` document."""

    manifest: str
    root: str
    split: str | None
    """The split audited; None: all of them."""
    splits: list[str]
    num_images: int
    unreadable: list[dict] = field(default_factory=list)
    """``[{path, error}]`` of every image whose header could not be read."""
    groups: list[GroupStats] = field(default_factory=list)
    classifier: ShortcutResult | None = None

    @property
    def shortcut(self) -> bool:
        return bool(self.classifier and self.classifier.shortcut)

    def to_json(self) -> dict:
        return {**asdict(self), "num_unreadable": len(self.unreadable), "shortcut": self.shortcut}


def audit_manifest(path: Path | str, *, split: str | None = None, bound: float = SHORTCUT_AUC_BOUND, seed: int = 0,
                   workers: int = 8, progress: bool = True) -> AuditReport:
    """Read every selected image's header, group the metadata and cross-validate the shortcut classifier."""
    if not 0.5 < bound < 1.0:
        raise InputError(f"--bound {bound}: the shortcut bound must be in (0.5, 1)")
    if workers < 1:
        raise InputError(f"--workers {workers}: need at least 1 thread")
    table, root = read_manifest(path)
    present = sorted(set(table["split"].to_pylist()), key=lambda s: (SPLITS.index(s) if s in SPLITS else 9, s))
    if split is not None and split in SPLITS and split not in present:
        raise ManifestError(f"{path}: no {split!r} rows; the manifest has the splits {present}")
    rows = select_rows(table, split=split).select(["path", "label", "generator", "split"]).to_pylist()
    if not rows:  # the split is present (checked above): the manifest has no rows at all
        raise empty_manifest_error(path)
    metas = read_all_meta(root, rows, workers=workers, progress=progress)
    return AuditReport(manifest=str(path), root=str(root), split=split, splits=[split] if split else present,
                       num_images=len(metas), unreadable=[{"path": m.path, "error": m.error} for m in metas if m.error],
                       groups=group_stats(metas),
                       classifier=metadata_shortcut(metas, bound=bound, seed=seed, workers=workers, progress=progress))


# ---- the rich report ------------------------------------------------------------------------
def _spread(s: Spread | None, digits: int = 0) -> str:
    return "-" if s is None else "–".join(f"{v:.{digits}f}" for v in (s.min, s.median, s.max))


def _share_text(shares: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.0%}" for k, v in shares.items()) or "-"


def print_audit_report(report: AuditReport, examples: int = 10) -> None:
    """The groups, the unreadable images and the classifier as rich tables on stderr (the log's stream)."""
    from rich.table import Table

    out = output_console(stderr=True)  # 12 columns: not squeezed to 80 off a terminal (a log file, a CI job)

    grid = Table(title=f"{report.manifest}: header metadata of {report.num_images} images "
                       f"({', '.join(report.splits)}); spreads are min–median–max")
    for column in ("split", "generator", "label", "images", "unreadable", "formats", "width", "height", "sizes",
                   "JPEG quality", "subsampling", "bytes/pixel"):
        grid.add_column(column, justify="right" if column in ("images", "unreadable") else "left")
    for g in report.groups:
        sizes = (f"{g.distinct_sizes} (top {g.most_common_size} {g.most_common_size_share:.0%})"
                 if g.distinct_sizes else "-")
        grid.add_row(g.split, g.generator, "fake" if g.label else "real", str(g.count), str(g.unreadable),
                     _share_text(g.formats), _spread(g.width), _spread(g.height), sizes, _spread(g.jpeg_quality),
                     _share_text(g.subsampling), _spread(g.bytes_per_pixel, 2))
    out.print(grid)
    if report.unreadable:
        bad = Table(title=f"{len(report.unreadable)} images could not be read (left out of the statistics)")
        bad.add_column("path", overflow="fold")
        bad.add_column("error", overflow="fold")
        for item in report.unreadable[:examples]:
            bad.add_row(item["path"], item["error"])
        if len(report.unreadable) > examples:
            bad.add_row(f"... and {len(report.unreadable) - examples} more (--json lists all)", "")
        out.print(bad)
    result = report.classifier
    if result is None or result.auc is None:
        out.print(f"metadata-only classifier: {result.note if result else 'not run'}")
        return
    verdict = "[bold red]SHORTCUT[/]" if result.shortcut else "no shortcut"
    out.print(f"label from metadata alone: CV ROC AUC {result.auc:.3f} ({result.folds}-fold, {result.num_images} "
                  f"images; chance 0.5 ± {result.chance_se:.3f}), bound {result.bound}: {verdict}")
    features = Table(title="each feature alone")
    features.add_column("feature")
    features.add_column("CV AUC alone", justify="right")
    for f in result.feature_aucs:
        features.add_row(f.feature, f"{f.auc:.3f}", style="bold red" if f.feature in result.features else None)
    out.print(features)
    if result.note:
        out.print(f"note: {result.note}")
