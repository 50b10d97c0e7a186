"""Seeded random tiny models with SD's geometry, for tests, the debug preset and benchmarks: never for detection.

``--sd tiny`` loads ``build_tiny_sd(seed=0)``: a VAE, UNet and CLIP text encoder with Stable
Diffusion's geometry (4 latent channels, x8 downsampling, 77-token prompts) and its training noise
schedule, but random weights and millisecond forward passes on a CPU. ``save_tiny_sd`` writes the
same model as a diffusers folder, loadable offline like a real one.

The toy CLIP BPE vocabulary (letters, digits, punctuation; no merges) stands in for SD's
tokenizer so that nothing is downloaded: every word is tokenized letter by letter. The
MiniGenImage zoo uses it too.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lare2.extract.models import SD_BETA_END, SD_BETA_START, SD_TRAIN_STEPS, SD_V1_CONFIGS, SD_VAE_SCALING_FACTOR

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


# ---- toy tokenizer ------------------------------------------------------------------------------
def toy_vocab() -> dict[str, int]:
    symbols = string.ascii_lowercase + string.digits + "',.-!?&()/"
    tokens = list(symbols) + [s + "</w>" for s in symbols] + list(SPECIAL_TOKENS)
    return {tok: i for i, tok in enumerate(tokens)}


def write_toy_tokenizer(folder: str | Path, model_max_length: int = 77) -> Path:
    """Write vocab.json / merges.txt / tokenizer_config.json loadable by ``CLIPTokenizer.from_pretrained``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(toy_vocab()))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": SPECIAL_TOKENS[0],
        "eos_token": SPECIAL_TOKENS[1],
        "unk_token": SPECIAL_TOKENS[1],
        "pad_token": SPECIAL_TOKENS[1],
    }))
    return folder


# ---- tiny SD ------------------------------------------------------------------------------------
def tiny_component_configs() -> dict[str, dict]:
    """Configs of the tiny SD (docs/method.md §6.4): SD's geometry, millisecond forward passes on a CPU."""
    vocab = toy_vocab()
    return {
        "vae": dict(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
            block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256, scaling_factor=SD_VAE_SCALING_FACTOR,
        ),
        "unet": dict(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8,
        ),
        "text_encoder": dict(
            vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=64,
            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        ),
        "scheduler": dict(
            num_train_timesteps=SD_TRAIN_STEPS, beta_start=SD_BETA_START, beta_end=SD_BETA_END,
            beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False,
        ),
    }


def build_tiny_sd(seed: int = 0) -> dict:
    """The tiny SD's components with weights drawn from ``seed`` (the global RNG is left untouched)."""
    configs = tiny_component_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**configs["vae"])
        unet = UNet2DConditionModel(**configs["unet"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(str(write_toy_tokenizer(tmp)))
    return {"vae": vae, "unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": DDPMScheduler(**configs["scheduler"])}


def save_tiny_sd(folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny SD as a diffusers folder (safetensors weights); loadable offline by ``load_latent_diffusion``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parts = build_tiny_sd(seed)
    for name in ("vae", "unet", "text_encoder"):
        parts[name].save_pretrained(folder / name, safe_serialization=True)
    parts["scheduler"].save_pretrained(folder / "scheduler")
    write_toy_tokenizer(folder / "tokenizer")
    model_index = json.loads((SD_V1_CONFIGS / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2))
    return folder
