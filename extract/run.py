"""Stage 1 job: manifest selection -> LaRE maps + backbone features -> a Zarr cache.

All Accelerate calls live here. Work is split in cache blocks (``chunk_samples`` consecutive
samples, one chunk of every array): array-job shard ``shard_index`` owns the blocks with
``block % num_shards == shard_index``, and the ranks of one job (``accelerate launch``/``torchrun``)
share that shard's pending blocks with a stride. A block is written whole and then marked done, so
a rerun after any crash (SIGKILL included) computes exactly the blocks that are not done. A batch
never spans two blocks, so a block is computed in the same batches however the work is split, and
a map never depends on the split (per-sample seeds, docs/method.md §1.5): 1 or 8 processes, 1 or 64 array
jobs, one run or ten resumed ones give the same cache. The features of a batch come from
``lare2.extract.features`` (the models and ``compute_images``), the batches from ``lare2.extract.loader``;
``recompute_samples`` recomputes chosen rows through the same batch path, for ``cache verify``.

Finished blocks go to a background writer (``lare2.extract.block_writer``: compression and chunk files
beside the model, same files and done-mark order). SIGTERM or SIGUSR1 (``lare2.extract.preemption``)
stops a job after the batch in flight: every finished block is written, the unfinished one is dropped,
and the summary says ``stopped`` (the command exits ``EXIT_PREEMPTED``); a rerun resumes.

Rank 0 of a job creates the cache (atomically, see ``FeatureCache.create``), and finalises it
(status counts in the attributes) after every rank of the job has finished.
"""

from __future__ import annotations

import datetime
import glob
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from lare2.extract.block_writer import BlockWriter
from lare2.extract.features import Models, compute_images, load_models, stored_config
from lare2.extract.loader import DecodedBatch, ManifestImages, block_batches, collate_decoded
from lare2.extract.plan import SELECTION_KEY, manifest_digest, mismatch_error, plan_extraction, shard_blocks
from lare2.extract.preemption import StopRequest, ignore_stop_signals, stop_on_signals
from lare2.shared.cache import (
    STATUS_ERROR,
    STATUS_OK,
    STATUS_PENDING,
    CacheError,
    CacheExistsError,
    FeatureCache,
    nonfinite_rows,
)
from lare2.shared.cache.errors import RecomputeUnavailable
from lare2.shared.config import ExtractConfig, diff_identity
from lare2.shared.devices import resolve_device
from lare2.shared.logs import get_logger, progress_bar, rate_text
from lare2.shared.provenance import provenance
from lare2.shared.seeding import sample_seed
from lare2.shared.wording import counted
from torch.utils.data import DataLoader

log = get_logger(__name__)


# ---- the cache: create, or reopen with the same identity ---------------------------------------
def open_or_create_cache(cfg: ExtractConfig, rows: dict, root: Path, models: Models, create: bool) -> FeatureCache:
    identity = cfg.identity(models.fingerprints)
    digest = manifest_digest(rows["sample_id"])
    out = Path(cfg.out)
    if create and not (out / "zarr.json").exists():
        attrs = {
            "extract_config": cfg.to_dict(),
            "identity": identity,
            "fingerprints": models.fingerprints,
            "provenance": provenance(),
            "manifest": {"path": str(Path(cfg.manifest).resolve()), "root": str(root), "digest": digest},
        }
        try:
            return FeatureCache.create(out, rows, models.layout, attrs)
        except CacheExistsError:
            pass  # another array job created it a moment ago: check it like any existing cache
    if (out / "zarr.json").exists():
        cache = FeatureCache.open(out, mode="r+")
        # the identity says what each sample holds; the digest, which samples (manifest selection)
        differing = diff_identity(cache.attrs.get("identity", {}), identity)
        stored_digest = cache.attrs.get("manifest", {}).get("digest")
        if stored_digest != digest:
            differing[SELECTION_KEY] = (stored_digest, digest)
        if differing:
            raise mismatch_error(out, differing)
        return cache
    raise CacheError(f"{out}: expected the cache created by the main process")


# ---- leftovers of killed cache creations ---------------------------------------------------------
STALE_STAGING_SECONDS = 3600.0
"""A creation folder untouched this long belongs to a creator that died (creating a cache of
millions of samples writes into its folder every few seconds)."""


