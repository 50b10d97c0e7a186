"""EGRE + head against an independent re-computation of docs/method.md §3; reference key names; baselines."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lare2.shared.cache import CacheLayout
from lare2.train.checkpoint import load_detector
from lare2.train.models import EGREClassifier, ModelConfig, build_model, egre_config_from_state_dict
from lare2.train.reference import split_reference_state
from lare2.train.scoring import score_features
from tests.helpers.caches import write_synthetic_cache

# docs/method.md §3.5: the head keys of a reference CLipClassifierWMapV6 checkpoint.
REFERENCE_HEAD_KEYS = {
    "fc.weight", "fc.bias", "conv.weight", "conv.bias", "conv_align.weight", "conv_align.bias",
    "attn_pool.positional_embedding",
    *[f"attn_pool.attention.fc_{p}.{t}" for p in "qkvo" for t in ("weight", "bias")],
    "attn_pool.layer_norm.weight", "attn_pool.layer_norm.bias",
    "channel_align.fc.0.weight", "channel_align.fc.2.weight",
}


def spec_egre_logits(sd: dict, pooled, fmap, lare, num_heads: int) -> torch.Tensor:
    """docs/method.md §3 written out as plain tensor code (eval mode: no dropout)."""
    B, C, H, W = fmap.shape
    lare_small = F.adaptive_avg_pool2d(lare, (H, W))
    bias = (torch.einsum("blhw,nl->bnhw", lare_small, sd["conv.weight"][:, :, 0, 0])
            + sd["conv.bias"][None, :, None, None])
    bias = bias.reshape(B, num_heads, H * W)
    bias = torch.cat([bias.mean(2, keepdim=True), bias], 2)  # [B, N, 197]
    tokens = fmap.reshape(B, C, H * W).permute(0, 2, 1)
    tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], 1) + sd["attn_pool.positional_embedding"]
    a = "attn_pool.attention."
    q = (tokens[:, 0] @ sd[a + "fc_q.weight"].T + sd[a + "fc_q.bias"]).reshape(B, num_heads, -1)
    k = (tokens @ sd[a + "fc_k.weight"].T + sd[a + "fc_k.bias"]).reshape(B, H * W + 1, num_heads, -1)
    v = (tokens @ sd[a + "fc_v.weight"].T + sd[a + "fc_v.bias"]).reshape(B, H * W + 1, num_heads, -1)
    d_k = q.shape[-1]
    att = (torch.einsum("bnk,btnk->bnt", q, k) / math.sqrt(d_k) + bias).softmax(-1)
    out = torch.einsum("bnt,btnk->bnk", att, v).reshape(B, -1) @ sd[a + "fc_o.weight"].T + sd[a + "fc_o.bias"]
    spatial = F.layer_norm(tokens[:, 0] + out, (C,), sd["attn_pool.layer_norm.weight"], sd["attn_pool.layer_norm.bias"],
                           eps=1e-5)
    hidden = torch.relu(lare.mean((2, 3)) @ sd["channel_align.fc.0.weight"].T)
    gate = torch.sigmoid(hidden @ sd["channel_align.fc.2.weight"].T)
    channel = fmap.mean((2, 3)) * gate
    return torch.cat([pooled, spatial, channel], 1) @ sd["fc.weight"].T + sd["fc.bias"]


def randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (biases too), so a term computed wrongly cannot hide behind a zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


@pytest.mark.parametrize("batch", [1, 7])
def test_egre_matches_spec_recomputation(batch: int) -> None:
    config = ModelConfig()  # the paper's dims: pooled 1024, fmap 1024x14x14, lare 4x32x32, 8 heads x 64
    model = randomised(EGREClassifier(config), seed=batch)
    g = torch.Generator().manual_seed(100 + batch)
    pooled, fmap = torch.randn(batch, 1024, generator=g), torch.randn(batch, 1024, 14, 14, generator=g)
    lare = torch.rand(batch, 4, 32, 32, generator=g) * 3
    with torch.no_grad():
        ours = model(pooled, fmap, lare)
        spec = spec_egre_logits(model.state_dict(), pooled, fmap, lare, num_heads=8)
    assert ours.shape == (batch, 2)
    torch.testing.assert_close(ours, spec, rtol=1e-5, atol=1e-5)
    # the LaRE map changes the logits through both refinements
    with torch.no_grad():
        assert not torch.allclose(model(pooled, fmap, lare * 0), ours, atol=1e-4)


def test_reference_state_dict_loads_strictly_and_converts(tmp_path) -> None:
    from lare2.train.calibration import calibrate_run
    from lare2.train.reference import convert_reference

    layout = CacheLayout(pooled_dim=16, fmap_shape=(24, 6, 6), lare_shape=(4, 16, 16), chunk_samples=16)
    config = ModelConfig(pooled_dim=16, fmap_shape=(24, 6, 6), lare_shape=(4, 16, 16), num_heads=8, head_dim=4,
                         channel_hidden=12)
    head = randomised(EGREClassifier(config), seed=3)
    assert set(head.state_dict()) == REFERENCE_HEAD_KEYS
    # a reference checkpoint: head keys + clip_model.*, saved as {"state_dict": ...} by DataParallel
    reference = {f"module.{k}": v.clone() for k, v in head.state_dict().items()}
    reference["module.clip_model.visual.conv1.weight"] = torch.randn(8, 3, 3, 3)
    reference["module.clip_model.logit_scale"] = torch.tensor(4.6)
    ckpt = tmp_path / "reference.pth"
    torch.save({"state_dict": reference, "epoch": 7}, ckpt)

    head_sd, backbone_sd = split_reference_state(torch.load(ckpt, weights_only=True))
    assert set(backbone_sd) == {"visual.conv1.weight", "logit_scale"}
    inferred = egre_config_from_state_dict(head_sd, (16, 16))
    dims = (inferred.pooled_dim, inferred.fmap_shape, inferred.num_heads, inferred.head_dim, inferred.channel_hidden)
    assert dims == (16, (24, 6, 6), 8, 4, 12)
    EGREClassifier(inferred).load_state_dict(head_sd, strict=True)

    write_synthetic_cache(tmp_path / "val", num_samples=40, signal="lare", seed=1, layout=layout)
    # conversion writes an uncalibrated run; `lare2 calibrate` sets its threshold on a val cache
    uncalibrated = convert_reference(ckpt, tmp_path / "run", lare_size=16)
    assert uncalibrated.threshold == 0.5 and uncalibrated.extra["calibrated"] is False
    converted = calibrate_run(tmp_path / "run", tmp_path / "val", target_fpr=0.1)
    model, loaded = load_detector(tmp_path / "run")
    assert loaded.threshold == converted.threshold and loaded.target_fpr == 0.1
    assert (tmp_path / "run" / "backbone.safetensors").exists()
    x = (torch.randn(3, 16), torch.randn(3, 24, 6, 6), torch.rand(3, 4, 16, 16))
    with torch.no_grad():
        torch.testing.assert_close(score_features(model, *x), head(*x).double().softmax(-1)[:, 1])


def test_a_head_of_other_dims_is_refused(tmp_path) -> None:
    from lare2.train.calibration import calibrate_run
    from lare2.train.checkpoint import CheckpointError
    from lare2.train.reference import convert_reference

    layout = CacheLayout(pooled_dim=16, fmap_shape=(24, 6, 6), lare_shape=(4, 16, 16), chunk_samples=16)
    write_synthetic_cache(tmp_path / "val", num_samples=20, signal="lare", seed=1, layout=layout)
    other = EGREClassifier(ModelConfig(pooled_dim=16, fmap_shape=(24, 5, 5), lare_shape=(4, 16, 16), head_dim=4))
    torch.save(other.state_dict(), tmp_path / "ref.pth")
    convert_reference(tmp_path / "ref.pth", tmp_path / "run", lare_size=16)  # the weights alone fix no cache
    with pytest.raises(CheckpointError, match="cache dims"):
        calibrate_run(tmp_path / "run", tmp_path / "val")


@pytest.mark.parametrize("kind", ["egre", "linear", "lare-only"])
def test_every_model_trains_a_step_at_batch_size_1(kind: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind=kind, pooled_dim=8, fmap_shape=(16, 4, 4), lare_shape=(4, 8, 8), head_dim=4))
    x = (torch.randn(1, 8), torch.randn(1, 16, 4, 4), torch.rand(1, 4, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = F.cross_entropy(model(*x), torch.tensor([1]))
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    # each model reads exactly the inputs it declares, and all of its trainable weights learn,
    # except EGRE's conv.bias: a per-head constant added to every key cancels in the softmax
    constant_in_softmax = {"conv.bias"} if kind == "egre" else set()
    assert changed == {k for k, p in model.named_parameters() if p.requires_grad} - constant_in_softmax
    used = set(type(model).input_names)
    for i, name in enumerate(("pooled", "fmap", "lare")):
        y = list(x)
        y[i] = y[i] + 1.0
        with torch.no_grad():
            assert (not torch.allclose(model(*y), model(*x))) == (name in used), name


def test_unknown_kind_names_the_choices() -> None:
    with pytest.raises(ValueError, match="egre"):
        ModelConfig(kind="resnet")


def test_zero_lare_ablation_ignores_the_map_and_nothing_else() -> None:
    torch.manual_seed(0)
    config = ModelConfig(pooled_dim=16, fmap_shape=(16, 7, 7), lare_shape=(4, 16, 16), head_dim=8)
    full = EGREClassifier(config).eval()
    ablated = EGREClassifier(ModelConfig(**{**config.to_dict(), "zero_lare": True})).eval()
    ablated.load_state_dict(full.state_dict())  # same weights: only the guiding map differs
    pooled, fmap = torch.randn(3, 16), torch.randn(3, 16, 7, 7)
    lare_a, lare_b = torch.rand(3, 4, 16, 16), 5 * torch.rand(3, 4, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ablated(pooled, fmap, lare_a), ablated(pooled, fmap, lare_b))
        torch.testing.assert_close(ablated(pooled, fmap, lare_a), full(pooled, fmap, torch.zeros_like(lare_a)))
        assert not torch.allclose(full(pooled, fmap, lare_a), full(pooled, fmap, lare_b))
    assert ModelConfig.from_dict({k: v for k, v in config.to_dict().items() if k != "zero_lare"}).zero_lare is False
