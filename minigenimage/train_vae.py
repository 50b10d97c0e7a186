"""Train the zoo's VAE (SD's geometry, 64 px -> 4 x 8 x 8) on crops of the zoo-pool photographs.

Writes ``<zoo>/ldm-a/vae`` (diffusers AutoencoderKL, safetensors) with ``scaling_factor`` set so that
scaled latents have unit standard deviation, as SD's 0.18215 does for its VAE.

    python -m lare2.minigenimage.train_vae [--steps N] [--zoo DIR]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lare2.minigenimage.models import IMAGE_SIZE, tiny_vae
from lare2.minigenimage.zoo import (StepLogger, ZooTrainConfig, batches, log, optimizer_step, record_weights,
                                   recipe_from_args, training_images)


@dataclass(kw_only=True)
class VaeTrainConfig(ZooTrainConfig):
    """Recipe of the zoo's VAE; it goes to ``<zoo>/ldm-a/vae``."""

    steps: int = 1200
    batch_size: int = 8
    kl_weight: float = 1e-6
    """Weight of the KL term (SD's VAE uses ~1e-6: a near-deterministic autoencoder)."""


def train(config: VaeTrainConfig) -> Path:
    torch.manual_seed(config.seed)
    images_N3HW, _ = training_images(config.crops_per_photo, IMAGE_SIZE, config.seed)
    vae = tiny_vae().train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
    generator = torch.Generator().manual_seed(config.seed)
    step_log = StepLogger("vae", config.steps)
    for step, index_B in enumerate(batches(len(images_N3HW), config.batch_size, config.steps, generator)):
        x_B3HW = images_N3HW[index_B]
        posterior = vae.encode(x_B3HW).latent_dist
        recon_B3HW = vae.decode(posterior.sample(generator=generator)).sample
        loss = (recon_B3HW - x_B3HW).abs().mean() + (recon_B3HW - x_B3HW).pow(2).mean()
        loss = loss + config.kl_weight * posterior.kl().mean()
        optimizer_step(loss, vae, optimizer, schedule)
        step_log(step, loss.item())

    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(images_N3HW[i:i + 64]).latent_dist.mean
                             for i in range(0, len(images_N3HW), 64)])
    scaling_factor = round(float(1.0 / latents.std()), 5)
    vae.register_to_config(scaling_factor=scaling_factor)
    out = Path(config.zoo) / "ldm-a" / "vae"
    vae.save_pretrained(out, safe_serialization=True)
    log.info("vae: scaling_factor %.5f, saved to %s", scaling_factor, out)
    record_weights(Path(config.zoo), "ldm-a", {"vae": asdict(config) | {"zoo": "minigenimage/zoo"}})
    return out


def main(argv: list[str] | None = None) -> None:
    train(recipe_from_args(VaeTrainConfig, __doc__.splitlines()[0], argv))


if __name__ == "__main__":
    main()
