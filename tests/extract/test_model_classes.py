"""Stage 1's own model class through the one model tester (``tests/helpers/model_tester.py``): the CLIP
text tower. The image tower is a ``shared`` class (``tests/shared/test_model_classes.py``); the VAE, UNet
and text encoder of the latent diffusion model are diffusers' and transformers' classes, and the LaRE
computer holds no weights of its own (its batch independence: ``tests/extract/test_lare.py``)."""

from __future__ import annotations

import pytest
import torch

from lare2.extract.clip_text import ClipTextConfig, ClipTextTower
from tests.helpers.model_tester import MODEL_CHECKS, ModelCase, case_id, check_id

# a 2-block transformer over 8 tokens of a 64-token vocabulary
TEXT = ClipTextConfig(vocab_size=64, context_length=8, width=32, layers=2, heads=4, embed_dim=16)


def prompt_tokens(batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Token ids [B, L] and each prompt's end-of-text position [B], not the last for every prompt."""
    return {"ids_BL": torch.randint(0, TEXT.vocab_size, (batch, TEXT.context_length), generator=generator),
            "eot_B": torch.randint(1, TEXT.context_length, (batch,), generator=generator)}


CASES = [
    ModelCase(name="clip-text-tower", build=lambda: ClipTextTower(TEXT), inputs=prompt_tokens,
              output_shapes={"forward": (TEXT.embed_dim,)}),
]


@pytest.mark.parametrize("check", MODEL_CHECKS, ids=check_id)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_model_class(case: ModelCase, check, tmp_path) -> None:
    check(case, tmp_path)
