"""The zoo's own model classes through the one model tester (``tests/helpers/model_tester.py``): the GAN's
generator and discriminator. The zoo's VAE, UNets and text encoder are diffusers' and transformers'
classes in tiny configs (``minigenimage/models.py``); their weights are checked against the recorded
fingerprints in ``tests/minigenimage/test_minigenimage.py``."""

from __future__ import annotations

import pytest
import torch

from lare2.minigenimage.models import IMAGE_SIZE, GanConfig, GanDiscriminator, GanGenerator
from tests.helpers.model_tester import MODEL_CHECKS, ModelCase, case_id, check_id

GAN = GanConfig(noise_dim=8, num_classes=3, width=4)


def generator_inputs(batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {"noise_BZ": torch.randn(batch, GAN.noise_dim, generator=generator),
            "class_B": torch.randint(0, GAN.num_classes, (batch,), generator=generator)}


def discriminator_inputs(batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {"image_B3HW": torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 2 - 1,
            "class_B": torch.randint(0, GAN.num_classes, (batch,), generator=generator)}


CASES = [
    ModelCase(name="gan-generator", build=lambda: GanGenerator(GAN), inputs=generator_inputs,
              output_shapes={"forward": (3, IMAGE_SIZE, IMAGE_SIZE)}),
    ModelCase(name="gan-discriminator", build=lambda: GanDiscriminator(GAN), inputs=discriminator_inputs,
              output_shapes={"forward": ()}),
]


@pytest.mark.parametrize("check", MODEL_CHECKS, ids=check_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_model_class(case: ModelCase, check, tmp_path) -> None:
    check(case, tmp_path)
