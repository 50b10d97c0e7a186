"""Reduced-precision extraction: bfloat16 runs on CPU (so CI exercises the GPU's half-precision paths) and
stays within a stated tolerance of float32; float16 on CPU is refused with the way out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lare2.extract.features import compute_images, load_models
from lare2.shared.config import debug

CPU = torch.device("cpu")
NUM_IMAGES = 4
PROMPTS = ["a photo of a goldfish", "a photo of a tabby", "", "a photo of a goldfish"]

# Relative L2 error of one sample's array, ||bf16 - fp32|| / ||fp32||, worst over samples. Measured with the
# tiny models (debug preset) on 5 sets of 4 random images, torch 2.13 CPU: lare 0.0038, pooled 0.022,
# fmap 0.0078 (bfloat16 keeps 8 mantissa bits: ~0.4% per rounding; the VAE posterior and the error stay
# float32, so the map errs least). Tolerances are ~3x those figures.
TOLERANCE = {"lare": 0.012, "pooled": 0.06, "fmap": 0.025}


def random_images(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LaRE inputs [n, 3, 256, 256] in [-1, 1] and backbone inputs [n, 3, 224, 224] in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    lare_images_B3SS = torch.rand(NUM_IMAGES, 3, 256, 256, generator=generator) * 2 - 1
    backbone_images_B3HW = torch.rand(NUM_IMAGES, 3, 224, 224, generator=generator)
    return lare_images_B3SS, backbone_images_B3HW


def worst_relative_error(got: np.ndarray, want: np.ndarray) -> float:
    per_sample = [np.linalg.norm(g - w) / np.linalg.norm(w) for g, w in zip(got, want, strict=True)]
    return float(max(per_sample))


@pytest.fixture(scope="module")
def float32_models():
    return load_models(debug(compute_dtype="float32"), CPU)


@pytest.mark.parametrize("seed", [0, 1])
def test_bfloat16_on_cpu_is_within_tolerance_of_float32(float32_models, seed):
    models = load_models(debug(compute_dtype="bfloat16"), CPU)
    assert next(models.backbone.parameters()).dtype == torch.bfloat16
    assert models.layout == float32_models.layout  # the cache layout never depends on the compute dtype
    lare_images, backbone_images = random_images(seed)
    seeds = list(range(seed, seed + NUM_IMAGES))
    want = compute_images(float32_models, lare_images, backbone_images, PROMPTS, seeds, CPU)
    got = compute_images(models, lare_images, backbone_images, PROMPTS, seeds, CPU)
    for name, tolerance in TOLERANCE.items():
        assert got[name].dtype == np.float32 and got[name].shape == want[name].shape, name
        assert np.isfinite(got[name]).all(), name
        error = worst_relative_error(got[name], want[name])
        assert 0 < error < tolerance, (name, error)  # 0 would mean bfloat16 never ran


def test_float16_on_cpu_is_refused_with_the_way_out():
    with pytest.raises(ValueError, match="float16 is for GPUs.*bfloat16"):
        load_models(debug(compute_dtype="float16"), CPU)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compute_dtype", ["float16", "bfloat16"])
def test_half_precision_on_gpu_is_within_tolerance_of_float32_on_cpu(float32_models, compute_dtype):
    models = load_models(debug(compute_dtype=compute_dtype), torch.device("cuda"))
    lare_images, backbone_images = random_images(0)
    seeds = list(range(NUM_IMAGES))
    want = compute_images(float32_models, lare_images, backbone_images, PROMPTS, seeds, CPU)
    got = compute_images(models, lare_images.pin_memory(), backbone_images.pin_memory(), PROMPTS, seeds,
                         torch.device("cuda"))
    for name, tolerance in TOLERANCE.items():  # float16 keeps 3 more mantissa bits than bfloat16: inside its bound
        assert worst_relative_error(got[name], want[name]) < tolerance, name
