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
from tests.helpers.bad_images import GALLERY, good_rgb

pytestmark = pytest.mark.slow


def image_seed(split: str, index: int) -> int:
    """The same pixels on every run (``hash()`` of a str is salted per process)."""
    return zlib.crc32(f"{split}/{index}".encode()) % 1000


def scored_test_cache(root: Path) -> tuple[FeatureCache, np.ndarray, float]:
    """The stage-1 test cache, the trained detector's p(fake) of each of its samples, and its threshold."""
    from lare2.train.checkpoint import load_detector
    from lare2.train.scoring import score_features

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
            image = good_rgb(seed=image_seed(split, i), size=(32 + i, 40))
            (folder / f"{i % 5 + 1}_{split}_{i}.png").write_bytes(image)
    manifest = write_built(root / "manifest.parquet", build_folders(images, progress=False))
    for split in ("train", "val", "test"):
        # classless_prompt=refuse (the paper's rule, not debug's): images without a class are error rows when scored
        run_extraction(debug(manifest=str(manifest), out=str(root / "cache" / split), split=split, sd=str(sd),
                             device="cpu", chunk_samples=4, ensemble=2, classless_prompt="refuse"))
    run_training(train_debug(model="egre", train=str(root / "cache/train"), val=str(root / "cache/val"),
                             out=str(root / "run"), epochs=1))
    return root, sd


@pytest.fixture(scope="module")
def detector(pipeline):
    from lare2 import Detector

    root, _ = pipeline
    return Detector.from_run(root / "run", device="cpu", num_workers=0)


def cached_scores(root: Path) -> dict[str, float]:
    """File name -> p(fake) of the test cache's samples, as `extract` + `eval` score them."""
    cache, scores, _ = scored_test_cache(root)
    return {Path(path).name: float(p) for path, p in zip(cache.column("path"), scores)}


def test_a_folder_of_good_and_bad_files_scores_like_the_cache(pipeline, tmp_path):
    import shutil

    root, _ = pipeline
    folder = tmp_path / "mixed"
    shutil.copytree(root / "images/gen-x/test", folder)
    bad = {"zero_byte.png": (GALLERY["zero_byte.png"][0], "empty file"),
           "truncated.jpg": (GALLERY["truncated.jpg"][0], "cannot decode"),
           "text_named.jpg": (b"this is a text file, not a picture\n" * 4, "not an image Pillow can identify"),
           "bomb.png": (GALLERY["bomb.png"][0], "decompression bomb")}
    for name, (data, _) in bad.items():
        (folder / name).write_bytes(data)
    (folder / "notes.txt").write_text("not scored")
    out = tmp_path / "rows.csv"
    result = CliRunner().invoke(app, ["score", str(root / "run"), str(folder), "--device", "cpu", "-o", str(out),
                                      "--heatmaps", str(tmp_path / "heat"), "--workers", "2"])
    assert result.exit_code == 1, result.output  # some rows are errors
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    good = cached_scores(root)
    from lare2.shared.manifest.sources import files_under
    # input order
    assert [r["path"] for r in rows] == [str(p) for p in files_under(folder) if p.suffix in (".png", ".jpg")]
    assert len(rows) == len(good) + len(bad)
    threshold = scored_test_cache(root)[2]
    for r in rows:
        name = Path(r["path"]).name
        if name in bad:
            assert (r["status"], r["p_fake"], r["is_fake"]) == ("error", "", "") and bad[name][1] in r["error"], r
        else:
            assert r["status"] == "ok" and r["error"] == "" and r["prompt"].startswith("a photo of a ")
            assert float(r["p_fake"]) == pytest.approx(good[name], abs=1e-5)
            assert r["is_fake"] == str(float(r["p_fake"]) > threshold)
            assert float(r["threshold"]) == pytest.approx(threshold)
    assert "scored 4 of 8 images" in result.stderr and "4 errors" in result.stderr
    assert "skipped 1 file without an image name" in result.stderr and "notes.txt" in result.stderr
    from PIL import Image

    from lare2.heatmaps import heatmap_pixels
    pngs = sorted((tmp_path / "heat").iterdir())
    # one per ok row, named by row index and stem, and named in the row
    assert [r["heatmap"] for r in rows] == [str(tmp_path / "heat" / f"{i:04d}-{Path(r['path']).stem}.png")
                                            if r["status"] == "ok" else "" for i, r in enumerate(rows)]
    assert pngs == sorted(Path(r["heatmap"]) for r in rows if r["heatmap"])
    for png in pngs:
        with Image.open(png) as im:
            assert im.size == heatmap_pixels()


