"""FLOPs per image of stage 1's models, counted by ``torch.utils.flop_counter.FlopCounterMode`` on meta tensors.

Counted (2 FLOPs per multiply-add; convolutions, matmuls and attention; elementwise work is not
counted), per image, at the settings of docs/method.md §1:
- ``vae_encoder``: SD VAE encoder + ``quant_conv`` on a 256 px image;
- ``unet``: the E UNet calls of one image, i.e. one call at batch E on the 32 x 32 latent, with
  77-token text conditioning;
- ``backbone``: CLIP RN50 at 224 px;
- ``total``: the three together (what one extracted image costs);
and, for reference: one UNet call, the text encoder per distinct prompt (cached, so amortised), the
VAE decoder, and a DIRE-style feature (encoder + 2 x 20 UNet calls at batch 1 + decoder).

Meta tensors carry shapes and no data, so the full-size count takes a second and no memory; the
weights (random or real) do not change it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.models import Size, build_backbone, build_latent_diffusion

GIGA = 1e9


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (under ``torch.no_grad``)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn()
    return int(counter.get_total_flops())


def stage1_flops(size: Size = "full", *, ensemble: int = 4, image_size: int = 256, backbone_size: int = 224,
                 dire_steps: int = 20, device: str | torch.device = "meta") -> dict:
    """GFLOP per image of each stage-1 component and their total; see the module docstring."""
    model = build_latent_diffusion(size, device=device)
    backbone = build_backbone(size, device=device)
    vae, unet = model.vae, model.unet
    latent = image_size // 2 ** (len(vae.config.block_out_channels) - 1)
    channels = vae.config.latent_channels
    length = model.tokenizer.model_max_length
    width = model.text_encoder.config.hidden_size

    def unet_call(batch: int) -> int:
        return count_flops(lambda: unet(torch.zeros(batch, channels, latent, latent, device=device),
                                        torch.full((batch,), 200, device=device),
                                        encoder_hidden_states=torch.zeros(batch, length, width, device=device)))

    encoder = count_flops(lambda: vae.encode(torch.zeros(1, 3, image_size, image_size, device=device)))
    unet_e = unet_call(ensemble)
    unet_1 = unet_call(1)
    rn = count_flops(lambda: backbone(torch.zeros(1, 3, backbone_size, backbone_size, device=device)))
    text = count_flops(lambda: model.text_encoder(torch.zeros(1, length, dtype=torch.long, device=device)))
    decoder = count_flops(lambda: vae.decode(torch.zeros(1, channels, latent, latent, device=device)))
    total = encoder + unet_e + rn
    dire = encoder + 2 * dire_steps * unet_1 + decoder
    return {
        "size": size, "ensemble": ensemble, "image_size": image_size, "latent": [channels, latent, latent],
        "backbone_size": backbone_size,
        "gflop_per_image": {"vae_encoder": round(encoder / GIGA, 2), "unet": round(unet_e / GIGA, 2),
                            "backbone": round(rn / GIGA, 2), "total": round(total / GIGA, 2)},
        "gflop_other": {"unet_one_call": round(unet_1 / GIGA, 2), "text_encoder_per_prompt": round(text / GIGA, 2),
                        "vae_decoder": round(decoder / GIGA, 2),
                        f"dire_style_{dire_steps}_steps": round(dire / GIGA, 2),
                        "dire_style_over_lare": round(dire / (encoder + unet_e), 2),
                        "dire_style_over_lare_plus_backbone": round(dire / total, 2)},
        "flops_per_image": {"vae_encoder": encoder, "unet": unet_e, "backbone": rn, "total": total,
                            "unet_one_call": unet_1},
        "method": "torch.utils.flop_counter.FlopCounterMode on meta tensors, 2 FLOPs per multiply-add",
    }
