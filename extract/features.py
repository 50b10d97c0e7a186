"""Stage 1's features of a batch: the models that compute them, and the one batch path through them.

``load_models`` loads the latent diffusion model (for the LaRE map, docs/method.md §1) and the image
backbone (§2) for an ``ExtractConfig`` and reads the cache layout off one dummy pass; ``compute_images``
turns a batch of prepared images into the cache's arrays. The extraction job (``lare2.extract.run``),
its recomputation for ``cache verify`` and scoring new images (``lare2.detect``) all go through these,
so a feature is computed one way wherever it is computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lare2.extract.clip_resnet import ModifiedResNet
from lare2.extract.lare import LareComputer
from lare2.shared.cache import CacheLayout
from lare2.shared.config import ExtractConfig
from lare2.shared.settings import SettingsError


@dataclass
class Models:
    """Stage 1's frozen models for one extraction config, with what identifies them."""

    lare: LareComputer
    """The LaRE map computer around the latent diffusion model (its VAE, UNet, text encoder and tokenizer)."""
    backbone: ModifiedResNet
    """CLIP's image tower: ``pooled`` and ``fmap`` of a [B, 3, 224, 224] batch."""
    fingerprints: dict[str, str]
    """``{"sd": ..., "backbone": ...}``: the fingerprints of the ``sd`` and ``clip`` weights, part of a cache's
    identity (``fingerprint.sd``, ``fingerprint.backbone``: the keys every cache has been hashed with)."""
    layout: CacheLayout
    """Array shapes and storage dtypes of the cache these models fill."""

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype the backbone runs in (the config's ``compute_dtype``)."""
        return next(self.backbone.parameters()).dtype

    @property
    def tokenizer(self):
        """The latent diffusion model's tokenizer (also CLIP's text tower's, for zero-shot classes)."""
        return self.lare.model.tokenizer


def load_models(cfg: ExtractConfig, device: torch.device) -> Models:
    """The models ``cfg`` names, on ``device`` in ``cfg.compute_dtype``; the layout from one dummy pass."""
    from lare2.extract.clip_resnet import load_backbone
    from lare2.extract.models import load_latent_diffusion

    dtype = getattr(torch, cfg.compute_dtype)
    if dtype == torch.float16 and device.type == "cpu":
        # float16 convolutions run on CPU, but ~20x slower than float32 (tiny models, torch 2.13); bfloat16
        # has native CPU kernels, so it is what CI uses to exercise the reduced-precision GPU paths
        raise SettingsError("compute_dtype=float16 is for GPUs (on CPU its convolutions run ~20x slower than "
                            "float32); on CPU use float32, or bfloat16 to try the reduced-precision path")
    diffusion = load_latent_diffusion(cfg.sd, device=device, dtype=dtype)
    backbone, backbone_fp = load_backbone(cfg.clip, device=device, dtype=dtype)
    lare = LareComputer(diffusion, timestep=cfg.timestep, ensemble=cfg.ensemble, device=device, dtype=dtype)
    with torch.no_grad():  # shapes from one dummy pass: any backbone, any VAE depth
        out = backbone(torch.zeros(1, 3, 224, 224, device=device, dtype=dtype))
    down = 2 ** (len(diffusion.vae.config.block_out_channels) - 1)
    layout = CacheLayout(
        lare_shape=(diffusion.vae.config.latent_channels, cfg.image_size // down, cfg.image_size // down),
        pooled_dim=int(out.pooled.shape[-1]),
        fmap_shape=tuple(int(s) for s in out.fmap.shape[1:]),
        feature_dtype=cfg.feature_dtype,
        chunk_samples=cfg.chunk_samples,
        views=cfg.views,
    )
    return Models(lare, backbone, {"sd": diffusion.fingerprint, "backbone": backbone_fp}, layout)


def stored_config(stored: dict, device: torch.device, *, sd: str | None = None, clip: str | None = None,
                  compute_dtype: str | None = None) -> ExtractConfig:
    """A recorded extraction config (a cache's or a detector's), to recompute its features in this
    process: the models and compute dtype may be given anew, the device is this one, decoding runs inline."""
    given = dict(sd=sd, clip=clip, compute_dtype=compute_dtype)
    overrides = {key: value for key, value in given.items() if value}
    return ExtractConfig.from_dict(stored, **overrides, device=device.type, num_workers=0)


@torch.no_grad()
def compute_images(models: Models, lare_images: torch.Tensor, backbone_images: torch.Tensor, prompts: list[str],
                   seeds: list[int], device: torch.device,
                   view_images: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """Float32 numpy arrays by cache array name: ``lare`` [n, 4, h, w], ``pooled`` [n, D], ``fmap`` [n, Cf, 14, 14],
    and with ``view_images`` ``pooled_views`` [n, K, D], ``fmap_views`` [n, K, Cf, 14, 14].

    ``lare_images`` [n, 3, S, S] in [-1, 1], ``backbone_images`` [n, 3, 224, 224], ``view_images``
    [n, K, 3, 224, 224] (a ``DecodedBatch``'s tensors); the copies to ``device`` overlap with compute when the
    inputs are pinned. The evaluation views go through the backbone in their own call, so that they round
    exactly as without views.
    """
    lare_images_B3SS = lare_images.to(device, non_blocking=True)
    backbone_images_B3HW = backbone_images.to(device, non_blocking=True)
    lare_B4hw = models.lare(lare_images_B3SS, prompts, seeds)
    out = models.backbone(backbone_images_B3HW.to(models.dtype))
    outputs = {"lare": lare_B4hw, "pooled": out.pooled, "fmap": out.fmap}
    if view_images is not None:
        n, k = view_images.shape[:2]
        # V = n * K views, image-major
        views_V3HW = view_images.to(device, non_blocking=True).reshape(n * k, *view_images.shape[2:])
        views = models.backbone(views_V3HW.to(models.dtype))
        outputs["pooled_views"] = views.pooled.reshape(n, k, *views.pooled.shape[1:])
        outputs["fmap_views"] = views.fmap.reshape(n, k, *views.fmap.shape[1:])
    return {name: value.float().cpu().numpy() for name, value in outputs.items()}
