"""Every stage-2 model class through the one model tester (``tests/helpers/model_tester.py``): shapes at
batch 2 and 1, a batch of one equal to its row, safetensors round trip, same seed same model, eval mode
without randomness. Adding a model class is one row of ``CASES``. The backbone top on its own (a
``shared`` class) is a row of ``tests/shared/test_model_classes.py``."""

from __future__ import annotations

import pytest
import torch

from lare2.train.models import (
    EGREClassifier,
    EGREWithBackboneTop,
    LareOnlyCNN,
    LinearProbe,
    LinearWithBackboneTop,
    ModelConfig,
)
from tests.helpers.model_tester import MODEL_CHECKS, ModelCase, batch_inputs, build_seeded, case_id, check_id, run_model

# pooled D 16, fmap C x H x W 32 x 4 x 4, LaRE L x h x w 4 x 8 x 8; dropout > 0: eval mode must switch it off
TINY = {"pooled_dim": 16, "fmap_shape": (32, 4, 4), "lare_shape": (4, 8, 8), "num_heads": 2, "head_dim": 8,
        "channel_hidden": 8, "cnn_widths": (4, 8), "dropout": 0.1}
TOP = {"train_backbone_top": True, "backbone_top_depth": 1, "backbone_top_heads": 2}
GRID = TINY["fmap_shape"][1:]


def cached_inputs(model_class: type):
    """Inputs as the cache gives them: only the arrays ``model_class.input_names`` reads, None for the rest."""

    def inputs(batch: int, generator: torch.Generator) -> dict[str, torch.Tensor | None]:
        arrays = {
            "pooled": torch.randn(batch, TINY["pooled_dim"], generator=generator),
            "fmap": torch.randn(batch, *TINY["fmap_shape"], generator=generator),
            "lare": torch.rand(batch, *TINY["lare_shape"], generator=generator),  # squared errors: >= 0
        }
        return {name: a if name in model_class.input_names else None for name, a in arrays.items()}

    return inputs


def detector_case(name: str, model_class: type, with_attention: bool, **config) -> ModelCase:
    """``forward`` gives the logits [B, 2]; ``predict`` the ``DetectorOutput`` (EGRE's attention [B, H, W])."""
    shapes = {"forward": (2,), "predict.logits": (2,), **({"predict.attention": GRID} if with_attention else {})}
    model_config = ModelConfig(**TINY, **config)
    return ModelCase(name=name, build=lambda: model_class(model_config), inputs=cached_inputs(model_class),
                     output_shapes=shapes, methods=("forward", "predict"))


CASES = [
    detector_case("egre", EGREClassifier, with_attention=True, kind="egre"),
    detector_case("egre-zero-lare", EGREClassifier, with_attention=True, kind="egre", zero_lare=True),
    detector_case("linear", LinearProbe, with_attention=False, kind="linear"),
    detector_case("lare-only", LareOnlyCNN, with_attention=False, kind="lare-only"),
    detector_case("egre-backbone-top", EGREWithBackboneTop, with_attention=True, kind="egre", **TOP),
    detector_case("linear-backbone-top", LinearWithBackboneTop, with_attention=False, kind="linear", **TOP),
]


@pytest.mark.parametrize("check", MODEL_CHECKS, ids=check_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_model_class(case: ModelCase, check, tmp_path) -> None:
    check(case, tmp_path)


@pytest.mark.parametrize("case", [c for c in CASES if "predict" in c.methods], ids=case_id)
def test_forward_gives_the_logits_of_predict(case: ModelCase) -> None:
    """Training's ``forward`` and scoring's ``predict`` are one pass: the same logits, bit for bit."""
    outputs = run_model(case, build_seeded(case, seed=0), batch_inputs(case))
    assert torch.equal(outputs["forward"], outputs["predict.logits"])
