"""``lare2 manifest audit``: JPEG quality and subsampling read back from Pillow-saved files, the
per-group statistics, the metadata-only shortcut classifier (flagged for JPEG reals vs PNG fakes,
quiet when both classes share one distribution), unreadable files and bad invocations."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from lare2.shared.manifest import (
    SHORTCUT_AUC_BOUND,
    audit_manifest,
    build_folders,
    build_webdataset,
    estimate_jpeg_quality,
    ijg_quantization_table,
    read_image_meta,
    write_built,
)
from lare2.shared.manifest_cli import DEFAULT_SHORTCUT_BOUND
from PIL import Image
from typer.testing import CliRunner

from lare2.cli import app

PER_LABEL = 40
SIZES = ((32, 32), (48, 40), (40, 56), (64, 48))
SUBSAMPLING = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}
runner = CliRunner()


# ---- tiny image files ---------------------------------------------------------------------
def _picture(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A gradient plus noise, so files compress like photographs, not like flat colour or pure noise."""
    w, h = size
    ramp_HW = np.add.outer(np.linspace(0, 120, h), np.linspace(0, 120, w))
    pixels_HW3 = ramp_HW[..., None] + rng.normal(0, 25, (h, w, 3)) + rng.integers(0, 100, 3)
    return Image.fromarray(np.clip(pixels_HW3, 0, 255).astype(np.uint8))


def _encode(image: Image.Image, fmt: str, quality: int = 75, subsampling: str = "4:2:0") -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        image.save(buf, format="JPEG", quality=quality, subsampling=SUBSAMPLING[subsampling])
    else:
        image.save(buf, format=fmt)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _manifest(tmp_path: Path, encode, splits: tuple[str, ...] = ("train",), seed: int = 0) -> Path:
    """``images/gen-x/<split>/{0_real,1_fake}/`` with ``PER_LABEL`` files per label and split, each
    ``encode(rng, label) -> (bytes, extension)``; its manifest."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for label, folder in ((0, "0_real"), (1, "1_fake")):
            for i in range(PER_LABEL):
                data, ext = encode(rng, label)
                _write(tmp_path / "images" / "gen-x" / split / folder / f"img_{i:03d}.{ext}", data)
    return write_built(tmp_path / "manifest.parquet", build_folders(tmp_path / "images", progress=False))


def _jpeg_vs_png(rng: np.random.Generator, label: int) -> tuple[bytes, str]:
    """GenImage's bias: reals are JPEG q75, fakes PNG; sizes from one distribution for both."""
    image = _picture(rng, SIZES[rng.integers(len(SIZES))])
    return (_encode(image, "JPEG", 75), "jpg") if label == 0 else (_encode(image, "PNG"), "png")


def _label_blind(rng: np.random.Generator, label: int) -> tuple[bytes, str]:
    """Format, quality, subsampling and size drawn at random, whatever the label."""
    image = _picture(rng, SIZES[rng.integers(len(SIZES))])
    if rng.random() < 0.5:
        return _encode(image, "PNG"), "png"
    quality = int(rng.choice([70, 80, 90, 95]))
    return _encode(image, "JPEG", quality, str(rng.choice(list(SUBSAMPLING)))), "jpg"


def _audit(*args: object):
    return runner.invoke(app, ["manifest", "audit", *map(str, args)], env={"COLUMNS": "240"})


def _error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


# ---- JPEG headers -------------------------------------------------------------------------
@pytest.mark.parametrize("quality", [50, 75, 90, 95, 100])
@pytest.mark.parametrize("subsampling", list(SUBSAMPLING))
def test_quality_and_subsampling_read_back_what_pillow_saved(tmp_path: Path, quality: int, subsampling: str) -> None:
    data = _encode(_picture(np.random.default_rng(quality), (40, 24)), "JPEG", quality, subsampling)
    _write(tmp_path / "a.jpg", data)
    meta = read_image_meta(tmp_path, {"path": "a.jpg", "label": 0, "generator": "g", "split": "test"})
    assert (meta.format, meta.width, meta.height, meta.error) == ("JPEG", 40, 24, "")
    assert meta.jpeg_quality == quality
    assert meta.subsampling == subsampling
    assert meta.file_bytes == len(data)
    assert meta.bytes_per_pixel == pytest.approx(len(data) / (40 * 24))


def test_quality_estimator_covers_every_ijg_quality() -> None:
    for quality in range(1, 101):
        table = ijg_quantization_table(quality)
        assert estimate_jpeg_quality({0: list(table)}) == quality
    assert ijg_quantization_table(50)[:4].tolist() == [16, 11, 10, 16]  # quality 50 is the Annex K table itself
    assert ijg_quantization_table(100).tolist() == [1] * 64


