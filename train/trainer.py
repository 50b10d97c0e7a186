"""Fit a detector on cached tensors: select and schedule on validation, calibrate, save.

All Accelerate calls live in this module. A run directory holds

    resume.pt           last finished epoch: model, optimizer, scheduler, RNG, epoch/step, history
    model.safetensors   weights of the best epoch on the validation metric
    history.json        per-epoch training loss, learning rate and validation metrics
    config.json         written last: model, extraction fingerprint, calibrated threshold, provenance

A crash loses at most the epoch in progress: the next run with the same config resumes from
``resume.pt`` and, with deterministic algorithms on, ends with the same weights as an
uninterrupted run (the data order depends only on (seed, epoch); the RNG state is restored).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lare2.shared.cache import CacheError
from lare2.shared.config import ExtractConfig
from lare2.shared.jsonio import write_json
from lare2.shared.logs import get_logger, progress_bar, rate_text
from lare2.shared.provenance import provenance
from lare2.shared.seeding import seed_everything
from lare2.train.checkpoint import (
    WEIGHTS_FILE,
    CheckpointError,
    DetectorConfig,
    save_detector,
    save_weights,
    score_split,
)
from lare2.train.config import RESUME_FREE_KEYS, TrainConfig
from lare2.train.data import Batch, CacheSplit, ReadSettings
from lare2.train.split_safety import cache_ids, check_train_val, ids_digest
from lare2.train.metrics import calibrate_threshold, detection_metrics
from lare2.train.models import ModelConfig, build_model, param_groups

logger = get_logger(__name__)

RESUME_FILE = "resume.pt"
MIN_CALIBRATION_REALS = 100
"""Fewer validation reals than this and calibration warns: the threshold's FPR rests on a handful of images."""
HISTORY_FILE = "history.json"


@dataclass
class TrainResult:
    """Outcome of :func:`run_training`."""

    run_dir: Path
    finished: bool
    """False when stopped early by ``stop_after_steps``."""
    best_epoch: int
    threshold: float | None
    val_metrics: dict


def validation_loss(labels: np.ndarray, p_fake: np.ndarray) -> float:
    """Mean cross-entropy of the scores (p clipped to [1e-7, 1 - 1e-7])."""
    p = np.clip(p_fake, 1e-7, 1 - 1e-7)
    return float(-np.mean(np.where(labels == 1, np.log(p), np.log1p(-p))))


def model_config_for(cfg: TrainConfig, split: CacheSplit, top=None) -> ModelConfig:
    """``top``: the ``TopWeights`` of ``--train-backbone-top`` (``train/backbone_top.py``), or None."""
    layout = split.cache.layout
    top_settings = {} if top is None else {"train_backbone_top": True, "backbone_top_depth": top.depth,
                                           "backbone_top_heads": top.heads}
    return ModelConfig(
        kind=cfg.model, pooled_dim=layout.pooled_dim, fmap_shape=tuple(layout.fmap_shape), lare_shape=tuple(layout.lare_shape),
        **cfg.head_settings(), **top_settings,
    )


