"""Our CLIP ModifiedResNet: official key names and shapes, outputs, loading from every file kind, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lare2.extract.clip_resnet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AttentionPool2d,
    build_backbone,
    load_backbone,
    normalize,
    tiny_config,
)


def official_visual_shapes(layers=(3, 4, 6, 3), width=64, output_dim=1024, grid=7) -> dict[str, tuple]:
    """Names and shapes of OpenAI CLIP's ``visual.*`` ResNet tensors, written out from the architecture.

    Stem: conv1 3->w/2 s2, conv2 w/2->w/2, conv3 w/2->w (3x3); stage k has planes w*2^k and
    4*planes outputs; the first block of each stage has downsample.0 (1x1 conv) / .1 (BN).
    """
    shapes: dict[str, tuple] = {}

    def bn(name: str, channels: int) -> None:
        for part in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"visual.{name}.{part}"] = (channels,)
        shapes[f"visual.{name}.num_batches_tracked"] = ()

    half = width // 2
    shapes["visual.conv1.weight"] = (half, 3, 3, 3)
    bn("bn1", half)
    shapes["visual.conv2.weight"] = (half, half, 3, 3)
    bn("bn2", half)
    shapes["visual.conv3.weight"] = (width, half, 3, 3)
    bn("bn3", width)
    channels = width
    for stage, depth in enumerate(layers, start=1):
        planes = width * 2 ** (stage - 1)
        for block in range(depth):
            prefix = f"layer{stage}.{block}"
            shapes[f"visual.{prefix}.conv1.weight"] = (planes, channels, 1, 1)
            bn(f"{prefix}.bn1", planes)
            shapes[f"visual.{prefix}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{prefix}.bn2", planes)
            shapes[f"visual.{prefix}.conv3.weight"] = (planes * 4, planes, 1, 1)
            bn(f"{prefix}.bn3", planes * 4)
            if block == 0:
                shapes[f"visual.{prefix}.downsample.0.weight"] = (planes * 4, channels, 1, 1)
                bn(f"{prefix}.downsample.1", planes * 4)
            channels = planes * 4
    embed = width * 32
    shapes["visual.attnpool.positional_embedding"] = (grid * grid + 1, embed)
    for proj in ("q_proj", "k_proj", "v_proj"):
        shapes[f"visual.attnpool.{proj}.weight"] = (embed, embed)
        shapes[f"visual.attnpool.{proj}.bias"] = (embed,)
    shapes["visual.attnpool.c_proj.weight"] = (output_dim, embed)
    shapes["visual.attnpool.c_proj.bias"] = (output_dim,)
    return shapes


def random_official_state(shapes: dict[str, tuple], seed: int = 0,
                          with_text_tower: bool = True) -> dict[str, torch.Tensor]:
    """Random tensors under the official names; BN variances positive; plus keys of CLIP's text tower."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(0)
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[name] = torch.randn(shape, generator=generator) * 0.05
    if with_text_tower:
        state["token_embedding.weight"] = torch.zeros(10, 8)
        state["transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(24, 8)
        state["input_resolution"] = torch.tensor(224)
    return state


TINY = dict(layers=(1, 1, 1, 1), width=8, output_dim=128)


def test_official_rn50_key_counts_are_what_we_expect() -> None:
    shapes = official_visual_shapes()
    blocks = 3 + 4 + 6 + 3
    assert sum(n.endswith("conv1.weight") or n.endswith("conv2.weight") or n.endswith("conv3.weight")
               for n in shapes) == 3 + 3 * blocks
    assert sum(".downsample.0." in n for n in shapes) == 4
    assert len(shapes) == 339  # 59 convs/BNs: 55 convs + 55 BNs x 5 + 9 attention-pool tensors
    assert shapes["visual.layer3.5.conv3.weight"] == (1024, 256, 1, 1)
    assert shapes["visual.attnpool.positional_embedding"] == (50, 2048)


def test_tiny_outputs_and_fmap_is_layer3() -> None:
    model, _ = load_backbone("tiny")
    seen: list[torch.Tensor] = []
    hook = model.layer3.register_forward_hook(lambda module, args, out: seen.append(out))  # returns None: output kept
    out = model(torch.randn(2, 3, 224, 224))
    hook.remove()
    assert out.pooled.shape == (2, 128) and out.fmap.shape == (2, 128, 14, 14)
    torch.testing.assert_close(out.fmap, seen[0], rtol=0, atol=0)
    single = model(torch.randn(2, 3, 224, 224)[:1])
    assert single.pooled.shape == (1, 128)  # batch of one keeps its batch axis


def test_attention_pool_matches_multi_head_attention() -> None:
    torch.manual_seed(0)
    pool = AttentionPool2d(grid=3, embed_dim=16, heads=4, output_dim=6)
    for proj in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
        nn.init.normal_(proj.bias)
    x = torch.randn(2, 16, 3, 3)
    tokens = x.flatten(2).permute(2, 0, 1)  # [HW, B, C]
    tokens = torch.cat([tokens.mean(0, keepdim=True), tokens]) + pool.positional_embedding[:, None]
    expected, _ = F.multi_head_attention_forward(
        query=tokens[:1], key=tokens, value=tokens, embed_dim_to_check=16, num_heads=4,
        in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
        out_proj_weight=pool.c_proj.weight, out_proj_bias=pool.c_proj.bias, training=False, need_weights=False,
        use_separate_proj_weight=True, q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight,
        v_proj_weight=pool.v_proj.weight,
    )
    torch.testing.assert_close(pool(x), expected[0], rtol=1e-5, atol=1e-6)


def test_tiny_state_dict_has_official_names() -> None:
    model, _ = load_backbone("tiny")
    expected = {k.removeprefix("visual."): v for k, v in official_visual_shapes(**TINY, grid=7).items()}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected


@pytest.mark.parametrize("kind", ["bare.safetensors", "visual.pth", "wrapped.bin"])
def test_state_dict_files_load_strictly(tmp_path: Path, kind: str) -> None:
    from safetensors.torch import save_file

    state = random_official_state(official_visual_shapes(**TINY, grid=7))
    path = tmp_path / f"rn.{kind.split('.')[1]}"
    if kind.startswith("bare"):
        save_file({k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}, str(path))
    elif kind.startswith("visual"):
        torch.save(state, path)
    else:
        torch.save({"state_dict": state}, path)
    model, fingerprint = load_backbone(path)
    for name, value in state.items():
        if name.startswith("visual."):
            torch.testing.assert_close(model.state_dict()[name.removeprefix("visual.")], value, rtol=0, atol=0)
    assert model.config.width == 8 and model.config.layers == (1, 1, 1, 1) and model.config.output_dim == 128
    again, fingerprint_again = load_backbone(path, dtype=torch.float16)
    assert fingerprint_again == fingerprint and again.conv1.weight.dtype == torch.float16
    assert not again.training and not any(p.requires_grad for p in again.parameters())


def test_torchscript_archive_loads_its_visual_tensors(tmp_path: Path) -> None:
    source, fingerprint = load_backbone("tiny")

    class Clip(nn.Module):  # a stand-in for the official archive: visual.* tensors plus other entries
        def __init__(self) -> None:
            super().__init__()
            self.visual = source
            self.register_buffer("input_resolution", torch.tensor(224))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.input_resolution

    torch.jit.trace(Clip(), torch.zeros(1)).save(str(tmp_path / "RN50.pt"))
    model, loaded_fingerprint = load_backbone(tmp_path / "RN50.pt")
    assert loaded_fingerprint == fingerprint
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(model(x).pooled, source(x).pooled, rtol=0, atol=0)


def test_fingerprints_are_stable_and_distinct() -> None:
    from lare2.shared.provenance import fingerprint_state_dict

    assert load_backbone("tiny")[1] == load_backbone("tiny")[1]
    other_seed = build_backbone(tiny_config(), seed=1)
    assert load_backbone("tiny")[1] != fingerprint_state_dict(other_seed.state_dict())


def test_normalize_uses_imagenet_statistics() -> None:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    assert normalize(mean).abs().max() < 1e-7
    ones = normalize(torch.ones(1, 3, 2, 2))
    torch.testing.assert_close(ones[0, :, 0, 0], (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD))


# ---- errors -------------------------------------------------------------------------------------
def test_missing_backbone_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"not found.*RN50\.pt.*random-rn50.*tiny"):
        load_backbone(tmp_path / "RN50.pt")


