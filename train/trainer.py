"""Fit a detector on cached tensors: select and schedule on validation, calibrate, save.

All Accelerate calls live in this module. ``run_training`` runs these steps:

    set_up               the accelerator, the model, the splits, the optimizer and scheduler (resume.pt restored)
    train_epoch          one pass over this rank's part of the training split
    validate_and_select  validation metrics, the learning-rate schedule, the best epoch so far
    save_epoch           model.safetensors (on a new best), history.json, resume.pt
    finish               reload the best epoch, calibrate its threshold on validation reals, write config.json

The run directory's files are read and written by ``lare2.train.checkpoint``. A crash loses at most
the epoch in progress: the next run with the same config resumes from ``resume.pt`` and, with
deterministic algorithms on, ends with the same weights as an uninterrupted run (the data order
depends only on (seed, epoch); the RNG state is restored).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lare2.shared.cache import CacheError
from lare2.shared.config import current_keys
from lare2.shared.errors import InputError
from lare2.shared.logs import get_logger, progress_bar, rate_text
from lare2.shared.seeding import seed_everything
from lare2.train.calibration import calibrated_config_for
from lare2.train.checkpoint import (
    WEIGHTS_FILE,
    Progress,
    identity_differences,
    load_resume_state,
    save_detector,
    save_history,
    save_resume_state,
    save_weights,
)
from lare2.train.config import TrainConfig
from lare2.train.data import Batch, CacheSplit, ReadSettings
from lare2.train.metrics import detection_metrics, validation_loss
from lare2.train.models import ModelConfig, build_model, param_groups
from lare2.train.scoring import score_split
from lare2.train.split_safety import cache_ids, check_train_val, ids_digest

logger = get_logger(__name__)


@dataclass
class TrainResult:
    """Outcome of :func:`run_training`."""

    run_dir: Path
    finished: bool
    """False when stopped early by ``stop_after_steps``."""
    best_epoch: int
    threshold: float | None
    val_metrics: dict


def model_config_for(cfg: TrainConfig, split: CacheSplit, top=None) -> ModelConfig:
    """``top``: the ``TopWeights`` of ``--train-backbone-top`` (``train/backbone_top.py``), or None."""
    layout = split.cache.layout
    top_settings = {} if top is None else {"train_backbone_top": True, "backbone_top_depth": top.depth,
                                           "backbone_top_heads": top.heads}
    return ModelConfig(
        kind=cfg.model, pooled_dim=layout.pooled_dim, fmap_shape=tuple(layout.fmap_shape),
        lare_shape=tuple(layout.lare_shape),
        **cfg.head_settings(), **top_settings,
    )


def _open_splits(cfg: TrainConfig, input_names: tuple[str, ...], read: ReadSettings) -> tuple[CacheSplit, CacheSplit]:
    train = CacheSplit(cfg.train, input_names, allow_pending=cfg.allow_pending, read=read, views=cfg.use_views)
    val = CacheSplit(cfg.val, input_names, allow_pending=cfg.allow_pending, read=read)
    check_train_val(train.cache, val.cache, cfg.allow_overlap)
    if train.fingerprint != val.fingerprint:
        differing = identity_differences(val.cache.attrs.get("identity"), train.cache.attrs.get("identity"),
                                         ("val", "train"))
        raise CacheError(f"{cfg.val}: extraction fingerprint differs from {cfg.train}'s ({differing}); train and "
                         "validation features must come from the same extraction settings")
    if train.cache.layout != val.cache.layout:
        raise CacheError(f"{cfg.val}: layout {val.cache.layout} differs from {cfg.train}'s {train.cache.layout}")
    # the fingerprint ignores --perturb (perturbed test caches stay scorable), so say it when selection and
    # calibration would rest on damaged images the training split never saw
    perturbs = [(split.cache.attrs.get("extract_config") or {}).get("perturb", "") for split in (train, val)]
    if perturbs[0] != perturbs[1]:
        logger.warning("%s: validation images perturbed %r, training images %r: epoch selection and the calibrated "
                       "threshold follow the validation condition", cfg.val, perturbs[1] or "none",
                       perturbs[0] or "none")
    for split, role in ((train, "training"), (val, "validation")):
        labels = split.labels[split.ok]
        if not ((labels == 0).any() and (labels == 1).any()):
            raise CacheError(f"{split.path}: the {role} split needs ok samples of both classes, "
                             f"has {int((labels == 0).sum())} real and {int((labels == 1).sum())} fake")
    return train, val


def read_settings(cfg: TrainConfig, device: torch.device) -> ReadSettings:
    """How the splits are read on ``device``: pinned for CUDA, so that ``Batch.to``'s copies do not block."""
    pin = None
    if device.type == "cuda":
        pin = f"cuda:{torch.cuda.current_device() if device.index is None else device.index}"
    return ReadSettings(workers=cfg.read_workers, ahead=cfg.read_ahead, pin_device=pin)


