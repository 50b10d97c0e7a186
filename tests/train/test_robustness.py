"""``lare2 eval --robustness``: the generator x perturbation table, its plot, and the per-sample predictions."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lare2.shared.cache import CacheLayout, FeatureCache
from lare2.train.checkpoint import load_detector
from lare2.train.cli import main
from lare2.train.data import CacheSplit
from lare2.train.report import PREDICTION_COLUMNS, ScoredCache, evaluate, percent
from lare2.train.robustness import METRICS, group_by_perturbation
from lare2.train.scoring import score_split
from tests.helpers.rich_tables import table_rows
from tests.helpers.caches import write_synthetic_cache

LAYOUT = CacheLayout(pooled_dim=16, fmap_shape=(16, 7, 7), lare_shape=(4, 16, 16), chunk_samples=16)
# (folder, generators, seed, lare_shift: weaker signal = a harder perturbation, perturb as the extractor records it)
TEST_CACHES = (
    ("test-sd", ("sd",), 10, 1.0, ""),
    ("test-glide", ("glide",), 11, 1.0, None),  # caches from before perturbations: no key, clean
    ("test-sd-jpeg75", ("sd",), 12, 0.6, "jpeg:75"),
    ("test-glide-jpeg75", ("glide",), 13, 0.6, "jpeg:75"),
    ("test-blur1", ("sd", "glide"), 14, 0.3, "blur:1.0"),  # one cache holding both generators; non-canonical spelling
)
GROUPS = {"clean": ["test-sd", "test-glide"], "jpeg:75": ["test-sd-jpeg75", "test-glide-jpeg75"],
          "blur:1": ["test-blur1"]}


def write_test_cache(path: Path, generators, seed: int, lare_shift: float, perturb: str | None,
                     **kwargs) -> FeatureCache:
    cache = write_synthetic_cache(path, num_samples=40, signal="lare", seed=seed, layout=LAYOUT, generators=generators,
                                  lare_shift=lare_shift, **kwargs)
    if perturb is not None:  # the extraction fingerprint ignores perturb: the identity stays the training caches'
        cache.group.attrs["extract_config"] = {"perturb": perturb, "normalize": ""}
    return cache


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("robustness")
    write_synthetic_cache(root / "train", num_samples=96, signal="lare", seed=1, layout=LAYOUT)
    write_synthetic_cache(root / "val", num_samples=64, signal="lare", seed=2, layout=LAYOUT)
    run = root / "run"
    assert main(["train", "--preset", "debug", "--model", "egre", "--train", str(root / "train"),
                 "--val", str(root / "val"), "--out", str(run), "--epochs", "2", "--batch-size", "16",
                 "--set", "progress=false", "--set", "head_dim=8"]) == 0
    for folder, generators, seed, shift, perturb in TEST_CACHES:
        # an extraction error in the first cache: left out of the table and of the predictions
        write_test_cache(root / folder, generators, seed, shift, perturb,
                         error_rows=(3,) if folder == "test-sd" else ())
    tests = [str(root / folder) for folder, *_ in TEST_CACHES]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        report = evaluate(run, tests, root / "report", robustness=True)
    return root, run, tests, report, out.getvalue()


def test_one_row_per_generator_and_one_column_per_perturbation(setup) -> None:
    root, _, _, report, printed = setup
    robustness = json.loads((root / "report" / "robustness.json").read_text())
    assert [g["perturb"] for g in robustness["perturbations"]] == list(GROUPS)  # clean first, then by kind
    assert [g["kind"] for g in robustness["perturbations"]] == ["clean", "jpeg", "blur"]
    for group in robustness["perturbations"]:
        assert [r["generator"] for r in group["rows"]] == ["sd", "glide"]
        assert group["mean"]["generator"] == "mean"
        assert group["caches"] == [str(root / f) for f in GROUPS[group["perturb"]]]
        for row in [*group["rows"], group["mean"]]:
            assert all(isinstance(row[m], float) for m in METRICS)
    # the printed table: a row per generator and the mean, a column per perturbation, AUC / ACC in every cell
    rows = table_rows(printed, cells=4)
    assert [r[0] for r in rows] == ["sd", "glide", "mean"]
    clean_sd = robustness["perturbations"][0]["rows"][0]
    assert rows[0][1] == f"AUC {percent(clean_sd['auc'])} / ACC {percent(clean_sd['acc'])}"
    header = next(line for line in printed.splitlines() if "generator" in line and "jpeg:75" in line)
    assert [c.strip() for c in header.strip("┃ ").split("┃")] == ["generator", *GROUPS]
    assert report["robustness"]["perturbations"][1]["perturb"] == "jpeg:75"

    with open(root / "report" / "robustness.csv") as f:
        lines = list(csv.DictReader(f))
    assert [(r["perturb"], r["generator"]) for r in lines] == [(p, g) for p in GROUPS for g in ("sd", "glide", "mean")]
    assert set(METRICS) <= set(lines[0])
    jpeg_glide = robustness["perturbations"][1]["rows"][1]
    assert float(lines[4]["auc"]) == pytest.approx(jpeg_glide["auc"]) and lines[4]["strength"] == "75"


def test_each_column_equals_a_plain_eval_of_its_caches(setup, tmp_path) -> None:
    root, run, _, report, _ = setup
    for group in report["robustness"]["perturbations"]:
        with contextlib.redirect_stdout(io.StringIO()):
            alone = evaluate(run, [root / f for f in GROUPS[group["perturb"]]], tmp_path / group["perturb"],
                             plots=False)
        assert [r["generator"] for r in alone["rows"]] == [r["generator"] for r in group["rows"]]
        for mine, plain in zip([*group["rows"], group["mean"]], [*alone["rows"], alone["mean"]]):
            for key in (*METRICS, "n_real", "n_fake", "reals_from"):
                assert mine[key] == pytest.approx(plain[key], nan_ok=True), (group["perturb"], mine["generator"], key)


def test_the_plot_has_a_panel_per_kind(setup) -> None:
    root, *_ = setup
    with Image.open(root / "report" / "robustness.png") as image:
        width, height = image.size
        assert image.format == "PNG"
    # two panels (jpeg, blur) side by side at 120 dpi
    assert 800 <= width <= 2000 and 300 <= height <= 800 and width > 1.5 * height


def test_predictions_hold_every_scored_sample(setup) -> None:
    root, run, tests, report, _ = setup
    table = pq.read_table(root / "report" / "predictions.parquet")
    assert tuple(table.column_names) == PREDICTION_COLUMNS
    predictions = table.to_pydict()
    model, config = load_detector(run)
    caches = np.asarray(predictions["cache"])
    expected_perturb = {str(root / f): p for p, folders in GROUPS.items() for f in folders}
    for path in tests:
        mine = caches == path
        cache = FeatureCache.open(path)
        ok = cache.ok_mask()
        assert mine.sum() == ok.sum() == 40 - (path.endswith("test-sd"))
        picked = {column: np.asarray(values, dtype=object)[mine].tolist() for column, values in predictions.items()}
        for column in ("sample_id", "path", "generator"):
            assert picked[column] == cache.column(column)[ok].tolist(), column
        assert picked["label"] == cache.column("label")[ok].astype(int).tolist()
        labels, scores, _ = score_split(model, CacheSplit(path, type(model).input_names))
        assert np.asarray(predictions["label"])[mine].tolist() == labels.tolist()
        np.testing.assert_allclose(np.asarray(predictions["p_fake"])[mine], scores, rtol=0, atol=1e-12)
        assert set(picked["perturb"]) == {expected_perturb[path]}
    p_fake, decision = np.asarray(predictions["p_fake"]), np.asarray(predictions["decision"])
    assert decision.dtype == bool and (decision == (p_fake > config.threshold)).all()
    assert 0 < decision.sum() < len(decision)
    # acc@thr of the report is the accuracy of these decisions (the clean sd row has its own reals)
    sd = (caches == tests[0])
    labels = np.asarray(predictions["label"])[sd]
    assert report["rows"][0]["acc@thr"] == pytest.approx((decision[sd] == labels.astype(bool)).mean())


def test_plain_eval_writes_predictions_and_no_robustness_table(setup, tmp_path, capsys) -> None:
    _, run, tests, *_ = setup
    assert main(["eval", str(run), "--test", tests[0], "--report", str(tmp_path / "report")]) == 0
    assert pq.read_table(tmp_path / "report" / "predictions.parquet").num_rows == 39
    assert not (tmp_path / "report" / "robustness.json").exists()
    assert not table_rows(capsys.readouterr().out, cells=2)


def test_robustness_on_clean_caches_only_says_so(setup, tmp_path, capsys, caplog) -> None:
    _, run, tests, *_ = setup
    lare2_logger = logging.getLogger("lare2")
    lare2_logger.addHandler(caplog.handler)
    try:
        assert main(["eval", str(run), "--test", tests[0], "--test", tests[1], "--report", str(tmp_path / "r"),
                     "--robustness", "--metric", "ap"]) == 0
    finally:
        lare2_logger.removeHandler(caplog.handler)
    robustness = json.loads((tmp_path / "r" / "robustness.json").read_text())
    assert [g["perturb"] for g in robustness["perturbations"]] == ["clean"]
    assert "every test cache is clean" in robustness["note"]
    assert any("every test cache is clean" in r.getMessage() for r in caplog.records)
    rows = table_rows(capsys.readouterr().out, cells=2)
    assert [r[0] for r in rows] == ["sd", "glide", "mean"] and rows[0][1].startswith("AP ")
    assert not (tmp_path / "r" / "robustness.png").exists()  # nothing to plot against strength


def test_bad_invocations_and_a_bad_perturb_are_one_error_line(setup, tmp_path, capsys) -> None:
    _, run, tests, *_ = setup
    cases = [
        (["--metric", "ap"], "--metric ap: only the robustness table has a shown metric; add --robustness"),
        (["--robustness", "--metric", "f1"], "--metric f1: choose from auc, acc, acc@thr, ap"),
    ]
    for extra, message in cases:
        assert main(["eval", str(run), "--test", tests[0], "--report", str(tmp_path / "r"), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    bad = write_test_cache(tmp_path / "test-bad", ("sd",), 20, 1.0, "jpeg:500")
    assert main(["eval", str(run), "--test", str(bad.path), "--report", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bad.path}: extract_config perturb 'jpeg:500'") and len(err.splitlines()) == 1


def test_columns_run_clean_then_kinds_mild_to_strong_then_chains() -> None:
    empty = np.empty(0)
    caches = [ScoredCache(path=Path(p), labels=empty, scores=empty, generators=empty, num_errors=0, sample_ids=empty,
                          paths=empty, perturb=p)
              for p in ("jpeg:50", "jpeg:75+resize:0.5", "clean", "noise:5", "jpeg:90", "blur:2", "blur:0.5",
                        "resize:0.5", "crop:0.8", "jpeg:50")]
    groups = group_by_perturbation(caches)
    assert [g.perturb for g in groups] == ["clean", "jpeg:90", "jpeg:50", "blur:0.5", "blur:2", "resize:0.5",
                                           "crop:0.8", "noise:5", "jpeg:75+resize:0.5"]
    assert [len(g.caches) for g in groups][2] == 2
    assert (groups[-1].kind, groups[-1].strength) == ("chain", None)
    assert (groups[1].kind, groups[1].strength) == ("jpeg", 90)


def test_the_per_generator_table_never_mixes_perturbations(setup, tmp_path) -> None:
    root, run, tests, report, _ = setup
    # clean and perturbed caches together: the main table is the clean group's, as a plain eval of it
    assert report["table_caches"] == [str(root / f) for f in GROUPS["clean"]] and "robustness" in report["table_note"]
    clean_group = next(g for g in report["robustness"]["perturbations"] if g["perturb"] == "clean")
    assert report["rows"] == clean_group["rows"] and report["mean"] == clean_group["mean"]
    # no clean cache: pooled, and said so
    with contextlib.redirect_stdout(io.StringIO()):
        pooled = evaluate(run, [root / "test-sd-jpeg75", root / "test-blur1"], tmp_path / "pooled", plots=False)
    assert len(pooled["table_caches"]) == 2 and "pooled" in pooled["table_note"]
