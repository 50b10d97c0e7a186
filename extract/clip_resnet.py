"""OpenAI CLIP's ModifiedResNet image tower (docs/method.md §2), written out with the official key names.

Differences from a torchvision ResNet: a 3-conv stem closed by an average pool; strided
bottlenecks downsample with an average pool (anti-aliasing) before a stride-1 conv, on both the
main and the shortcut path; the head is an attention pool whose single query is the mean token.

Parameter names match the ``visual.*`` entries of OpenAI's ``RN50.pt`` (prefix stripped), so its
state dict loads with ``strict=True``. The backbone returns the attention-pool embedding and the
layer3 feature map: for RN50 at 224 px, ``pooled [B, 1024]`` and ``fmap [B, 1024, 14, 14]``.

Shapes: B batch, C channels, H x W spatial, T tokens (H*W + 1, the mean token first).
"""

from __future__ import annotations

import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lare2.extract.models import ModelNotFoundError, ModelSourceError  # torch only: diffusers loads lazily
from lare2.shared.provenance import fingerprint_state_dict
from lare2.shared.weights import read_state_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
BOTTLENECK_EXPANSION = 4
HEAD_WIDTH = 64  # CLIP's convention: attention-pool heads = embed_dim // 64


def normalize(x01_B3HW: Tensor) -> Tensor:
    """ImageNet mean/std normalisation of images in [0, 1] (the reference training code's constants)."""
    mean = torch.tensor(IMAGENET_MEAN, device=x01_B3HW.device, dtype=x01_B3HW.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x01_B3HW.device, dtype=x01_B3HW.dtype).view(1, 3, 1, 1)
    return (x01_B3HW - mean) / std


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
            raise ValueError(f"attention pool expects a {self.positional_embedding.shape[0] - 1}-position grid, got {H}x{W}")
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

        in_channels = width
        stages = []
        for index, depth in enumerate(config.layers):
            planes, stride = width * 2**index, 1 if index == 0 else 2
            blocks = [Bottleneck(in_channels, planes, stride)]
            in_channels = planes * BOTTLENECK_EXPANSION
            blocks += [Bottleneck(in_channels, planes) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.attnpool = AttentionPool2d(config.image_size // 32, config.embed_dim, config.heads, config.output_dim)
        self._init_like_clip()

    def _init_like_clip(self) -> None:
        """CLIP's initialisation: attention-pool projections ~ N(0, 1/C), last BN of each residual branch zero."""
        std = self.attnpool.c_proj.in_features**-0.5
        for proj in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(proj.weight, std=std)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                nn.init.zeros_(block.bn3.weight)

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


# ---- loading ------------------------------------------------------------------------------------
def infer_config(state: Mapping[str, Tensor]) -> ModifiedResNetConfig:
    """The architecture of a ModifiedResNet state dict (bare keys), from its tensor shapes.

    Heads cannot be read from shapes; CLIP's convention (embed_dim // 64) is assumed.
    """
    required = ("conv1.weight", "attnpool.positional_embedding", "attnpool.c_proj.weight")
    missing = [k for k in required if k not in state]
    if missing:
        raise KeyError(f"not a CLIP ModifiedResNet state dict: missing {missing}")
    width = state["conv1.weight"].shape[0] * 2
    layers = []
    for stage in range(1, 5):
        blocks = {int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        layers.append(len(blocks))
    positions = state["attnpool.positional_embedding"].shape[0] - 1
    grid = round(positions**0.5)
    embed_dim = width * 32
    return ModifiedResNetConfig(
        layers=tuple(layers), width=width, output_dim=state["attnpool.c_proj.weight"].shape[0],
        heads=max(1, embed_dim // HEAD_WIDTH), image_size=grid * 32,
    )


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files holding a ``code/`` folder; ``torch.save`` zips do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def read_backbone_state(path: Path) -> dict[str, Tensor]:
    """The tensors of a backbone file, keys as stored (``visual.*`` or bare)."""
    suffix = path.suffix.lower()
    if suffix not in STATE_DICT_SUFFIXES:
        raise ModelSourceError(f"{path}: unsupported backbone file type {suffix!r}; expected one of {STATE_DICT_SUFFIXES}")
    if suffix != ".safetensors" and _is_torchscript(path):
        # Only the archive's tensors are used; its methods are never called (loading still deserialises it).
        return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    try:
        return read_state_dict(path)
    except ValueError as err:
        raise ValueError(f"{err} (nor as a TorchScript archive)") from None


def visual_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Keep the image tower: ``visual.*`` keys with the prefix stripped, or all keys if none has it."""
    if any(k.startswith("visual.") for k in state):
        return {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    return dict(state)


def load_state_strict(module: nn.Module, state: Mapping[str, Tensor], where: str,
                      what: str = "a CLIP ModifiedResNet") -> None:
    """``load_state_dict(strict=True)`` with an error that names the file, ``what`` it should be and a few offending keys."""
    expected = set(module.state_dict())
    # BatchNorm fills a missing num_batches_tracked itself; every other key must match.
    missing = sorted(k for k in expected - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - expected)
    wrong_shape = sorted(k for k in expected & set(state) if tuple(state[k].shape) != tuple(module.state_dict()[k].shape))
    if missing or unexpected or wrong_shape:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        problems = [f"{label} {len(keys)}: {few(keys)}" for label, keys in
                    (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)) if keys]
        raise ValueError(f"{where}: does not match {what}; " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def build_backbone(config: ModifiedResNetConfig, seed: int = 0) -> ModifiedResNet:
    """A ModifiedResNet with weights drawn from ``seed`` (the global RNG is left untouched).

    Fresh BatchNorm statistics (mean 0, variance 1) let the activations of a random tower shrink
    layer after layer until every image gives the same features; the statistics are therefore
    set from one pass over seeded noise images, rounded to float16 precision so that the weights
    (and their fingerprint) do not depend on the machine's thread count.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ModifiedResNet(config)
        calibrate_batchnorm(model, torch.randn(16, 3, config.image_size, config.image_size))
    return model


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, images_B3HW: Tensor) -> None:
    """Set every BatchNorm's running statistics to those of ``images_B3HW`` flowing through ``model``."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average: one batch gives exactly its statistics
    model.train()
    model(images_B3HW)
    model.eval()
    for norm in norms:
        norm.momentum = 0.1
        norm.running_mean.copy_(norm.running_mean.half().float())
        norm.running_var.copy_(norm.running_var.half().float())


NAMED_BACKBONES = {"random-rn50": rn50_config, "tiny": tiny_config, "small": small_config}
"""Seeded random towers, by name: full-size RN50, and two millisecond ones for tests and the debug preset."""
BACKBONE_REMEDY = (f"pass an RN50.pt TorchScript archive, a state dict ({'/'.join(STATE_DICT_SUFFIXES)}, "
                   f"keys visual.* or bare), or one of {', '.join(repr(n) for n in NAMED_BACKBONES)}")


def load_backbone(
    spec: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[ModifiedResNet, str]:
    """A frozen ModifiedResNet in eval mode and the fingerprint of its weights.

    ``spec``: ``RN50.pt`` (OpenAI's TorchScript archive), a state dict (``.pt/.pth/.bin`` read with
    ``weights_only=True``, or ``.safetensors``; keys ``visual.*`` or bare), ``random-rn50`` (full
    size, seeded random), ``tiny`` or ``small``. The fingerprint is taken over float32 weights, so it is the
    same whichever file format held them and whatever ``dtype`` the module runs in.
    """
    spec = str(spec)
    if spec in NAMED_BACKBONES:
        module = build_backbone(NAMED_BACKBONES[spec]())
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            resolved = str(path.resolve())
            if path.is_dir():
                what = ": a folder, not a weight file"
            elif path.suffix.lower() in STATE_DICT_SUFFIXES or any(sep in spec for sep in ("/", "\\", "~")):
                what = ": no such file" + (f" ({resolved})" if resolved != spec else "")
            else:
                what = f": not a file on disk ({resolved}) nor a named backbone"
            raise ModelNotFoundError(f"backbone {spec!r} not found{what}; {BACKBONE_REMEDY}")
        state = visual_state(read_backbone_state(path))
        try:
            config = infer_config(state)
        except (KeyError, ValueError) as err:
            raise ModelSourceError(f"{path}: {err.args[0]}; found keys like {sorted(state)[:5]}") from err
        module = ModifiedResNet(config)
        load_state_strict(module, state, str(path))
    module.float()
    fingerprint = fingerprint_state_dict(module.state_dict())
    module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return module, fingerprint
