"""Stage 2 models on cached tensors: EGRE + head (docs/method.md §3) and the two ablation baselines.

Every model maps ``(pooled, fmap, lare)`` to logits ``[B, 2]`` (index 1 = fake) in ``forward``, which
training calls, and to a ``DetectorOutput`` (the logits, and EGRE's spatial attention) in ``predict``,
which scoring calls: p(fake) and the attention of a heatmap come from one pass. Each model names the
cached arrays it reads in ``input_names`` so the data reader loads nothing else.

Shape legend: B batch, D pooled dim, C fmap channels, H x W fmap grid (14 x 14), T = H*W + 1
tokens (the mean token first), L LaRE channels (4), h x w LaRE grid (32 x 32), N heads (8),
K head dim (64), Q queries (1).

Parameter names follow the reference implementation (class ``CLipClassifierWMapV6``) so that its
head loads with ``strict=True`` once the ``clip_model.*`` part is split off. With
``train_backbone_top`` (docs/method.md §2.4) the model also holds the backbone's ``layer4`` +
attention pool as ``backbone_top.*`` and recomputes ``pooled`` from ``fmap`` with it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lare2.shared.clip_blocks import BackboneTop
from lare2.shared.errors import InputError
from lare2.shared.settings import SettingsError

MODEL_KINDS = ("egre", "linear", "lare-only")
TOP_KINDS = ("egre", "linear")
"""Model kinds that read ``pooled``, and so can recompute it with a trainable backbone top."""
BACKBONE_TOP = "backbone_top"
"""Attribute (and state-dict key prefix) of the trainable backbone top."""


@dataclass(kw_only=True)
class HeadSettings:
    """EGRE's hyperparameters: set in the training config, recorded in each detector's model config."""

    num_heads: int = 8
    """Attention heads of the map-biased pool; the LaRE map is projected to one bias map per head."""
    head_dim: int = 64
    """d_k = d_v per head."""
    channel_hidden: int = 128
    """Hidden width of the LaRE channel gate (W1: L -> hidden, W2: hidden -> C)."""
    dropout: float = 0.1
    """Dropout on the attention weights and on the attention output."""
    zero_lare: bool = False
    """Ablation: EGRE sees a LaRE map of zeros, in training and in scoring alike (what the map adds)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise SettingsError(f"dropout must be in [0, 1), got {self.dropout}")

    def head_settings(self) -> dict[str, Any]:
        """This object's ``HeadSettings`` fields, e.g. to build a ``ModelConfig`` from a training config."""
        return {f.name: getattr(self, f.name) for f in fields(HeadSettings)}


