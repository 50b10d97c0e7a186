"""Augmented training views (``lare2 extract --views K``) and training on them.

Stage 1: each augmentation is what Pillow/numpy give by hand for the same draws; the draws follow the
documented order; views are the same whatever the batch size, the number of processes, or a resume;
the evaluation view of a views cache is a plain cache's features bit for bit. Stage 2: one view per
sample per epoch, picked by (seed, epoch, sample id) alone, in the order a plain split would serve.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from lare2.extract.augment import (
    BLUR_KERNELS,
    VIEW_STREAM,
    ViewDraws,
    apply_view,
    draw_view,
    view_inputs,
    view_pixels,
    view_rng,
)
from lare2.extract.images import backbone_input, imagenet_normalised, reflect_pad
from lare2.shared.cache import ARRAY_NAMES, CacheError, CacheLayout, FeatureCache
from lare2.shared.config import debug, identity_fingerprint
from lare2.train.data import CacheSplit, ReadSettings, view_choice
from tests.helpers.bad_images import good_rgb, truncated

K = 3
TRAIN_SIZES = [(300, 260), (230, 240), (64, 48), (250, 300), (100, 230), (40, 36), (320, 224), (90, 80), (224, 260)]
SETTINGS = {"image_size": 64, "ensemble": 1, "chunk_samples": 3, "num_workers": 0}
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _pixels(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _draws(**changes) -> ViewDraws:
    base = dict(top=0, left=0, operation="none", quality=75, kernel=3, variance=5.0, quarters=0, flip=False)
    return ViewDraws(**{**base, **changes})


# ---- the draws ------------------------------------------------------------------------------------
def test_draws_follow_the_documented_order():
    for seed, view, (height, width) in [(0, 0, (224, 224)), (7, 2, (300, 260)), (2**62 + 5, 1, (231, 500))]:
        got = draw_view(view_rng(seed, view), height, width)
        rng = np.random.default_rng([seed, VIEW_STREAM, view])
        top, left = rng.integers(0, height - 223), rng.integers(0, width - 223)
        apply, which, quality = rng.random() < 0.5, rng.integers(0, 4), rng.integers(50, 96)
        kernel, variance = (3, 5, 7)[rng.integers(0, 3)], rng.uniform(3.0, 10.0)
        rotate, quarters, flip = rng.random() < 0.33, rng.integers(1, 4), rng.random() < 0.33
        assert got == ViewDraws(top=int(top), left=int(left),
                                operation=("jpeg", "blur", "noise", "grey")[which] if apply else "none",
                                quality=int(quality), kernel=kernel, variance=float(variance),
                                quarters=int(quarters) if rotate else 0, flip=bool(flip))


def test_draws_have_the_reference_probabilities_and_ranges():
    draws = [draw_view(view_rng(seed, view), 260, 300) for seed in range(1000) for view in range(4)]
    n = len(draws)
    ops = [d.operation for d in draws]
    assert abs(ops.count("none") / n - 0.5) < 0.03
    for op in ("jpeg", "blur", "noise", "grey"):
        assert abs(ops.count(op) / n - 0.125) < 0.02, op
    assert abs(sum(d.quarters > 0 for d in draws) / n - 0.33) < 0.03
    assert abs(sum(d.flip for d in draws) / n - 0.33) < 0.03
    assert {d.quarters for d in draws} == {0, 1, 2, 3} and {d.kernel for d in draws} == {3, 5, 7}
    assert {d.quality for d in draws} == set(range(50, 96))
    assert 3.0 <= min(d.variance for d in draws) < 3.1 and 9.9 < max(d.variance for d in draws) <= 10.0
    assert {d.top for d in draws} == set(range(0, 260 - 224 + 1)) and max(d.left for d in draws) == 300 - 224


# ---- each augmentation, by hand -----------------------------------------------------------------
def test_the_crop_is_of_the_reflect_101_padded_full_resolution_image():
    small = _pixels(1, 150, 190)  # padded by 74 rows (37 + 37) and 34 columns (17 + 17), edge pixel not repeated
    padded = reflect_pad(small)
    assert padded.shape == (224, 224, 3)
    np.testing.assert_array_equal(padded[37:187, 17:207], small)
    np.testing.assert_array_equal(padded[36, 17:207], small[1])
    np.testing.assert_array_equal(padded[37 + 150, 17:207], small[-2])
    np.testing.assert_array_equal(padded[40, 16], small[3, 1])
    large = _pixels(2, 260, 300)
    got = apply_view(reflect_pad(large), _draws(top=17, left=61), np.random.default_rng(0))
    np.testing.assert_array_equal(got, large[17:241, 61:285])  # no resize: full resolution


def test_jpeg_equals_pillow_by_hand():
    crop = _pixels(3, 224, 224)
    buffer = io.BytesIO()
    Image.fromarray(crop).save(buffer, format="JPEG", quality=63, subsampling=2)
    expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    np.testing.assert_array_equal(apply_view(crop, _draws(operation="jpeg", quality=63), None), expected)


@pytest.mark.parametrize("kernel", [3, 5, 7])
def test_blur_equals_a_2d_convolution_with_opencvs_sigma_0_kernel(kernel):
    crop = _pixels(4, 224, 224)
    weights = np.asarray(BLUR_KERNELS[kernel])
    # OpenCV's getGaussianKernel(k, 0) for k <= 7: its fixed table, binomial-like, symmetric, summing to 1
    assert math.isclose(weights.sum(), 1.0) and np.array_equal(weights, weights[::-1]) and len(weights) == kernel
    assert np.all(np.diff(weights[: kernel // 2 + 1]) > 0)
    kernel_2d = np.outer(weights, weights)
    blurred = np.stack([ndimage.convolve(crop[..., c].astype(np.float64), kernel_2d, mode="mirror")
                        for c in range(3)], -1)
    expected = np.clip(np.floor(blurred + 0.5), 0, 255).astype(np.uint8)  # mirror = reflect-101; halves up
    got = apply_view(crop, _draws(operation="blur", kernel=kernel), None)
    np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(got, crop)


def test_noise_equals_numpy_by_hand():
    crop = _pixels(5, 224, 224)
    got = apply_view(crop, _draws(operation="noise", variance=7.5), np.random.default_rng(42))
    noise = np.random.default_rng(42).normal(0.0, math.sqrt(7.5), (224, 224, 3))
    expected = np.clip(np.round(crop + noise), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(got, expected)
    assert 2.0 < np.std(got.astype(float) - crop) < 3.0  # std sqrt(7.5) = 2.74, a little less for clipped pixels


def test_grey_equals_itu_601_luma_by_hand():
    crop = _pixels(6, 224, 224).astype(np.int64)
    luma = (19595 * crop[..., 0] + 38470 * crop[..., 1] + 7471 * crop[..., 2] + 0x8000) >> 16
    got = apply_view(crop.astype(np.uint8), _draws(operation="grey"), None)
    np.testing.assert_array_equal(got, np.repeat(luma[..., None], 3, axis=2).astype(np.uint8))


@pytest.mark.parametrize("quarters", [1, 2, 3])
@pytest.mark.parametrize("flip", [False, True])
def test_rotation_then_flip_equal_pillow_by_hand(quarters, flip):
    crop = _pixels(7, 224, 224)
    image = Image.fromarray(crop)
    for _ in range(quarters):
        image = image.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    got = apply_view(crop, _draws(quarters=quarters, flip=flip), None)
    np.testing.assert_array_equal(got, np.asarray(image))


def test_a_view_is_the_operations_in_order_then_the_evaluation_normalisation():
    image = Image.fromarray(_pixels(8, 260, 300))
    seed = 12345
    for view in range(6):
        rng = view_rng(seed, view)
        draws = draw_view(rng, 260, 300)
        expected = apply_view(np.asarray(image), draws, rng)
        np.testing.assert_array_equal(view_pixels(image, seed, view), expected)
    inputs = view_inputs(image, seed, 4)
    assert inputs.shape == (4, 3, 224, 224) and inputs.dtype == torch.float32
    for view in range(4):
        torch.testing.assert_close(inputs[view], imagenet_normalised(view_pixels(image, seed, view)), rtol=0, atol=0)
    centre = np.asarray(image)[18:242, 38:262]
    torch.testing.assert_close(imagenet_normalised(centre), backbone_input(image), rtol=0, atol=0)
    # deterministic, distinct across views and seeds
    torch.testing.assert_close(view_inputs(image, seed, 4), inputs, rtol=0, atol=0)
    assert not torch.equal(inputs[0], inputs[1])
    assert not torch.equal(view_inputs(image, seed + 1, 1)[0], inputs[0])


# ---- stage 1: caches with views -------------------------------------------------------------------
def _write_tree(root: Path) -> None:
    for i, size in enumerate(TRAIN_SIZES):
        folder = root / "gen-x" / "train" / ("0_real" if i % 2 == 0 else "1_fake")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i % 3 + 1}_img_{i:03d}.png").write_bytes(good_rgb(seed=i, size=size))
    (root / "gen-x" / "train" / "1_fake" / "9_broken.jpg").write_bytes(truncated())  # an error row
    for i in range(4):
        folder = root / "gen-x" / "val" / ("0_real" if i % 2 == 0 else "1_fake")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i + 1}_val_{i:03d}.png").write_bytes(good_rgb(seed=100 + i, size=(80 + 40 * i, 260)))


def _config(manifest: Path, out: Path, split: str = "train", **overrides):
    return debug(manifest=str(manifest), out=str(out), split=split, device="cpu",
                 **{**SETTINGS, "batch_size": 2, **overrides})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Caches of one manifest, all made with one CPU thread (the subprocess runs use one too)."""
    from lare2.extract.run import run_extraction
    from lare2.shared.manifest import build_folders, write_built

    tmp = tmp_path_factory.mktemp("views")
    _write_tree(tmp / "images")
    manifest = write_built(tmp / "manifest.parquet", build_folders(tmp / "images", progress=False))
    configs = {
        "plain": _config(manifest, tmp / "plain"),
        "views": _config(manifest, tmp / "views", views=K),
        "views_b5": _config(manifest, tmp / "views_b5", views=K, batch_size=5),
        "val": _config(manifest, tmp / "val", split="val"),
    }
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for cfg in configs.values():
            run_extraction(cfg)
    finally:
        torch.set_num_threads(before)
    return tmp, manifest, configs