def staging_folders(out: Path) -> list[Path]:
    """Creation folders of the cache at ``out``: ``FeatureCache.create`` builds ``.{name}.creating-*`` beside it."""
    return sorted(out.parent.glob(f".{glob.escape(out.name)}.creating-*"))


def _newest_folder_mtime(folder: Path) -> float:
    # Every chunk write creates a file (write + rename), which bumps its folder's mtime: no need to stat files.
    newest = folder.stat().st_mtime
    for parent, children, _ in os.walk(folder):
        for child in children:
            newest = max(newest, os.stat(os.path.join(parent, child)).st_mtime)
    return newest


def remove_stale_staging(out: Path, older_than_s: float = STALE_STAGING_SECONDS) -> list[Path]:
    """Delete creation folders of ``out`` that nothing wrote to for ``older_than_s``; returns them.

    They are never taken for a cache (that needs ``out/zarr.json``, which appears by an atomic
    rename); younger ones may belong to a concurrent creator still at work and are left alone.
    """
    now = time.time()
    removed = []
    for folder in staging_folders(out):
        if now - _newest_folder_mtime(folder) > older_than_s:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


# ---- the job -----------------------------------------------------------------------------------
PROCESS_GROUP_TIMEOUT_S = 4 * 3600
"""Collective timeout: covers rank 0 creating a GenImage-size cache (minutes at that size) on a slow file system."""


@dataclass
class Summary:
    cache: str
    samples: int
    computed: int = 0
    """Samples extracted by this run (all its processes), failed ones included."""
    failed: int = 0
    skipped_blocks: int = 0
    """Blocks of this run's shard that were already done when it started."""
    seconds: float = 0.0
    counts: dict = field(default_factory=dict)
    """Status counts of the whole cache after this run (main process only; other ranks: empty)."""
    processes: int = 1
    rank: int = 0
    shard: str = "0/1"
    stopped: bool = False
    """A stop signal (SIGTERM/SIGUSR1) ended the job before its blocks were done (any rank): rerun to resume."""
    discarded: int = 0
    """Samples computed but dropped on a stop, with the unfinished block they belong to (all ranks)."""

    def line(self) -> str:
        where = f"shard {self.shard}, " if self.shard != "0/1" else ""
        stopped = (f"; stopped by a signal ({self.discarded} computed samples of unfinished blocks dropped): "
                   "rerun the same command to resume" if self.stopped else "")
        return (f"{self.cache}: computed {counted(self.computed, 'image')} ({self.failed} failed) in "
                f"{self.seconds:.1f} s ({rate_text(self.computed, self.seconds)}; {where}"
                f"{counted(self.processes, 'process', 'processes')}); {counted(self.skipped_blocks, 'block')} "
                f"{'was' if self.skipped_blocks == 1 else 'were'} already done{stopped}")


def rank_blocks(pending: Sequence[int], rank: int, world: int) -> list[int]:
    """This rank's share of its job's pending blocks: every ``world``-th, so shares differ by one block at most."""
    return list(pending[rank::world])