def test_non_jpegs_have_no_quality(tmp_path: Path) -> None:
    image = _picture(np.random.default_rng(0), (16, 16))
    for fmt in ("PNG", "WEBP", "BMP"):
        _write(tmp_path / f"a.{fmt.lower()}", _encode(image, fmt))
        meta = read_image_meta(tmp_path, {"path": f"a.{fmt.lower()}", "label": 1, "generator": "g", "split": "test"})
        assert (meta.format, meta.jpeg_quality, meta.subsampling) == (fmt, None, None)
    assert estimate_jpeg_quality(None) is None and estimate_jpeg_quality({}) is None
    gray = io.BytesIO()
    image.convert("L").save(gray, format="JPEG", quality=60)
    _write(tmp_path / "gray.jpg", gray.getvalue())
    meta = read_image_meta(tmp_path, {"path": "gray.jpg", "label": 0, "generator": "g", "split": "test"})
    assert (meta.jpeg_quality, meta.subsampling) == (60, "gray")


def test_tar_members_are_read_too(tmp_path: Path) -> None:
    data = _encode(_picture(np.random.default_rng(1), (24, 16)), "JPEG", 90)
    (tmp_path / "wds").mkdir()
    with tarfile.open(tmp_path / "wds" / "000000.tar", "w") as tar:
        for name, payload in (("k1.jpg", data), ("k1.cls", b"0")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    manifest = write_built(tmp_path / "m.parquet", build_webdataset(tmp_path / "wds", split="test", progress=False))
    report = audit_manifest(manifest, progress=False)
    (group,) = report.groups
    assert (group.formats, group.jpeg_quality.median, group.most_common_size) == ({"JPEG": 1.0}, 90, "24x16")
    assert report.classifier.auc is None and "not cross-validated" in report.classifier.note  # one class only


# ---- the shortcut classifier --------------------------------------------------------------
def test_jpeg_reals_png_fakes_is_a_shortcut(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, _jpeg_vs_png)
    report = audit_manifest(manifest, progress=False)
    real, fake = report.groups
    assert (real.label, real.count, real.formats, real.most_common_jpeg_quality, real.subsampling) == \
        (0, PER_LABEL, {"JPEG": 1.0}, 75, {"4:2:0": 1.0})
    assert (real.jpeg_quality.min, real.jpeg_quality.max) == (75, 75)
    assert (fake.label, fake.formats, fake.jpeg_quality, fake.subsampling) == (1, {"PNG": 1.0}, None, {})
    assert real.distinct_sizes <= len(SIZES) and real.width.min >= 32 and real.height.max <= 56
    result = report.classifier
    assert result.shortcut and report.shortcut
    assert result.auc > SHORTCUT_AUC_BOUND
    assert result.features[0] == "format"  # ties with jpeg_quality (absent for PNGs) go to the format
    aucs = [f.auc for f in result.feature_aucs]
    assert aucs == sorted(aucs, reverse=True) and {f.feature for f in result.feature_aucs} >= {"format", "width"}

    cli = _audit(manifest, "--json")
    assert cli.exit_code == 1, cli.output
    document = json.loads(cli.stdout)
    assert document["shortcut"] is True and document["classifier"]["bound"] == SHORTCUT_AUC_BOUND
    assert document["classifier"]["features"][0] == "format"
    assert document["classifier"]["auc"] == pytest.approx(result.auc)  # seeded: the same folds, the same AUC
    assert [g["formats"] for g in document["groups"]] == [{"JPEG": 1.0}, {"PNG": 1.0}]
    assert "SHORTCUT" in cli.stderr

    tables = _audit(manifest)
    assert tables.exit_code == 1
    assert "SHORTCUT" in tables.stderr and "JPEG 100%" in tables.stderr and "4:2:0 100%" in tables.stderr


def test_label_blind_metadata_is_no_shortcut(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, _label_blind, seed=3)
    cli = _audit(manifest, "--json")
    assert cli.exit_code == 0, cli.output
    document = json.loads(cli.stdout)
    assert document["shortcut"] is False and document["classifier"]["features"] == []
    assert document["classifier"]["auc"] <= SHORTCUT_AUC_BOUND
    assert document["classifier"]["folds"] == 5 and document["classifier"]["num_images"] == 2 * PER_LABEL
    assert "SHORTCUT" not in cli.stderr
    formats = [set(g["formats"]) for g in document["groups"]]
    assert formats == [{"JPEG", "PNG"}, {"JPEG", "PNG"}]
    assert _audit(manifest).exit_code == 0


def test_split_option_selects_one_split(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, _label_blind, splits=("train", "val"))
    whole = audit_manifest(manifest, progress=False)
    assert [(g.split, g.label) for g in whole.groups] == [("train", 0), ("train", 1), ("val", 0), ("val", 1)]
    val = audit_manifest(manifest, split="val", progress=False)
    assert (val.splits, val.num_images) == (["val"], 2 * PER_LABEL)
    assert {g.split for g in val.groups} == {"val"}


def test_small_classes_use_fewer_folds(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, _jpeg_vs_png)
    for path in sorted((tmp_path / "images" / "gen-x" / "train" / "1_fake").iterdir())[3:]:
        path.unlink()  # 3 readable fakes left: 3 folds
    result = audit_manifest(manifest, progress=False).classifier
    assert result.folds == 3 and result.num_images == PER_LABEL + 3


# ---- unreadable files and bad invocations -------------------------------------------------
def test_unreadable_files_are_reported_not_a_crash(tmp_path: Path) -> None:
    fakes = tmp_path / "images" / "gen-x" / "train" / "1_fake"
    _write(fakes / "zz_garbage.png", b"this is not a PNG")
    manifest = _manifest(tmp_path, _jpeg_vs_png)
    (fakes / "img_000.png").unlink()  # gone since the manifest was built
    report = audit_manifest(manifest, progress=False)
    named = {item["path"]: item["error"] for item in report.unreadable}
    assert set(named) == {"gen-x/train/1_fake/img_000.png", "gen-x/train/1_fake/zz_garbage.png"}
    assert all(error.startswith("unreadable") for error in named.values())
    fake = report.groups[1]
    assert (fake.count, fake.unreadable, fake.formats) == (PER_LABEL + 1, 2, {"PNG": 1.0})
    assert report.classifier.num_images == 2 * PER_LABEL - 1

    cli = _audit(manifest)
    assert cli.exit_code == 1, cli.output  # the shortcut; the unreadable files alone do not fail the audit
    assert "zz_garbage.png" in cli.stderr and "2 images could not be read" in cli.stderr
    document = json.loads(_audit(manifest, "--json").stdout)
    assert document["num_unreadable"] == 2


@pytest.mark.parametrize(("args", "names"), [
    (["{missing}"], "{missing}"),
    (["{not_manifest}"], "not_a_manifest.parquet"),
    (["{images}"], "{images}"),
    (["{manifest}", "--split", "dev"], "dev"),
    (["{manifest}", "--split", "val"], "'val'"),
    (["{manifest}", "--bound", "1.5"], "--bound"),
    (["{manifest}", "--workers", "0"], "--workers"),
])
def test_bad_invocations_are_one_error_line(tmp_path: Path, args: list[str], names: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    _write(tmp_path / "images" / "gen-x" / "train" / "0_real" / "a.png",
           _encode(_picture(np.random.default_rng(0), (8, 8)), "PNG"))
    paths = {"missing": tmp_path / "absent.parquet", "not_manifest": tmp_path / "not_a_manifest.parquet",
             "images": tmp_path / "images",
             "manifest": write_built(tmp_path / "m.parquet", build_folders(tmp_path / "images", progress=False))}
    pq.write_table(pa.table({"x": [1]}), paths["not_manifest"])
    result = _audit(*(a.format(**paths) for a in args))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert names.format(**paths) in _error_line(result.stderr)


def test_cli_default_bound_is_the_library_bound() -> None:
    assert DEFAULT_SHORTCUT_BOUND == SHORTCUT_AUC_BOUND


def test_a_png_only_manifest_audits_without_jpeg_columns(tmp_path):
    # every image PNG: the JPEG quality column is all NaN and must not stop the classifier
    import numpy as np
    from PIL import Image

    from lare2.shared.manifest import build_folders, write_built
    from lare2.shared.manifest.audit import audit_manifest

    rng = np.random.default_rng(0)
    for label in ("0_real", "1_fake"):
        folder = tmp_path / "images" / "train" / label
        folder.mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (16 + i % 3, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    manifest = write_built(tmp_path / "m.parquet", build_folders(tmp_path / "images", progress=False))
    report = audit_manifest(manifest, progress=False)
    assert report.classifier.auc is not None and not report.classifier.shortcut


# ---- the classifier's fits ----------------------------------------------------------------
def test_cv_aucs_equal_sklearns_cross_validation_and_fit_each_column_set_once() -> None:
    """The threaded folds give sklearn's ``cross_val_predict`` AUC; a subset whose varying columns are another
    subset's gets the same AUC, and one without a varying column gets 0.5."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    from lare2.shared.manifest.audit import _classifier, cv_aucs

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 40)
    signal_N = y + rng.normal(0, 0.8, len(y))
    X = np.stack([signal_N, np.full(len(y), 7.0), rng.normal(size=len(y))], axis=1)  # (80, 3): signal, constant, noise
    subsets = {"all": np.array([True, True, True]), "signal": np.array([True, False, False]),
               "signal+constant": np.array([True, True, False]), "constant": np.array([False, True, False])}
    aucs = cv_aucs(X, y, subsets, folds=5, seed=0, workers=2)
    cv = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    reference = roc_auc_score(y, cross_val_predict(_classifier(0), X[:, [0]], y, cv=cv, method="predict_proba")[:, 1])
    assert aucs["signal"] == pytest.approx(reference) and aucs["signal"] > 0.75
    assert aucs["signal+constant"] == aucs["signal"] and aucs["constant"] == 0.5
    assert aucs["all"] != aucs["signal"]  # the noise column is a third column set, fitted on its own


def test_the_audit_shows_its_fits_on_a_progress_bar(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, _jpeg_vs_png)
    result = _audit(manifest)
    assert "metadata classifier" in result.stderr, result.output
