"""Perturbations (test conditions) and normalisation (debiasing) of stage 1's images: the chain
grammar, each operation against Pillow/numpy by hand, and what they do to caches, fingerprints,
``cache info`` and scoring new images."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter
from typer.testing import CliRunner

from lare2.shared.config import debug, identity_fingerprint
from lare2.shared.perturbations import NOISE_STREAM, Step, apply_chain, chain_text, parse_chain


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _image(width: int = 40, height: int = 30, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _jpeg_by_hand(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)  # Pillow's defaults: 4:2:0
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


# ---- the grammar -----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, canonical", [
    ("", ""), ("none", ""), (" None ", ""),
    ("jpeg:75", "jpeg:75"), ("JPEG:75.0", "jpeg:75"), ("blur:1.0", "blur:1"), ("resize:0.5", "resize:0.5"),
    ("jpeg:75 + resize:0.5", "jpeg:75+resize:0.5"), ("crop:0.8+noise:2.5+blur:0.7", "crop:0.8+noise:2.5+blur:0.7"),
])
def test_chain_text_is_canonical_and_round_trips(spec, canonical):
    steps = parse_chain(spec)
    assert chain_text(steps) == canonical
    assert parse_chain(chain_text(steps)) == steps
    assert [s.text for s in steps] == (canonical.split("+") if canonical else [])


def test_steps_keep_their_order_and_values():
    assert parse_chain("jpeg:75+resize:0.5") == (Step("jpeg", 75.0), Step("resize", 0.5))
    assert parse_chain("jpeg:96+size:512", allow_size=True) == (Step("jpeg", 96), Step("size", 512))


@pytest.mark.parametrize("spec, bad_part, expected", [
    ("jpeg:500", "jpeg:500", "1-100"),
    ("jpeg:0", "jpeg:0", "1-100"),
    ("jpeg:75.5", "jpeg:75.5", "integer"),
    ("jpeg", "jpeg", "jpeg:Q"),
    ("blur:0", "blur:0", "> 0"),
    ("resize:1.5", "resize:1.5", "(0, 1]"),
    ("crop:0", "crop:0", "(0, 1]"),
    ("noise:abc", "noise:abc", "(0, 255]"),
    ("noise:nan", "noise:nan", "(0, 255]"),
    ("jpeg:75+sharpen:2", "sharpen:2", "jpeg, blur, resize, crop, noise"),
    ("jpeg:75+", "''", "KIND:VALUE"),
    ("size:512", "size:512", "--normalize"),
])
def test_bad_parts_are_refused_naming_the_option_the_part_and_the_choices(spec, bad_part, expected):
    with pytest.raises(ValueError) as err:
        parse_chain(spec, what="--perturb")
    message = str(err.value)
    assert message.startswith(f"--perturb {spec!r}: ") and bad_part in message and expected in message, message
    assert "\n" not in message


def test_size_is_for_normalisation_only_and_checked():
    assert parse_chain("size:64", allow_size=True) == (Step("size", 64),)
    with pytest.raises(ValueError, match=r"--normalize 'size:4'.*size:N with N .*>= 8"):
        parse_chain("size:4", allow_size=True, what="--normalize")


# ---- each operation, by hand ----------------------------------------------------------------------------
def test_each_operation_equals_pillow_and_numpy_by_hand():
    image = _image(40, 30)
    by_hand = {
        "jpeg:50": _jpeg_by_hand(image, 50),
        "blur:1.5": image.filter(ImageFilter.GaussianBlur(radius=1.5)),
        "resize:0.5": image.resize((20, 15), Image.BICUBIC).resize((40, 30), Image.BICUBIC),
        "crop:0.5": image.crop((10, 7, 30, 22)),
        # short side 30 -> 16, long side round(40 * 16 / 30) = 21, centre crop from left (21 - 16) // 2 = 2
        "size:16": image.resize((21, 16), Image.BICUBIC).crop((2, 0, 18, 16)),
    }
    rng = np.random.default_rng([7, NOISE_STREAM, 0])
    noisy = np.asarray(image, dtype=np.float64) + rng.normal(0.0, 10.0, size=(30, 40, 3))
    by_hand["noise:10"] = Image.fromarray(np.clip(np.round(noisy), 0, 255).astype(np.uint8))
    for spec, expected in by_hand.items():
        got = apply_chain(image, parse_chain(spec, allow_size=True), seed=7)
        assert got.mode == "RGB" and got.size == expected.size, spec
        np.testing.assert_array_equal(_pixels(got), _pixels(expected), err_msg=spec)
        if spec != "crop:0.5":
            assert not np.array_equal(_pixels(got)[:15, :16], _pixels(image)[:15, :16]), f"{spec} changed nothing"
    assert apply_chain(image, (), seed=7) is image  # the empty chain is the identity


def test_chains_apply_their_steps_in_order():
    image = _image(48, 36, seed=1)
    halved = _jpeg_by_hand(image, 100).resize((24, 18), Image.BICUBIC).resize((48, 36), Image.BICUBIC)
    np.testing.assert_array_equal(_pixels(apply_chain(image, parse_chain("jpeg:100+resize:0.5"), seed=0)),
                                  _pixels(halved))
    swapped = apply_chain(image, parse_chain("resize:0.5+jpeg:100"), seed=0)
    assert not np.array_equal(_pixels(swapped), _pixels(halved))

    # blur, then noise as step 1 of the chain (its position picks its stream), then a 3/4 centre crop
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(radius=1.0)), dtype=np.float64)
    noisy = blurred + np.random.default_rng([3, NOISE_STREAM, 1]).normal(0.0, 4.0, size=blurred.shape)
    expected = Image.fromarray(np.clip(np.round(noisy), 0, 255).astype(np.uint8)).crop((6, 4, 42, 31))
    got = apply_chain(image, parse_chain("blur:1+noise:4+crop:0.75"), seed=3)
    np.testing.assert_array_equal(_pixels(got), _pixels(expected))


def test_noise_is_deterministic_per_seed_and_differs_across_seeds_and_steps():
    image, steps = _image(), parse_chain("noise:8")
    first, again, other = (_pixels(apply_chain(image, steps, seed=s)) for s in (11, 11, 12))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    twice = _pixels(apply_chain(image, parse_chain("noise:8+noise:8"), seed=11))
    once_more = _pixels(apply_chain(Image.fromarray(first.astype(np.uint8)), steps, seed=11))
    assert not np.array_equal(twice, once_more)  # the second step draws from its own stream


# ---- config: canonical, identity, fingerprint -----------------------------------------------------------
def test_config_stores_canonical_chains_and_identity_only_when_set():
    from lare2.shared.settings import SettingsError

    clean = debug(manifest="m.parquet")
    perturbed = debug(manifest="m.parquet", perturb="JPEG:50.0")
    normalised = debug(manifest="m.parquet", normalize="jpeg:96 + size:512")
    assert (perturbed.perturb, normalised.normalize) == ("jpeg:50", "jpeg:96+size:512")
    fingerprints = {"sd": "s" * 16, "backbone": "b" * 16}
    assert "perturb" not in clean.identity(fingerprints) and "normalize" not in clean.identity(fingerprints)
    assert perturbed.identity(fingerprints)["perturb"] == "jpeg:50"
    fp = {name: identity_fingerprint(c.identity(fingerprints)) for name, c in
          (("clean", clean), ("perturbed", perturbed), ("normalised", normalised))}
    assert fp["perturbed"] == fp["clean"] != fp["normalised"]
    with pytest.raises(SettingsError, match=r"perturb 'size:512'.*--normalize"):
        debug(manifest="m.parquet", perturb="size:512")
    with pytest.raises(SettingsError, match=r"normalize 'png:1'"):
        debug(manifest="m.parquet", normalize="png:1")


# ---- stage 1 end to end ------------------------------------------------------------------------------
def _write_tree(root: Path) -> None:
    """PNG reals and JPEG-q75 fakes (GenImage's bias) in train and val, GenImage-style names (class prompts)."""
    for split, count in (("train", 6), ("val", 4)):
        for i in range(count):
            real = i % 2 == 0
            folder = root / "gen-x" / split / ("0_real" if real else "1_fake")
            folder.mkdir(parents=True, exist_ok=True)
            image = _image(40 + 3 * i, 36 + 2 * i, seed=100 * (split == "val") + i)
            image.save(folder / f"{i % 3 + 1}_{split}_{i}.{'png' if real else 'jpg'}",
                       **({} if real else {"quality": 75}))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from lare2.extract.run import run_extraction
    from lare2.shared.manifest import build_folders, write_built

    tmp = tmp_path_factory.mktemp("perturb")
    _write_tree(tmp / "images")
    manifest = write_built(tmp / "manifest.parquet", build_folders(tmp / "images", progress=False))
    configs = {
        "clean": _config(manifest, tmp / "clean"),
        "jpeg50": _config(manifest, tmp / "jpeg50", perturb="jpeg:50"),
        "norm": _config(manifest, tmp / "norm", normalize="jpeg:96"),
    }
    for cfg in configs.values():
        run_extraction(cfg)
    return tmp, manifest, configs


def _config(manifest: Path, out: Path, split: str = "train", **overrides):
    return debug(manifest=str(manifest), out=str(out), split=split, device="cpu", chunk_samples=4, batch_size=3,
                 ensemble=2, **overrides)


def test_a_perturbed_cache_matches_the_clean_one_but_its_features(world):
    from lare2.shared.cache import FeatureCache
    from lare2.train.data import extraction_fingerprint

    _, _, configs = world
    clean, perturbed, normalised = (FeatureCache.open(configs[k].out) for k in ("clean", "jpeg50", "norm"))
    for column in ("sample_id", "seed", "status", "path", "label"):
        assert list(perturbed.column(column)) == list(clean.column(column)), column
    assert set(clean.column("status")) == {"ok"}
    a, b = clean.read(slice(None)), perturbed.read(slice(None))
    for name in ("lare", "pooled"):
        assert np.isfinite(b[name]).all()
        assert not np.allclose(a[name].astype(np.float32), b[name].astype(np.float32), atol=1e-3), name
    assert perturbed.attrs["extract_config"]["perturb"] == "jpeg:50"
    assert perturbed.attrs["identity"]["perturb"] == "jpeg:50" and "perturb" not in clean.attrs["identity"]
    # scorable by a detector trained on clean features; a normalised cache is not
    assert extraction_fingerprint(perturbed) == extraction_fingerprint(clean) != extraction_fingerprint(normalised)


def test_recomputation_applies_the_caches_own_perturbation(world):
    from lare2.extract.run import recompute_samples
    from lare2.shared.cache import FeatureCache

    _, _, configs = world
    stored = FeatureCache.open(configs["jpeg50"].out).read([0, 4])
    recomputed = recompute_samples(configs["jpeg50"].out, [0, 4], device="cpu")
    for name in ("lare", "pooled", "fmap"):
        np.testing.assert_array_equal(recomputed[name], stored[name])


def test_normalize_feeds_both_labels_a_jpeg_q96_reencode(world):
    from lare2.extract.images import backbone_input, lare_input
    from lare2.extract.loader import ManifestImages
    from lare2.shared.cache import FeatureCache

    tmp, _, configs = world
    cfg = configs["norm"]
    cache = FeatureCache.open(cfg.out)
    dataset = ManifestImages(tmp / "images", cache.column("path"), cfg.image_size, cfg.max_image_pixels,
                             steps=cfg.image_steps(), sample_ids=cache.column("sample_id"), run_seed=cfg.seed)
    formats = set()
    for index, path in enumerate(cache.column("path")):
        with Image.open(tmp / "images" / path) as source:
            formats.add((int(cache.column("label")[index]), source.format))
            buffer = io.BytesIO()
            source.convert("RGB").save(buffer, format="JPEG", quality=96)
        with Image.open(io.BytesIO(buffer.getvalue())) as reencoded:
            assert reencoded.format == "JPEG"
            expected = reencoded.convert("RGB")
        np.testing.assert_array_equal(_pixels(dataset.image(index)), _pixels(expected), err_msg=path)
        sample = dataset[index]
        assert sample.error == ""
        np.testing.assert_array_equal(sample.lare_image.numpy(), lare_input(expected, cfg.image_size).numpy())
        np.testing.assert_array_equal(sample.backbone_image.numpy(), backbone_input(expected).numpy())
    assert formats == {(0, "PNG"), (1, "JPEG")}  # the bias the normalisation removes


@pytest.mark.parametrize("key, overrides", [("normalize", {"normalize": "jpeg:96"}),
                                            ("perturb", {"perturb": "blur:1"})])
def test_extracting_into_a_cache_of_another_chain_is_refused_naming_it(world, key, overrides):
    from lare2.extract.run import run_extraction
    from lare2.shared.cache import CacheError

    tmp, manifest, _ = world
    with pytest.raises(CacheError, match=rf"{key}: cache has none, this run '"):
        run_extraction(_config(manifest, tmp / "clean", **overrides))


def test_cache_info_shows_the_perturbation(world):
    from lare2.cli import app

    _, _, configs = world
    text = CliRunner().invoke(app, ["cache", "info", configs["jpeg50"].out])
    assert text.exit_code == 0, text.output
    assert "images: perturb jpeg:50, normalize none" in text.output
    report = json.loads(CliRunner().invoke(app, ["cache", "info", configs["norm"].out, "--json"]).stdout)
    assert (report["perturb"], report["normalize"]) == ("none", "jpeg:96")


@pytest.mark.parametrize("option, spec, fragment", [
    ("--perturb", "jpeg:500", "--perturb 'jpeg:500': bad part 'jpeg:500'"),
    ("--perturb", "size:256", "--perturb 'size:256'"),
    ("--normalize", "png:9", "--normalize 'png:9': bad part 'png:9'"),
])
def test_cli_refuses_a_bad_chain_in_one_line(world, option, spec, fragment):
    from lare2.cli import app

    tmp, manifest, _ = world
    result = CliRunner().invoke(app, ["extract", "--manifest", str(manifest), "--split", "train", "--preset", "debug",
                                      "--out", str(tmp / "never"), option, spec])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], result.output
    assert "Traceback" not in result.output and not (tmp / "never").exists()


