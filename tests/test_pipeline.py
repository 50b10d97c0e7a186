"""Stage 1 -> stage 2 -> scoring new images, with tiny models: the pieces agree with each other."""

from __future__ import annotations

import csv
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lare2.cli import app
from lare2.shared.cache import FeatureCache
from lare2.shared.config import debug
from tests.bad_images import good_rgb

pytestmark = pytest.mark.slow


def image_seed(split: str, index: int) -> int:
    """The same pixels on every run (``hash()`` of a str is salted per process)."""
    return zlib.crc32(f"{split}/{index}".encode()) % 1000


def scored_test_cache(root: Path) -> tuple[FeatureCache, np.ndarray, float]:
    """The stage-1 test cache, the trained detector's p(fake) of each of its samples, and its threshold."""
    from lare2.train.checkpoint import load_detector, score_features

    cache = FeatureCache.open(root / "cache/test")
    model, detector = load_detector(root / "run")
    arrays = cache.read(slice(None))
    return cache, score_features(model, arrays["pooled"], arrays["fmap"], arrays["lare"]).numpy(), detector.threshold


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from lare2.extract.run import run_extraction
    from lare2.extract.tiny_models import save_tiny_sd
    from lare2.shared.manifest import build_folders, write_built
    from lare2.train.config import debug as train_debug
    from lare2.train.trainer import run_training

    root = tmp_path_factory.mktemp("pipeline")
    sd = save_tiny_sd(root / "tiny-sd", seed=0)
    images = root / "images"
    for split, count in (("train", 8), ("val", 6), ("test", 4)):
        for i in range(count):
            folder = images / "gen-x" / split / ("0_real" if i % 2 == 0 else "1_fake")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i % 5 + 1}_{split}_{i}.png").write_bytes(good_rgb(seed=image_seed(split, i), size=(32 + i, 40)))
    manifest = write_built(root / "manifest.parquet", build_folders(images, progress=False))
    for split in ("train", "val", "test"):
        run_extraction(debug(manifest=str(manifest), out=str(root / "cache" / split), split=split, sd_model=str(sd),
                             device="cpu", chunk_samples=4, ensemble=2))
    run_training(train_debug(model="egre", train=str(root / "cache/train"), val=str(root / "cache/val"),
                             out=str(root / "run"), epochs=1))
    return root, sd


def test_score_new_images_equals_scoring_their_cached_features(pipeline):
    from lare2.detect import score_images
    root, sd = pipeline
    cache, from_cache, threshold = scored_test_cache(root)
    verdicts = {Path(v.path).name: v for v in score_images(root / "run", [root / "images/gen-x/test"])}
    assert sorted(verdicts) == sorted(Path(path).name for path in cache.column("path"))  # the same 4 images
    for path, p in zip(cache.column("path"), from_cache):
        v = verdicts[Path(path).name]
        assert v.error == "" and v.prompt.startswith("a photo of a ")
        assert v.p_fake == pytest.approx(float(p), abs=1e-4)
        assert v.fake == (v.p_fake > threshold)


def test_score_refuses_other_models_and_reports_bad_files(pipeline, tmp_path):
    from lare2.extract.models import load_latent_diffusion
    from lare2.extract.tiny_models import save_tiny_sd

    root, _ = pipeline
    other_sd = save_tiny_sd(tmp_path / "other-sd", seed=1)
    refused = CliRunner().invoke(app, ["score", str(root / "run"), str(root / "images/gen-x/test"), "--sd", str(other_sd)])
    assert refused.exit_code == 2 and "not those the detector was trained on" in refused.output
    # the one error line names the run and the weights at hand: the other SD's fingerprint, not the trained one's
    error = [line for line in refused.output.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and error[0].startswith(f"error: {root / 'run'}: ")
    assert load_latent_diffusion(other_sd).fingerprint in error[0]
    assert load_latent_diffusion(root / "tiny-sd").fingerprint not in error[0]

    (tmp_path / "broken.png").write_bytes(b"not a picture")
    (tmp_path / "fine.png").write_bytes(good_rgb(seed=3))
    result = CliRunner().invoke(app, ["score", str(root / "run"), str(tmp_path / "broken.png"), str(tmp_path / "fine.png"),
                                      "--json", "--out", str(tmp_path / "scores.csv")])
    assert result.exit_code == 0, result.output
    rows = {Path(r["path"]).name: r for r in json.loads(result.stdout.strip().splitlines()[-1])}
    assert rows["broken.png"]["p_fake"] is None and "not an image" in rows["broken.png"]["error"]
    assert 0.0 <= rows["fine.png"]["p_fake"] <= 1.0 and rows["fine.png"]["prompt"] == ""
    threshold = scored_test_cache(root)[2]
    broken = {"path": str(tmp_path / "broken.png"), "p_fake": None, "fake": None, "prompt": "",
              "error": "not an image Pillow can identify"}
    assert {k: rows["broken.png"][k] for k in broken} == broken
    assert rows["fine.png"]["fake"] is (rows["fine.png"]["p_fake"] > threshold) and rows["fine.png"]["error"] == ""
    assert (tmp_path / "scores.csv").read_text().count("\n") == 3
    with open(tmp_path / "scores.csv", newline="") as f:
        table = {Path(r["path"]).name: r for r in csv.DictReader(f)}
    assert sorted(table) == ["broken.png", "fine.png"]  # the CSV holds the JSON rows
    assert float(table["fine.png"]["p_fake"]) == pytest.approx(rows["fine.png"]["p_fake"], abs=1e-6)
    assert table["broken.png"]["p_fake"] == "" and table["broken.png"]["error"] == rows["broken.png"]["error"]


def test_eval_reads_the_test_cache_made_by_stage_1(pipeline, tmp_path):
    root, _ = pipeline
    result = CliRunner().invoke(app, ["eval", str(root / "run"), "--test", str(root / "cache/test"), "--report", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "report/metrics.json").read_text())
    text = json.dumps(metrics)
    assert "gen-x" in text and (tmp_path / "report/roc.png").exists()
    from lare2.train.metrics import detection_metrics

    cache, scores, threshold = scored_test_cache(root)
    labels = np.asarray(cache.column("label"))
    (row,) = metrics["rows"]  # one generator in one cache: the test split's 2 reals and 2 fakes
    assert row["generator"] == "gen-x" and row["cache"] == str(root / "cache/test")
    assert (row["n_real"], row["n_fake"]) == (2, 2) == (int((labels == 0).sum()), int((labels == 1).sum()))
    expected = detection_metrics(labels, scores, threshold)
    for key in ("acc", "ap", "auc", "acc@thr"):
        assert row[key] == pytest.approx(expected[key], abs=1e-6), key
    assert metrics["threshold"] == pytest.approx(threshold) and metrics["extraction_errors"] == {str(root / "cache/test"): 0}