@dataclass(kw_only=True)
class ModelConfig(HeadSettings):
    """Which model and its dimensions; the cache fixes the input dims, the rest are hyperparameters."""

    kind: str = "egre"
    """``egre`` (full LaRE^2 head), ``linear`` (linear probe on pooled features) or ``lare-only``
    (a small CNN on the LaRE map)."""
    pooled_dim: int = 1024
    """D: length of the pooled backbone embedding."""
    fmap_shape: tuple[int, int, int] = (1024, 14, 14)
    """C x H x W of the backbone feature map."""
    lare_shape: tuple[int, int, int] = (4, 32, 32)
    """L x h x w of the LaRE map."""
    cnn_widths: tuple[int, ...] = (16, 32, 64)
    """Channel widths of the lare-only CNN, one stride-2 conv3x3 block each (32x32 map -> 4x4)."""
    train_backbone_top: bool = False
    """Recompute ``pooled`` from ``fmap`` with a trainable copy of the backbone's layer4 + attention pool
    (``backbone_top.*`` weights, docs/method.md §2.4) instead of reading the cached ``pooled``."""
    backbone_top_depth: int = 0
    """Bottlenecks in the top's layer4 (RN50: 3); read from the backbone weights, with ``train_backbone_top``."""
    backbone_top_heads: int = 0
    """Heads of the top's attention pool (RN50: 32); read from the backbone weights, with ``train_backbone_top``."""

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise SettingsError(f"model kind {self.kind!r}: choose from {MODEL_KINDS}")
        self.fmap_shape = tuple(int(v) for v in self.fmap_shape)  # type: ignore[assignment]
        self.lare_shape = tuple(int(v) for v in self.lare_shape)  # type: ignore[assignment]
        self.cnn_widths = tuple(int(v) for v in self.cnn_widths)
        if len(self.fmap_shape) != 3 or len(self.lare_shape) != 3:
            raise SettingsError(f"fmap_shape and lare_shape must be [C, H, W], got {self.fmap_shape}, "
                                f"{self.lare_shape}")
        if self.train_backbone_top and self.kind not in TOP_KINDS:
            raise SettingsError(f"train_backbone_top: the {self.kind} model reads no pooled features; "
                                f"use one of {TOP_KINDS}")
        if self.train_backbone_top and min(self.backbone_top_depth, self.backbone_top_heads) < 1:
            raise SettingsError("train_backbone_top needs backbone_top_depth and backbone_top_heads >= 1, "
                                f"got {self.backbone_top_depth}, {self.backbone_top_heads}")
        super().__post_init__()

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# ---- what every model gives ------------------------------------------------------------------------
@dataclass
class DetectorOutput:
    """A detector's outputs for a batch, from one forward pass (shapes: B batch, H x W the fmap grid)."""

    logits: torch.Tensor
    """[B, 2], index 1 = fake: what ``forward`` returns and training's loss reads."""
    attention: torch.Tensor | None = None
    """[B, H, W]: where EGRE's attention pool looked over the feature grid, each map summing to 1
    (``MapAttentionPool``); None for a model without one."""

    @property
    def p_fake(self) -> torch.Tensor:
        """[B] float64: the softmax's fake column."""
        # float64: a float32 softmax rounds margins above ~17 to exactly 1.0, tying confident fakes with misjudged reals
        return self.logits.double().softmax(dim=-1)[:, 1]


class CachedFeatureClassifier(nn.Module):
    """A model on cached arrays: ``predict`` gives its ``DetectorOutput``, ``forward`` the logits alone."""

    input_names: tuple[str, ...] = ()
    """The cached arrays the model reads (the others may be None)."""

    def forward(self, pooled: torch.Tensor | None = None, fmap: torch.Tensor | None = None,
                lare: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, 2] of ``pooled`` [B, D], ``fmap`` [B, C, H, W], ``lare`` [B, L, h, w]."""
        return self.predict(pooled, fmap, lare).logits

    def predict(self, pooled: torch.Tensor | None, fmap: torch.Tensor | None,
                lare: torch.Tensor | None) -> DetectorOutput:
        """Every output of one pass over the batch."""
        raise NotImplementedError


# ---- EGRE -----------------------------------------------------------------------------------------
class MapBiasedAttention(nn.Module):
    """Multi-head attention whose logits get one additive bias per head and key from the LaRE map."""

    def __init__(self, *, d_in: int, d_out: int, num_heads: int, head_dim: int, dropout: float) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.fc_q = nn.Linear(d_in, num_heads * head_dim)
        self.fc_k = nn.Linear(d_in, num_heads * head_dim)
        self.fc_v = nn.Linear(d_in, num_heads * head_dim)
        self.fc_o = nn.Linear(num_heads * head_dim, d_out)
        self.dropout = nn.Dropout(dropout)
        for linear in (self.fc_q, self.fc_k, self.fc_v, self.fc_o):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, query_BQD: torch.Tensor, tokens_BTD: torch.Tensor, bias_BTN: torch.Tensor,
                return_weights: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The attended output [B, Q, d_out]; with ``return_weights`` also the softmax weights [B, N, Q, T]
        (before dropout)."""
        B, Q, _ = query_BQD.shape
        T = tokens_BTD.shape[1]
        N, K = self.num_heads, self.head_dim
        q_BNQK = self.fc_q(query_BQD).view(B, Q, N, K).transpose(1, 2)
        k_BNTK = self.fc_k(tokens_BTD).view(B, T, N, K).transpose(1, 2)
        v_BNTK = self.fc_v(tokens_BTD).view(B, T, N, K).transpose(1, 2)
        logits_BNQT = q_BNQK @ k_BNTK.transpose(-1, -2) / math.sqrt(K)
        logits_BNQT = logits_BNQT + bias_BTN.transpose(1, 2).unsqueeze(2)  # bias [B, N, 1, T] for every query
        softmax_BNQT = logits_BNQT.softmax(dim=-1)
        out_BQNK = (self.dropout(softmax_BNQT) @ v_BNTK).transpose(1, 2)
        out_BQD = self.fc_o(out_BQNK.reshape(B, Q, N * K))
        return (out_BQD, softmax_BNQT) if return_weights else out_BQD