def _everything(path) -> dict[str, np.ndarray]:
    cache = FeatureCache.open(path)
    return cache.read(slice(None), cache.layout.array_names)


def test_a_views_cache_holds_k_views_besides_the_evaluation_view(world):
    _, _, configs = world
    cache = FeatureCache.open(configs["views"].out)
    arrays = _everything(cache.path)
    n, ok = len(cache), cache.ok_mask()
    assert cache.layout.views == K and cache.layout.array_names == (*ARRAY_NAMES, "pooled_views", "fmap_views")
    D, fmap_shape = cache.layout.pooled_dim, tuple(cache.layout.fmap_shape)
    assert arrays["pooled_views"].shape == (n, K, D) and arrays["fmap_views"].shape == (n, K, *fmap_shape)
    assert arrays["pooled_views"].dtype == arrays["fmap_views"].dtype == np.float16
    assert cache.group["fmap_views"].chunks == (3, K, *fmap_shape)  # one chunk per block, like the others
    assert np.isfinite(arrays["fmap_views"][ok]).all() and np.isnan(arrays["fmap_views"][~ok]).all()
    assert int((~ok).sum()) == 1
    # views differ from each other and from the evaluation view
    pooled = arrays["pooled_views"][ok].astype(np.float32)
    assert not np.allclose(pooled[:, 0], pooled[:, 1], atol=1e-2)
    assert not np.allclose(pooled[:, 0], arrays["pooled"][ok].astype(np.float32), atol=1e-2)
    assert cache.attrs["layout"]["views"] == K and cache.attrs["identity"]["views"] == K
    plain = FeatureCache.open(configs["plain"].out)
    assert "views" not in plain.attrs["layout"] and "views" not in plain.attrs["identity"]
    assert plain.layout == cache.layout  # the evaluation features' layout: what detectors compare


