"""The LaRE map against its formula (docs/method.md §1.3), its independence from batching, prompts and seeds."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from lare2.extract.lare import LareComputer, draw_sample_noise
from lare2.extract.models import SD_V1_CONFIGS, LatentDiffusion, load_latent_diffusion
from lare2.extract.tiny_models import save_tiny_sd

TIMESTEP, ENSEMBLE = 200, 4


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> LatentDiffusion:
    return load_latent_diffusion(save_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "model"))


def images(n: int, seed: int = 0, size: int = 256) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=generator) * 2 - 1


@torch.no_grad()
def reference_map(model: LatentDiffusion, image_3HW: torch.Tensor, prompt: str, seed: int,
                  timestep: int = TIMESTEP, ensemble: int = ENSEMBLE) -> torch.Tensor:
    """One image, straight from the formula: diffusers' posterior sample, then the noise, from one generator."""
    generator = torch.Generator().manual_seed(seed)
    posterior = model.vae.encode(image_3HW[None]).latent_dist
    z0 = posterior.sample(generator=generator) * model.vae.config.scaling_factor  # [1, 4, h, w]
    noise = torch.randn((ensemble, *z0.shape[1:]), generator=generator)
    alpha_bar = model.scheduler.alphas_cumprod[timestep]
    zt = alpha_bar.sqrt() * z0 + (1 - alpha_bar).sqrt() * noise
    ids = model.tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    text = model.text_encoder(ids)[0].expand(ensemble, -1, -1)
    predicted = model.unet(zt, torch.tensor([timestep] * ensemble), encoder_hidden_states=text).sample
    if model.prediction_type == "v_prediction":
        target = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * z0
    else:
        target = noise
    return ((predicted - target) ** 2).mean(dim=0)


def test_map_equals_the_formula(model: LatentDiffusion) -> None:
    computer = LareComputer(model, timestep=TIMESTEP, ensemble=ENSEMBLE)
    batch, prompts, seeds = images(2), ["a photo of a goldfish", "a photo of a tench"], [7, 123456789012]
    maps = computer(batch, prompts, seeds)
    assert maps.shape == (2, 4, 32, 32) and maps.dtype == torch.float32
    for i in range(2):
        torch.testing.assert_close(maps[i], reference_map(model, batch[i], prompts[i], seeds[i]), rtol=1e-5, atol=1e-5)


def test_v_prediction_target_is_the_velocity(model: LatentDiffusion) -> None:
    scheduler = type(model.scheduler).from_config({**model.scheduler.config, "prediction_type": "v_prediction"})
    v_model = dataclasses.replace(model, scheduler=scheduler)
    batch = images(1, seed=3)
    v_map = LareComputer(v_model, timestep=TIMESTEP, ensemble=2)(batch, ["a dog"], [5])[0]
    torch.testing.assert_close(v_map, reference_map(v_model, batch[0], "a dog", 5, ensemble=2), rtol=1e-5, atol=1e-5)
    eps_map = LareComputer(model, timestep=TIMESTEP, ensemble=2)(batch, ["a dog"], [5])[0]
    assert (v_map - eps_map).abs().max() > 1e-3


def test_draws_come_in_spec_order_from_one_generator() -> None:
    posterior, noise = draw_sample_noise(42, (4, 8, 8), ensemble=3)
    generator = torch.Generator().manual_seed(42)
    torch.testing.assert_close(posterior, torch.randn(1, 4, 8, 8, generator=generator), rtol=0, atol=0)
    torch.testing.assert_close(noise, torch.randn(3, 4, 8, 8, generator=generator), rtol=0, atol=0)


def test_map_does_not_depend_on_batch_size_or_order(model: LatentDiffusion) -> None:
    computer = LareComputer(model, timestep=TIMESTEP, ensemble=2)
    batch = images(5, seed=1)
    prompts = ["a photo of a cat", "a photo of a dog", "a photo of a cat", "", "a photo of an axolotl"]
    seeds = [11, 12, 13, 14, 15]
    together = computer(batch, prompts, seeds)
    order = [3, 0, 4, 1, 2]
    shuffled = computer(batch[order], [prompts[i] for i in order], [seeds[i] for i in order])
    # Equal up to float32 rounding of batched kernels (observed <= 2.4e-6 on values ~1).
    torch.testing.assert_close(shuffled, together[order], rtol=1e-5, atol=1e-5)
    for i in (0, 4):
        alone = LareComputer(model, timestep=TIMESTEP, ensemble=2)(batch[i:i + 1], [prompts[i]], [seeds[i]])
        torch.testing.assert_close(alone[0], together[i], rtol=1e-5, atol=1e-5)
    # Images 0 and 2 share a prompt but not a seed: their maps differ.
    assert (together[0] - computer(batch[:1], [prompts[0]], [seeds[2]])[0]).abs().max() > 1e-3


