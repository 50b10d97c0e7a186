"""Stage 1 -> stage 2 -> scoring new images, with tiny models: the pieces agree with each other."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lare2.cli import app
from lare2.shared.cache import FeatureCache
from lare2.shared.config import debug
from tests.bad_images import good_rgb

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from lare2.extract.models import save_tiny_sd
    from lare2.extract.run import run_extraction
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
            (folder / f"{i % 5 + 1}_{split}_{i}.png").write_bytes(good_rgb(seed=hash((split, i)) % 1000, size=(32 + i, 40)))
    manifest = write_built(root / "manifest.parquet", build_folders(images, progress=False))
    for split in ("train", "val", "test"):
        run_extraction(debug(manifest=str(manifest), out=str(root / "cache" / split), split=split, sd_model=str(sd),
                             device="cpu", chunk_samples=4, ensemble=2))
    run_training(train_debug(model="egre", train=str(root / "cache/train"), val=str(root / "cache/val"),
                             out=str(root / "run"), epochs=1))
    return root, sd


def test_score_new_images_equals_scoring_their_cached_features(pipeline):
    from lare2.extract.score import score_images
    from lare2.train.checkpoint import load_detector, score_features

    root, sd = pipeline
    cache = FeatureCache.open(root / "cache/test")
    verdicts = {Path(v.path).name: v for v in score_images(root / "run", [root / "images/gen-x/test"])}
    model, detector = load_detector(root / "run")
    arrays = cache.read(slice(None))
    from_cache = score_features(model, arrays["pooled"], arrays["fmap"], arrays["lare"]).numpy()
    for path, p in zip(cache.column("path"), from_cache):
        v = verdicts[Path(path).name]
        assert v.error == "" and v.prompt.startswith("a photo of a ")
        assert v.p_fake == pytest.approx(float(p), abs=1e-4)
        assert v.fake == (v.p_fake > detector.threshold)


def test_score_refuses_other_models_and_reports_bad_files(pipeline, tmp_path):
    from lare2.extract.models import save_tiny_sd

    root, _ = pipeline
    other_sd = save_tiny_sd(tmp_path / "other-sd", seed=1)
    refused = CliRunner().invoke(app, ["score", str(root / "run"), str(root / "images/gen-x/test"), "--sd", str(other_sd)])
    assert refused.exit_code == 2 and "not those the detector was trained on" in refused.output

    (tmp_path / "broken.png").write_bytes(b"not a picture")
    (tmp_path / "fine.png").write_bytes(good_rgb(seed=3))
    result = CliRunner().invoke(app, ["score", str(root / "run"), str(tmp_path / "broken.png"), str(tmp_path / "fine.png"),
                                      "--json", "--out", str(tmp_path / "scores.csv")])
    assert result.exit_code == 0, result.output
    rows = {Path(r["path"]).name: r for r in json.loads(result.stdout.strip().splitlines()[-1])}
    assert rows["broken.png"]["p_fake"] is None and "not an image" in rows["broken.png"]["error"]
    assert 0.0 <= rows["fine.png"]["p_fake"] <= 1.0 and rows["fine.png"]["prompt"] == ""
    assert (tmp_path / "scores.csv").read_text().count("\n") == 3


def test_eval_reads_the_test_cache_made_by_stage_1(pipeline, tmp_path):
    root, _ = pipeline
    result = CliRunner().invoke(app, ["eval", str(root / "run"), "--test", str(root / "cache/test"), "--report", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "report/metrics.json").read_text())
    text = json.dumps(metrics)
    assert "gen-x" in text and (tmp_path / "report/roc.png").exists()