def test_the_evaluation_view_equals_a_plain_caches_features(world):
    from lare2.train.data import extraction_fingerprint

    _, _, configs = world
    plain, views = FeatureCache.open(configs["plain"].out), FeatureCache.open(configs["views"].out)
    a, b = plain.read(slice(None)), views.read(slice(None))
    for name in ARRAY_NAMES:
        assert a[name].tobytes() == b[name].tobytes(), name  # bit for bit, NaN rows included
    assert list(plain.column("seed")) == list(views.column("seed"))
    assert extraction_fingerprint(plain) == extraction_fingerprint(views)
    assert identity_fingerprint(plain.attrs["identity"]) == identity_fingerprint(views.attrs["identity"])


def test_views_do_not_depend_on_the_batch_size(world):
    from lare2.extract.loader import ManifestImages

    tmp, _, configs = world
    b2, b5 = _everything(configs["views"].out), _everything(configs["views_b5"].out)
    for name in ("pooled_views", "fmap_views"):  # float16 storage: batched kernels round ~1e-6 apart
        np.testing.assert_allclose(b2[name].astype(np.float32), b5[name].astype(np.float32), rtol=2e-3, atol=1e-4)
    # the backbone's inputs are identical: each view is made per sample, in whatever worker
    cache = FeatureCache.open(configs["views"].out)
    ids, cfg = cache.column("sample_id"), configs["views"]
    dataset = ManifestImages(tmp / "images", cache.column("path"), 64, cfg.max_image_pixels,
                             sample_ids=ids, run_seed=cfg.seed, views=K)
    again = ManifestImages(tmp / "images", cache.column("path")[::-1], 64, cfg.max_image_pixels,
                           sample_ids=ids[::-1], run_seed=cfg.seed, views=K)
    for i in range(len(cache)):
        sample, other = dataset[i], again[len(cache) - 1 - i]
        if sample.error:
            assert other.error and sample.view_images is None
            continue
        assert sample.view_images.shape == (K, 3, 224, 224)
        assert torch.equal(sample.view_images, other.view_images)


