"""A DIRE-style feature with the LaRE model's VAE and UNet, for the cost comparison of ``make bench``
(never for detection).

DIRE (Wang et al., ICCV 2023) inverts an image to noise with DDIM, reconstructs it with DDIM and
takes the reconstruction error. In latent-diffusion form, per image:

    z0    = E(x).mean * s                        posterior mean, s = vae scaling factor   [B, 4, h, w]
    z_T   = invert(z0)                           S DDIM steps up, eta = 0 (t_1 < ... < t_S ~ T)
    z0'   = reconstruct(z_T)                     S DDIM steps down (diffusers' ``DDIMScheduler.step``)
    dire  = |x - D(z0' / s)|                                                              [B, 3, H, W]

2 x S UNet calls at batch B (text-conditioned, no guidance), against LaRE's one call at batch B x E.
The inversion is the exact mirror of the scheduler's step: step k goes from the noise level the
reconstruction step at t_k lands on (``alphas_cumprod[t_k - T/S]``, or ``final_alpha_cumprod``)
to ``alphas_cumprod[t_k]``, with the UNet's prediction at the current latent and timestep t_k (the
convention of diffusers' ``DDIMInverseScheduler``). With a prediction that does not depend on its
input, inversion then reconstruction returns the start exactly.

Shapes: B images, L tokens (77), D text width, h = w = image size / 8.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from lare2.extract.models import LatentDiffusion
from torch import Tensor

if TYPE_CHECKING:
    from diffusers import DDIMScheduler

DDIM_STEPS = 20
"""DIRE's setting: 20 DDIM steps each way."""


def ddim_scheduler(model: LatentDiffusion, steps: int = DDIM_STEPS) -> DDIMScheduler:
    """A ``DDIMScheduler`` on the model's training noise schedule, set to ``steps`` steps; no sample clipping
    (latents)."""
    from diffusers import DDIMScheduler

    if model.prediction_type != "epsilon":
        raise ValueError(f"prediction_type={model.prediction_type!r}: the DIRE-style path supports ('epsilon',)")
    scheduler = DDIMScheduler.from_config(model.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(steps)
    return scheduler


def predict_noise(model: LatentDiffusion, z_BChw: Tensor, t: Tensor, text_BLD: Tensor) -> Tensor:
    """One UNet call: the noise prediction at timestep ``t`` for every latent, float32 (computed in
    ``text_BLD``'s dtype)."""
    t_B = torch.full((z_BChw.shape[0],), int(t), dtype=torch.long, device=z_BChw.device)
    return model.unet(z_BChw.to(text_BLD.dtype), t_B, encoder_hidden_states=text_BLD).sample.float()


@torch.no_grad()
def ddim_invert(model: LatentDiffusion, scheduler: DDIMScheduler, z0_BChw: Tensor, text_BLD: Tensor) -> Tensor:
    """Deterministic DDIM inversion of clean latents up to ``scheduler.timesteps[0]`` (951 of 1000 for SD at 20 steps;
    len(timesteps) UNet calls)."""
    alphas = scheduler.alphas_cumprod
    alpha_from = torch.as_tensor(scheduler.final_alpha_cumprod)
    z_BChw = z0_BChw.float()
    for t in scheduler.timesteps.flip(0):  # ascending
        eps_BChw = predict_noise(model, z_BChw, t, text_BLD)
        alpha_to = alphas[int(t)]
        x0_BChw = (z_BChw - (1 - alpha_from).sqrt() * eps_BChw) / alpha_from.sqrt()
        z_BChw = alpha_to.sqrt() * x0_BChw + (1 - alpha_to).sqrt() * eps_BChw
        alpha_from = alpha_to
    return z_BChw


@torch.no_grad()
def ddim_reconstruct(model: LatentDiffusion, scheduler: DDIMScheduler, zT_BChw: Tensor, text_BLD: Tensor) -> Tensor:
    """DDIM sampling (eta = 0) from ``scheduler.timesteps[0]`` down to clean latents (len(timesteps) UNet calls)."""
    z_BChw = zT_BChw.float()
    for t in scheduler.timesteps:  # descending
        eps_BChw = predict_noise(model, z_BChw, t, text_BLD)
        z_BChw = scheduler.step(eps_BChw, t, z_BChw, eta=0.0).prev_sample
    return z_BChw


@torch.no_grad()
def dire_maps(model: LatentDiffusion, scheduler: DDIMScheduler, images_B3HW: Tensor, text_BLD: Tensor) -> Tensor:
    """|x - x_rec| [B, 3, H, W], float32, of images in [-1, 1]: encode, invert, reconstruct, decode."""
    vae = model.vae
    device, dtype = vae.device, vae.dtype
    images_B3HW = images_B3HW.to(device, torch.float32)
    z0_BChw = vae.encode(images_B3HW.to(dtype)).latent_dist.mode().float() * vae.config.scaling_factor
    zT_BChw = ddim_invert(model, scheduler, z0_BChw, text_BLD)
    z0_rec_BChw = ddim_reconstruct(model, scheduler, zT_BChw, text_BLD)
    x_rec_B3HW = vae.decode((z0_rec_BChw / vae.config.scaling_factor).to(dtype)).sample.float()
    return (images_B3HW - x_rec_B3HW).abs()
