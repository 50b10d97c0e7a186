"""Train a latent diffusion model of the zoo (``ldm-a`` or ``ldm-b``) on the VAE latents of the zoo-pool crops.

The UNet is conditioned through a tiny frozen CLIP text encoder on ``a photo of a {class}``, with SD's
schedule (1000 steps, scaled-linear betas 0.00085..0.012, epsilon). ``ldm-a`` makes the text encoder,
toy tokenizer and scheduler; ``ldm-b`` copies them and the VAE from ``ldm-a`` (as SD V1.4 and Wukong
share SD's VAE) and trains its own UNet, of another width and seed. Either folder loads with diffusers
``StableDiffusionPipeline.from_pretrained`` / each component's ``from_pretrained``.

    python -m lare2.minigenimage.train_ldm --name ldm-a
    python -m lare2.minigenimage.train_ldm --name ldm-b
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from lare2.minigenimage.models import IMAGE_SIZE, latent_unet, sd_scheduler_config, tiny_text_encoder
from lare2.minigenimage.photos import CLASS_NAMES
from lare2.minigenimage.zoo import (
    ZOO_DIR,
    StepLogger,
    ZooTrainConfig,
    batches,
    log,
    optimizer_step,
    record_weights,
    training_images,
)
from lare2.shared.errors import InputError
from lare2.shared.settings import make_config, pick_preset

PROMPT_TEMPLATE = "a photo of a {}"
SHARED_COMPONENTS = ("vae", "text_encoder", "tokenizer", "scheduler")
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.42.0",
    "vae": ["diffusers", "AutoencoderKL"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "DDPMScheduler"],
    "safety_checker": [None, None],
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": False,
}


@dataclass(kw_only=True)
class LdmTrainConfig(ZooTrainConfig):
    """Recipe of one latent diffusion model of the zoo: ``<zoo>/<name>``, on ``<zoo>/ldm-a/vae``."""

    name: str = "ldm-a"
    """``ldm-a`` (makes the shared text encoder, tokenizer, scheduler) or ``ldm-b`` (copies them from ldm-a)."""
    width: int = 32
    """Channels of the UNet's first block (the second has twice as many)."""
    steps: int = 1500

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.name not in ("ldm-a", "ldm-b"):
            raise InputError(f"name={self.name!r}: choose from ('ldm-a', 'ldm-b')")
        if self.width < 8 or self.width % 8:
            raise InputError("width must be a positive multiple of 8")


# ---- presets: plain functions returning a config ------------------------------------------------
def ldm_a(**overrides: Any) -> LdmTrainConfig:
    """ldm-a: width 32, seed 0, 6000 steps; it makes the text encoder, tokenizer and scheduler ldm-b shares."""
    return make_config(LdmTrainConfig, {"name": "ldm-a", "width": 32, "seed": 0, "steps": 6000, **overrides})


def ldm_b(**overrides: Any) -> LdmTrainConfig:
    """ldm-b: width 24, seed 1, 1000 steps (another model on the same VAE)."""
    return make_config(LdmTrainConfig, {"name": "ldm-b", "width": 24, "seed": 1, "steps": 1000, **overrides})


PRESETS: dict[str, Callable[..., LdmTrainConfig]] = {"ldm-a": ldm_a, "ldm-b": ldm_b}


def preset(name: str, **overrides: Any) -> LdmTrainConfig:
    """The recipe of the model called ``name`` with ``overrides``; ``SettingsError`` for an unknown name or key."""
    return pick_preset(PRESETS, name, **overrides)


def write_shared_components(folder: Path, seed: int) -> None:
    """Tokenizer, text encoder and scheduler of ``ldm-a``."""
    from diffusers import DDPMScheduler

    from lare2.extract.tiny_models import toy_vocab, write_toy_tokenizer

    write_toy_tokenizer(folder / "tokenizer")
    tiny_text_encoder(len(toy_vocab()), seed).save_pretrained(folder / "text_encoder", safe_serialization=True)
    DDPMScheduler(**sd_scheduler_config()).save_pretrained(folder / "scheduler")


@torch.no_grad()
def class_embeddings(folder: Path) -> torch.Tensor:
    """Text-encoder states of ``a photo of a {class}`` for every class -> [num_classes, 77, hidden]."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    text_encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder")).eval()
    prompts = [PROMPT_TEMPLATE.format(name) for name in CLASS_NAMES]
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def train(config: LdmTrainConfig) -> Path:
    from diffusers import AutoencoderKL, DDPMScheduler

    zoo = Path(config.zoo)
    folder = zoo / config.name
    source = zoo / "ldm-a"
    if not (source / "vae" / "config.json").exists():
        raise FileNotFoundError(f"{source / 'vae'}: no VAE; train it first (python -m lare2.minigenimage.train_vae)")
    if config.name == "ldm-a":
        write_shared_components(folder, config.seed)
    else:
        for component in SHARED_COMPONENTS:
            shutil.rmtree(folder / component, ignore_errors=True)
            shutil.copytree(source / component, folder / component)
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")

    vae = AutoencoderKL.from_pretrained(str(folder / "vae")).eval()
    scheduler = DDPMScheduler.from_pretrained(str(folder / "scheduler"))
    text_BLD = class_embeddings(folder)
    images_N3HW, classes_N = training_images(config.crops_per_photo, IMAGE_SIZE, config.seed)
    with torch.no_grad():  # the VAE is frozen: keep each crop's posterior, sample it per step
        posteriors = [vae.encode(images_N3HW[i:i + 64]).latent_dist for i in range(0, len(images_N3HW), 64)]
    mean_N4hw = torch.cat([p.mean for p in posteriors])
    std_N4hw = torch.cat([p.std for p in posteriors])
    scaling = vae.config.scaling_factor

    torch.manual_seed(config.seed)
    unet = latent_unet(config.width).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
    generator = torch.Generator().manual_seed(config.seed)
    alphas = scheduler.alphas_cumprod
    step_log = StepLogger(config.name, config.steps)
    for step, index_B in enumerate(batches(len(mean_N4hw), config.batch_size, config.steps, generator)):
        eps_B4hw = torch.randn(mean_N4hw[index_B].shape, generator=generator)
        z0_B4hw = (mean_N4hw[index_B] + std_N4hw[index_B] * eps_B4hw) * scaling
        noise_B4hw = torch.randn(z0_B4hw.shape, generator=generator)
        t_B = torch.randint(0, scheduler.config.num_train_timesteps, (len(index_B),), generator=generator)
        a_B111 = alphas[t_B].view(-1, 1, 1, 1)
        zt_B4hw = a_B111.sqrt() * z0_B4hw + (1 - a_B111).sqrt() * noise_B4hw
        loss = (unet(zt_B4hw, t_B, text_BLD[classes_N[index_B]]).sample - noise_B4hw).pow(2).mean()
        optimizer_step(loss, unet, optimizer, schedule)
        step_log(step, loss.item())

    unet.eval().save_pretrained(folder / "unet", safe_serialization=True)
    log.info("%s: saved to %s", config.name, folder)
    record_weights(zoo, config.name, {"unet": asdict(config) | {"zoo": "minigenimage/zoo"}})
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="ldm-a", choices=("ldm-a", "ldm-b"))
    parser.add_argument("--zoo", default=str(ZOO_DIR))
    parser.add_argument("--steps", type=int, default=None, help="override the preset's steps")
    args = parser.parse_args(argv)
    steps = {} if args.steps is None else {"steps": args.steps}
    train(preset(args.name, zoo=args.zoo, **steps))


if __name__ == "__main__":
    main()