def _open_splits(cfg: TrainConfig, input_names: tuple[str, ...], read: ReadSettings) -> tuple[CacheSplit, CacheSplit]:
    train = CacheSplit(cfg.train, input_names, allow_pending=cfg.allow_pending, read=read, views=cfg.use_views)
    val = CacheSplit(cfg.val, input_names, allow_pending=cfg.allow_pending, read=read)
    check_train_val(train.cache, val.cache, cfg.allow_overlap)
    if train.fingerprint != val.fingerprint:
        raise CacheError(f"{cfg.val}: extraction fingerprint {val.fingerprint} differs from {cfg.train}'s {train.fingerprint}; "
                         "train and validation features must come from the same extraction settings")
    if train.cache.layout != val.cache.layout:
        raise CacheError(f"{cfg.val}: layout {val.cache.layout} differs from {cfg.train}'s {train.cache.layout}")
    # the fingerprint ignores --perturb (perturbed test caches stay scorable), so say it when selection and
    # calibration would rest on damaged images the training split never saw
    perturbs = [(split.cache.attrs.get("extract_config") or {}).get("perturb", "") for split in (train, val)]
    if perturbs[0] != perturbs[1]:
        logger.warning("%s: validation images perturbed %r, training images %r: epoch selection and the calibrated threshold "
                    "follow the validation condition", cfg.val, perturbs[1] or "none", perturbs[0] or "none")
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

    ``on`` refuses (``ValueError``) a split that does not fit; ``auto`` reads it from the cache instead."""
    if cfg.in_memory == "off":
        return
    budget = left = memory_budget_bytes(cfg)
    for split in splits:
        need = split.memory_bytes()
        if need > left:
            why = (f"{split.path}: its {split.num_ok} ok samples take {need / 1e9:.2f} GB, over the {left / 1e9:.2f} GB "
                   f"left of the {budget / 1e9:.2f} GB in-memory budget")
            if cfg.in_memory == "on":
                raise ValueError(f"{why}; raise --set memory_budget_gb=GB or use --set in_memory=auto (reads from the cache)")
            if log:
                logger.info(f"{why}: read from the cache ({cfg.read_workers} read workers, {cfg.read_ahead} windows ahead)")
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


def _check_resumable(saved: dict, cfg: TrainConfig, path: Path) -> None:
    now, defaults = cfg.to_dict(), TrainConfig().to_dict()  # a setting newer than the saved state has its default there
    changed = {k: (saved.get(k, defaults[k]), now[k]) for k in now
               if k not in RESUME_FREE_KEYS and saved.get(k, defaults[k]) != now[k]}
    if changed:
        raise CheckpointError(f"{path}: saved with other settings {changed} (saved, now); use another --out, or --overwrite to start afresh")


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["rng_torch"])
    if state.get("rng_cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])


def _rng_state() -> dict:
    return {"rng_torch": torch.get_rng_state(), "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def run_training(cfg: TrainConfig) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.train``, select on ``cfg.val``, calibrate, write the run directory."""
    from accelerate import Accelerator

    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS needs it set before first use
    accelerator = Accelerator(cpu=cfg.device == "cpu", mixed_precision=cfg.mixed_precision)
    if cfg.device == "cuda" and accelerator.device.type != "cuda":
        raise RuntimeError("device='cuda' but no CUDA device is visible")
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    if accelerator.device.type == "cpu":
        # near-zero losses make denormal gradients, which crawl on x86 CPUs; this reaches the calling thread
        # and threads started after it, so a long-lived process should set it before its first parallel op
        torch.set_flush_denormal(True)
        if cfg.cpu_threads:
            torch.set_num_threads(cfg.cpu_threads)
    is_main = accelerator.is_main_process
    out = Path(cfg.out)

    seed_everything(cfg.seed)
    probe = CacheSplit(cfg.train, (), allow_pending=cfg.allow_pending)
    top = None
    if cfg.train_backbone_top:  # the backbone's layer4 + attention pool, the cache's own weights (fingerprint checked)
        from lare2.train.backbone_top import load_top_weights

        top = load_top_weights(cfg.clip, probe.cache.attrs, cfg.train)
    model_config = model_config_for(cfg, probe, top)
    model = build_model(model_config)
    if top is not None:
        model.backbone_top.load_state_dict(top.state)
    train_split, val_split = _open_splits(cfg, type(model).input_names, read_settings(cfg, accelerator.device))
    fingerprint = train_split.fingerprint
    model.to(accelerator.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # one group for the head at lr; with --train-backbone-top a second for the top at lr * backbone_top_lr_scale
    optimizer = torch.optim.Adam(param_groups(model, cfg.lr, cfg.backbone_top_lr_scale), lr=cfg.lr,
                                 weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience, min_lr=cfg.min_lr)

    start_epoch, step, history = 0, 0, []
    best = {"metric": -math.inf, "epoch": -1}
    best_weights: dict[str, torch.Tensor] | None = None  # kept in resume.pt too: the pair stays consistent
    resume_path = out / RESUME_FILE
    if cfg.resume and resume_path.exists():
        state = torch.load(resume_path, map_location="cpu", weights_only=True)
        _check_resumable(state["config"], cfg, resume_path)
        best_weights = state.get("best_model")
        if best_weights is not None and is_main:
            # a kill between saving a new best and saving resume.pt left a best that resume.pt does not know
            save_weights(best_weights, out / WEIGHTS_FILE)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state)
        start_epoch, step, history, best = state["epoch"], state["step"], state["history"], state["best"]
        logger.info(f"resuming {out} after epoch {start_epoch} (step {step})")
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        logger.info(f"{cfg.model}: {sum(p.numel() for p in trainable):,} trainable parameters; "
                    f"train {train_split.num_ok} / val {val_split.num_ok} ok samples; extraction {fingerprint}")
        warning = class_prompt_warning(train_split.cache.attrs.get("extract_config") or {})
        if warning:
            logger.warning(warning)
    if start_epoch < cfg.epochs:  # every epoch reads the whole train split (this rank's part) and val: read them once
        hold_splits_in_memory(cfg, [train_split, val_split], log=is_main)

    model, optimizer_acc = accelerator.prepare(model, optimizer)
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        loss_sum, seen, started = 0.0, 0, time.perf_counter()
        batches = train_split.epoch_batches(epoch=epoch, seed=cfg.seed, batch_size=cfg.batch_size, shuffle_blocks=cfg.shuffle_blocks,
                                            rank=accelerator.process_index, world_size=accelerator.num_processes)
        steps_per_epoch = train_split.num_batches(batch_size=cfg.batch_size, shuffle_blocks=cfg.shuffle_blocks,
                                                  world_size=accelerator.num_processes, epoch=epoch, seed=cfg.seed)
        with progress_bar("img", disable=not (is_main and cfg.progress)) as bar:
            task = bar.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=steps_per_epoch, rate="")
            for batch in batches:
                batch = batch.to(accelerator.device)
                loss = train_step(model, batch, optimizer_acc, accelerator, trainable, cfg.grad_clip)
                step += 1
                loss_sum += float(loss) * len(batch)
                seen += len(batch)
                bar.update(task, advance=1, rate=f"loss {loss_sum / seen:.4f}  {rate_text(seen, time.perf_counter() - started)}")
                if is_main and cfg.log_every and step % cfg.log_every == 0 and not cfg.progress:
                    logger.info(f"step {step}: loss {loss_sum / seen:.4f}")
                if cfg.stop_after_steps is not None and step >= cfg.stop_after_steps:
                    logger.warning(f"stopping after {step} steps (stop_after_steps); nothing of this epoch is saved")
                    return TrainResult(run_dir=out, finished=False, best_epoch=best["epoch"] + 1, threshold=None, val_metrics={})

        raw_model = accelerator.unwrap_model(model)
        labels, scores, _ = score_split(raw_model, val_split, batch_size=max(cfg.batch_size, 64))
        val_metrics = detection_metrics(labels, scores)
        val_metrics["loss"] = validation_loss(labels, scores)
        metric = val_metrics[cfg.select_metric]
        epoch_lr = optimizer.param_groups[0]["lr"]
        scheduler.step(metric)
        # ties on the selection metric (e.g. AUC saturating at 1) go to the lower validation loss
        improved = (metric, -val_metrics["loss"]) > (best["metric"], -best.get("loss", math.inf))
        if improved:
            best = {"metric": float(metric), "loss": val_metrics["loss"], "epoch": epoch}
        record = {"epoch": epoch + 1, "step": step, "train_loss": loss_sum / max(seen, 1), "lr": epoch_lr,
                  **{f"val_{k}": v for k, v in val_metrics.items()}}
        history.append(record)
        if is_main:
            logger.info(f"epoch {epoch + 1}: loss {record['train_loss']:.4f}  val loss {val_metrics['loss']:.4f}  acc {val_metrics['acc']:.4f}  "
                        f"ap {val_metrics['ap']:.4f}  auc {val_metrics['auc']:.4f}{'  (best)' if improved else ''}")
            if improved:
                best_weights = {k: v.detach().cpu().clone() for k, v in raw_model.state_dict().items()}
                save_weights(raw_model, out / WEIGHTS_FILE)
            write_json(out / HISTORY_FILE, {"history": history})
            state = {"model": {k: v.detach().cpu() for k, v in raw_model.state_dict().items()}, "best_model": best_weights,
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "epoch": epoch + 1, "step": step, "history": history, "best": best, "config": cfg.to_dict(), **_rng_state()}
            tmp = resume_path.with_suffix(".tmp")
            torch.save(state, tmp)
            tmp.replace(resume_path)  # atomic: a kill leaves the previous epoch's state intact
        accelerator.wait_for_everyone()

    return _finish(cfg, accelerator, model_config, val_split, best, train_split.cache)