def test_paths_pil_images_and_bytes_score_alike_in_any_batch(pipeline, detector, tmp_path):
    from PIL import Image

    from lare2 import Detector
    root, _ = pipeline
    paths = sorted((root / "images/gen-x/test").rglob("*.png"))
    from_paths = detector.score(paths)
    from_pil = detector.score([Image.open(p) for p in paths])
    from_bytes = detector.score([p.read_bytes() for p in paths], class_name="goldfish")
    one_by_one = Detector.from_run(root / "run", device="cpu", batch_size=1, num_workers=2).score(paths)
    good = cached_scores(root)
    for path, a, b, c in zip(paths, from_paths, from_pil, one_by_one):
        assert a.status == b.status == c.status == "ok"
        assert a.p_fake == pytest.approx(good[path.name], abs=1e-5)
        assert b.p_fake == pytest.approx(a.p_fake, abs=1e-6) and c.p_fake == pytest.approx(a.p_fake, abs=1e-5)
        assert a.prompt == b.prompt and b.path == str(path)
    assert all(r.prompt == "a photo of a goldfish" and r.path == f"<bytes {i}>" for i, r in enumerate(from_bytes))
    copies = [tmp_path / f"copy_{i}.png" for i in range(len(paths))]  # same bytes, other names: an explicit class
    for path, copy in zip(paths, copies):
        copy.write_bytes(path.read_bytes())
    renamed = detector.score(copies, class_name="goldfish")
    assert [r.p_fake for r in renamed] == pytest.approx([r.p_fake for r in from_bytes], abs=1e-6)
    assert detector.score(copies)[0].status == "error"  # without one, a name that is not GenImage-style has no class
    one = detector.score_image(Image.open(paths[0]).convert("RGB"))  # no file behind it: seeded from its pixels
    assert one.status == "error" and "no ImageNet class" in one.error and "in-memory image" in one.error
    assert 0.0 <= detector.score_image(Image.open(paths[0]).convert("RGB"), class_name="goldfish").p_fake <= 1.0


def test_class_prompts_need_a_class_unless_auto(pipeline, tmp_path):
    from lare2 import Detector
    from lare2.extract.clip_text import load_text_tower, tokenize, zero_shot_input
    from lare2.extract.images import decode_rgb
    from lare2.shared.classnames import class_name
    from tests.extract.test_clip_text import write_two_tower_clip

    root, _ = pipeline
    nameless = tmp_path / "holiday.png"
    nameless.write_bytes((next((root / "images/gen-x/test").rglob("*.png"))).read_bytes())
    refused = CliRunner().invoke(app, ["score", str(root / "run"), str(nameless), "--device", "cpu", "--json"])
    assert refused.exit_code == 1
    (row,) = json.loads(refused.stdout)
    assert row["status"] == "error" and "'holiday.png' is not a GenImage-style file name" in row["error"]
    no_tower = CliRunner().invoke(app, ["score", str(root / "run"), str(nameless), "--device", "cpu",
                                        "--class-name", "auto"])
    assert no_tower.exit_code == 2 and "text tower" in no_tower.stderr

    clip = write_two_tower_clip(tmp_path / "clip.pt", seed=2)  # the same image tower as the run's ``tiny``
    det = Detector.from_run(root / "run", clip=str(clip), device="cpu", num_workers=0)
    auto = det.score([nameless], class_name="auto")[0]
    # the zero-shot argmax, computed directly from the two towers
    tower, tokenizer = load_text_tower(clip), det.models.lare.model.tokenizer
    ids, eot = tokenize(tokenizer, [f"a photo of a {class_name(i)}" for i in range(1000)], 77)
    import torch
    with torch.no_grad():
        text = torch.nn.functional.normalize(tower(ids, eot), dim=-1)
        image = det.models.backbone(zero_shot_input(decode_rgb(nameless.read_bytes()))[None]).pooled
    best = int((torch.nn.functional.normalize(image, dim=-1) @ text.T).argmax())
    assert auto.status == "ok" and auto.prompt == f"a photo of a {class_name(best)}"
    # auto ignores file names: the GenImage-named original scores the same with it
    original = next((root / "images/gen-x/test").rglob("*.png"))
    assert det.score([original], class_name="auto")[0].p_fake == pytest.approx(auto.p_fake, abs=1e-6)