def test_wrong_backbone_file_type(tmp_path: Path) -> None:
    path = tmp_path / "weights.onnx"
    path.write_bytes(b"\0")
    with pytest.raises(ValueError, match=r"weights\.onnx.*unsupported.*'\.onnx'"):
        load_backbone(path)


def test_foreign_state_dict_is_refused(tmp_path: Path) -> None:
    torch.save({"fc.weight": torch.zeros(2, 2), "layer1.0.conv1.weight": torch.zeros(1)}, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match=r"resnet\.pth.*not a CLIP ModifiedResNet.*conv1\.weight"):
        load_backbone(tmp_path / "resnet.pth")


def test_missing_and_unexpected_keys_are_listed(tmp_path: Path) -> None:
    state = random_official_state(official_visual_shapes(**TINY, grid=7), with_text_tower=False)
    del state["visual.layer2.0.bn1.weight"]
    state["visual.layer2.0.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(ValueError,
                       match=r"broken\.pt.*missing 1: layer2\.0\.bn1\.weight; unexpected 1: layer2\.0\.extra\.weight"):
        load_backbone(tmp_path / "broken.pt")


@pytest.mark.slow
def test_full_rn50_official_state_dict_loads_strictly(tmp_path: Path) -> None:
    state = random_official_state(official_visual_shapes())
    # The official archive keeps convolutions and projections in float16 and BatchNorm in float32.
    state = {k: v.half() if k.endswith("weight") and v.ndim >= 2 else v for k, v in state.items()}
    torch.save(state, tmp_path / "rn50_state.pt")
    model, _ = load_backbone(tmp_path / "rn50_state.pt")
    assert model.config.layers == (3, 4, 6, 3) and model.config.heads == 32 and model.config.image_size == 224
    out = model(normalize(torch.rand(1, 3, 224, 224)))
    assert out.pooled.shape == (1, 1024) and out.fmap.shape == (1, 1024, 14, 14)
    assert torch.isfinite(out.pooled).all()
    random_model, _ = load_backbone("random-rn50")
    random_out = random_model(torch.randn(1, 3, 224, 224))
    assert random_out.pooled.shape == (1, 1024) and random_out.fmap.shape == (1, 1024, 14, 14)