def test_a_resumed_extraction_equals_one_run(world, tmp_path):
    from lare2.extract.run import run_extraction

    _, manifest, configs = world
    out = tmp_path / "resumed"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first = run_extraction(_config(manifest, out, views=K, num_shards=2, shard_index=1))  # as if killed half way
        assert 0 < int(FeatureCache.open(out).done_blocks().sum()) < FeatureCache.open(out).num_blocks
        rest = run_extraction(_config(manifest, out, views=K))
    finally:
        torch.set_num_threads(before)
    assert first.computed + rest.computed == len(FeatureCache.open(out)) and rest.skipped_blocks > 0
    got, want = _everything(out), _everything(configs["views"].out)
    for name, values in want.items():
        assert got[name].tobytes() == values.tobytes(), name

    with pytest.raises(CacheError, match="views: cache has none, this run 3"):
        run_extraction(_config(manifest, Path(configs["plain"].out), views=K))


@pytest.mark.slow
def test_two_processes_give_the_same_views(world, tmp_path):
    _, manifest, configs = world
    out = tmp_path / "two_processes"
    sets = [arg for key, value in {**SETTINGS, "batch_size": 2}.items() for arg in ("--set", f"{key}={value}")]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lare2.extract",
               "--manifest", str(manifest), "--split", "train", "--out", str(out), "--preset", "debug",
               "--device", "cpu",
               "--views", str(K), *sets, "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, **ONE_THREAD_ENV})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])["processes"] == 2
    got, want = _everything(out), _everything(configs["views"].out)
    for name, values in want.items():
        assert got[name].tobytes() == values.tobytes(), name


def test_views_survive_verify_recompute_pack_and_show_in_cache_info(world, tmp_path):
    from typer.testing import CliRunner

    from lare2.cli import app
    from lare2.extract.run import recompute_samples
    from lare2.shared.cache import pack_cache
    from lare2.shared.cache.summary import cache_info
    from lare2.shared.cache.verify import verify_cache

    _, _, configs = world
    path = Path(configs["views"].out)
    cache = FeatureCache.open(path)
    info = cache_info(cache)
    assert info["views"] == K and info["layout"]["views"] == K
    shapes = {a["name"]: a["shape"] for a in info["arrays"]}
    assert shapes["pooled_views"] == [len(cache), K, cache.layout.pooled_dim]
    assert cache_info(FeatureCache.open(configs["plain"].out))["views"] == 0
    shown = CliRunner().invoke(app, ["cache", "info", str(path)])
    assert shown.exit_code == 0 and "fmap_views" in shown.output

    assert verify_cache(path).ok
    ok_rows = [int(i) for i in np.flatnonzero(cache.ok_mask())[:3]]
    recomputed = recompute_samples(path, ok_rows)
    stored = cache.read(ok_rows, cache.layout.array_names)
    for name in cache.layout.array_names:
        assert recomputed[name].tobytes() == stored[name].tobytes(), name
    packed = pack_cache(path, tmp_path / "packed", pack_blocks=2, progress=False)
    for name, values in _everything(path).items():
        assert packed.read(slice(None), packed.layout.array_names)[name].tobytes() == values.tobytes(), name


