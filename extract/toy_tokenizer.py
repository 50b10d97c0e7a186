"""A toy CLIP BPE vocabulary (letters, digits, punctuation; no merges) for tiny models.

Real Stable Diffusion folders ship their own tokenizer; tests, the demo and the MiniGenImage
zoo use this one so that nothing is downloaded. Every word is tokenized letter by letter.
"""

from __future__ import annotations

import json
import string
from pathlib import Path


SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def toy_vocab() -> dict[str, int]:
    symbols = string.ascii_lowercase + string.digits + "',.-!?&()/"
    tokens = list(symbols) + [s + "</w>" for s in symbols] + list(SPECIAL_TOKENS)
    return {tok: i for i, tok in enumerate(tokens)}


def write_toy_tokenizer(folder: str | Path, model_max_length: int = 77) -> Path:
    """Write vocab.json / merges.txt / tokenizer_config.json loadable by ``CLIPTokenizer.from_pretrained``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(toy_vocab()))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": SPECIAL_TOKENS[0],
        "eos_token": SPECIAL_TOKENS[1],
        "unk_token": SPECIAL_TOKENS[1],
        "pad_token": SPECIAL_TOKENS[1],
    }))
    return folder