def test_seed_and_prompt_change_the_map(model: LatentDiffusion) -> None:
    computer = LareComputer(model, timestep=TIMESTEP, ensemble=2)
    image = images(1, seed=2)
    base = computer(image, ["a photo of a cat"], [1])
    assert torch.equal(base, LareComputer(model, timestep=TIMESTEP, ensemble=2)(image, ["a photo of a cat"], [1]))
    assert (base - computer(image, ["a photo of a cat"], [2])).abs().max() > 1e-3
    assert (base - computer(image, ["a photo of a dog"], [1])).abs().max() > 1e-4


def test_timestep_changes_the_map(model: LatentDiffusion) -> None:
    image = images(1, seed=4)
    early = LareComputer(model, timestep=50, ensemble=2)(image, ["x"], [0])
    late = LareComputer(model, timestep=600, ensemble=2)(image, ["x"], [0])
    assert (early - late).abs().max() > 1e-3


def test_each_distinct_prompt_is_encoded_once(model: LatentDiffusion) -> None:
    encoded: list[int] = []
    hook = model.text_encoder.register_forward_hook(lambda module, args, out: encoded.append(args[0].shape[0]))
    try:
        computer = LareComputer(model, timestep=TIMESTEP, ensemble=1)
        computer(images(3), ["a cat", "a dog", "a cat"], [1, 2, 3])
        computer(images(2), ["a dog", "a fox"], [4, 5])
        computer(images(1), ["a fox"], [6])
    finally:
        hook.remove()
    # a cat, a dog, a fox: each once, alone (so its embedding never depends on its companions);
    # the third batch needed no text encoder call
    assert encoded == [1, 1, 1]


def test_bad_inputs_are_refused(model: LatentDiffusion) -> None:
    computer = LareComputer(model, ensemble=1)
    with pytest.raises(ValueError, match="as many prompts and seeds"):
        computer(images(2), ["a"], [1, 2])
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        computer(images(1) * 127.5 + 127.5, ["a"], [1])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        computer(images(1)[0], ["a"], [1])
    with pytest.raises(ValueError, match=r"timestep must be in \[0, 1000\)"):
        LareComputer(model, timestep=1000)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_gpu_draw_the_same_maps(model: LatentDiffusion, tmp_path: Path) -> None:
    gpu_model = load_latent_diffusion(save_tiny_sd(tmp_path / "m"), device="cuda")
    batch, prompts, seeds = images(3), ["a cat", "a dog", ""], [1, 2, 3]
    on_cpu = LareComputer(model)(batch, prompts, seeds)
    on_gpu = LareComputer(gpu_model, device="cuda")(batch, prompts, seeds).cpu()
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-3, atol=1e-3)  # TF32 / kernel differences only


@pytest.mark.slow
def test_full_size_sd_v1_unet_and_vae_give_4x32x32_maps() -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lare2.extract.models import ddpm_scheduler_from
    from lare2.extract.tiny_models import build_tiny_sd

    def config(component: str) -> dict:
        return {k: v for k, v in json.loads((SD_V1_CONFIGS / component / "config.json").read_text()).items()
                if not k.startswith("_")}

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL.from_config(config("vae")).eval()
        unet = UNet2DConditionModel.from_config(config("unet")).eval()
        # Full width (768 = the UNet's cross-attention width), one layer: the text tower's depth is not under test.
        text_encoder = CLIPTextModel(CLIPTextConfig(**{**config("text_encoder"), "num_hidden_layers": 1})).eval()
    assert sum(p.numel() for p in unet.parameters()) > 850e6  # the real SD v1 UNet size
    full = LatentDiffusion(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=build_tiny_sd()["tokenizer"],
                           scheduler=ddpm_scheduler_from(SD_V1_CONFIGS), source="random-sd-v1", fingerprint="-")
    maps = LareComputer(full, timestep=TIMESTEP, ensemble=2)(images(1), ["a photo of a cat"], [0])
    assert maps.shape == (1, 4, 32, 32)
    assert torch.isfinite(maps).all() and maps.min() >= 0