# ---- stage 2: one view per sample per epoch -------------------------------------------------------
def _choice_by_hand(seed: int, epoch: int, sample_id: str, views: int) -> int:
    mask = (1 << 64) - 1

    def mix(x: int) -> int:
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    return mix(mix(mix(seed) ^ epoch) ^ zlib.crc32(sample_id.encode())) % views


def _views_cache(path: Path, num_samples: int = 83, chunk: int = 4, views: int = 4) -> FeatureCache:
    """A synthetic views cache: every value distinct, failed rows NaN."""
    layout = CacheLayout(pooled_dim=6, fmap_shape=(5, 3, 3), lare_shape=(4, 4, 4), chunk_samples=chunk, views=views)
    rng = np.random.default_rng(0)
    rows = {"sample_id": [f"id-{i:04d}" for i in range(num_samples)], "path": [f"{i}.png" for i in range(num_samples)],
            "label": (rng.random(num_samples) < 0.5).astype(int).tolist(), "generator": ["g"] * num_samples,
            "split": ["train"] * num_samples, "class_name": [""] * num_samples}
    cache = FeatureCache.create(path, rows, layout, attrs={"identity": {"synthetic": True}})
    arrays = {name: rng.normal(size=(num_samples, *layout.sample_shape(name))).astype(np.float32)
              for name in layout.array_names}
    failed = {5, 6, 40}
    for i in failed:
        for values in arrays.values():
            values[i] = np.nan
    for block in range(cache.num_blocks):
        sl = cache.block_slice(block)
        status = ["error" if i in failed else "ok" for i in range(sl.start, sl.stop)]
        cache.write_block(block, **{n: v[sl] for n, v in arrays.items()}, seed=list(range(sl.start, sl.stop)),
                          status=status, error=["x" if s == "error" else "" for s in status])
    return cache


NAMES = ("pooled", "fmap", "lare")


@pytest.mark.parametrize("world_size", [1, 2])
def test_training_reads_one_view_per_sample_per_epoch_in_the_plain_order(tmp_path, world_size):
    cache = _views_cache(tmp_path / "train")
    stored = cache.read(slice(None), cache.layout.array_names)
    ids = cache.column("sample_id")
    kwargs = dict(seed=3, batch_size=7, shuffle_blocks=3, world_size=world_size)
    chosen: dict[str, set[int]] = {}
    for epoch in range(4):
        for rank in range(world_size):
            plain = list(CacheSplit(cache.path, NAMES).epoch_batches(epoch=epoch, rank=rank, **kwargs))
            for settings, memory in ((ReadSettings(), False), (ReadSettings(workers=2, ahead=1), False),
                                     (ReadSettings(workers=2), True)):
                split = CacheSplit(cache.path, NAMES, read=settings, views=True)
                if memory:
                    split.hold_in_memory()
                batches = list(split.epoch_batches(epoch=epoch, rank=rank, **kwargs))
                assert [b.index.tolist() for b in batches] == [b.index.tolist() for b in plain]  # the same order
                for batch, same in zip(batches, plain):
                    assert torch.equal(batch.label, same.label) and torch.equal(batch.lare, same.lare)  # one map
                    for row, i in enumerate(batch.index):
                        view = _choice_by_hand(3, epoch, ids[i], 4)
                        chosen.setdefault(ids[i], set()).add(view)
                        expected = {"pooled": stored["pooled_views"][i, view], "fmap": stored["fmap_views"][i, view]}
                        for name, values in expected.items():
                            np.testing.assert_array_equal(getattr(batch, name)[row].numpy(), values.astype(np.float32))
    assert len(chosen) == int(cache.ok_mask().sum()) if world_size == 1 else len(chosen) > 0
    assert any(len(views) > 1 for views in chosen.values())  # epochs pick other views
    assert set().union(*chosen.values()) == {0, 1, 2, 3}


def test_view_choice_depends_only_on_seed_epoch_and_sample():
    from lare2.train.data import id_keys

    ids = [f"sample-{i}" for i in range(500)]
    keys = id_keys(ids)
    for seed, epoch in [(0, 0), (0, 1), (7, 0), (2**40, 99)]:
        got = view_choice(seed, epoch, keys, 4)
        assert got.tolist() == [_choice_by_hand(seed, epoch, i, 4) for i in ids]
        np.testing.assert_array_equal(view_choice(seed, epoch, keys[::-1], 4), got[::-1])  # per sample, any order
        assert np.bincount(got, minlength=4).min() > 90  # near-uniform over the views
    assert not np.array_equal(view_choice(0, 0, keys, 4), view_choice(0, 1, keys, 4))
    assert not np.array_equal(view_choice(0, 0, keys, 4), view_choice(1, 0, keys, 4))