def test_attention_and_heatmap(pipeline, detector, tmp_path):
    from PIL import Image

    from lare2.heatmaps import heatmap_pixels
    from lare2.shared.cache.plots import show_figure_pixels
    root, _ = pipeline
    path = sorted((root / "images/gen-x/test").rglob("*.png"))[0]
    result = detector.score([path])[0]
    assert result.attention.shape == (14, 14) and result.attention.sum() == pytest.approx(1.0, abs=1e-5)
    assert (result.attention >= 0).all() and result.lare.shape == (4, 32, 32)
    shown = detector.heatmap(result, tmp_path / "heat.png")
    with Image.open(tmp_path / "heat.png") as im:
        assert im.size == heatmap_pixels() == tuple(shown["pixels"])
    error_row = detector.score([b""])[0]
    with pytest.raises(ValueError, match="not scored"):
        detector.heatmap(error_row, tmp_path / "none.png")

    cache = FeatureCache.open(root / "cache/test")
    shown = CliRunner().invoke(app, ["cache", "show", str(root / "cache/test"), cache.column("sample_id")[0],
                                     "--png", str(tmp_path / "sample.png"), "--run", str(root / "run")])
    assert shown.exit_code == 0, shown.output
    with Image.open(tmp_path / "sample.png") as im:
        assert im.size == show_figure_pixels(1 + 4 + 1)  # image, 4 LaRE channels, attention


