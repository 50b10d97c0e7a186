"""Detector checkpoints: ``model.safetensors`` + ``config.json`` in a run directory.

``config.json`` holds the model kind and dims, the extraction config and fingerprint of the caches
it was trained on (what scoring new images recomputes), the calibrated decision threshold and how
it was set, the training config and the provenance. Scoring a cache made with another extraction fingerprint is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lare2.shared.cache import CacheLayout
from lare2.shared.config import ExtractConfig
from lare2.shared.jsonio import write_json
from lare2.train.data import CacheSplit
from lare2.train.models import ModelConfig, build_model

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class CheckpointError(RuntimeError):
    """A run directory that cannot be loaded or does not fit the data it is used on; the message says why."""


@dataclass(kw_only=True)
class DetectorConfig:
    """What ``config.json`` records beside the weights."""

    model: ModelConfig
    """Model kind and dimensions."""
    extraction_fingerprint: str
    """Fingerprint of the extraction identity of the caches the model was trained (or calibrated) on."""
    extraction: ExtractConfig | None = None
    """The extraction config of those caches: scoring new images recomputes features with it
    (None for a converted checkpoint not yet calibrated on a cache)."""
    threshold: float = 0.5
    """Decision threshold on p(fake): fake when ``p_fake > threshold``."""
    target_fpr: float | None = None
    """FPR on validation reals the threshold was calibrated for (None: not calibrated, 0.5 used)."""
    val_metrics: dict = field(default_factory=dict)
    """Metrics of the selected model on the validation split."""
    train: dict = field(default_factory=dict)
    """The resolved training config (empty for converted checkpoints)."""
    train_ids_digest: str | None = None
    """Digest of the training cache's sample ids (``lare2.train.split_safety.ids_digest``): ``lare2 eval``
    warns when a test cache is that cache (None for converted checkpoints)."""
    extra: dict = field(default_factory=dict)
    """Provenance, best epoch, source checkpoint and similar records."""

    def to_dict(self) -> dict:
        return {
            "model": self.model.to_dict(), "extraction_fingerprint": self.extraction_fingerprint,
            "extraction": self.extraction.to_dict() if self.extraction else None,
            "threshold": self.threshold, "target_fpr": self.target_fpr, "val_metrics": self.val_metrics,
            "train": self.train, "train_ids_digest": self.train_ids_digest, **self.extra,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DetectorConfig":
        # runs written before the typed field kept the extraction config as "extract_config"
        known = {"model", "extraction_fingerprint", "extraction", "extract_config", "threshold", "target_fpr",
                 "val_metrics", "train", "train_ids_digest"}
        stored_extraction = d.get("extraction") or d.get("extract_config")
        return cls(
            model=ModelConfig.from_dict(d["model"]), extraction_fingerprint=d["extraction_fingerprint"],
            extraction=ExtractConfig.from_dict(stored_extraction) if stored_extraction else None,
            threshold=float(d.get("threshold", 0.5)), target_fpr=d.get("target_fpr"),
            val_metrics=dict(d.get("val_metrics", {})), train=dict(d.get("train", {})),
            train_ids_digest=d.get("train_ids_digest"), extra={k: v for k, v in d.items() if k not in known},
        )


def save_weights(model: nn.Module | Mapping[str, torch.Tensor], path: Path) -> None:
    """A model's weights (or a state dict) as safetensors, written atomically."""
    source = model.state_dict() if isinstance(model, nn.Module) else model
    state = {k: v.detach().cpu().contiguous() for k, v in source.items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp))
    tmp.replace(path)


def save_detector(run_dir: str | Path, model: nn.Module, config: DetectorConfig) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_weights(model, run_dir / WEIGHTS_FILE)
    write_json(run_dir / CONFIG_FILE, config.to_dict())


def load_detector(run_dir: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, DetectorConfig]:
    """The trained model (eval mode) and its config from a run directory."""
    run_dir = Path(run_dir)
    config_path, weights_path = run_dir / CONFIG_FILE, run_dir / WEIGHTS_FILE
    for p in (config_path, weights_path):
        if not p.exists():
            raise CheckpointError(f"{p}: missing; {run_dir} is not a finished lare2 run (train with `lare2 train`)")
    try:
        config = DetectorConfig.from_dict(json.loads(config_path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{config_path}: not a lare2 detector config ({err})") from err
    model = build_model(config.model)
    state = load_file(str(weights_path))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{weights_path}: weights do not fit the model in {config_path}: {err}") from err
    return model.to(device).eval(), config


def check_compatible(config: DetectorConfig, fingerprint: str, layout: CacheLayout, cache_path: str | Path) -> None:
    """Refuse a cache whose extraction fingerprint or dimensions differ from the detector's."""
    if fingerprint != config.extraction_fingerprint:
        raise CheckpointError(
            f"{cache_path}: extraction fingerprint {fingerprint} differs from the detector's "
            f"{config.extraction_fingerprint}; its features were made with other settings or models"
        )
    m = config.model
    have = (layout.pooled_dim, tuple(layout.fmap_shape), tuple(layout.lare_shape))
    want = (m.pooled_dim, tuple(m.fmap_shape), tuple(m.lare_shape))
    if have != want:
        raise CheckpointError(f"{cache_path}: cache dims (pooled, fmap, lare) = {have}, the detector expects {want}")


@torch.no_grad()
def score_features(model: nn.Module, pooled: torch.Tensor | np.ndarray | None, fmap: torch.Tensor | np.ndarray | None,
                   lare: torch.Tensor | np.ndarray | None) -> torch.Tensor:
    """p(fake) [B] for cached-style inputs (any float dtype; cast to float32 on the model's device)."""
    device = next(model.parameters()).device

    def prepare(x):
        if x is None:
            return None
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
        return x.to(device=device, dtype=torch.float32)

    was_training = model.training
    model.eval()
    logits_B2 = model(prepare(pooled), prepare(fmap), prepare(lare))
    model.train(was_training)
    # float64: a float32 softmax rounds margins above ~17 to exactly 1.0, tying confident fakes with misjudged reals
    return logits_B2.double().softmax(dim=-1)[:, 1]


def split_reference_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(head, backbone) parts of a reference ``CLipClassifierWMapV6`` state dict.

    Unwraps ``{"state_dict": ...}``/``{"model": ...}`` containers and ``module.`` prefixes
    (DataParallel). Backbone keys lose their ``clip_model.`` prefix (``visual.*`` remains).
    """
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    head, backbone = {}, {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        key = key.removeprefix("module.")
        if key.startswith("clip_model."):
            backbone[key.removeprefix("clip_model.")] = value
        else:
            head[key] = value
    return head, backbone


@torch.no_grad()
def score_split(model: nn.Module, split: CacheSplit, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels [N], p_fake [N], cache row indices [N]) for every ok sample of ``split``, in store order."""
    labels, scores, indices = [], [], []
    for batch in split.sequential_batches(batch_size):
        scores.append(score_features(model, batch.pooled, batch.fmap, batch.lare).cpu().numpy())
        labels.append(batch.label.numpy())
        indices.append(batch.index)
    if not scores:
        return np.empty(0, np.int64), np.empty(0, np.float64), np.empty(0, np.int64)
    return np.concatenate(labels), np.concatenate(scores).astype(np.float64), np.concatenate(indices)
