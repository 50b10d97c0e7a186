"""The CLIP tower classes both stages build (``shared/clip_blocks.py``) through the one model tester
(``tests/helpers/model_tester.py``): stage 1's ``ModifiedResNet`` and stage 2's ``BackboneTop``."""

from __future__ import annotations

import pytest
import torch

from lare2.shared.clip_blocks import BackboneTop, ModifiedResNet, ModifiedResNetConfig
from tests.helpers.model_tester import MODEL_CHECKS, ModelCase, case_id, check_id

# RN50's geometry in miniature: 64 px -> layer3 map [128, 4, 4] -> layer4 [256, 2, 2] -> pooled [16]
TOWER = ModifiedResNetConfig(layers=(1, 1, 1, 1), width=8, output_dim=16, heads=4, image_size=64)
FMAP_SHAPE = (TOWER.fmap_channels, TOWER.image_size // 16, TOWER.image_size // 16)

CASES = [
    ModelCase(
        name="modified-resnet",
        build=lambda: ModifiedResNet(TOWER),
        inputs=lambda batch, generator: {
            "x_B3HW": torch.randn(batch, 3, TOWER.image_size, TOWER.image_size, generator=generator)},
        output_shapes={"forward.pooled": (TOWER.output_dim,), "forward.fmap": FMAP_SHAPE},
    ),
    ModelCase(
        name="backbone-top",
        build=lambda: BackboneTop(fmap_channels=FMAP_SHAPE[0], grid=FMAP_SHAPE[1:], depth=1, heads=TOWER.heads,
                                  output_dim=TOWER.output_dim),
        inputs=lambda batch, generator: {"fmap_BCHW": torch.randn(batch, *FMAP_SHAPE, generator=generator)},
        output_shapes={"forward": (TOWER.output_dim,)},
    ),
]


@pytest.mark.parametrize("check", MODEL_CHECKS, ids=check_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_model_class(case: ModelCase, check, tmp_path) -> None:
    check(case, tmp_path)
