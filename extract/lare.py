"""The LaRE map (docs/method.md §1): the latent reconstruction error of a latent diffusion model, batched.

Per image, with one generator seeded for that image alone:
    z0    = (mean + std * n_post) * scaling_factor     n_post ~ N(0, I)  [1, 4, h, w], drawn first
    z_t   = sqrt(a_t) z0 + sqrt(1 - a_t) noise_e       noise  ~ N(0, I)  [E, 4, h, w], drawn second
    map   = mean_e (unet(z_t, t, text) - target_e)^2   target = noise (epsilon) or velocity
Draws happen on the CPU and then move, so a CPU and a GPU run see the same numbers; the map of a
sample never depends on batch size, batch composition or order.

Shapes: B images, E ensemble draws, L tokens (77), D text width, h = w = image size / 8.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lare2.extract.models import LatentDiffusion

LATENT_LOGVAR_RANGE = (-30.0, 20.0)  # the clamp of diffusers' DiagonalGaussianDistribution


def draw_sample_noise(seed: int, latent_shape_Chw: tuple[int, int, int], ensemble: int) -> tuple[Tensor, Tensor]:
    """One image's random draws, in the order of docs/method.md §1.5: the posterior's standard normal [1,C,h,w],
    then the noise [E,C,h,w].

    Float32 on the CPU, from a fresh ``torch.Generator`` seeded with ``seed``.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    posterior_1Chw = torch.randn((1, *latent_shape_Chw), generator=generator, dtype=torch.float32)
    noise_ECHW = torch.randn((ensemble, *latent_shape_Chw), generator=generator, dtype=torch.float32)
    return posterior_1Chw, noise_ECHW


class LareComputer:
    """Turns batches of [-1, 1] images into LaRE maps with a frozen latent diffusion model."""

    def __init__(
        self,
        model: LatentDiffusion,
        *,
        timestep: int = 200,
        ensemble: int = 4,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """``device`` / ``dtype`` default to the UNet's; the posterior, the draws and the error stay float32."""
        num_steps = model.scheduler.config.num_train_timesteps
        if not 0 <= timestep < num_steps:
            raise ValueError(f"timestep must be in [0, {num_steps}), got {timestep}")
        if ensemble < 1:
            raise ValueError(f"ensemble must be >= 1, got {ensemble}")
        if model.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type={model.prediction_type!r}: choose from ('epsilon', 'v_prediction')")
        self.model = model
        self.timestep = timestep
        self.ensemble = ensemble
        self.device = torch.device(device) if device is not None else model.unet.device
        self.dtype = dtype if dtype is not None else model.unet.dtype
        self._prompt_embeddings: dict[str, Tensor] = {}  # prompt -> [L, D], compute dtype, on device

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """Text embeddings [B, L, D] (``text_encoder(ids)[0]``); each distinct prompt is encoded once per computer."""
        tokenizer = self.model.tokenizer
        # one prompt per call: batched encoding rounds differently with different companions, and a map
        # must not depend on which prompts a process happened to meet first
        for prompt in sorted(set(prompts) - set(self._prompt_embeddings)):
            ids_1L = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length,
                               truncation=True, return_tensors="pt").input_ids.to(self.device)
            self._prompt_embeddings[prompt] = self.model.text_encoder(ids_1L)[0][0].to(self.dtype)
        return torch.stack([self._prompt_embeddings[p] for p in prompts])

    @torch.no_grad()
    def __call__(self, images_B3HW: Tensor, prompts: list[str], seeds: list[int]) -> Tensor:
        """LaRE maps [B, 4, h, w], float32, on ``device``, of images already in [-1, 1]
        (docs/method.md §1.2: 256 x 256)."""
        if images_B3HW.ndim != 4 or images_B3HW.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images_B3HW.shape)}")
        batch = images_B3HW.shape[0]
        if len(prompts) != batch or len(seeds) != batch:
            raise ValueError(f"{batch} images need as many prompts and seeds, got {len(prompts)} and {len(seeds)}")
        if images_B3HW.numel() and (images_B3HW.min() < -1.0001 or images_B3HW.max() > 1.0001):
            raise ValueError("images must be scaled to [-1, 1] ((x/255 - 0.5) * 2)")
        vae, unet, scheduler = self.model.vae, self.model.unet, self.model.scheduler
        E = self.ensemble

        # Posterior of the VAE, kept in float32 whatever the compute dtype.
        moments_B2Chw = vae.encode(images_B3HW.to(self.device, self.dtype)).latent_dist.parameters.float()
        mean_BChw, logvar_BChw = moments_B2Chw.chunk(2, dim=1)
        std_BChw = torch.exp(0.5 * logvar_BChw.clamp(*LATENT_LOGVAR_RANGE))

        draws = [draw_sample_noise(seed, tuple(mean_BChw.shape[1:]), E) for seed in seeds]
        posterior_BChw = torch.cat([p for p, _ in draws]).to(self.device)
        noise_BECHW = torch.stack([n for _, n in draws]).to(self.device)
        z0_BChw = (mean_BChw + std_BChw * posterior_BChw) * vae.config.scaling_factor

        z0_NChw = z0_BChw.repeat_interleave(E, dim=0)  # N = B * E, image-major
        noise_NChw = noise_BECHW.flatten(0, 1)
        t_N = torch.full((batch * E,), self.timestep, dtype=torch.long, device=self.device)
        zt_NChw = scheduler.add_noise(z0_NChw, noise_NChw, t_N)

        text_NLD = self.encode_prompts(list(prompts)).repeat_interleave(E, dim=0)
        prediction_NChw = unet(zt_NChw.to(self.dtype), t_N, encoder_hidden_states=text_NLD).sample.float()
        if self.model.prediction_type == "v_prediction":
            target_NChw = scheduler.get_velocity(z0_NChw, noise_NChw, t_N)
        else:
            target_NChw = noise_NChw
        error_BEChw = (prediction_NChw - target_NChw).square().unflatten(0, (batch, E))
        return error_BEChw.mean(dim=1)
