"""Stage 1 job: manifest selection -> LaRE maps + backbone features -> a Zarr cache.

All Accelerate calls live here. Work is split in cache blocks (``chunk_samples`` consecutive
samples, one chunk of every array): array-job shard ``shard_index`` takes blocks with
``block % num_shards == shard_index``, and within a job rank ``r`` of ``W`` takes every W-th of
those. A block is written whole and then marked done, so a rerun after any crash computes exactly
the blocks that are not done, and a map never depends on how the work was split (SPEC 2.1 seeds).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lare2.extract.images import ImageError, backbone_input, decode_rgb, lare_input
from lare2.shared.cache import STATUS_ERROR, STATUS_OK, CacheError, CacheExistsError, CacheLayout, FeatureCache
from lare2.shared.config import ExtractConfig, diff_identity
from lare2.shared.logs import get_logger, progress_bar, rate_text
from lare2.shared.manifest import read_image_bytes, read_manifest, select_rows
from lare2.shared.provenance import provenance
from lare2.shared.seeding import sample_seed

log = get_logger(__name__)


# ---- data: decode + preprocess in DataLoader workers ---------------------------------------------
@dataclass
class DecodedSample:
    index: int  # row in the cache
    lare_image: torch.Tensor | None  # [3, S, S] in [-1, 1]
    backbone_image: torch.Tensor | None  # [3, 224, 224] normalised
    error: str


class ManifestImages(Dataset):
    """Rows of the cache -> decoded model inputs (or the reason they could not be decoded)."""

    def __init__(self, root: Path, paths: Sequence[str], image_size: int, max_pixels: int):
        self.root, self.paths, self.image_size, self.max_pixels = root, list(paths), image_size, max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> DecodedSample:
        try:
            data = read_image_bytes(self.root, self.paths[index])
            image = decode_rgb(data, max_pixels=self.max_pixels)
            return DecodedSample(index, lare_input(image, self.image_size), backbone_input(image), "")
        except (ImageError, OSError, KeyError) as err:
            return DecodedSample(index, None, None, f"{type(err).__name__}: {err}" if not isinstance(err, ImageError) else str(err))


def _collate(samples: list[DecodedSample]) -> list[DecodedSample]:
    return samples


def block_batches(cache: FeatureCache, blocks: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches of row indices; a batch never spans two blocks, so a block completes in order."""
    batches = []
    for block in blocks:
        rows = list(range(*cache.block_slice(block).indices(len(cache))))
        batches += [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    return batches


# ---- models ------------------------------------------------------------------------------------
@dataclass
class Models:
    lare: "object"  # LareComputer
    backbone: torch.nn.Module
    fingerprints: dict[str, str]
    layout: CacheLayout


def load_models(cfg: ExtractConfig, device: torch.device) -> Models:
    from lare2.extract.clip_resnet import load_backbone
    from lare2.extract.lare import LareComputer
    from lare2.extract.models import load_latent_diffusion

    dtype = getattr(torch, cfg.compute_dtype)
    if dtype != torch.float32 and device.type == "cpu":
        raise ValueError(f"compute_dtype={cfg.compute_dtype} is for GPUs; on CPU use float32 (faster there too)")
    diffusion = load_latent_diffusion(cfg.sd_model, device=device, dtype=dtype)
    backbone, backbone_fp = load_backbone(cfg.backbone, device=device, dtype=dtype)
    lare = LareComputer(diffusion, timestep=cfg.timestep, ensemble=cfg.ensemble, device=device, dtype=dtype)
    with torch.no_grad():  # shapes from one dummy pass: any backbone, any VAE depth
        out = backbone(torch.zeros(1, 3, 224, 224, device=device, dtype=dtype))
    down = 2 ** (len(diffusion.vae.config.block_out_channels) - 1)
    layout = CacheLayout(
        lare_shape=(diffusion.vae.config.latent_channels, cfg.image_size // down, cfg.image_size // down),
        pooled_dim=int(out.pooled.shape[-1]),
        fmap_shape=tuple(int(s) for s in out.fmap.shape[1:]),
        feature_dtype=cfg.feature_dtype,
        chunk_samples=cfg.chunk_samples,
    )
    return Models(lare, backbone, {"sd": diffusion.fingerprint, "backbone": backbone_fp}, layout)


@torch.no_grad()
def compute_batch(models: Models, samples: list[DecodedSample], prompts: list[str], seeds: list[int], device: torch.device):
    """Model outputs for the decodable samples of a batch, as float32 numpy [n, ...] arrays."""
    lare_images = torch.stack([s.lare_image for s in samples]).to(device, non_blocking=True)
    backbone_images = torch.stack([s.backbone_image for s in samples]).to(device, non_blocking=True)
    lare_B4hw = models.lare(lare_images, prompts, seeds)
    out = models.backbone(backbone_images.to(next(models.backbone.parameters()).dtype))
    return (
        lare_B4hw.float().cpu().numpy(),
        out.pooled.float().cpu().numpy(),
        out.fmap.float().cpu().numpy(),
    )


# ---- the cache: create, or reopen with the same identity ---------------------------------------
def manifest_digest(sample_ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sample_ids).encode()).hexdigest()[:16]


def open_or_create_cache(cfg: ExtractConfig, rows: dict, root: Path, models: Models, create: bool) -> FeatureCache:
    identity = cfg.identity(models.fingerprints) | {"manifest_digest": manifest_digest(rows["sample_id"])}
    out = Path(cfg.out)
    if create and not (out / "zarr.json").exists():
        attrs = {
            "extract_config": cfg.to_dict(),
            "identity": identity,
            "fingerprints": models.fingerprints,
            "provenance": provenance(),
            "manifest": {"path": str(Path(cfg.manifest).resolve()), "root": str(root)},
        }
        try:
            return FeatureCache.create(out, rows, models.layout, attrs)
        except CacheExistsError:
            pass  # another array job created it a moment ago: check it like any existing cache
    if (out / "zarr.json").exists():
        cache = FeatureCache.open(out, mode="r+")
        differing = diff_identity(cache.attrs.get("identity", {}), identity)
        if differing:
            lines = "; ".join(f"{k}: cache has {a!r}, this run {b!r}" for k, a, b in ((k, *v) for k, v in differing.items()))
            raise CacheError(f"{out}: refusing to extract into a cache made with another configuration ({lines}). "
                             f"Use another --out, or the cache's own settings.")
        return cache
    raise CacheError(f"{out}: expected the cache created by the main process")


# ---- the job -----------------------------------------------------------------------------------
@dataclass
class Summary:
    cache: str
    samples: int
    computed: int = 0
    failed: int = 0
    skipped_blocks: int = 0
    seconds: float = 0.0
    counts: dict = field(default_factory=dict)

    def line(self) -> str:
        return (f"{self.cache}: computed {self.computed} images ({self.failed} failed) in {self.seconds:.1f} s "
                f"({rate_text(self.computed, self.seconds)}); {self.skipped_blocks} blocks were already done")


def selected_rows(cfg: ExtractConfig) -> tuple[dict, Path]:
    table, root = read_manifest(cfg.manifest)
    table = select_rows(table, split=cfg.split, generators=cfg.generators, limit=cfg.limit)
    if table.num_rows == 0:
        raise CacheError(f"{cfg.manifest}: no rows for split={cfg.split!r} generators={cfg.generators or 'all'}")
    columns = ("sample_id", "path", "label", "generator", "split", "class_name")
    return {c: table.column(c).to_pylist() for c in columns}, Path(root)


def my_blocks(cache: FeatureCache, cfg: ExtractConfig, rank: int, world: int) -> tuple[list[int], int]:
    """Pending blocks of this array-job shard and rank, and how many of its blocks were already done."""
    done = cache.done_blocks()
    shard = [b for b in range(cache.num_blocks) if b % cfg.num_shards == cfg.shard_index]
    mine = shard[rank::world]
    return [b for b in mine if not done[b]], sum(bool(done[b]) for b in mine)


def run_extraction(cfg: ExtractConfig) -> Summary:
    """Extract the manifest selection into ``cfg.out``; safe to rerun (does only what is missing)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=cfg.device == "cpu")
    device = accelerator.device if cfg.device == "auto" else torch.device(cfg.device)
    rank, world = accelerator.process_index, accelerator.num_processes

    rows, root = selected_rows(cfg)
    models = load_models(cfg, device)
    with accelerator.main_process_first():
        cache = open_or_create_cache(cfg, rows, root, models, create=accelerator.is_main_process)
    accelerator.wait_for_everyone()

    blocks, skipped = my_blocks(cache, cfg, rank, world)
    paths = cache.column("path")
    class_names = cache.column("class_name")
    sample_ids = cache.column("sample_id")
    dataset = ManifestImages(root, paths, cfg.image_size, cfg.max_image_pixels)
    loader = DataLoader(
        dataset,
        batch_sampler=block_batches(cache, blocks, cfg.batch_size),
        num_workers=cfg.num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    summary = Summary(cache=str(cache.path), samples=len(cache), skipped_blocks=skipped)
    pending: dict[int, dict] = {}  # block -> per-row results gathered so far
    started = time.perf_counter()
    total = sum(len(range(*cache.block_slice(b).indices(len(cache)))) for b in blocks)
    with progress_bar(disable=not accelerator.is_local_main_process) as bar:
        task = bar.add_task(f"extract {Path(cfg.out).name}", total=total, rate="")
        for batch in loader:
            good = [s for s in batch if s.error == ""]
            seeds = [sample_seed(cfg.seed, sample_ids[s.index]) for s in good]
            prompts = [cfg.prompt_for(class_names[s.index]) for s in good]
            outputs = compute_batch(models, good, prompts, seeds, device) if good else None
            for s in batch:
                if s.error:
                    log.warning("%s: %s", paths[s.index], s.error)
            _gather(pending, cache, batch, good, outputs, cfg.seed, sample_ids)
            for block in [b for b, acc in pending.items() if len(acc["rows"]) == acc["size"]]:
                _flush(cache, block, pending.pop(block), summary)
            done = summary.computed + sum(len(a["rows"]) for a in pending.values())
            elapsed = time.perf_counter() - started
            bar.update(task, completed=done, rate=rate_text(done, elapsed))
    if pending:
        raise RuntimeError(f"internal: blocks {sorted(pending)} incomplete at the end of the loader")
    summary.seconds = time.perf_counter() - started

    accelerator.wait_for_everyone()
    totals = torch.tensor([summary.computed, summary.failed, summary.skipped_blocks], device=device)
    totals = accelerator.reduce(totals, reduction="sum") if world > 1 else totals
    summary.computed, summary.failed, summary.skipped_blocks = (int(v) for v in totals.tolist())
    if accelerator.is_main_process:
        summary.counts = cache.finalize()
    accelerator.wait_for_everyone()
    return summary


def _gather(pending: dict, cache: FeatureCache, batch: list[DecodedSample], good: list[DecodedSample], outputs, run_seed: int, sample_ids) -> None:
    position = {s.index: i for i, s in enumerate(good)}
    for s in batch:
        block = s.index // cache.layout.chunk_samples
        sl = cache.block_slice(block)
        acc = pending.setdefault(block, {"size": sl.stop - sl.start, "rows": {}})
        if s.error:
            acc["rows"][s.index] = (None, sample_seed(run_seed, sample_ids[s.index]), s.error)
        else:
            i = position[s.index]
            arrays = tuple(o[i] for o in outputs)
            bad = [name for name, a in zip(("lare", "pooled", "fmap"), arrays) if not np.isfinite(a).all()]
            error = f"non-finite model output in {', '.join(bad)}" if bad else ""
            acc["rows"][s.index] = (None if bad else arrays, sample_seed(run_seed, sample_ids[s.index]), error)


def _flush(cache: FeatureCache, block: int, acc: dict, summary: Summary) -> None:
    sl = cache.block_slice(block)
    n = sl.stop - sl.start
    layout = cache.layout
    out = {name: np.full((n, *layout.sample_shape(name)), np.nan, dtype=np.float32) for name in ("lare", "pooled", "fmap")}
    seeds, status, errors = [0] * n, [STATUS_OK] * n, [""] * n
    for row, (arrays, seed, error) in acc["rows"].items():
        i = row - sl.start
        seeds[i] = seed
        if arrays is None:
            status[i], errors[i] = STATUS_ERROR, error
            summary.failed += 1
        else:
            for name, a in zip(("lare", "pooled", "fmap"), arrays):
                out[name][i] = a
        summary.computed += 1
    cache.write_block(block, **out, seed=seeds, status=status, error=errors)


# ---- re-computation for verification -----------------------------------------------------------
def recompute_samples(cache_path: str | Path, indices: Sequence[int], *, sd_model: str | None = None,
                      backbone: str | None = None, device: str = "cpu") -> dict[str, np.ndarray]:
    """Recompute rows ``indices`` of a cache with its own config (models overridable).

    Each requested row is recomputed inside the same batch it was extracted in (same block, same
    ``batch_size``, same failed neighbours left out), so on the same hardware and software the
    result equals the cache bit for bit; batched kernels round differently for other batch
    compositions (~1e-6 relative). Returns ``lare``/``pooled``/``fmap`` in the storage dtypes, with
    NaN rows for images that fail to decode.
    """
    cache = FeatureCache.open(cache_path)
    stored = dict(cache.attrs["extract_config"])
    if sd_model:
        stored["sd_model"] = sd_model
    if backbone:
        stored["backbone"] = backbone
    stored.update(device=device, num_workers=0)
    cfg = ExtractConfig(**stored)
    torch_device = torch.device(device)
    models = load_models(cfg, torch_device)
    if models.fingerprints != cache.attrs["fingerprints"]:
        raise CacheError(f"{cache_path}: the models at hand differ from those that made the cache "
                         f"(have {models.fingerprints}, cache {cache.attrs['fingerprints']})")
    root = Path(cache.attrs["manifest"]["root"])
    dataset = ManifestImages(root, cache.column("path"), cfg.image_size, cfg.max_image_pixels)
    ids, class_names = cache.column("sample_id"), cache.column("class_name")
    wanted = {int(i): k for k, i in enumerate(indices)}
    blocks = sorted({i // cache.layout.chunk_samples for i in wanted})
    out = {name: np.full((len(indices), *cache.layout.sample_shape(name)), np.nan, dtype=cache.layout.dtype(name))
           for name in ("lare", "pooled", "fmap")}
    for batch_rows in block_batches(cache, blocks, cfg.batch_size):
        if not wanted.keys() & set(batch_rows):
            continue
        good = [s for s in (dataset[r] for r in batch_rows) if not s.error]
        if not good:
            continue
        arrays = compute_batch(models, good, [cfg.prompt_for(class_names[s.index]) for s in good],
                               [sample_seed(cfg.seed, ids[s.index]) for s in good], torch_device)
        for position, sample in enumerate(good):
            if sample.index in wanted:
                for name, values in zip(("lare", "pooled", "fmap"), arrays):
                    out[name][wanted[sample.index]] = values[position].astype(cache.layout.dtype(name))
    return out