class MapAttentionPool(nn.Module):
    """Spatial refine: the mean token attends over [mean; H*W tokens] + learned positions, biased by the map."""

    def __init__(self, *, channels: int, grid: tuple[int, int], num_heads: int, head_dim: int, dropout: float) -> None:
        super().__init__()
        num_tokens = grid[0] * grid[1] + 1
        self.positional_embedding = nn.Parameter(torch.randn(num_tokens, channels) / channels**0.5)
        self.attention = MapBiasedAttention(d_in=channels, d_out=channels, num_heads=num_heads, head_dim=head_dim,
                                            dropout=dropout)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(channels)

    def forward(self, fmap_BCHW: torch.Tensor, bias_BNHW: torch.Tensor,
                return_attention: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The spatial feature [B, C]; with ``return_attention`` also where the query looked: [B, H, W], each
        head's weights on the H*W positions renormalised to sum to 1 (the mean token's share left out),
        averaged over heads."""
        tokens_BSC = fmap_BCHW.flatten(2).transpose(1, 2)  # S = H*W spatial tokens
        tokens_BTC = torch.cat([tokens_BSC.mean(dim=1, keepdim=True), tokens_BSC], dim=1)
        tokens_BTC = tokens_BTC + self.positional_embedding.to(tokens_BTC.dtype)
        bias_BSN = bias_BNHW.flatten(2).transpose(1, 2)
        bias_BTN = torch.cat([bias_BSN.mean(dim=1, keepdim=True), bias_BSN], dim=1)
        query_B1C = tokens_BTC[:, :1]
        out_B1C, weights_BN1T = self.attention(query_B1C, tokens_BTC, bias_BTN, return_weights=True)
        # index, not squeeze(): keeps batch size 1
        spatial_BC = self.layer_norm(query_B1C + self.dropout(out_B1C))[:, 0]
        if not return_attention:
            return spatial_BC
        grid_BNS = weights_BN1T[:, :, 0, 1:]
        grid_BNS = grid_BNS / grid_BNS.sum(dim=-1, keepdim=True)
        return spatial_BC, grid_BNS.mean(dim=1).unflatten(-1, fmap_BCHW.shape[-2:])


class LareChannelGate(nn.Module):
    """Channel align + refine: ``GAP(fmap) * sigmoid(W2 relu(W1 GAP(lare)))`` (squeeze-and-excitation style)."""

    def __init__(self, *, lare_channels: int, hidden: int, channels: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(lare_channels, hidden, bias=False),
            nn.ReLU(),
            nn.Linear(hidden, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, fmap_BCHW: torch.Tensor, lare_BLhw: torch.Tensor) -> torch.Tensor:
        gate_BC = self.fc(lare_BLhw.mean(dim=(2, 3)))
        return fmap_BCHW.mean(dim=(2, 3)) * gate_BC


class EGREClassifier(CachedFeatureClassifier):
    """LaRE^2's error-guided refinement + linear head: logits = fc([pooled; spatial; channel])."""

    input_names = ("pooled", "fmap", "lare")

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        C, H, W = config.fmap_shape
        L = config.lare_shape[0]
        self.fc = nn.Linear(config.pooled_dim + 2 * C, 2)
        self.conv = nn.Conv2d(L, config.num_heads, kernel_size=1)  # one attention-bias map per head
        self.conv_align = nn.Conv2d(L, C, kernel_size=1)  # present in the reference, unused in its forward
        self.conv_align.requires_grad_(False)  # no gradient ever reaches it; DDP must not wait for one
        self.attn_pool = MapAttentionPool(channels=C, grid=(H, W), num_heads=config.num_heads,
                                          head_dim=config.head_dim, dropout=config.dropout)
        self.channel_align = LareChannelGate(lare_channels=L, hidden=config.channel_hidden, channels=C)

    def refine(self, pooled_BD: torch.Tensor, fmap_BCHW: torch.Tensor,
               lare_BLhw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the refined feature [B, D + 2C] the head classifies, the attention pool's map [B, H, W])."""
        lare_BLhw = self.guide(lare_BLhw)
        lare_BLHW = F.adaptive_avg_pool2d(lare_BLhw, fmap_BCHW.shape[-2:])  # align the map to the feature grid
        spatial_BC, attention_BHW = self.attn_pool(fmap_BCHW, self.conv(lare_BLHW), return_attention=True)
        channel_BC = self.channel_align(fmap_BCHW, lare_BLhw)
        return torch.cat([pooled_BD, spatial_BC, channel_BC], dim=1), attention_BHW

    def predict(self, pooled: torch.Tensor | None, fmap: torch.Tensor | None,
                lare: torch.Tensor | None) -> DetectorOutput:
        """Logits [B, 2] and EGRE's spatial attention [B, H, W], from one pass."""
        features_BF, attention_BHW = self.refine(pooled, fmap, lare)
        return DetectorOutput(logits=self.fc(features_BF), attention=attention_BHW)

    def guide(self, lare_BLhw: torch.Tensor) -> torch.Tensor:
        """The map EGRE is guided by: the LaRE map, or zeros in the ``zero_lare`` ablation."""
        return torch.zeros_like(lare_BLhw) if self.config.zero_lare else lare_BLhw

    def spatial_attention(self, fmap_BCHW: torch.Tensor, lare_BLhw: torch.Tensor) -> torch.Tensor:
        """Where the attention pool looked: [B, H, W] over the feature grid, summing to 1 (``MapAttentionPool``),
        without the rest of the model (``pooled`` is not needed)."""
        lare_BLHW = F.adaptive_avg_pool2d(self.guide(lare_BLhw), fmap_BCHW.shape[-2:])
        return self.attn_pool(fmap_BCHW, self.conv(lare_BLHW), return_attention=True)[1]


# ---- baselines ------------------------------------------------------------------------------------
class LinearProbe(CachedFeatureClassifier):
    """Ablation: a linear classifier on the pooled backbone embedding alone (no LaRE)."""

    input_names = ("pooled",)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.fc = nn.Linear(config.pooled_dim, 2)

    def predict(self, pooled: torch.Tensor | None, fmap: torch.Tensor | None,
                lare: torch.Tensor | None) -> DetectorOutput:
        return DetectorOutput(logits=self.fc(pooled))


class LareOnlyCNN(CachedFeatureClassifier):
    """Ablation: a small CNN on the LaRE map alone (no image features).

    stride-2 conv3x3 + ReLU blocks, global average pool, linear.
    No normalisation layers: the map's absolute error level is part of the signal.
    """

    input_names = ("lare",)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        in_ch = config.lare_shape[0]
        for width in config.cnn_widths:
            layers += [nn.Conv2d(in_ch, width, kernel_size=3, stride=2, padding=1), nn.ReLU()]
            in_ch = width
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(in_ch, 2)

    def predict(self, pooled: torch.Tensor | None, fmap: torch.Tensor | None,
                lare: torch.Tensor | None) -> DetectorOutput:
        return DetectorOutput(logits=self.fc(self.features(lare).mean(dim=(2, 3))))


# ---- trainable backbone top (docs/method.md §2.4) ----------------------------------------------
class WithBackboneTop:
    """Mixin for a model that reads ``pooled``: recompute it from ``fmap`` with ``backbone_top``
    (the backbone's layer4 + attention pool, trainable); the cached ``pooled`` is never read.

    The head is built first, so it starts from the same weights as without a top (same seed)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)  # type: ignore[call-arg]
        C, H, W = config.fmap_shape
        self.backbone_top = BackboneTop(fmap_channels=C, grid=(H, W), depth=config.backbone_top_depth,
                                        heads=config.backbone_top_heads, output_dim=config.pooled_dim)

    def predict(self, pooled: torch.Tensor | None, fmap: torch.Tensor | None,
                lare: torch.Tensor | None) -> DetectorOutput:
        return super().predict(self.backbone_top(fmap), fmap, lare)  # type: ignore[misc]


class EGREWithBackboneTop(WithBackboneTop, EGREClassifier):
    """EGRE + head on ``[backbone_top(fmap); spatial; channel]``."""

    input_names = ("fmap", "lare")


class LinearWithBackboneTop(WithBackboneTop, LinearProbe):
    """A linear classifier on ``backbone_top(fmap)``."""

    input_names = ("fmap",)


def build_model(config: ModelConfig) -> nn.Module:
    """The model ``config.kind`` names (with its backbone top when ``train_backbone_top``), freshly
    initialised from torch's global RNG."""
    classes = {"egre": EGREClassifier, "linear": LinearProbe, "lare-only": LareOnlyCNN}
    if config.kind not in classes:
        raise SettingsError(f"model kind {config.kind!r}: choose from {MODEL_KINDS}")
    if config.train_backbone_top:
        return {"egre": EGREWithBackboneTop, "linear": LinearWithBackboneTop}[config.kind](config)
    return classes[config.kind](config)


def param_groups(model: nn.Module, lr: float, backbone_top_lr_scale: float) -> list[dict[str, Any]]:
    """Adam parameter groups: the head's trainable parameters at ``lr``, then (when the model has one)
    the backbone top's at ``lr * backbone_top_lr_scale``."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    top = [p for name, p in named if name.startswith(BACKBONE_TOP + ".")]
    groups = [{"params": [p for name, p in named if not name.startswith(BACKBONE_TOP + ".")], "lr": lr, "name": "head"}]
    if top:
        groups.append({"params": top, "lr": lr * backbone_top_lr_scale, "name": BACKBONE_TOP})
    return groups


def egre_config_from_state_dict(state: Mapping[str, torch.Tensor], lare_grid: tuple[int, int],
                                dropout: float = 0.1) -> ModelConfig:
    """Dimensions of an EGRE head read off a reference-style state dict (keys as in docs/method.md §3.5).

    The LaRE grid (h, w) does not appear in the weights, so it comes from the cache.
    """
    required = ("fc.weight", "conv.weight", "attn_pool.positional_embedding", "attn_pool.attention.fc_q.weight",
                "channel_align.fc.0.weight")
    missing = [k for k in required if k not in state]
    if missing:
        raise InputError(f"not an EGRE (CLipClassifierWMapV6) head: missing keys {missing}")
    num_tokens, channels = state["attn_pool.positional_embedding"].shape
    side = math.isqrt(num_tokens - 1)
    if side * side != num_tokens - 1:
        raise InputError(f"positional embedding has {num_tokens} tokens, expected a square grid + 1")
    num_heads, lare_channels = state["conv.weight"].shape[:2]
    qk_dim = state["attn_pool.attention.fc_q.weight"].shape[0]
    return ModelConfig(
        kind="egre",
        pooled_dim=int(state["fc.weight"].shape[1]) - 2 * int(channels),
        fmap_shape=(int(channels), side, side),
        lare_shape=(int(lare_channels), *lare_grid),
        num_heads=int(num_heads),
        head_dim=int(qk_dim) // int(num_heads),
        channel_hidden=int(state["channel_align.fc.0.weight"].shape[0]),
        dropout=dropout,
    )


@torch.no_grad()
def predict_features(model: CachedFeatureClassifier, pooled: torch.Tensor | np.ndarray | None,
                     fmap: torch.Tensor | np.ndarray | None, lare: torch.Tensor | np.ndarray | None) -> DetectorOutput:
    """``model.predict`` in eval mode on cached-style inputs: numpy arrays or tensors of any float dtype, cast to
    float32 on the model's device (None for an array the model does not read)."""
    device = next(model.parameters()).device

    def as_input(x: torch.Tensor | np.ndarray | None) -> torch.Tensor | None:
        if x is None:
            return None
        return torch.as_tensor(x if isinstance(x, torch.Tensor) else np.asarray(x)).to(device, torch.float32)

    was_training = model.training
    model.eval()
    try:
        return model.predict(as_input(pooled), as_input(fmap), as_input(lare))
    finally:
        model.train(was_training)
