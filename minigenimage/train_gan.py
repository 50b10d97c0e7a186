"""Train the zoo's GAN (``gan``, the BigGAN stand-in): a class-conditional DCGAN generator against a
spectral-norm projection discriminator, hinge loss, on 64 x 64 crops of the zoo-pool photographs.

Writes ``<zoo>/gan/generator.safetensors`` and ``<zoo>/gan/config.json`` (the generator only).

    python -m lare2.minigenimage.train_gan [--steps N]
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lare2.minigenimage.models import IMAGE_SIZE, GanConfig, GanDiscriminator, GanGenerator
from lare2.minigenimage.photos import CLASS_NAMES
from lare2.minigenimage.zoo import (StepLogger, ZooTrainConfig, batches, log, record_weights, recipe_from_args,
                                   training_images)
from lare2.shared.errors import InputError


@dataclass(kw_only=True)
class GanTrainConfig(ZooTrainConfig):
    """Recipe of the zoo's GAN; the generator goes to ``<zoo>/gan``."""

    seed: int = 3
    width: int = 16
    """Generator / discriminator width (see ``GanConfig``)."""
    steps: int = 800
    lr: float = 2e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.width < 1:
            raise InputError("width must be >= 1")


def train(config: GanTrainConfig) -> Path:
    from safetensors.torch import save_file

    images_N3HW, classes_N = training_images(config.crops_per_photo, IMAGE_SIZE, config.seed)
    gan_config = GanConfig(num_classes=len(CLASS_NAMES), width=config.width)
    torch.manual_seed(config.seed)
    generator_net, discriminator = GanGenerator(gan_config).train(), GanDiscriminator(gan_config).train()
    opt_g = torch.optim.Adam(generator_net.parameters(), lr=config.lr, betas=(0.0, 0.9))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=2 * config.lr, betas=(0.0, 0.9))
    rng = torch.Generator().manual_seed(config.seed)
    step_log = StepLogger("gan", config.steps)
    for step, index_B in enumerate(batches(len(images_N3HW), config.batch_size, config.steps, rng)):
        real_B3HW, class_B = images_N3HW[index_B], classes_N[index_B]
        noise_BZ = torch.randn(len(index_B), gan_config.noise_dim, generator=rng)
        fake_B3HW = generator_net(noise_BZ, class_B)
        loss_d = (torch.relu(1 - discriminator(real_B3HW, class_B)).mean()
                  + torch.relu(1 + discriminator(fake_B3HW.detach(), class_B)).mean())
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        loss_g = -discriminator(fake_B3HW, class_B).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        step_log(step, loss_d.item())

    folder = Path(config.zoo) / "gan"
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in generator_net.eval().state_dict().items()}
    save_file(state, str(folder / "generator.safetensors"))
    (folder / "config.json").write_text(json.dumps(asdict(gan_config), indent=2) + "\n")
    log.info("gan: saved to %s", folder)
    record_weights(Path(config.zoo), "gan", {"generator": asdict(config) | {"zoo": "minigenimage/zoo"}})
    return folder


def load_generator(folder: Path) -> GanGenerator:
    """The committed generator, in eval mode (batch norm uses its running statistics: images are independent)."""
    from safetensors.torch import load_file

    config_path, weights_path = folder / "config.json", folder / "generator.safetensors"
    for path in (config_path, weights_path):
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing; train the GAN first (python -m lare2.minigenimage.train_gan)")
    net = GanGenerator(GanConfig(**json.loads(config_path.read_text())))
    net.load_state_dict(load_file(str(weights_path)), strict=True)
    return net.eval()


def main(argv: list[str] | None = None) -> None:
    train(recipe_from_args(GanTrainConfig, __doc__.splitlines()[0], argv))


if __name__ == "__main__":
    main()
