"""Architectures of the MiniGenImage zoo, sized for a CPU: each family's config and constructor.

Shapes: B batch, images [B, 3, 64, 64] in [-1, 1]; latents [B, 4, 8, 8] (SD's geometry: 4 channels, x8 down).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

IMAGE_SIZE = 64
"""Benchmark images are 64 x 64: the LaRE latent is 8 x 8 and every family trains in minutes on 2 cores."""
LATENT_CHANNELS = 4
TEXT_HIDDEN = 32
"""Width of the tiny CLIP text encoder (the cross-attention dimension of both latent UNets)."""


def tiny_vae():
    """AutoencoderKL with SD's geometry (4 latent channels, x8 down), 4 levels of (16, 32, 64, 64) channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, sample_size=IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8,
    )


def tiny_text_encoder(vocab_size: int, seed: int):
    """A 2-layer CLIP text encoder, randomly initialised from ``seed`` and kept frozen (as SD keeps CLIP frozen)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval()


def latent_unet(width: int):
    """UNet2DConditionModel on 8 x 8 latents, blocks (width, 2 width), text cross-attention."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 8, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(width, 2 * width), layers_per_block=1, cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8, norm_num_groups=8,
    )


def pixel_unet(num_classes: int):
    """Class-conditional UNet2DModel on 64 x 64 pixels (the ADM / GLIDE stand-in), blocks (16, 32, 64, 64)."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=IMAGE_SIZE, in_channels=3, out_channels=3, block_out_channels=(16, 32, 64, 64),
        down_block_types=("DownBlock2D",) * 4, up_block_types=("UpBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=8, num_class_embeds=num_classes,
    )


def sd_scheduler_config() -> dict:
    """Stable Diffusion's training schedule: 1000 steps, scaled-linear betas 0.00085..0.012, epsilon."""
    return {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "prediction_type": "epsilon", "clip_sample": False, "steps_offset": 1}


def pixel_scheduler_config() -> dict:
    """ADM's cosine schedule in pixel space, v-prediction (stable when the model is briefly trained:
    epsilon prediction amplifies its error ~100x into the image at the noisiest steps)."""
    return {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction",
            "clip_sample": True}


@dataclass(kw_only=True)
class GanConfig:
    """A class-conditional DCGAN generator (the BigGAN stand-in)."""

    noise_dim: int = 64
    """Length of the Gaussian noise vector z."""
    num_classes: int = 7
    """Number of classes; each has a learned embedding concatenated to z."""
    width: int = 32
    """Channels of the last upsampling block; earlier blocks have 2x, 4x, 8x."""


class GanGenerator(nn.Module):
    """z [B, noise_dim] + class [B] -> image [B, 3, 64, 64] in [-1, 1]: 4x4 seed, four x2 upsamplings."""

    def __init__(self, config: GanConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.class_embedding = nn.Embedding(config.num_classes, config.noise_dim)
        self.project = nn.Linear(2 * config.noise_dim, 8 * w * 4 * 4)
        blocks: list[nn.Module] = []
        for c_in, c_out in ((8 * w, 4 * w), (4 * w, 2 * w), (2 * w, w)):
            blocks += [nn.BatchNorm2d(c_in), nn.ReLU(), nn.Upsample(scale_factor=2),
                       nn.Conv2d(c_in, c_out, 3, padding=1)]
        blocks += [nn.BatchNorm2d(w), nn.ReLU(), nn.Upsample(scale_factor=2), nn.Conv2d(w, 3, 3, padding=1), nn.Tanh()]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, noise_BZ: torch.Tensor, class_B: torch.Tensor) -> torch.Tensor:
        h = self.project(torch.cat([noise_BZ, self.class_embedding(class_B)], dim=1))
        return self.blocks(h.view(h.shape[0], 8 * self.config.width, 4, 4))  # [B, 8w, 4, 4] -> [B, 3, 64, 64]


class GanDiscriminator(nn.Module):
    """image [B, 3, 64, 64] + class [B] -> realness logit [B] (projection discriminator)."""

    def __init__(self, config: GanConfig) -> None:
        super().__init__()
        w = config.width
        layers: list[nn.Module] = []
        for c_in, c_out in ((3, w), (w, 2 * w), (2 * w, 4 * w), (4 * w, 8 * w)):  # 64 -> 32 -> 16 -> 8 -> 4
            layers += [nn.utils.spectral_norm(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)
        self.linear = nn.utils.spectral_norm(nn.Linear(8 * w, 1))
        self.class_embedding = nn.utils.spectral_norm(nn.Embedding(config.num_classes, 8 * w))

    def forward(self, image_B3HW: torch.Tensor, class_B: torch.Tensor) -> torch.Tensor:
        h_BC = self.features(image_B3HW).sum(dim=(2, 3))
        return self.linear(h_BC).squeeze(1) + (self.class_embedding(class_B) * h_BC).sum(dim=1)