def test_one_egre_pass_per_batch_gives_the_plain_forwards_p_fake_and_attention(pipeline, detector):
    """Scoring runs EGRE once per batch, and its p(fake) and attention equal the model's plain forward and
    ``spatial_attention`` on the same features (the two passes scoring made before), to 1e-6."""
    import torch

    from lare2 import Detector
    from lare2.detect import ScoreInputs, collate_scored
    from lare2.extract.features import compute_images
    from lare2.shared.seeding import sample_seed
    from lare2.train.scoring import score_features

    root, _ = pipeline
    paths = sorted((root / "images/gen-x/test").rglob("*.png"))
    model, extraction, models = detector.model, detector.extraction, detector.models
    batch_size = 3  # the 4 test images in two batches
    scorer = Detector(model, detector.config, extraction, models, detector.device, batch_size=batch_size,
                      num_workers=0)
    passes: list[int] = []
    hook = model.attn_pool.register_forward_hook(lambda *_: passes.append(1))
    try:
        results = scorer.score(paths)
    finally:
        hook.remove()
    assert len(passes) == -(-len(paths) // batch_size) == 2
    assert all(r.status == "ok" for r in results)

    # the same features, batch by batch, through the model's plain forward and its attention method
    dataset = ScoreInputs(paths, extraction.image_size, extraction.max_image_pixels, False,
                          steps=extraction.normalize_steps(), run_seed=extraction.seed)
    for start in range(0, len(paths), batch_size):
        rows = range(start, min(start + batch_size, len(paths)))
        batch, _ = collate_scored([dataset[i] for i in rows])
        arrays = compute_images(models, batch.lare_images, batch.backbone_images, [results[i].prompt for i in rows],
                                [sample_seed(extraction.seed, key) for key in batch.keys], detector.device)
        stored = {name: a.astype(models.layout.dtype(name)).astype(np.float32) for name, a in arrays.items()}
        p_fake = score_features(model, stored["pooled"], stored["fmap"], stored["lare"]).numpy()
        with torch.no_grad():
            attention = model.spatial_attention(torch.from_numpy(stored["fmap"]), torch.from_numpy(stored["lare"]))
        for k, i in enumerate(rows):
            assert results[i].p_fake == pytest.approx(float(p_fake[k]), abs=1e-6)
            np.testing.assert_allclose(results[i].attention, attention[k].numpy(), rtol=0, atol=1e-6)
            np.testing.assert_array_equal(results[i].lare, stored["lare"][k])


def test_score_refuses_other_models_and_bad_usage(pipeline, tmp_path):
    from lare2.extract.models import load_latent_diffusion
    from lare2.extract.tiny_models import save_tiny_sd

    root, _ = pipeline
    other_sd = save_tiny_sd(tmp_path / "other-sd", seed=1)
    refused = CliRunner().invoke(app, ["score", str(root / "run"), str(root / "images/gen-x/test"),
                                       "--sd", str(other_sd)])
    assert refused.exit_code == 2 and "not those the detector was trained on" in refused.output
    # the one error line names the run, the weights at hand and the ones the run expects
    error = [line for line in refused.output.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and error[0].startswith(f"error: {root / 'run'}: ")
    have, expected = error[0].split("expected")
    assert load_latent_diffusion(other_sd).fingerprint in have
    assert load_latent_diffusion(root / "tiny-sd").fingerprint in expected
    # a bad --out is refused before anything is scored, and nothing is written
    for out, why in ((tmp_path / "nodir" / "v.csv", "no folder"), (tmp_path / "v.xlsx", "must end in")):
        bad = CliRunner().invoke(app, ["score", str(root / "run"), str(root / "images/gen-x/test"), "-o", str(out)])
        assert bad.exit_code == 2 and why in bad.stderr and not out.exists() and "scored" not in bad.stderr


def test_rows_reach_the_file_as_they_are_scored(tmp_path):
    from lare2.detect import ROW_FIELDS
    from lare2.score_cli import RowWriter

    for suffix in (".csv", ".json", ".jsonl"):
        path = tmp_path / f"rows{suffix}"
        writer = RowWriter(path, ROW_FIELDS)
        row = dict(path="a.png", p_fake=0.25, is_fake=False, threshold=0.5, prompt="", status="ok", error="")
        writer.write(row)
        assert "a.png" in path.read_text()  # on disk before the next row, let alone the end
        writer.write({**row, "path": "b.png"})
        writer.close()
        text = path.read_text()
        rows = (list(csv.DictReader(text.splitlines())) if suffix == ".csv" else json.loads(text) if suffix == ".json"
                else [json.loads(line) for line in text.splitlines()])
        assert [r["path"] for r in rows] == ["a.png", "b.png"]


def test_training_on_class_prompts_warns():
    from lare2.train.trainer import class_prompt_warning

    refused = {"prompt_mode": "class", "prompt_template": "a photo of a {}", "classless_prompt": "refuse"}
    assert "--class-name auto" in class_prompt_warning(refused)
    # a cache from before classless_prompt: its classless rows got the empty prompt, and so will scoring
    assert "classless_prompt=empty" in class_prompt_warning({"prompt_mode": "class"})
    assert class_prompt_warning({"prompt_mode": "empty"}) == ""


def test_eval_reads_the_test_cache_made_by_stage_1(pipeline, tmp_path):
    root, _ = pipeline
    result = CliRunner().invoke(app, ["eval", str(root / "run"), "--test", str(root / "cache/test"),
                                      "--report", str(tmp_path / "report")])
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
    assert metrics["threshold"] == pytest.approx(threshold)
    assert metrics["extraction_errors"] == {str(root / "cache/test"): 0}
