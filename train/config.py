"""Stage 2 configuration: one typed dataclass, presets as functions."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lare2.train.models import MODEL_KINDS

SELECT_METRICS = ("auc", "ap", "acc")
DEVICES = ("auto", "cpu", "cuda")
MIXED_PRECISION = ("no", "bf16", "fp16")

# Settings a resumed run may change without invalidating its saved state.
RESUME_FREE_KEYS = ("out", "epochs", "stop_after_steps", "log_every", "device", "resume", "progress", "cpu_threads")


@dataclass(kw_only=True)
class TrainConfig:
    """Everything stage 2 needs to fit a detector on cached tensors and calibrate it."""

    model: str = "egre"
    """``egre`` (LaRE^2: EGRE + head), ``linear`` (probe on pooled features) or ``lare-only`` (CNN on the map)."""
    train: str = "cache/train"
    """Training cache (``lare2 extract`` output); only samples with status ok are used."""
    val: str = "cache/val"
    """Validation cache: model selection, the learning-rate schedule and the threshold use it, never test data."""
    out: str = "runs/egre"
    """Run directory: checkpoints, config.json, history.json; resumed from when it holds a saved state."""

    epochs: int = 20
    """Passes over the training cache."""
    batch_size: int = 48
    """Samples per optimiser step (reference: 48)."""
    lr: float = 1e-4
    """Adam learning rate (reference: 1e-4, no weight decay)."""
    weight_decay: float = 0.0
    """Adam weight decay."""
    grad_clip: float = 5.0
    """Max global gradient norm (reference: 5.0); 0 disables clipping."""
    plateau_factor: float = 0.5
    """ReduceLROnPlateau factor on the validation metric (reference: 0.5)."""
    plateau_patience: int = 4
    """Epochs without improvement before the learning rate drops (reference: 4)."""
    min_lr: float = 1e-7
    """Learning-rate floor of the plateau schedule."""
    select_metric: str = "auc"
    """Validation metric that picks the best epoch and drives the schedule: ``auc``, ``ap`` or ``acc``."""
    target_fpr: float = 0.05
    """False positive rate on validation reals that the calibrated decision threshold is set for."""

    num_heads: int = 8
    """EGRE attention heads (one LaRE bias map each)."""
    head_dim: int = 64
    """EGRE per-head query/key/value width."""
    channel_hidden: int = 128
    """Hidden width of EGRE's LaRE channel gate."""
    dropout: float = 0.1
    """EGRE dropout (attention weights and attention output)."""

    seed: int = 0
    """Seeds the initial weights, the per-epoch data order and dropout."""
    shuffle_blocks: int = 8
    """Cache blocks (chunks) read together and shuffled as one window; the whole split never needs to fit in memory."""
    device: str = "auto"
    """``auto`` (Accelerate picks: GPU when present), ``cpu`` or ``cuda``."""
    mixed_precision: str = "no"
    """Accelerate mixed precision on GPU: ``no``, ``bf16`` or ``fp16``."""
    cpu_threads: int = 0
    """Torch intra-op threads on CPU; 0 keeps torch's default. Tiny models run fastest on 1."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms(True): bitwise repeatable runs (slower on GPU)."""
    resume: bool = True
    """Continue from the run directory's last saved epoch when there is one."""
    progress: bool = True
    """Show a progress bar per epoch."""
    log_every: int = 50
    """Log the running training loss every N steps."""
    stop_after_steps: int | None = None
    """Debug: stop (without saving) after this many optimiser steps in total, as a crash would."""

    def __post_init__(self) -> None:
        if self.model not in MODEL_KINDS:
            raise ValueError(f"model={self.model!r}: choose from {MODEL_KINDS}")
        if self.select_metric not in SELECT_METRICS:
            raise ValueError(f"select_metric={self.select_metric!r}: choose from {SELECT_METRICS}")
        if self.device not in DEVICES:
            raise ValueError(f"device={self.device!r}: choose from {DEVICES}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision={self.mixed_precision!r}: choose from {MIXED_PRECISION}")
        if not 0.0 < self.target_fpr < 1.0:
            raise ValueError(f"target_fpr must be in (0, 1), got {self.target_fpr}")
        if self.epochs < 1 or self.batch_size < 1 or self.shuffle_blocks < 1:
            raise ValueError("epochs, batch_size and shuffle_blocks must be >= 1")
        if self.cpu_threads < 0:
            raise ValueError(f"cpu_threads must be >= 0, got {self.cpu_threads}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    def to_dict(self) -> dict:
        return asdict(self)


# ---- presets ------------------------------------------------------------------------------------
def paper(**overrides) -> TrainConfig:
    """The reference recipe (SPEC 2.4): Adam 1e-4, batch 48, clip 5.0, plateau(0.5, 4) on validation AUC."""
    return TrainConfig(**overrides)


def debug(**overrides) -> TrainConfig:
    """Tiny and fast on a CPU: a larger learning rate, few epochs, bitwise deterministic."""
    return TrainConfig(**{"epochs": 4, "batch_size": 16, "lr": 1e-3, "device": "cpu", "deterministic": True,
                          "cpu_threads": 1, "log_every": 10, **overrides})


PRESETS = {"paper": paper, "debug": debug}


def preset(name: str, **overrides) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name](**overrides)