def make_accelerator(cfg: ExtractConfig):
    """An ``Accelerator`` for ``cfg.device``; several CPU processes run as MULTI_CPU over gloo."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    has_cuda = resolve_device(cfg.device).type == "cuda"  # refuses cuda without a device
    # Without cpu=True, Accelerate treats processes launched without a GPU as unrelated single
    # processes, and every one of them would extract the whole selection.
    # Rank 0 may spend minutes creating a cache of millions of samples while the others wait.
    timeout = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=PROCESS_GROUP_TIMEOUT_S))
    accelerator = Accelerator(cpu=cfg.device == "cpu" or not has_cuda, kwargs_handlers=[timeout])
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise RuntimeError(f"launched as {launched} processes but Accelerate sees {accelerator.num_processes} "
                           f"({accelerator.distributed_type}); refusing to let each extract everything")
    return accelerator


def run_extraction(cfg: ExtractConfig, *, create_only: bool = False) -> Summary:
    """Extract the manifest selection into ``cfg.out``; safe to rerun (does only what is missing).

    Run once per process under ``accelerate launch``/``torchrun``; ``cfg.num_shards`` /
    ``cfg.shard_index`` split the work between independent jobs (each may have several processes).
    ``create_only``: create (or check) the cache and stop, e.g. once before an array of jobs, so
    that they do not all build the same empty store at once. SIGTERM/SIGUSR1 stop the job after the
    batch in flight (``Summary.stopped``; module docstring).
    """
    with stop_on_signals() as stop:
        return _run_job(cfg, create_only, stop)


def _run_job(cfg: ExtractConfig, create_only: bool, stop: StopRequest) -> Summary:
    accelerator = make_accelerator(cfg)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    out = Path(cfg.out)

    plan = plan_extraction(cfg)  # prompts, --out and an existing cache's settings, before any model loads
    rows, root = plan.rows, plan.root
    models = load_models(cfg, device)
    with accelerator.main_process_first():
        if accelerator.is_main_process:
            for folder in remove_stale_staging(out):
                log.info("removed %s, left by a cache creation that was killed", folder)
        cache = open_or_create_cache(cfg, rows, root, models, create=accelerator.is_main_process)
    shard = f"{cfg.shard_index}/{cfg.num_shards}"
    if create_only:
        accelerator.wait_for_everyone()
        return Summary(cache=str(cache.path), samples=len(cache), skipped_blocks=int(cache.done_blocks().sum()),
                       counts=cache.finalize() if accelerator.is_main_process else {}, processes=world, rank=rank,
                       shard=shard)
    mine, pending = _shard_pending_blocks(accelerator, cache, cfg)
    summary = Summary(cache=str(cache.path), samples=len(cache), skipped_blocks=len(mine) - len(pending),
                      processes=world, rank=rank, shard=shard)
    started = time.perf_counter()
    _extract_blocks(cfg, cache, models, root, rank_blocks(pending, rank, world), summary, device, stop,
                    show_progress=accelerator.is_local_main_process)
    summary.seconds = time.perf_counter() - started
    _finish(accelerator, cache, cfg, mine, summary)
    return summary


def _shard_pending_blocks(accelerator, cache: FeatureCache, cfg: ExtractConfig) -> tuple[list[int], list[int]]:
    """(this shard's blocks, those of them not done), as rank 0 sees the cache before any rank of the job writes.

    One view for every rank: their shares then partition the pending blocks exactly, even while other
    array jobs write theirs."""
    from accelerate.utils import broadcast_object_list

    done = [cache.done_blocks()] if accelerator.is_main_process else [None]
    done = broadcast_object_list(done)[0] if accelerator.num_processes > 1 else done[0]
    mine = shard_blocks(cache.num_blocks, cfg.num_shards, cfg.shard_index)
    pending = [b for b in mine if not done[b]]
    if accelerator.is_main_process:
        log.info("%s: shard %d/%d holds %s, %d done, %d to do on %s", cfg.out, cfg.shard_index, cfg.num_shards,
                 counted(len(mine), "block"), len(mine) - len(pending), len(pending),
                 counted(accelerator.num_processes, "process", "processes"))
    return mine, pending


def batch_features(models: Models, cfg: ExtractConfig, batch: DecodedBatch, class_names: Sequence[str],
                   sample_ids: Sequence[str], device: torch.device) -> dict[str, np.ndarray] | None:
    """``compute_images``'s arrays for a batch's decodable rows (None when it has none): the one batch path of
    extraction and of its recomputation, with each row's prompt and seed from its cache row."""
    good = batch.good_indices
    if not good:
        return None
    return compute_images(models, batch.lare_images, batch.backbone_images,
                          [cfg.prompt_for(class_names[i]) for i in good],
                          [sample_seed(cfg.seed, sample_ids[i]) for i in good], device, view_images=batch.view_images)


def _extract_blocks(cfg: ExtractConfig, cache: FeatureCache, models: Models, root: Path, blocks: list[int],
                    summary: Summary, device: torch.device, stop: StopRequest, *, show_progress: bool) -> None:
    """Compute ``blocks`` and hand each to the writer as soon as its last batch is in; counts go to ``summary``.

    On a ``stop`` request no further batch is taken: the finished blocks are written, the unfinished one
    dropped (``summary.stopped``, ``summary.discarded``)."""
    paths, class_names, sample_ids = cache.column("path"), cache.column("class_name"), cache.column("sample_id")
    loader = DataLoader(
        ManifestImages(root, paths, cfg.image_size, cfg.max_image_pixels, steps=cfg.image_steps(),
                       sample_ids=sample_ids, run_seed=cfg.seed, views=cfg.views),
        batch_sampler=block_batches(cache, blocks, cfg.batch_size),
        num_workers=cfg.num_workers,
        collate_fn=collate_decoded,
        pin_memory=device.type == "cuda",
        worker_init_fn=ignore_stop_signals if cfg.num_workers else None,
    )
    results: dict[int, dict] = {}  # block -> per-row results gathered so far
    started = time.perf_counter()
    total = sum(len(range(*cache.block_slice(b).indices(len(cache)))) for b in blocks)
    with progress_bar(disable=not show_progress) as bar, BlockWriter(cache) as writer:
        task = bar.add_task(f"extract {Path(cfg.out).name}", total=total, rate="")
        for batch in loader:
            if stop.requested:
                break
            outputs = batch_features(models, cfg, batch, class_names, sample_ids, device)
            for index, error in zip(batch.indices, batch.errors):
                if error:
                    log.warning("%s: %s", paths[index], error)
            _gather(results, cache, batch, outputs, cfg.seed, sample_ids)
            for block in [b for b, acc in results.items() if len(acc["rows"]) == acc["size"]]:
                writer.put(block, _block_values(cache, block, results.pop(block), summary))
            writer.check()
            progressed = summary.computed + sum(len(a["rows"]) for a in results.values())
            bar.update(task, completed=progressed, rate=rate_text(progressed, time.perf_counter() - started))
        if stop.requested and summary.computed < total:
            summary.stopped, summary.discarded = True, sum(len(a["rows"]) for a in results.values())
            log.warning("%s received: writing the %d finished blocks not yet written, dropping %d computed samples "
                        "of the unfinished block; rerun the same command to resume", stop.name,
                        writer.pending, summary.discarded)
            results.clear()
    if results:
        raise RuntimeError(f"internal: blocks {sorted(results)} incomplete at the end of the loader")


def _finish(accelerator, cache: FeatureCache, cfg: ExtractConfig, mine: list[int], summary: Summary) -> None:
    """After every rank of the job: the job's totals in ``summary``; rank 0 finalises the cache (status counts)."""
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        totals = torch.tensor([summary.computed, summary.failed, summary.stopped, summary.discarded],
                              dtype=torch.int64, device=accelerator.device)
        computed, failed, stopped, discarded = (int(v) for v in accelerator.reduce(totals, reduction="sum").tolist())
        summary.computed, summary.failed, summary.stopped, summary.discarded = computed, failed, stopped > 0, discarded
    if accelerator.is_main_process:
        summary.counts = cache.finalize()
        done = cache.done_blocks()
        left = [b for b in mine if not done[b]]
        if left:  # only if a duplicate of this shard raced us; a rerun completes them
            log.warning("%s: %d blocks of shard %d/%d still pending: %s", cfg.out, len(left), cfg.shard_index,
                        cfg.num_shards, left[:10])
        elif summary.counts.get(STATUS_PENDING):
            log.info("%s: this shard is complete; %d samples of other shards still pending", cfg.out,
                     summary.counts[STATUS_PENDING])
    accelerator.wait_for_everyone()


def _gather(results: dict, cache: FeatureCache, batch: DecodedBatch, outputs, run_seed: int, sample_ids) -> None:
    """File a batch's rows under their block: (arrays or None, seed, error)."""
    position = {index: i for i, index in enumerate(batch.good_indices)}
    # rows holding NaN/Inf once cast to the storage dtype: {array: bool [good rows]}
    nonfinite = {name: nonfinite_rows(v.astype(cache.layout.dtype(name))) for name, v in (outputs or {}).items()}
    for index, error in zip(batch.indices, batch.errors):
        block = index // cache.layout.chunk_samples
        sl = cache.block_slice(block)
        acc = results.setdefault(block, {"size": sl.stop - sl.start, "rows": {}})
        seed = sample_seed(run_seed, sample_ids[index])
        if error:
            acc["rows"][index] = (None, seed, error)
            continue
        arrays = {name: values[position[index]] for name, values in outputs.items()}
        bad = [name for name, rows in nonfinite.items() if rows[position[index]]]
        error = f"non-finite model output in {', '.join(bad)} (in its storage dtype)" if bad else ""
        acc["rows"][index] = (None if bad else arrays, seed, error)


def _block_values(cache: FeatureCache, block: int, acc: dict, summary: Summary) -> dict:
    """A finished block as ``FeatureCache.write_block``'s keyword arguments (float32 arrays, NaN rows for
    failed samples); its samples are counted in ``summary``."""
    sl = cache.block_slice(block)
    n = sl.stop - sl.start
    layout = cache.layout
    out = {name: np.full((n, *layout.sample_shape(name)), np.nan, dtype=np.float32) for name in layout.array_names}
    seeds, status, errors = [0] * n, [STATUS_OK] * n, [""] * n
    for row, (arrays, seed, error) in acc["rows"].items():
        i = row - sl.start
        seeds[i] = seed
        if arrays is None:
            status[i], errors[i] = STATUS_ERROR, error
            summary.failed += 1
        else:
            for name, a in arrays.items():
                out[name][i] = a
        summary.computed += 1
    return {**out, "seed": seeds, "status": status, "error": errors}


# ---- re-computation for verification -----------------------------------------------------------
def recompute_samples(cache_path: str | Path, indices: Sequence[int], *, sd: str | None = None,
                      clip: str | None = None, device: str = "auto",
                      compute_dtype: str | None = None) -> dict[str, np.ndarray]:
    """Recompute rows ``indices`` of a cache with its own config (models, device and compute dtype overridable).

    Each requested row is recomputed inside the same batch it was extracted in (same block, same
    ``batch_size``, same failed neighbours left out), so on the same hardware and software the
    result equals the cache bit for bit; batched kernels round differently for other batch
    compositions (~1e-6 relative), other devices and other compute dtypes (compare those with a
    tolerance). ``device`` ``auto`` takes CUDA when present. Returns ``lare``/``pooled``/``fmap`` (and the
    view arrays of a views cache) in the storage dtypes, with NaN rows for images that fail to decode.
    """
    cache = FeatureCache.open(cache_path)
    torch_device = resolve_device(device)
    cfg = stored_config(cache.attrs["extract_config"], torch_device, sd=sd, clip=clip, compute_dtype=compute_dtype)
    if torch_device.type == "cpu" and cfg.compute_dtype == "float16":  # bfloat16 runs on CPU (load_models)
        raise RecomputeUnavailable(
            f"{cache_path} was computed in {cfg.compute_dtype}, which needs a GPU (no CUDA device here); "
            "recompute on this CPU in float32 and compare with a tolerance: --compute-dtype float32 --tolerance 0.01")
    models = load_models(cfg, torch_device)
    if models.fingerprints != cache.attrs["fingerprints"]:
        raise CacheError(f"{cache_path}: the models at hand differ from those that made the cache "
                         f"(have {models.fingerprints}, cache {cache.attrs['fingerprints']})")
    root = Path(cache.attrs["manifest"]["root"])
    ids, class_names = cache.column("sample_id"), cache.column("class_name")
    dataset = ManifestImages(root, cache.column("path"), cfg.image_size, cfg.max_image_pixels,
                             steps=cfg.image_steps(), sample_ids=ids, run_seed=cfg.seed, views=cfg.views)
    wanted = {int(i): k for k, i in enumerate(indices)}
    blocks = sorted({i // cache.layout.chunk_samples for i in wanted})
    out = {name: np.full((len(indices), *cache.layout.sample_shape(name)), np.nan, dtype=cache.layout.dtype(name))
           for name in cache.layout.array_names}
    for batch_rows in block_batches(cache, blocks, cfg.batch_size):
        if not wanted.keys() & set(batch_rows):
            continue
        batch = collate_decoded([dataset[row] for row in batch_rows])
        arrays = batch_features(models, cfg, batch, class_names, ids, torch_device)
        for position, row in enumerate(batch.good_indices):
            if row in wanted:
                for name, values in arrays.items():
                    out[name][wanted[row]] = values[position].astype(cache.layout.dtype(name))
    return out
