"""Train the zoo's pixel-space diffusion model (``pixel-ddpm``, the ADM / GLIDE stand-in).

A class-conditional diffusers ``UNet2DModel`` on 64 x 64 crops of the zoo-pool photographs, DDPM's cosine
schedule (ADM's), v-prediction. Writes ``<zoo>/pixel-ddpm/{unet,scheduler}``.

    python -m lare2.minigenimage.train_pixel_ddpm [--steps N]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lare2.minigenimage.models import IMAGE_SIZE, pixel_scheduler_config, pixel_unet
from lare2.minigenimage.photos import CLASS_NAMES
from lare2.minigenimage.zoo import (StepLogger, ZooTrainConfig, batches, log, optimizer_step, record_weights,
                                   recipe_from_args, training_images)


@dataclass(kw_only=True)
class PixelDdpmTrainConfig(ZooTrainConfig):
    """Recipe of the zoo's pixel diffusion model; it goes to ``<zoo>/pixel-ddpm``."""

    seed: int = 2
    steps: int = 500
    batch_size: int = 8


def train(config: PixelDdpmTrainConfig) -> Path:
    from diffusers import DDPMScheduler

    images_N3HW, classes_N = training_images(config.crops_per_photo, IMAGE_SIZE, config.seed)
    scheduler = DDPMScheduler(**pixel_scheduler_config())
    torch.manual_seed(config.seed)
    unet = pixel_unet(len(CLASS_NAMES)).train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
    generator = torch.Generator().manual_seed(config.seed)
    alphas = scheduler.alphas_cumprod
    step_log = StepLogger("pixel-ddpm", config.steps, every=25)
    for step, index_B in enumerate(batches(len(images_N3HW), config.batch_size, config.steps, generator)):
        x0_B3HW = images_N3HW[index_B]
        noise_B3HW = torch.randn(x0_B3HW.shape, generator=generator)
        t_B = torch.randint(0, scheduler.config.num_train_timesteps, (len(index_B),), generator=generator)
        a_B111 = alphas[t_B].view(-1, 1, 1, 1)
        xt_B3HW = a_B111.sqrt() * x0_B3HW + (1 - a_B111).sqrt() * noise_B3HW
        v_B3HW = scheduler.get_velocity(x0_B3HW, noise_B3HW, t_B)
        loss = (unet(xt_B3HW, t_B, class_labels=classes_N[index_B]).sample - v_B3HW).pow(2).mean()
        optimizer_step(loss, unet, optimizer, schedule)
        step_log(step, loss.item())

    folder = Path(config.zoo) / "pixel-ddpm"
    unet.eval().save_pretrained(folder / "unet", safe_serialization=True)
    scheduler.save_pretrained(folder / "scheduler")
    log.info("pixel-ddpm: saved to %s", folder)
    record_weights(Path(config.zoo), "pixel-ddpm", {"unet": asdict(config) | {"zoo": "minigenimage/zoo"}})
    return folder


def main(argv: list[str] | None = None) -> None:
    train(recipe_from_args(PixelDdpmTrainConfig, __doc__.splitlines()[0], argv))


if __name__ == "__main__":
    main()
