"""OpenAI CLIP's text tower, written out with the official key names, and zero-shot ImageNet classes.

OpenAI's ``RN50.pt`` holds the text tower beside the image tower (``extract/clip_resnet.py``):
``token_embedding``, ``positional_embedding``, ``transformer.resblocks.*`` (pre-LayerNorm blocks
with causal self-attention and QuickGELU MLPs), ``ln_final`` and ``text_projection``. The text
embedding of a prompt is ``ln_final`` of the hidden state at its end-of-text token, times
``text_projection``. Scoring uses it to pick an image's ImageNet class when a detector was
trained with class prompts and an image's name carries none (``lare2 score --class-name auto``):
the class whose prompt ``a photo of a {class}`` is the most similar (cosine) to the image's
embedding, CLIP's zero-shot classifier (docs/method.md §1.4).

Prompts are tokenised with the CLIP BPE tokenizer that ships in every Stable Diffusion folder
(``tokenizer/``, ``transformers.CLIPTokenizer``): the same vocabulary as OpenAI's.

Shapes: B prompts or images, L tokens (77), W transformer width, E embedding width.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from lare2.extract.clip_resnet import HEAD_WIDTH, load_state_strict, read_backbone_state
from lare2.extract.models import ModelSourceError
from lare2.shared.classnames import NUM_CLASSES, class_name

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""CLIP's own image normalisation, for the zero-shot classifier's input (the backbone features keep ImageNet's)."""
TEXT_PREFIXES = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection")
"""Keys of the text tower in a CLIP state dict; ``visual.*``, ``logit_scale`` and the TorchScript
archive's ``input_resolution``/``context_length``/``vocab_size`` belong to other parts."""


@dataclass(kw_only=True)
class ClipTextConfig:
    """Architecture of a CLIP text transformer."""

    vocab_size: int = 49408
    """Token embeddings (CLIP's BPE vocabulary: 49,408)."""
    context_length: int = 77
    """Tokens per prompt (positional embeddings)."""
    width: int = 512
    """Transformer width W."""
    layers: int = 12
    """Residual attention blocks."""
    heads: int = 8
    """Attention heads (CLIP: width // 64)."""
    embed_dim: int = 1024
    """Output E, shared with the image tower (RN50: 1024)."""

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"heads={self.heads} must divide width={self.width}")


def rn50_text_config() -> ClipTextConfig:
    """The text tower of OpenAI CLIP RN50."""
    return ClipTextConfig()


def tiny_text_config(vocab_size: int, embed_dim: int = 128) -> ClipTextConfig:
    """Milliseconds on a CPU; ``embed_dim`` 128 matches ``clip_resnet.tiny_config``'s pooled width."""
    return ClipTextConfig(vocab_size=vocab_size, width=32, layers=2, heads=4, embed_dim=embed_dim)


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """``x + attn(ln_1(x))`` (causal), then ``x + mlp(ln_2(x))``; keys as OpenAI's."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(width * 4, width)),
        ]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x_BLW: Tensor, mask_LL: Tensor) -> Tensor:
        h = self.ln_1(x_BLW)
        x_BLW = x_BLW + self.attn(h, h, h, need_weights=False, attn_mask=mask_LL)[0]
        return x_BLW + self.mlp(self.ln_2(x_BLW))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x_BLW: Tensor, mask_LL: Tensor) -> Tensor:
        for block in self.resblocks:
            x_BLW = block(x_BLW, mask_LL)
        return x_BLW


class ClipTextTower(nn.Module):
    """CLIP's text encoder: token ids [B, L] and end-of-text positions -> embeddings [B, E]."""

    def __init__(self, config: ClipTextConfig) -> None:
        super().__init__()
        self.config = config
        width = config.width
        self.token_embedding = nn.Embedding(config.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(config.context_length, width) * 0.01)
        self.transformer = Transformer(width, config.layers, config.heads)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, config.embed_dim) * width**-0.5)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def forward(self, ids_BL: Tensor, eot_B: Tensor) -> Tensor:
        """``eot_B``: index of each prompt's end-of-text token (OpenAI: ``ids.argmax(-1)``, the highest id)."""
        L = ids_BL.shape[1]
        mask_LL = torch.full((L, L), float("-inf"), device=ids_BL.device).triu(1)  # causal: no attending ahead
        x_BLW = self.token_embedding(ids_BL) + self.positional_embedding[:L]
        x_BLW = self.ln_final(self.transformer(x_BLW, mask_LL.to(x_BLW.dtype)))
        return x_BLW[torch.arange(ids_BL.shape[0], device=ids_BL.device), eot_B] @ self.text_projection


