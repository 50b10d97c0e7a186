"""Stage 2 configuration: one typed dataclass, presets as plain functions returning one.

Choices are ``Literal`` types; ``lare2.shared.settings`` checks every field's type and converts
``--set KEY=VALUE``; ranges are checked in ``__post_init__``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal, get_args

from lare2.shared.devices import DEVICES, DeviceName
from lare2.shared.settings import SettingsError, check_fields, check_range, make_config, pick_preset
from lare2.train.models import MODEL_KINDS, HeadSettings

ModelKind = Literal[MODEL_KINDS]  # type: ignore[valid-type]  # ("egre", "linear", "lare-only")
SelectMetric = Literal["auc", "ap", "acc"]
MixedPrecision = Literal["no", "bf16", "fp16"]
InMemory = Literal["auto", "on", "off"]
SELECT_METRICS: tuple[str, ...] = get_args(SelectMetric)
MIXED_PRECISION: tuple[str, ...] = get_args(MixedPrecision)
__all__ = ["DEVICES", "MIXED_PRECISION", "PRESETS", "RESUME_FREE_KEYS", "SELECT_METRICS", "TrainConfig", "preset"]

# Settings a resumed run may change without invalidating its saved state.
RESUME_FREE_KEYS = ("out", "epochs", "stop_after_steps", "log_every", "device", "resume", "progress", "cpu_threads",
                    "allow_pending", "allow_overlap", "clip", "read_workers", "read_ahead", "in_memory",
                    "memory_budget_gb")


@dataclass(kw_only=True)
class TrainConfig(HeadSettings):
    """Everything stage 2 needs to fit a detector on cached tensors and calibrate it (EGRE's own
    hyperparameters, ``num_heads``, ``head_dim``, ``channel_hidden``, ``dropout``, come from ``HeadSettings``)."""

    model: ModelKind = "egre"
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
    train_backbone_top: bool = False
    """Train the backbone's layer4 + attention pool with the head (docs/method.md §2.4): ``pooled`` is recomputed
    from the cached layer3 ``fmap`` (the cached ``pooled`` is not read), starting from the backbone weights the
    training cache was made with (fingerprint checked). egre and linear only."""
    backbone_top_lr_scale: float = 0.1
    """The backbone top's learning rate as a multiple of ``lr`` (its own Adam parameter group)."""
    clip: str = ""
    """Backbone weights for ``train_backbone_top`` (``--clip``): RN50.pt, a state dict or a named seeded tower;
    empty: the ``clip`` weights the training cache's extraction recorded."""
    grad_clip: float = 5.0
    """Max global gradient norm (reference: 5.0); 0 disables clipping."""
    plateau_factor: float = 0.5
    """ReduceLROnPlateau factor on the validation metric (reference: 0.5)."""
    plateau_patience: int = 4
    """Epochs without improvement before the learning rate drops (reference: 4)."""
    min_lr: float = 1e-7
    """Learning-rate floor of the plateau schedule."""
    select_metric: SelectMetric = "auc"
    """Validation metric that picks the best epoch and drives the schedule: ``auc``, ``ap`` or ``acc``."""
    target_fpr: float = 0.05
    """False positive rate on validation reals that the calibrated decision threshold is set for."""

    seed: int = 0
    """Seeds the initial weights, the per-epoch data order and dropout."""
    shuffle_blocks: int = 8
    """Cache blocks (chunks) read together and shuffled as one window; the whole split never needs to fit in memory."""
    read_workers: int = 2
    """Background threads reading, checking and decoding the next windows while the current one trains (zarr's
    codecs and torch's casts release the GIL; threads beat processes, which must pickle each window back);
    0 reads each window inline when it is due. More workers than ``read_ahead`` do not help. Never changes a batch."""
    read_ahead: int = 2
    """Windows read ahead of the one in use (with ``read_workers`` > 0). Memory holds up to 2 + ``read_ahead``
    float32 windows (the one in use, the one before while a batch spans both, those being read): ~215 MB each
    for full-size features in windows of 8 blocks of 32 samples. Pinned when training on CUDA."""
    in_memory: InMemory = "auto"
    """``auto``: hold the training split's ok samples in RAM, then the validation split's, each when it fits in
    what is left of ``memory_budget_gb``, else read it from the cache (logged either way); ``on``: refuse a split
    that does not fit; ``off``: always read from the cache. Each process holds its own copy. Never changes a batch."""
    memory_budget_gb: float = 0.0
    """RAM the ``in_memory`` splits may take in this process, in GB at their storage dtypes (full-size features:
    0.42 MB per sample); 0: half the memory available at the start, divided among the processes of this machine."""
    device: DeviceName = "auto"
    """``auto`` (CUDA when present, else CPU), ``cpu`` or ``cuda``."""
    mixed_precision: MixedPrecision = "no"
    """Accelerate mixed precision on GPU: ``no``, ``bf16`` or ``fp16``."""
    cpu_threads: int = 0
    """Torch intra-op threads on CPU; 0 keeps torch's default. Tiny models run fastest on 1."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms(True): bitwise repeatable runs (slower on GPU)."""
    resume: bool = True
    """True: continue from the run directory's last saved epoch when there is one (refused, naming the
    settings, when they changed). False: start afresh; ``lare2 train`` then refuses a run directory
    that already holds a run unless ``--overwrite`` is given."""
    progress: bool = True
    """Show a progress bar per epoch."""
    log_every: int = 50
    """Log the running training loss every N steps."""
    stop_after_steps: int | None = None
    """Debug: stop (without saving) after this many optimiser steps in total, as a crash would."""
    allow_pending: bool = False
    """Train on caches whose extraction is unfinished (their pending samples left out); refused otherwise."""
    allow_overlap: bool = False
    """Accept train and val caches sharing sample ids, or holding test data; refused otherwise (split safety)."""
    use_views: bool = True
    """With a training cache extracted with ``--views K``: train on one of its K augmented views per sample per
    epoch, drawn from (seed, epoch, sample id) (``lare2.train.data``); False: on the evaluation view, as without
    views. Validation always uses the evaluation view."""

    def __post_init__(self) -> None:
        check_fields(self)
        super().__post_init__()
        check_range(self, "target_fpr", above=0.0, below=1.0)
        for key in ("epochs", "batch_size", "shuffle_blocks", "num_heads", "head_dim", "channel_hidden"):
            check_range(self, key, min=1)
        for key in ("cpu_threads", "weight_decay", "grad_clip", "plateau_patience", "min_lr", "log_every", "seed",
                    "read_workers", "memory_budget_gb"):
            check_range(self, key, min=0)
        check_range(self, "lr", above=0.0)
        check_range(self, "read_ahead", min=1)
        check_range(self, "plateau_factor", above=0.0, below=1.0)
        check_range(self, "stop_after_steps", min=1)
        check_range(self, "backbone_top_lr_scale", above=0.0)
        if self.train_backbone_top and self.model == "lare-only":
            raise SettingsError("train_backbone_top: the lare-only model reads no backbone features; "
                                "use --model egre or linear")

    def to_dict(self) -> dict:
        return asdict(self)


# ---- presets: plain functions returning a config ------------------------------------------------
def paper(**overrides: Any) -> TrainConfig:
    """The reference recipe (docs/method.md §4.1): Adam 1e-4, batch 48, clip 5.0, plateau(0.5, 4) on validation AUC."""
    return make_config(TrainConfig, overrides)


def debug(**overrides: Any) -> TrainConfig:
    """Tiny and fast on a CPU: a larger learning rate, few epochs, bitwise deterministic."""
    return make_config(TrainConfig, {"epochs": 4, "batch_size": 16, "lr": 1e-3, "device": "cpu", "deterministic": True,
                                     "cpu_threads": 1, "log_every": 10, **overrides})


PRESETS: dict[str, Callable[..., TrainConfig]] = {"paper": paper, "debug": debug}


def preset(name: str, **overrides: Any) -> TrainConfig:
    """The preset called ``name`` with ``overrides``; ``SettingsError`` for an unknown preset or key."""
    return pick_preset(PRESETS, name, **overrides)