def memory_budget_bytes(cfg: TrainConfig) -> int:
    """``cfg.memory_budget_gb``; 0: half the memory available now, shared by the processes on this machine."""
    if cfg.memory_budget_gb:
        return int(cfg.memory_budget_gb * 1e9)
    import psutil  # an accelerate dependency

    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun / accelerate launch set it
    return psutil.virtual_memory().available // (2 * local_processes)


def hold_splits_in_memory(cfg: TrainConfig, splits: list[CacheSplit], log: bool = True) -> None:
    """Hold ``splits`` in RAM, in turn, while they fit under the budget (``cfg.in_memory``); say which and why.

    ``on`` refuses (``InputError``) a split that does not fit; ``auto`` reads it from the cache instead."""
    if cfg.in_memory == "off":
        return
    budget = left = memory_budget_bytes(cfg)
    for split in splits:
        need = split.memory_bytes()
        if need > left:
            why = (f"{split.path}: its {split.num_ok} ok samples take {need / 1e9:.2f} GB, over the "
                   f"{left / 1e9:.2f} GB left of the {budget / 1e9:.2f} GB in-memory budget")
            if cfg.in_memory == "on":
                raise InputError(f"{why}; raise --set memory_budget_gb=GB or use --set in_memory=auto "
                                 "(reads from the cache)")
            if log:
                logger.info(f"{why}: read from the cache ({cfg.read_workers} read workers, "
                            f"{cfg.read_ahead} windows ahead)")
            continue
        started = time.perf_counter()
        split.hold_in_memory()
        left -= need
        if log:
            logger.info(f"{split.path}: {split.num_ok} ok samples held in memory ({need / 1e9:.2f} GB of the "
                        f"{budget / 1e9:.2f} GB budget, read in {time.perf_counter() - started:.1f} s)")