# ---- loading ------------------------------------------------------------------------------------
def text_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The text tower's tensors of a CLIP state dict (see ``TEXT_PREFIXES``)."""
    return {k: v for k, v in state.items() if k.startswith(TEXT_PREFIXES)}


def infer_text_config(state: Mapping[str, Tensor]) -> ClipTextConfig:
    """The architecture of a text-tower state dict, from its tensor shapes (heads = width // 64, CLIP's convention)."""
    required = ("token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection")
    missing = [k for k in required if k not in state]
    if missing:
        raise KeyError(f"no CLIP text tower: missing {missing}")
    vocab_size, width = state["token_embedding.weight"].shape
    layers = {int(m.group(1)) for k in state if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))}
    return ClipTextConfig(vocab_size=int(vocab_size), context_length=int(state["positional_embedding"].shape[0]),
                          width=int(width), layers=len(layers), heads=max(1, int(width) // HEAD_WIDTH),
                          embed_dim=int(state["text_projection"].shape[1]))


def load_text_tower(spec: str | Path, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> ClipTextTower:
    """The frozen text tower of a CLIP weight file (``RN50.pt`` or a state dict), loaded with ``strict=True``."""
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ModelSourceError(f"{spec}: zero-shot classes need CLIP's text tower, and this backbone is not a weight "
                               "file; pass --clip RN50.pt (OpenAI's archive holds both towers)")
    state = text_state(read_backbone_state(path))
    try:
        config = infer_text_config(state)
    except KeyError as err:
        raise ModelSourceError(f"{path}: {err.args[0]}; zero-shot classes need a CLIP file with its text tower "
                               "(OpenAI's RN50.pt holds it)") from None
    tower = ClipTextTower(config)
    load_state_strict(tower, state, str(path), what="a CLIP text tower")
    return tower.to(device=device, dtype=dtype).eval().requires_grad_(False)


# ---- zero-shot ImageNet ------------------------------------------------------------------------
def zero_shot_input(image, size: int = 224) -> Tensor:
    """[3, size, size]: CLIP's preprocessing (shorter side to ``size``, bicubic; centre crop; CLIP mean/std)."""
    from PIL import Image

    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), Image.BICUBIC)
    left, top = (resized.size[0] - size) // 2, (resized.size[1] - size) // 2
    x_HW3 = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    x_HW3 = (x_HW3 - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x_HW3.transpose(2, 0, 1)))


def tokenize(tokenizer, prompts: list[str], context_length: int) -> tuple[Tensor, Tensor]:
    """(ids [B, L], end-of-text positions [B]) with a ``transformers.CLIPTokenizer``, padded to ``context_length``."""
    ids_BL = tokenizer(prompts, padding="max_length", max_length=context_length, truncation=True,
                       return_tensors="pt").input_ids
    eot_B = (ids_BL == tokenizer.eos_token_id).int().argmax(dim=-1)  # the first one: padding may repeat it
    return ids_BL, eot_B


class ZeroShotImageNet:
    """CLIP's zero-shot classifier over the 1,000 ImageNet classes, prompting ``template`` with each class's name."""

    def __init__(self, tower: ClipTextTower, tokenizer, template: str = "a photo of a {}",
                 batch_size: int = 250) -> None:
        if len(tokenizer) > tower.config.vocab_size:
            raise ModelSourceError(f"the tokenizer has {len(tokenizer)} tokens, "
                                   f"the text tower {tower.config.vocab_size}: they do not belong together")
        self.names = [class_name(i) for i in range(NUM_CLASSES)]
        device = tower.token_embedding.weight.device
        chunks = []
        with torch.no_grad():
            for start in range(0, NUM_CLASSES, batch_size):
                ids, eot = tokenize(tokenizer, [template.format(n) for n in self.names[start:start + batch_size]],
                                    tower.config.context_length)
                chunks.append(tower(ids.to(device), eot.to(device)).float())
        self.text_features_KE = torch.nn.functional.normalize(torch.cat(chunks), dim=-1)

    @torch.no_grad()
    def classify(self, image_features_BE: Tensor) -> list[int]:
        """ImageNet class index per image embedding (the image tower's pooled output): the highest cosine similarity."""
        if image_features_BE.shape[-1] != self.text_features_KE.shape[-1]:
            raise ModelSourceError(f"image embeddings of width {image_features_BE.shape[-1]} and text embeddings of "
                                   f"width {self.text_features_KE.shape[-1]}: not the two towers of one CLIP model")
        image_BE = torch.nn.functional.normalize(image_features_BE.float(), dim=-1).to(self.text_features_KE.device)
        return (image_BE @ self.text_features_KE.T).argmax(dim=-1).tolist()