def _finish(cfg: TrainConfig, accelerator, model_config: ModelConfig, val_split: CacheSplit, best: dict,
            train_cache) -> TrainResult:
    """Reload the best epoch, calibrate its threshold on validation reals, write config.json."""
    from safetensors.torch import load_file

    out = Path(cfg.out)
    model = build_model(model_config)
    model.load_state_dict(load_file(str(out / WEIGHTS_FILE)))
    config = calibrated_config_for(
        model, model_config, val_split, cfg.target_fpr,
        extra={"best_epoch": best["epoch"] + 1, "select_metric": cfg.select_metric, "train_cache": str(cfg.train), "val_cache": str(cfg.val)},
    )
    config.train = cfg.to_dict()
    config.train_ids_digest = ids_digest(cache_ids(train_cache))
    threshold, val_metrics = config.threshold, config.val_metrics
    n_real = val_metrics["n_real"]
    if accelerator.is_main_process:
        save_detector(out, model, config)
        logger.info(f"best epoch {best['epoch'] + 1}: val {cfg.select_metric} {best['metric']:.4f}; threshold {threshold:.4g} "
                    f"for {cfg.target_fpr:.0%} FPR on {n_real} validation reals -> {out}")
    accelerator.wait_for_everyone()
    return TrainResult(run_dir=out, finished=True, best_epoch=best["epoch"] + 1, threshold=threshold, val_metrics=val_metrics)


