"""Models for the benchmarks: SD v1.5-shaped latent diffusion and CLIP RN50 with random weights, or the tiny ones.

Random weights change values, not cost. ``device="meta"`` builds the modules without memory or
initialisation (for FLOP counting); any other device draws seeded weights there.
"""

from __future__ import annotations

import json
import tempfile
from typing import Literal

import torch
from lare2.extract.models import SD_V1_CONFIGS, LatentDiffusion, ddpm_scheduler_from

Size = Literal["full", "tiny"]
SIZES = ("full", "tiny")


def sd_v1_config(component: str) -> dict:
    """A shipped SD v1 component config (``extract/configs/sd-v1``) as constructor keywords."""
    config = json.loads((SD_V1_CONFIGS / component / "config.json").read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}


def component_configs(size: Size) -> dict[str, dict]:
    """``vae``, ``unet`` and ``text_encoder`` constructor keywords of one size (tiny: and ``scheduler``)."""
    if size == "full":
        return {name: sd_v1_config(name) for name in ("vae", "unet", "text_encoder")}
    if size == "tiny":
        from lare2.extract.tiny_models import tiny_component_configs

        return tiny_component_configs()
    raise ValueError(f"size={size!r}: choose from {SIZES}")


def toy_tokenizer():
    """The toy CLIP tokenizer (77 tokens, letter by letter): the text encoder's cost does not depend on the
    vocabulary."""
    from lare2.extract.tiny_models import write_toy_tokenizer
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return CLIPTokenizer.from_pretrained(str(write_toy_tokenizer(tmp)))


def build_latent_diffusion(size: Size = "full", *, device: str | torch.device = "cpu",
                           seed: int = 0) -> LatentDiffusion:
    """VAE + UNet + text encoder of ``size``, frozen and in eval mode, on ``device`` (``meta``: shapes only)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = component_configs(size)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        vae = AutoencoderKL.from_config(configs["vae"])
        unet = UNet2DConditionModel.from_config(configs["unet"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    for module in (vae, unet, text_encoder):
        module.eval().requires_grad_(False)
    scheduler = ddpm_scheduler_from(SD_V1_CONFIGS) if size == "full" else DDPMScheduler(**configs["scheduler"])
    return LatentDiffusion(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=toy_tokenizer(),
                           scheduler=scheduler, source=f"random-sd-v1-{size}", fingerprint="-")


def build_backbone(size: Size = "full", *, device: str | torch.device = "cpu") -> torch.nn.Module:
    """CLIP RN50 (``random-rn50``) or the tiny tower, frozen; on ``meta`` without the BatchNorm calibration pass."""
    from lare2.extract.clip_resnet import (
        ModifiedResNet,
        load_backbone,
        rn50_config,
        tiny_config,
    )

    if size not in SIZES:
        raise ValueError(f"size={size!r}: choose from {SIZES}")
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            return ModifiedResNet(rn50_config() if size == "full" else tiny_config()).eval().requires_grad_(False)
    backbone, _ = load_backbone("random-rn50" if size == "full" else "tiny", device=device)
    return backbone
