"""Our CLIP text tower: official key names, strict loading from a CLIP-RN50-shaped file, outputs equal to
transformers' CLIPTextModelWithProjection with the same weights, and the zero-shot classifier's argmax."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lare2.extract.clip_resnet import build_backbone, tiny_config
from lare2.extract.clip_text import (
    ClipTextTower,
    ZeroShotImageNet,
    load_text_tower,
    rn50_text_config,
    tiny_text_config,
    tokenize,
)
from lare2.extract.tiny_models import SPECIAL_TOKENS, toy_vocab

BLOCK_KEYS = ("attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias", "ln_1.weight",
              "ln_1.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias", "ln_2.weight",
              "ln_2.bias")


def official_text_shapes(vocab=49408, context=77, width=512, layers=12, embed=1024) -> dict[str, tuple]:
    """Names and shapes of OpenAI CLIP's text tensors, written out from the architecture."""
    shapes = {"token_embedding.weight": (vocab, width), "positional_embedding": (context, width),
              "text_projection": (width, embed), "ln_final.weight": (width,), "ln_final.bias": (width,)}
    per_block = dict(zip(BLOCK_KEYS, [(3 * width, width), (3 * width,), (width, width), (width,), (width,), (width,),
                                      (4 * width, width), (4 * width,), (width, 4 * width), (width,), (width,),
                                      (width,)]))
    for i in range(layers):
        shapes.update({f"transformer.resblocks.{i}.{k}": v for k, v in per_block.items()})
    return shapes


def tiny_tower(seed: int = 0) -> ClipTextTower:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ClipTextTower(tiny_text_config(vocab_size=len(toy_vocab()))).eval()


def toy_tokenizer(tmp_path: Path):
    from transformers import CLIPTokenizer

    from lare2.extract.tiny_models import write_toy_tokenizer

    return CLIPTokenizer.from_pretrained(str(write_toy_tokenizer(tmp_path / "tokenizer")))


def write_two_tower_clip(path: Path, seed: int = 0) -> Path:
    """A CLIP-RN50-shaped file in tiny sizes: ``visual.*`` (the ``tiny`` backbone's weights, hence its
    fingerprint), the text tower, ``logit_scale`` and the TorchScript archive's scalar entries."""
    state = {f"visual.{k}": v for k, v in build_backbone(tiny_config()).state_dict().items()}
    state.update(tiny_tower(seed).state_dict())
    state.update({"logit_scale": torch.tensor(4.6052), "input_resolution": torch.tensor(224),
                  "context_length": torch.tensor(77), "vocab_size": torch.tensor(len(toy_vocab()))})
    torch.save(state, path)
    return path


def test_key_names_and_shapes_are_openais() -> None:
    with torch.device("meta"):
        rn50 = ClipTextTower(rn50_text_config())
    assert {k: tuple(v.shape) for k, v in rn50.state_dict().items()} == official_text_shapes()


def test_loads_the_text_part_of_a_clip_file_strictly(tmp_path) -> None:
    path = write_two_tower_clip(tmp_path / "clip.pt")
    tower = load_text_tower(path)
    expected = tiny_tower(0).state_dict()
    assert set(tower.state_dict()) == set(expected)
    assert all(torch.equal(tower.state_dict()[k], v) for k, v in expected.items())
    assert not tower.training and not any(p.requires_grad for p in tower.parameters())

    state = torch.load(path, weights_only=True)
    del state["transformer.resblocks.1.ln_2.bias"]
    state["transformer.resblocks.0.attn.bias_k"] = torch.zeros(1, 1, 32)
    torch.save(state, tmp_path / "damaged.pt")
    with pytest.raises(ValueError, match=r"missing 1: transformer.resblocks.1.ln_2.bias.*unexpected 1: "
                                         r"transformer.resblocks.0.attn.bias_k"):
        load_text_tower(tmp_path / "damaged.pt")
    visual_only = {k: v for k, v in torch.load(path, weights_only=True).items() if k.startswith("visual.")}
    torch.save(visual_only, tmp_path / "visual.pt")
    with pytest.raises(ValueError, match="text tower"):
        load_text_tower(tmp_path / "visual.pt")
    with pytest.raises(ValueError, match="--clip RN50.pt"):
        load_text_tower("tiny")


def hf_copy(tower: ClipTextTower):
    """transformers' CLIPTextModelWithProjection with our tower's weights (q, k, v split out of in_proj)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    c, vocab = tower.config, toy_vocab()
    hf = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=c.vocab_size, hidden_size=c.width, intermediate_size=4 * c.width, num_hidden_layers=c.layers,
        num_attention_heads=c.heads, max_position_embeddings=c.context_length, projection_dim=c.embed_dim,
        hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=vocab[SPECIAL_TOKENS[0]],
        eos_token_id=vocab[SPECIAL_TOKENS[1]], pad_token_id=vocab[SPECIAL_TOKENS[1]])).eval()
    ours = tower.state_dict()
    state = {"text_model.embeddings.token_embedding.weight": ours["token_embedding.weight"],
             "text_model.embeddings.position_embedding.weight": ours["positional_embedding"],
             "text_model.final_layer_norm.weight": ours["ln_final.weight"],
             "text_model.final_layer_norm.bias": ours["ln_final.bias"],
             "text_projection.weight": ours["text_projection"].T}
    for i in range(c.layers):
        src, dst = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for part, name in zip(ours[src + "attn.in_proj_weight"].chunk(3), ("q", "k", "v")):
            state[f"{dst}self_attn.{name}_proj.weight"] = part
        for part, name in zip(ours[src + "attn.in_proj_bias"].chunk(3), ("q", "k", "v")):
            state[f"{dst}self_attn.{name}_proj.bias"] = part
        pairs = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                 "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
        for a, b in pairs.items():
            state[f"{dst}{b}.weight"], state[f"{dst}{b}.bias"] = ours[f"{src}{a}.weight"], ours[f"{src}{a}.bias"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return hf


def test_text_embeddings_equal_transformers_clip_with_the_same_weights(tmp_path) -> None:
    tower, tokenizer = tiny_tower(3), toy_tokenizer(tmp_path)
    prompts = ["a photo of a tench", "a photo of a great white shark", "", "x" * 200]  # empty and truncated too
    ids, eot = tokenize(tokenizer, prompts, tower.config.context_length)
    assert ids.shape == (4, 77) and eot[2] == 1 and eot[3] == 76
    with torch.no_grad():
        ours = tower(ids, eot)
        theirs = hf_copy(tower)(input_ids=ids).text_embeds
    assert ours.shape == (4, 128)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours[0], ours[1])  # the prompts matter


def test_zero_shot_class_is_the_argmax_of_cosine_similarities(tmp_path) -> None:
    from lare2.shared.classnames import class_name

    tower, tokenizer = tiny_tower(1), toy_tokenizer(tmp_path)
    classifier = ZeroShotImageNet(tower, tokenizer, "a photo of a {}")
    images = torch.randn(5, 128)
    with torch.no_grad():
        ids, eot = tokenize(tokenizer, [f"a photo of a {class_name(i)}" for i in range(1000)], 77)
        text = torch.nn.functional.normalize(tower(ids, eot), dim=-1)
    expected = (torch.nn.functional.normalize(images, dim=-1) @ text.T).argmax(dim=-1).tolist()
    assert classifier.classify(images) == expected
    assert len(set(expected)) > 1
    with pytest.raises(ValueError, match="not the two towers"):
        classifier.classify(torch.randn(2, 64))