def class_prompt_warning(extract_config: dict) -> str:
    """A warning when features were extracted with class prompts, which images in the wild can only approximate."""
    if extract_config.get("prompt_mode") != "class":
        return ""
    return ("this detector is trained on LaRE maps made with class prompts "
            f"({extract_config.get('prompt_template', 'a photo of a {}')!r} + the ImageNet class of a GenImage file name): "
            "an image without such a name can only be scored with --class-name NAME or --class-name auto "
            "(CLIP zero-shot, an approximation of the training prompts); for images in the wild, extract with "
            "--prompt-mode empty (README: 'Train and evaluate')")


def calibrated_config_for(model: nn.Module, model_config: ModelConfig, val_split: CacheSplit, target_fpr: float,
                          extra: dict) -> DetectorConfig:
    """A detector config for already-trained weights, calibrated on ``val_split`` reals."""
    labels, scores, _ = score_split(model.eval(), val_split)
    n_real = int((labels == 0).sum())
    if n_real < MIN_CALIBRATION_REALS:
        logger.warning(f"the threshold rests on {n_real} validation reals of {val_split.path} (fewer than "
                       f"{MIN_CALIBRATION_REALS}): its false positive rate is a coarse estimate; calibrate on a larger val split")
    threshold = calibrate_threshold(scores[labels == 0], target_fpr)
    val_metrics = detection_metrics(labels, scores, threshold)
    val_metrics["fpr@thr"] = float((scores[labels == 0] > threshold).mean())
    # what scoring new images must recompute, exactly as the features the detector was calibrated on
    stored_extraction = val_split.cache.attrs.get("extract_config")
    return DetectorConfig(model=model_config, extraction_fingerprint=val_split.fingerprint,
                          extraction=ExtractConfig.from_dict(stored_extraction) if stored_extraction else None,
                          threshold=threshold, target_fpr=target_fpr, val_metrics=val_metrics,
                          extra={**extra, "model_fingerprints": dict(val_split.cache.attrs.get("fingerprints") or {}),
                                 "provenance": provenance()})


REFERENCE_BACKBONE_FILE = "backbone.safetensors"
"""Where ``convert_reference`` saves a reference checkpoint's fine-tuned backbone (keys ``visual.*``)."""


def convert_reference(checkpoint: str | Path, out: str | Path, *, lare_size: int = 32) -> DetectorConfig:
    """Write an uncalibrated lare2 run directory from a reference ``CLipClassifierWMapV6`` checkpoint.

    The head loads with ``strict=True``; the ``clip_model.*`` part goes to ``backbone.safetensors``
    (keys ``visual.*``) for extraction, since the reference fine-tunes its backbone. ``lare_size`` is
    the side of the LaRE map (image size / 8: 32 at the paper's 256 px), which the weights do not fix.
    The run has threshold 0.5, no extraction fingerprint and ``"calibrated": false`` in its config:
    extract a val cache with ``--clip OUT/backbone.safetensors``, then ``lare2 calibrate OUT --val CACHE``.
    """
    from safetensors.torch import save_file

    from lare2.shared.weights import read_state_dict
    from lare2.train.checkpoint import split_reference_state
    from lare2.train.models import egre_config_from_state_dict

    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: no such checkpoint file")
    try:
        head, backbone = split_reference_state(read_state_dict(checkpoint))
        model_config = egre_config_from_state_dict(head, (lare_size, lare_size))
    except ValueError as err:
        message = str(err) if str(err).startswith(str(checkpoint)) else f"{checkpoint}: {err}"
        raise CheckpointError(message) from err
    model = build_model(model_config)
    try:
        model.load_state_dict(head, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{checkpoint}: head does not load strictly: {' '.join(str(err).split())}") from err
    out.mkdir(parents=True, exist_ok=True)
    if backbone:
        save_file({k: v.contiguous() for k, v in backbone.items()}, str(out / REFERENCE_BACKBONE_FILE))
    config = DetectorConfig(model=model_config, extraction_fingerprint="", threshold=0.5, target_fpr=None,
                            extra={"calibrated": False, "converted_from": str(checkpoint), "backbone_keys": len(backbone),
                                   "provenance": provenance()})
    save_detector(out, model, config)
    logger.info(f"converted {checkpoint} ({len(head)} head tensors, {len(backbone)} backbone tensors) -> {out}; "
                f"uncalibrated: extract val{' with --clip ' + str(out / REFERENCE_BACKBONE_FILE) if backbone else ''}, "
                f"then `lare2 calibrate {out} --val CACHE`")
    return config
