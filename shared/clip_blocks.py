"""OpenAI CLIP's ModifiedResNet image tower (docs/method.md §2), written out with the official key names.

Both stages build it from here: stage 1 runs the whole tower (``extract/clip_resnet.py``), stage 2's
``--train-backbone-top`` trains its last stage and attention pool (``BackboneTop``, §2.4) on the
cached layer3 map. One definition keeps the two numerically and by key name the same.

Differences from a torchvision ResNet: a 3-conv stem closed by an average pool; strided
bottlenecks downsample with an average pool (anti-aliasing) before a stride-1 conv, on both the
main and the shortcut path; the head is an attention pool whose single query is the mean token.

Parameter names match the ``visual.*`` entries of OpenAI's ``RN50.pt`` (prefix stripped), so its
state dict loads with ``strict=True``. The tower returns the attention-pool embedding and the
layer3 feature map: for RN50 at 224 px, ``pooled [B, 1024]`` and ``fmap [B, 1024, 14, 14]``.

Shapes: B batch, C channels, H x W spatial, T tokens (H*W + 1, the mean token first), D pooled dim.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BOTTLENECK_EXPANSION = 4
HEAD_WIDTH = 64  # CLIP's convention: attention-pool heads = embed_dim // 64
TOP_PREFIXES = ("layer4.", "attnpool.")
"""State-dict keys of a tower that ``BackboneTop`` holds, under the same names."""


@dataclass(kw_only=True)
class ModifiedResNetConfig:
    """Architecture of a CLIP ModifiedResNet."""

    layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    """Bottlenecks per stage (RN50: 3, 4, 6, 3)."""
    width: int = 64
    """Stem output channels; stage k has width * 2**k planes and 4x as many output channels."""
    output_dim: int = 1024
    """Attention-pool output (the pooled embedding)."""
    heads: int = 32
    """Attention-pool heads (CLIP uses width * 32 // 64)."""
    image_size: int = 224
    """Input side; the attention pool's positional embedding covers (image_size / 32)**2 + 1 tokens."""

    def __post_init__(self) -> None:
        self.layers = tuple(self.layers)
        if len(self.layers) != 4 or min(self.layers) < 1:
            raise ValueError(f"layers must be 4 stage depths >= 1, got {self.layers}")
        if self.width % 2 or self.image_size % 32:
            raise ValueError(f"width must be even and image_size a multiple of 32, got {self.width}, {self.image_size}")
        if self.embed_dim % self.heads:
            raise ValueError(f"heads={self.heads} must divide the embedding width {self.embed_dim}")

    @property
    def embed_dim(self) -> int:
        """Channels of layer4, the attention pool's input."""
        return self.width * 32

    @property
    def fmap_channels(self) -> int:
        """Channels of layer3, the cached feature map."""
        return self.width * 16


def rn50_config() -> ModifiedResNetConfig:
    """OpenAI CLIP RN50: pooled [1024], fmap [1024, 14, 14] at 224 px."""
    return ModifiedResNetConfig()


def tiny_config() -> ModifiedResNetConfig:
    """A few-millisecond tower with RN50's geometry: pooled [128], fmap [128, 14, 14] at 224 px."""
    return ModifiedResNetConfig(layers=(1, 1, 1, 1), width=8, output_dim=128, heads=4)


def small_config() -> ModifiedResNetConfig:
    """Still milliseconds on a CPU at 64 px, 4x tiny's width: pooled [256], fmap [512, 14, 14] at 224 px."""
    return ModifiedResNetConfig(layers=(1, 1, 1, 1), width=32, output_dim=256, heads=16)


@dataclass(kw_only=True)
class BackboneOutput:
    """What an image backbone gives each image."""

    pooled: Tensor
    """Global embedding [B, D] (RN50: the attention pool, D = 1024)."""
    fmap: Tensor
    """Feature map [B, C, h, w] (RN50: layer3, C = 1024, 14 x 14 at 224 px)."""


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> (avgpool if strided) -> 1x1 (x4 channels), plus a shortcut that pools the same way."""

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * BOTTLENECK_EXPANSION
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride > 1 or in_channels != out_channels:
            # Keys downsample.0 (conv) and downsample.1 (bn); the parameter-free pool is named "-1".
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride) if stride > 1 else nn.Identity()),
                ("0", nn.Conv2d(in_channels, out_channels, 1, bias=False)),
                ("1", nn.BatchNorm2d(out_channels)),
            ]))

    def forward(self, x_BCHW: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x_BCHW)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        shortcut = x_BCHW if self.downsample is None else self.downsample(x_BCHW)
        return F.relu(out + shortcut)


def make_stage(in_channels: int, planes: int, depth: int, stride: int) -> nn.Sequential:
    """One ResNet stage: a (strided) bottleneck from ``in_channels``, then ``depth - 1`` more; output 4 * planes
    channels."""
    blocks = [Bottleneck(in_channels, planes, stride)]
    blocks += [Bottleneck(planes * BOTTLENECK_EXPANSION, planes) for _ in range(depth - 1)]
    return nn.Sequential(*blocks)


class AttentionPool2d(nn.Module):
    """Multi-head attention of the mean token (query) over [mean; all positions] (keys/values), then c_proj."""

    def __init__(self, grid: int, embed_dim: int, heads: int, output_dim: int) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.heads = heads

    def forward(self, x_BCHW: Tensor) -> Tensor:
        B, C, H, W = x_BCHW.shape
        if H * W + 1 != self.positional_embedding.shape[0]:
            raise ValueError(f"attention pool expects a {self.positional_embedding.shape[0] - 1}-position grid, "
                             f"got {H}x{W}")
        tokens_BNC = x_BCHW.flatten(2).transpose(1, 2)  # [B, HW, C]
        tokens_BTC = torch.cat([tokens_BNC.mean(dim=1, keepdim=True), tokens_BNC], dim=1)
        tokens_BTC = tokens_BTC + self.positional_embedding.to(tokens_BTC.dtype)

        def split_heads(t_BTC: Tensor) -> Tensor:  # [B, T, C] -> [B, heads, T, C / heads]
            return t_BTC.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        q = split_heads(self.q_proj(tokens_BTC[:, :1]))
        k = split_heads(self.k_proj(tokens_BTC))
        v = split_heads(self.v_proj(tokens_BTC))
        pooled_B1C = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # [B, 1, C]
        return self.c_proj(pooled_B1C[:, 0])


def init_like_clip(stages: list[nn.Sequential], attnpool: AttentionPool2d) -> None:
    """CLIP's initialisation: attention-pool projections ~ N(0, 1/C), last BN of each residual branch zero."""
    std = attnpool.c_proj.in_features**-0.5
    for proj in (attnpool.q_proj, attnpool.k_proj, attnpool.v_proj, attnpool.c_proj):
        nn.init.normal_(proj.weight, std=std)
    for stage in stages:
        for block in stage:
            nn.init.zeros_(block.bn3.weight)


class ModifiedResNet(nn.Module):
    """CLIP's ResNet image tower; ``forward`` returns the pooled embedding and the layer3 map."""

    def __init__(self, config: ModifiedResNetConfig) -> None:
        super().__init__()
        self.config = config
        width = config.width
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)

        in_channels, stages = width, []
        for index, depth in enumerate(config.layers):
            planes = width * 2**index
            stages.append(make_stage(in_channels, planes, depth, stride=1 if index == 0 else 2))
            in_channels = planes * BOTTLENECK_EXPANSION
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.attnpool = AttentionPool2d(config.image_size // 32, config.embed_dim, config.heads, config.output_dim)
        init_like_clip(stages, self.attnpool)

    def stem(self, x_B3HW: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x_B3HW)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.avgpool(x)  # [B, width, H/4, W/4]

    def forward(self, x_B3HW: Tensor) -> BackboneOutput:
        """``x_B3HW``: ImageNet-normalised images at ``config.image_size``."""
        x = self.stem(x_B3HW.to(self.conv1.weight.dtype))
        x = self.layer2(self.layer1(x))
        fmap_BCHW = self.layer3(x)  # [B, width*16, H/16, W/16]
        pooled_BD = self.attnpool(self.layer4(fmap_BCHW))
        return BackboneOutput(pooled=pooled_BD, fmap=fmap_BCHW)


class BackboneTop(nn.Module):
    """A tower's ``layer4`` + attention pool as a module of its own: the layer3 map [B, C, H, W] -> pooled [B, D].

    Keys are the tower's (``layer4.*``, ``attnpool.*``). The BatchNorm statistics stay those of the
    tower, in training too (only the affine weights learn; docs/method.md §2.4), so a top that has
    not been stepped gives the tower's own pooled embedding in either mode.
    """

    def __init__(self, *, fmap_channels: int, grid: tuple[int, int], depth: int, heads: int, output_dim: int) -> None:
        super().__init__()
        if grid[0] != grid[1] or grid[0] % 2:
            raise ValueError(f"the backbone top needs an even square layer3 grid, got {grid[0]}x{grid[1]}")
        self.layer4 = make_stage(fmap_channels, fmap_channels // 2, depth, stride=2)  # C -> 2C channels, H/2 x W/2
        self.attnpool = AttentionPool2d(grid[0] // 2, 2 * fmap_channels, heads, output_dim)
        init_like_clip([self.layer4], self.attnpool)

    def forward(self, fmap_BCHW: Tensor) -> Tensor:
        """``fmap_BCHW`` in any float dtype (caches store float16): cast to the weights' dtype first."""
        return self.attnpool(self.layer4(fmap_BCHW.to(self.attnpool.c_proj.weight.dtype)))

    def train(self, mode: bool = True) -> BackboneTop:
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()  # running statistics frozen: never updated, always used
        return self