def test_validation_and_scoring_read_the_evaluation_view(tmp_path):
    cache = _views_cache(tmp_path / "train")
    stored = cache.read(slice(None))
    for split in (CacheSplit(cache.path, NAMES, views=True), CacheSplit(cache.path, NAMES)):
        for batch in split.sequential_batches(8):
            np.testing.assert_array_equal(batch.pooled.numpy(), stored["pooled"][batch.index].astype(np.float32))
            np.testing.assert_array_equal(batch.fmap.numpy(), stored["fmap"][batch.index].astype(np.float32))
    # without views=True (use_views off), training reads the evaluation view too
    for batch in CacheSplit(cache.path, NAMES).epoch_batches(epoch=0, seed=0, batch_size=8, shuffle_blocks=2):
        np.testing.assert_array_equal(batch.pooled.numpy(), stored["pooled"][batch.index].astype(np.float32))
    # memory: the views are held besides the evaluation view (float16: 2 bytes a value)
    extra = int(cache.ok_mask().sum()) * 4 * (6 + 5 * 3 * 3) * 2
    plain_bytes = CacheSplit(cache.path, NAMES).memory_bytes()
    assert CacheSplit(cache.path, NAMES, views=True).memory_bytes() == plain_bytes + extra


def test_a_detector_trains_on_views_and_validates_on_a_plain_cache(world, tmp_path):
    from safetensors.torch import load_file

    from lare2.train.config import debug as train_debug
    from lare2.train.trainer import run_training

    _, _, configs = world
    weights = {}
    for use_views in (True, False):
        out = tmp_path / f"run-{use_views}"
        result = run_training(train_debug(model="egre", train=configs["views"].out, val=configs["val"].out,
                                          out=str(out), epochs=2, use_views=use_views, progress=False))
        assert result.finished
        weights[use_views] = load_file(out / "model.safetensors")
    plain = tmp_path / "run-plain"
    run_training(train_debug(model="egre", train=configs["plain"].out, val=configs["val"].out, out=str(plain),
                             epochs=2, progress=False))
    on_plain = load_file(plain / "model.safetensors")
    assert all(torch.equal(on_plain[k], weights[False][k]) for k in on_plain)  # use_views=False: as a plain cache
    assert not all(torch.equal(weights[True][k], weights[False][k]) for k in on_plain)

    # the detector trained on views scores new images through their evaluation view, as the cache holds it
    from lare2 import Detector
    from lare2.train.scoring import score_features

    tmp, _, _ = world
    detector = Detector.from_run(tmp_path / "run-True", device="cpu", num_workers=0)
    cache = FeatureCache.open(configs["plain"].out)
    ok = np.flatnonzero(cache.ok_mask())
    arrays = cache.read(ok)
    expected = score_features(detector.model, arrays["pooled"], arrays["fmap"], arrays["lare"]).numpy()
    results = detector.score([tmp / "images" / p for p in cache.column("path")[ok]])
    assert [r.status for r in results] == ["ok"] * len(ok)
    np.testing.assert_allclose([r.p_fake for r in results], expected, atol=1e-5)


def test_cache_diff_compares_the_view_arrays(world, tmp_path):
    import shutil

    import zarr

    from lare2.shared.cache.diff import diff_caches

    tmp, _, configs = world
    copy = tmp_path / "copy"
    shutil.copytree(configs["views"].out, copy)
    assert diff_caches(configs["views"].out, copy)["agree"]
    group = zarr.open_group(copy, mode="r+")
    group["fmap_views"][2, 1, 0, 0, 0] = group["fmap_views"][2, 1, 0, 0, 0] + np.float16(1.0)  # one view of one sample
    report = diff_caches(configs["views"].out, copy)
    assert not report["agree"] and len(report["arrays"]["fmap_views"]["samples_differing"]) == 1
    assert report["arrays"]["fmap"]["samples_differing"] == []  # the evaluation view is untouched
    against_plain = diff_caches(configs["views"].out, configs["plain"].out)
    assert against_plain["arrays"]["pooled_views"] == {"comparable": False, "reason": f"views: {K} vs 0"}
    assert against_plain["arrays"]["fmap"]["samples_differing"] == []  # the evaluation view equals a plain cache