def test_a_run_scores_new_images_with_its_normalisation_never_a_perturbation(world, caplog):
    """Train on normalised features with a perturbed validation cache (same fingerprint): scoring the training
    images applies the normalisation (equal to the cache's scores), not the validation perturbation."""
    from lare2 import Detector
    from lare2.extract.run import run_extraction
    from lare2.shared.cache import FeatureCache
    from lare2.train.scoring import score_features
    from lare2.train.config import debug as train_debug
    from lare2.train.trainer import run_training

    tmp, manifest, configs = world
    val = _config(manifest, tmp / "val-norm-jpeg50", split="val", normalize="jpeg:96", perturb="jpeg:50")
    run_extraction(val)
    import logging

    with caplog.at_level(logging.WARNING):
        run_training(train_debug(model="egre", train=configs["norm"].out, val=val.out, out=str(tmp / "run"), epochs=1))
    assert any("validation images perturbed 'jpeg:50', training images 'none'" in r.getMessage()
               for r in caplog.records)
    detector = Detector.from_run(tmp / "run", device="cpu", num_workers=0)
    assert (detector.extraction.perturb, detector.extraction.normalize) == ("", "jpeg:96")

    cache = FeatureCache.open(configs["norm"].out)
    arrays = cache.read(slice(None))
    expected = score_features(detector.model, arrays["pooled"], arrays["fmap"], arrays["lare"]).numpy()
    results = detector.score([tmp / "images" / p for p in cache.column("path")])
    assert [r.status for r in results] == ["ok"] * len(cache)
    np.testing.assert_allclose([r.p_fake for r in results], expected, atol=1e-5)

    # a heatmap is drawn over the image the maps come from: the normalised one (size:N changes its geometry)
    import dataclasses

    import lare2.heatmaps

    drawn = []
    detector.extraction = dataclasses.replace(detector.extraction, normalize="jpeg:96+size:16")
    original = lare2.heatmaps.render_heatmap
    lare2.heatmaps.render_heatmap = lambda image, *args, **kwargs: drawn.append(image.size) or {}
    try:
        detector.heatmap(results[0], tmp / "heat.png")
    finally:
        lare2.heatmaps.render_heatmap = original
    assert drawn == [(16, 16)]


def test_noise_drawn_in_row_blocks_equals_one_whole_image_draw(monkeypatch):
    import numpy as np
    from PIL import Image

    import lare2.shared.perturbations as perturbations

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 23, 3), dtype=np.uint8))
    rng = np.random.default_rng([5, perturbations.NOISE_STREAM, 1])
    noisy = np.round(np.asarray(image, np.float64) + rng.normal(0.0, 4.0, (37, 23, 3)))
    whole_HW3 = np.clip(noisy, 0, 255).astype(np.uint8)
    monkeypatch.setattr(perturbations, "NOISE_BLOCK_VALUES", 23 * 3 * 4)  # 4 rows at a time, the last block short
    np.testing.assert_array_equal(np.asarray(perturbations.add_noise(image, 4.0, 5, 1)), whole_HW3)
