"""EGRE's attention as exposed for heatmaps: sums to 1 over the grid, leaves the outputs alone, and is drawn
over the image pixels the backbone saw (its central 224 px crop, reflect-padded when smaller)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lare2.heatmaps import attention_over_image, lare_over_image
from lare2.train.models import EGREClassifier, ModelConfig


def tiny_egre() -> EGREClassifier:
    torch.manual_seed(0)
    return EGREClassifier(ModelConfig(pooled_dim=16, fmap_shape=(16, 7, 7), lare_shape=(4, 16, 16), head_dim=8)).eval()


def test_attention_sums_to_one_and_leaves_the_outputs_alone() -> None:
    model = tiny_egre()
    pooled, fmap, lare = torch.randn(3, 16), torch.randn(3, 16, 7, 7), torch.rand(3, 4, 16, 16)
    with torch.no_grad():
        logits = model(pooled, fmap, lare)
        attention = model.spatial_attention(fmap, lare)
        bias = model.conv(torch.nn.functional.adaptive_avg_pool2d(lare, (7, 7)))
        spatial, again = model.attn_pool(fmap, bias, return_attention=True)
        torch.testing.assert_close(spatial, model.attn_pool(fmap, bias), rtol=0, atol=0)
        torch.testing.assert_close(model(pooled, fmap, lare), logits, rtol=0, atol=0)
    assert attention.shape == (3, 7, 7) and (attention >= 0).all()
    torch.testing.assert_close(attention.sum(dim=(1, 2)), torch.ones(3))
    torch.testing.assert_close(again, attention)
    # the weights of a plain computation: softmax(q k^T / sqrt(d) + bias) of the mean token, heads averaged
    att = model.attn_pool.attention
    tokens = fmap.flatten(2).transpose(1, 2)
    tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], 1) + model.attn_pool.positional_embedding
    b = bias.flatten(2).transpose(1, 2)
    b = torch.cat([b.mean(1, keepdim=True), b], 1)  # [B, T, N]
    with torch.no_grad():
        q = att.fc_q(tokens[:, :1]).view(3, 1, 8, 8).transpose(1, 2)
        k = att.fc_k(tokens).view(3, 50, 8, 8).transpose(1, 2)
        w = ((q @ k.transpose(-1, -2)) / 8**0.5 + b.transpose(1, 2).unsqueeze(2)).softmax(-1)[:, :, 0, 1:]
    torch.testing.assert_close((w / w.sum(-1, keepdim=True)).mean(1).view(3, 7, 7), attention)


def test_attention_is_placed_over_the_backbones_crop() -> None:
    grid = np.arange(49, dtype=np.float32).reshape(7, 7) + 1
    large = attention_over_image(grid, (300, 250))  # width 300, height 250: the central 224 x 224 only
    assert large.shape == (250, 300)
    inside = np.isfinite(large)
    rows, cols = np.nonzero(inside)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (13, 236, 38, 261)
    assert large[13, 38] == pytest.approx(1.0) and large[236, 261] == pytest.approx(49.0)
    small = attention_over_image(grid, (100, 80))  # padded up to 224: every pixel was seen
    assert small.shape == (80, 100) and np.isfinite(small).all()
    lare = lare_over_image(np.ones((4, 8, 8)) * np.arange(4).reshape(4, 1, 1), (30, 20))
    assert lare.shape == (20, 30) and np.allclose(lare, 1.5)


TINY_DIMS = dict(pooled_dim=16, fmap_shape=(16, 8, 8), lare_shape=(4, 16, 16), head_dim=8)
TOP_DIMS = dict(train_backbone_top=True, backbone_top_depth=1, backbone_top_heads=4)


@pytest.mark.parametrize("kind, top", [("egre", False), ("egre", True), ("linear", False), ("linear", True),
                                       ("lare-only", False)])
def test_predict_is_forwards_logits_and_the_attention_from_one_pass(kind: str, top: bool) -> None:
    from lare2.train.models import build_model, predict_features

    torch.manual_seed(0)
    model = build_model(ModelConfig(kind=kind, **TINY_DIMS, **(TOP_DIMS if top else {}))).eval()
    pooled, fmap, lare = torch.randn(3, 16), torch.randn(3, 16, 8, 8), torch.rand(3, 4, 16, 16)
    egre_passes: list[int] = []
    if kind == "egre":  # the attention pool runs once per EGRE forward pass
        model.attn_pool.register_forward_hook(lambda *_: egre_passes.append(1))
    with torch.no_grad():
        output = model.predict(pooled, fmap, lare)
        assert len(egre_passes) == (kind == "egre")
        logits = model(pooled, fmap, lare)
    torch.testing.assert_close(output.logits, logits, rtol=0, atol=0)
    torch.testing.assert_close(output.p_fake, logits.double().softmax(-1)[:, 1], rtol=0, atol=0)
    assert output.logits.shape == (3, 2) and output.p_fake.dtype == torch.float64
    if kind == "egre":
        with torch.no_grad():
            torch.testing.assert_close(output.attention, model.spatial_attention(fmap, lare), rtol=0, atol=0)
        assert output.attention.shape == (3, 8, 8)
    else:
        assert output.attention is None
    # cached-style inputs: float16 numpy arrays, scored in eval mode, the model left in the mode it was in
    model.train()
    egre_passes.clear()
    cached = predict_features(model, pooled.half().numpy(), fmap.half().numpy(), lare.numpy())
    assert model.training and len(egre_passes) == (kind == "egre")
    with torch.no_grad():
        expected = model.eval()(pooled.half().float(), fmap.half().float(), lare)
    torch.testing.assert_close(cached.logits, expected, rtol=0, atol=0)
