"""Sample the zoo's generators deterministically: each image's starting noise comes from its own seed.

Diffusion models run DDIM with eta = 0 (no draw after the starting noise); the GAN draws only z.
Images are made in chunks of ``CHUNK`` in the order given, so calling ``sample`` again with the same
first ``k * CHUNK`` seeds reproduces those images bit for bit (same batches, same arithmetic).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from lare2.minigenimage.models import IMAGE_SIZE, LATENT_CHANNELS
from lare2.minigenimage.photos import CLASS_NAMES
from lare2.minigenimage.zoo import ZOO_DIR, check_generator

CHUNK = 16
"""Images per model call."""
DDIM_STEPS = 20
"""Sampling steps of the diffusion models."""


def to_uint8(images_B3HW: torch.Tensor) -> np.ndarray:
    """[-1, 1] float [B, 3, H, W] -> uint8 [B, H, W, 3]."""
    pixels = ((images_B3HW.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().numpy()


def start_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One independent draw of ``shape`` per seed -> [len(seeds), *shape]."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


class LatentDiffusionSampler:
    """``ldm-a`` / ``ldm-b``: text-conditioned DDIM on VAE latents, decoded by the VAE."""

    def __init__(self, folder: Path) -> None:
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from lare2.minigenimage.train_ldm import PROMPT_TEMPLATE

        self.vae = AutoencoderKL.from_pretrained(str(folder / "vae")).eval()
        self.unet = UNet2DConditionModel.from_pretrained(str(folder / "unet")).eval()
        self.scheduler = DDIMScheduler.from_pretrained(str(folder / "scheduler"), set_alpha_to_one=False)
        tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
        text_encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder")).eval()
        ids = tokenizer([PROMPT_TEMPLATE.format(c) for c in CLASS_NAMES], padding="max_length",
                        max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            self.text_CLD = text_encoder(ids)[0]  # [num_classes, 77, hidden]

    @torch.no_grad()
    def __call__(self, seeds: Sequence[int], classes: Sequence[int]) -> np.ndarray:
        latent_hw = IMAGE_SIZE // 8
        z_B4hw = start_noise(seeds, (LATENT_CHANNELS, latent_hw, latent_hw)) * self.scheduler.init_noise_sigma
        text_BLD = self.text_CLD[torch.as_tensor(classes)]
        self.scheduler.set_timesteps(DDIM_STEPS)
        for t in self.scheduler.timesteps:
            eps_B4hw = self.unet(z_B4hw, t, text_BLD).sample
            z_B4hw = self.scheduler.step(eps_B4hw, t, z_B4hw, eta=0.0).prev_sample
        return to_uint8(self.vae.decode(z_B4hw / self.vae.config.scaling_factor).sample)


class PixelDiffusionSampler:
    """``pixel-ddpm``: class-conditional DDIM in pixel space."""

    def __init__(self, folder: Path) -> None:
        from diffusers import DDIMScheduler, UNet2DModel

        self.unet = UNet2DModel.from_pretrained(str(folder / "unet")).eval()
        self.scheduler = DDIMScheduler.from_pretrained(str(folder / "scheduler"))

    @torch.no_grad()
    def __call__(self, seeds: Sequence[int], classes: Sequence[int]) -> np.ndarray:
        x_B3HW = start_noise(seeds, (3, IMAGE_SIZE, IMAGE_SIZE))
        class_B = torch.as_tensor(classes)
        self.scheduler.set_timesteps(DDIM_STEPS)
        for t in self.scheduler.timesteps:
            eps_B3HW = self.unet(x_B3HW, t, class_labels=class_B).sample
            x_B3HW = self.scheduler.step(eps_B3HW, t, x_B3HW, eta=0.0).prev_sample
        return to_uint8(x_B3HW)


class GanSampler:
    """``gan``: one generator pass from z."""

    def __init__(self, folder: Path) -> None:
        from lare2.minigenimage.train_gan import load_generator

        self.net = load_generator(folder)

    @torch.no_grad()
    def __call__(self, seeds: Sequence[int], classes: Sequence[int]) -> np.ndarray:
        noise_BZ = start_noise(seeds, (self.net.config.noise_dim,))
        return to_uint8(self.net(noise_BZ, torch.as_tensor(classes)))


def load_sampler(name: str, zoo: Path | str = ZOO_DIR):
    """The sampler of generator ``name``, with the weights under ``<zoo>/<name>``."""
    folder = Path(zoo) / check_generator(name)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: generator {name!r} is not in the zoo (lare2 minigenimage zoo)")
    if name in ("ldm-a", "ldm-b"):
        return LatentDiffusionSampler(folder)
    if name == "pixel-ddpm":
        return PixelDiffusionSampler(folder)
    return GanSampler(folder)


def sample(sampler, seeds: Sequence[int], classes: Sequence[int]) -> np.ndarray:
    """Images for ``seeds`` (one per image) and class indices, made ``CHUNK`` at a time -> uint8 [N, 64, 64, 3]."""
    if len(seeds) != len(classes):
        raise ValueError(f"{len(seeds)} seeds but {len(classes)} classes")
    out = [sampler(seeds[i:i + CHUNK], classes[i:i + CHUNK]) for i in range(0, len(seeds), CHUNK)]
    return np.concatenate(out) if out else np.empty((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