def train_step(model: nn.Module, batch: Batch, optimizer, accelerator, trainable: list[nn.Parameter],
               grad_clip: float) -> torch.Tensor:
    """One optimiser step on ``batch`` (already on the device); the detached loss."""
    with accelerator.autocast():
        logits_B2 = model(batch.pooled, batch.fmap, batch.lare)
    loss = F.cross_entropy(logits_B2.float(), batch.label)
    accelerator.backward(loss)
    if grad_clip > 0:
        accelerator.clip_grad_norm_(trainable, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


@dataclass
class TrainingRun:
    """What the steps of one training run share."""

    cfg: TrainConfig
    accelerator: Any
    """The ``accelerate.Accelerator`` (imported when a run starts: ``lare2 --help`` stays fast)."""
    model_config: ModelConfig
    model: nn.Module
    """The model itself, not the wrapper ``accelerator.prepare`` returns."""
    trainable: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau
    train_split: CacheSplit
    val_split: CacheSplit
    progress: Progress

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def start_accelerator(cfg: TrainConfig):
    """An ``accelerate.Accelerator`` for ``cfg``, with the process-wide torch settings the run asks for."""
    from accelerate import Accelerator

    if cfg.deterministic:
        # deterministic cuBLAS needs it set before its first use
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    accelerator = Accelerator(cpu=cfg.device == "cpu", mixed_precision=cfg.mixed_precision)
    if cfg.device == "cuda" and accelerator.device.type != "cuda":
        raise InputError("device='cuda' but no CUDA device is visible; use --device cpu or auto")
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    if accelerator.device.type == "cpu":
        # near-zero losses make denormal gradients, which crawl on x86 CPUs; this reaches the calling thread
        # and threads started after it, so a long-lived process should set it before its first parallel op
        torch.set_flush_denormal(True)
        if cfg.cpu_threads:
            torch.set_num_threads(cfg.cpu_threads)
    return accelerator


def _build_model(cfg: TrainConfig) -> tuple[ModelConfig, nn.Module]:
    """The model ``cfg`` asks for, sized by the training cache; with ``--train-backbone-top``, the top starts
    from the backbone weights the cache was extracted with (fingerprint checked)."""
    probe = CacheSplit(cfg.train, (), allow_pending=cfg.allow_pending)
    top = None
    if cfg.train_backbone_top:
        from lare2.train.backbone_top import load_top_weights

        top = load_top_weights(cfg.clip, probe.cache.attrs, cfg.train)
    model_config = model_config_for(cfg, probe, top)
    model = build_model(model_config)
    if top is not None:
        model.backbone_top.load_state_dict(top.state)
    return model_config, model


def _resume(run: TrainingRun) -> None:
    """Continue from ``resume.pt`` when the run directory holds one (saved with the same settings)."""
    progress = load_resume_state(run.out, run.cfg, run.model, run.optimizer, run.scheduler)
    if progress is None:
        return
    if progress.best_weights is not None and run.is_main:
        # a kill between saving a new best and saving resume.pt left a best that resume.pt does not know
        save_weights(progress.best_weights, run.out / WEIGHTS_FILE)
    run.progress = progress
    logger.info(f"resuming {run.out} after epoch {progress.epoch} (step {progress.step})")


def set_up(cfg: TrainConfig) -> TrainingRun:
    """Everything a run needs before its first step: seeded model, checked splits, optimizer, schedule, saved state."""
    accelerator = start_accelerator(cfg)
    seed_everything(cfg.seed)
    model_config, model = _build_model(cfg)
    train_split, val_split = _open_splits(cfg, type(model).input_names, read_settings(cfg, accelerator.device))
    model.to(accelerator.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # one group for the head at lr; with --train-backbone-top a second for the top at lr * backbone_top_lr_scale
    optimizer = torch.optim.Adam(param_groups(model, cfg.lr, cfg.backbone_top_lr_scale), lr=cfg.lr,
                                 weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience, min_lr=cfg.min_lr)
    run = TrainingRun(cfg=cfg, accelerator=accelerator, model_config=model_config, model=model, trainable=trainable,
                      optimizer=optimizer, scheduler=scheduler, train_split=train_split, val_split=val_split,
                      progress=Progress())
    if cfg.resume:
        _resume(run)
    if run.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        logger.info(f"{cfg.model}: {sum(p.numel() for p in trainable):,} trainable parameters; "
                    f"train {train_split.num_ok} / val {val_split.num_ok} ok samples; "
                    f"extraction {train_split.fingerprint}")
        warning = class_prompt_warning(train_split.cache.attrs.get("extract_config") or {})
        if warning:
            logger.warning(warning)
    # every epoch reads the whole train split (this rank's part) and val: read them once
    if run.progress.epoch < cfg.epochs:
        hold_splits_in_memory(cfg, [train_split, val_split], log=run.is_main)
    return run


def train_epoch(run: TrainingRun, model: nn.Module, optimizer, epoch: int) -> float | None:
    """One pass over this rank's part of the training split with the prepared ``model`` and ``optimizer``;
    the mean training loss, or None when ``stop_after_steps`` ended the run inside the epoch."""
    cfg, accelerator, progress = run.cfg, run.accelerator, run.progress
    model.train()
    loss_sum, seen, started = 0.0, 0, time.perf_counter()
    batches = run.train_split.epoch_batches(epoch=epoch, seed=cfg.seed, batch_size=cfg.batch_size,
                                            shuffle_blocks=cfg.shuffle_blocks, rank=accelerator.process_index,
                                            world_size=accelerator.num_processes)
    steps_per_epoch = run.train_split.num_batches(batch_size=cfg.batch_size, shuffle_blocks=cfg.shuffle_blocks,
                                                  world_size=accelerator.num_processes, epoch=epoch, seed=cfg.seed)
    with progress_bar("img", disable=not (run.is_main and cfg.progress)) as bar:
        task = bar.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=steps_per_epoch, rate="")
        for batch in batches:
            batch = batch.to(accelerator.device)
            loss = train_step(model, batch, optimizer, accelerator, run.trainable, cfg.grad_clip)
            progress.step += 1
            loss_sum += float(loss) * len(batch)
            seen += len(batch)
            rate = rate_text(seen, time.perf_counter() - started)
            bar.update(task, advance=1, rate=f"loss {loss_sum / seen:.4f}  {rate}")
            if run.is_main and cfg.log_every and progress.step % cfg.log_every == 0 and not cfg.progress:
                logger.info(f"step {progress.step}: loss {loss_sum / seen:.4f}")
            if cfg.stop_after_steps is not None and progress.step >= cfg.stop_after_steps:
                logger.warning(f"stopping after {progress.step} steps (stop_after_steps); "
                               "nothing of this epoch is saved")
                return None
    return loss_sum / max(seen, 1)


def validate_and_select(run: TrainingRun, model: nn.Module, epoch: int, train_loss: float) -> bool:
    """Score the validation split, step the learning-rate schedule, record the epoch in the history;
    whether it is the best so far (on ``select_metric``, ties to the lower validation loss)."""
    cfg, progress = run.cfg, run.progress
    labels, scores, _ = score_split(model, run.val_split, batch_size=max(cfg.batch_size, 64))
    val_metrics = detection_metrics(labels, scores)
    val_metrics["loss"] = validation_loss(labels, scores)
    metric = val_metrics[cfg.select_metric]
    epoch_lr = run.optimizer.param_groups[0]["lr"]
    run.scheduler.step(metric)
    # ties on the selection metric (e.g. AUC saturating at 1) go to the lower validation loss
    improved = (metric, -val_metrics["loss"]) > (progress.best["metric"], -progress.best.get("loss", math.inf))
    if improved:
        progress.best = {"metric": float(metric), "loss": val_metrics["loss"], "epoch": epoch}
    record = {"epoch": epoch + 1, "step": progress.step, "train_loss": train_loss, "lr": epoch_lr,
              **{f"val_{k}": v for k, v in val_metrics.items()}}
    progress.history.append(record)
    progress.epoch = epoch + 1
    if run.is_main:
        logger.info(f"epoch {epoch + 1}: loss {train_loss:.4f}  val loss {val_metrics['loss']:.4f}  "
                    f"acc {val_metrics['acc']:.4f}  ap {val_metrics['ap']:.4f}  auc {val_metrics['auc']:.4f}"
                    f"{'  (best)' if improved else ''}")
    return improved


def save_epoch(run: TrainingRun, model: nn.Module, improved: bool) -> None:
    """The main process writes the finished epoch: a new best's weights, history.json, then resume.pt."""
    if not run.is_main:
        return
    if improved:
        run.progress.best_weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        save_weights(model, run.out / WEIGHTS_FILE)
    save_history(run.out, run.progress.history)
    save_resume_state(run.out, run.progress, model, run.optimizer, run.scheduler, run.cfg)


def finish(run: TrainingRun) -> TrainResult:
    """Reload the best epoch, calibrate its threshold on validation reals, write config.json."""
    from safetensors.torch import load_file

    cfg, out, best = run.cfg, run.out, run.progress.best
    model = build_model(run.model_config)
    model.load_state_dict(load_file(str(out / WEIGHTS_FILE)))
    config = calibrated_config_for(
        model, run.model_config, run.val_split, cfg.target_fpr,
        extra={"best_epoch": best["epoch"] + 1, "select_metric": cfg.select_metric, "train_cache": str(cfg.train),
               "val_cache": str(cfg.val)},
    )
    config = replace(config, train=cfg.to_dict(), train_ids_digest=ids_digest(cache_ids(run.train_split.cache)))
    threshold, val_metrics = config.threshold, config.val_metrics
    if run.is_main:
        save_detector(out, model, config)
        logger.info(f"best epoch {best['epoch'] + 1}: val {cfg.select_metric} {best['metric']:.4f}; "
                    f"threshold {threshold:.4g} for {cfg.target_fpr:.0%} FPR on {val_metrics['n_real']} "
                    f"validation reals -> {out}")
    run.accelerator.wait_for_everyone()
    return TrainResult(run_dir=out, finished=True, best_epoch=best["epoch"] + 1, threshold=threshold,
                       val_metrics=val_metrics)


def run_training(cfg: TrainConfig) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.train``, select on ``cfg.val``, calibrate, write the run directory."""
    run = set_up(cfg)
    model, optimizer = run.accelerator.prepare(run.model, run.optimizer)
    for epoch in range(run.progress.epoch, cfg.epochs):
        train_loss = train_epoch(run, model, optimizer, epoch)
        if train_loss is None:
            return TrainResult(run_dir=run.out, finished=False, best_epoch=run.progress.best["epoch"] + 1,
                               threshold=None, val_metrics={})
        raw_model = run.accelerator.unwrap_model(model)
        improved = validate_and_select(run, raw_model, epoch, train_loss)
        save_epoch(run, raw_model, improved)
        run.accelerator.wait_for_everyone()
    return finish(run)


def class_prompt_warning(extract_config: dict) -> str:
    """A warning when features were extracted with class prompts, which images in the wild can only approximate."""
    if extract_config.get("prompt_mode") != "class":
        return ""
    if current_keys(extract_config).get("classless_prompt") == "empty":  # a cache from before the key: empty
        return ("this detector is trained on LaRE maps made with class prompts, and the empty prompt for images "
                "without a GenImage-style class name (classless_prompt=empty); lare2 score does the same, so a "
                "name decides an image's prompt; for images in the wild, extract with --prompt-mode empty")
    return ("this detector is trained on LaRE maps made with class prompts "
            f"({extract_config.get('prompt_template', 'a photo of a {}')!r} + the ImageNet class of a GenImage "
            "file name): "
            "an image without such a name can only be scored with --class-name NAME or --class-name auto "
            "(CLIP zero-shot, an approximation of the training prompts); for images in the wild, extract with "
            "--prompt-mode empty (README: 'Train and evaluate')")
