"""Run directories: what ``lare2 train`` writes, and what scoring, eval and calibration read back.

    model.safetensors   the detector's weights (of the best epoch on the validation metric)
    config.json         the model kind and dims, the extraction config and fingerprint of the caches it was
                        trained on (what scoring new images recomputes), the calibrated decision threshold and
                        how it was set, the training config and the provenance; written last
    history.json        per-epoch training loss, learning rate and validation metrics
    resume.pt           the last finished epoch: model, optimizer, scheduler, RNG, epoch/step, history, best

Scoring a cache made with another extraction fingerprint is refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lare2.shared.atomic import atomic_write
from lare2.shared.cache import CacheLayout
from lare2.shared.config import SCORING_IGNORES, ExtractConfig, diff_identity, identity_fingerprint
from lare2.shared.errors import UserError
from lare2.shared.jsonio import write_json
from lare2.shared.wording import shown
from lare2.train.config import RESUME_FREE_KEYS, TrainConfig
from lare2.train.models import ModelConfig, build_model

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.json"
RESUME_FILE = "resume.pt"


class CheckpointError(UserError):
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
    with atomic_write(path) as tmp:
        save_file(state, str(tmp))


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
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as err:  # truncated, overwritten, not safetensors at all
        raise CheckpointError(f"{weights_path}: not readable safetensors ({err}); retrain the run, or restore the "
                              "file") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{weights_path}: weights do not fit the model in {config_path}: {err}") from err
    return model.to(device).eval(), config


def run_identity(config: DetectorConfig) -> dict | None:
    """The extraction identity (``ExtractConfig.identity``) of the caches the detector was trained or calibrated
    on: recorded in ``config.json``, else rebuilt from its extraction config and model fingerprints when that
    gives back its fingerprint; None when neither is at hand (a converted checkpoint, a test run)."""
    recorded = config.extra.get("extraction_identity")
    if isinstance(recorded, dict):
        return recorded
    if config.extraction is None:
        return None
    rebuilt = config.extraction.identity(dict(config.extra.get("model_fingerprints") or {}))
    return rebuilt if identity_fingerprint(rebuilt) == config.extraction_fingerprint else None


def identity_differences(first: Mapping | None, second: Mapping | None, names: tuple[str, str]) -> str:
    """``key: <first name> has A, <second name> B; ...`` for every extraction identity key the fingerprint
    covers whose values differ (``SCORING_IGNORES`` aside); ``""`` when either identity is unknown."""
    if not isinstance(first, Mapping) or not isinstance(second, Mapping):
        return ""
    differing = {k: v for k, v in diff_identity(dict(first), dict(second)).items() if k not in SCORING_IGNORES}
    return "; ".join(f"{key}: {names[0]} has {shown(a)}, {names[1]} {shown(b)}" for key, (a, b) in differing.items())


def check_compatible(config: DetectorConfig, fingerprint: str, layout: CacheLayout, cache_path: str | Path,
                     identity: Mapping | None = None) -> None:
    """Refuse a cache whose extraction fingerprint or dimensions differ from the detector's; ``identity``,
    the cache's ``attrs["identity"]``, lets the refusal name each setting that differs."""
    if fingerprint != config.extraction_fingerprint:
        differing = identity_differences(identity, run_identity(config), ("the cache", "the run"))
        what = f"({differing or f'the cache has {fingerprint}, the run {config.extraction_fingerprint}'})"
        raise CheckpointError(f"{cache_path}: extraction fingerprint differs from the detector's {what}: its features "
                              "were made with other settings or models; extract it with the run's settings "
                              "(config.json: extraction)")
    m = config.model
    have = (layout.pooled_dim, tuple(layout.fmap_shape), tuple(layout.lare_shape))
    want = (m.pooled_dim, tuple(m.fmap_shape), tuple(m.lare_shape))
    if have != want:
        raise CheckpointError(f"{cache_path}: cache dims (pooled, fmap, lare) = {have}, the detector expects {want}")


@dataclass
class Progress:
    """Where training stands after its last finished epoch (``resume.pt`` holds it with the model,
    optimizer, scheduler and RNG states)."""

    epoch: int = 0
    """Epochs finished."""
    step: int = 0
    """Optimizer steps taken."""
    history: list[dict] = field(default_factory=list)
    """One record per finished epoch, as ``history.json`` holds them."""
    best: dict = field(default_factory=lambda: {"metric": -math.inf, "epoch": -1})
    """Selection metric, validation loss and epoch (0-based) of the best epoch so far."""
    best_weights: dict[str, torch.Tensor] | None = None
    """The best epoch's weights (CPU), kept in ``resume.pt`` too: they and ``best`` stay consistent."""


def save_history(run_dir: Path, history: list[dict]) -> None:
    write_json(run_dir / HISTORY_FILE, {"history": history})


def _rng_state() -> dict:
    return {"rng_torch": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["rng_torch"])
    if state.get("rng_cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])


def save_resume_state(run_dir: Path, progress: Progress, model: nn.Module, optimizer: torch.optim.Optimizer,
                      scheduler, cfg: TrainConfig) -> None:
    """``run_dir/resume.pt`` after a finished epoch, with this process's RNG state; written atomically,
    so that a kill leaves the previous epoch's state intact."""
    state = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "best_model": progress.best_weights,
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "epoch": progress.epoch, "step": progress.step, "history": progress.history, "best": progress.best,
             "config": cfg.to_dict(), **_rng_state()}
    with atomic_write(run_dir / RESUME_FILE) as tmp:
        torch.save(state, tmp)


def _check_resumable(saved: dict, cfg: TrainConfig, path: Path) -> None:
    now, defaults = cfg.to_dict(), TrainConfig().to_dict()  # a setting newer than the saved state has its default there
    changed = {k: (saved.get(k, defaults[k]), now[k]) for k in now
               if k not in RESUME_FREE_KEYS and saved.get(k, defaults[k]) != now[k]}
    if changed:
        raise CheckpointError(f"{path}: saved with other settings {changed} (saved, now); use another --out, "
                              "or --overwrite to start afresh")


def load_resume_state(run_dir: Path, cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                      scheduler) -> Progress | None:
    """Restore ``model``, ``optimizer``, ``scheduler`` and the RNG from ``run_dir/resume.pt``; where training
    stands (None: no saved state). A state saved with other settings (``RESUME_FREE_KEYS`` aside) is refused."""
    path = run_dir / RESUME_FILE
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    _check_resumable(state["config"], cfg, path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state)
    return Progress(epoch=state["epoch"], step=state["step"], history=state["history"], best=state["best"],
                    best_weights=state.get("best_model"))
