"""Stage 1 benchmarks on this machine -> ``OUT/bench.json`` + ``OUT/bench.md`` (``make bench``).

Figures:
- extraction throughput with the tiny models (img/s), end to end (decode, LaRE, backbone, cache);
- full-size models with random weights (SD v1.5 UNet + VAE from ``extract/configs/sd-v1``, CLIP RN50
  ``random-rn50``), seconds per image, on a few images;
- cache bytes per sample on disk with the real codec, for a cache of photo crops (tiny SD maps,
  float32; full-size random RN50 features, float16), and the GenImage full-size disk estimate;
- cache read throughput for training: random chunk-sized blocks, and random single samples;
- cache creation time (metadata of N samples), extrapolated to GenImage.

Random weights change values, not cost: the full-size timings hold for the real weights. Compressed
sizes of ``fmap`` depend on the weights (sparsity after the ReLU); the measured figure is an estimate.
"""

from __future__ import annotations

import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import typer

GENIMAGE_SAMPLES = 2_681_167
"""GenImage: 1,331,167 real + 1,350,000 generated images (train + val, 8 generators)."""


def _log(message: str) -> None:
    from lare2.shared.logs import console

    console.log(message)


# ---- inputs ---------------------------------------------------------------------------------------
def write_photo_tree(root: Path, count: int, size: int = 320, seed: int = 0) -> Path:
    """``count`` JPEG crops of the MiniGenImage photographs in a 0_real/1_fake tree; returns the manifest."""
    from PIL import Image

    from lare2.minigenimage.photos import photos_of, random_crops
    from lare2.shared.manifest import build_folders, write_built

    photos = photos_of("detector-train")
    for i in range(count):
        crop_HW3 = random_crops(photos[i % len(photos)], 1, size, seed=seed + i)[0]
        folder = root / "images" / "bench" / "train" / ("0_real" if i % 2 == 0 else "1_fake")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(crop_HW3).save(folder / f"{i % 1000 + 1}_photo_{i:05d}.jpg", quality=95)
    return write_built(root / "manifest.parquet", build_folders(root / "images", progress=False))


# ---- measurements ---------------------------------------------------------------------------------
def measure_extraction(manifest: Path, out: Path, **settings) -> dict:
    from lare2.extract.run import run_extraction
    from lare2.shared.config import debug

    cfg = debug(manifest=str(manifest), out=str(out), device="cpu", **settings)
    summary = run_extraction(cfg)
    return {"images": summary.computed, "seconds": round(summary.seconds, 2),
            "images_per_s": round(summary.computed / summary.seconds, 2),
            "settings": {k: getattr(cfg, k) for k in ("sd_model", "backbone", "image_size", "ensemble", "batch_size",
                                                      "chunk_samples", "num_workers")}}


def store_bytes(cache_path: Path) -> dict:
    """On-disk bytes per array of a cache: apparent (file sizes) and allocated (file system blocks)."""
    from lare2.shared.cache import ARRAY_NAMES, FeatureCache

    cache = FeatureCache.open(cache_path)
    n = len(cache)
    parts = {name: cache_path / name for name in ARRAY_NAMES}
    parts["metadata"] = None  # everything else: meta/*, block_done, zarr.json
    sizes = {name: {"apparent": 0, "allocated": 0, "files": 0} for name in parts}
    for file in cache_path.rglob("*"):
        if not file.is_file():
            continue
        stat = file.stat()
        owner = next((name for name, folder in parts.items() if folder is not None and folder in file.parents), "metadata")
        sizes[owner]["apparent"] += stat.st_size
        sizes[owner]["allocated"] += stat.st_blocks * 512
        sizes[owner]["files"] += 1
    result = {}
    for name, size in sizes.items():
        raw = (int(np.prod(cache.layout.sample_shape(name))) * np.dtype(cache.layout.dtype(name)).itemsize
               if name in ARRAY_NAMES else None)
        result[name] = {
            "bytes_per_sample": round(size["apparent"] / n, 1),
            "allocated_per_sample": round(size["allocated"] / n, 1),
            "raw_bytes_per_sample": raw,
            "compression_ratio": round(raw / (size["apparent"] / n), 3) if raw else None,
            "files": size["files"],
        }
    result["total"] = {"bytes_per_sample": round(sum(r["bytes_per_sample"] for r in result.values()), 1),
                       "allocated_per_sample": round(sum(r["allocated_per_sample"] for r in result.values()), 1),
                       "samples": n, "chunk_samples": cache.layout.chunk_samples}
    return result


def measure_reads(source: Path, folder: Path, blocks: int, seed: int = 0) -> dict:
    """Random block reads and random single-sample reads from a cache of ``blocks`` copies of a real block."""
    from lare2.shared.cache import FeatureCache

    src = FeatureCache.open(source)
    c = src.layout.chunk_samples
    m = len(range(*src.block_slice(0).indices(len(src))))
    tiled = np.arange(c) % m  # a short source fills a whole block by repetition
    block = {name: values[tiled] for name, values in src.read(src.block_slice(0)).items()}
    meta = {col: list(src.column(col)[tiled]) for col in ("seed", "status", "error")}
    n = blocks * c
    rows = {"sample_id": [f"s{i:07d}" for i in range(n)], "path": ["x.png"] * n, "label": [0] * n,
            "generator": ["x"] * n, "split": ["train"] * n, "class_name": ["goldfish"] * n}
    cache = FeatureCache.create(folder, rows, src.layout, {})
    for b in range(blocks):
        cache.write_block(b, **block, seed=meta["seed"], status=meta["status"], error=meta["error"])
    return {"samples": n, **_time_reads(cache, seed),
            "note": "warm page cache (just written); cold reads on a shared file system are slower"}


def _time_reads(cache, seed: int) -> dict:
    """Every block once in random order, then 64 random single samples; and the files the cache takes."""
    from lare2.shared.cache import ARRAY_NAMES

    n, c = len(cache), cache.layout.chunk_samples
    rng = random.Random(seed)
    order = list(range(cache.num_blocks))
    rng.shuffle(order)
    started = time.perf_counter()
    for b in order:
        arrays = cache.read(cache.block_slice(b))
    block_seconds = time.perf_counter() - started
    raw = sum(arrays[name].nbytes for name in ARRAY_NAMES) / c
    singles = [rng.randrange(n) for _ in range(min(n, 64))]
    started = time.perf_counter()
    for i in singles:
        cache.read([i])
    single_seconds = time.perf_counter() - started
    from lare2.shared.cache.chunks import folder_file_count

    return {"files": folder_file_count(cache.path),
            "block_reads": {"samples_per_s": round(n / block_seconds, 1),
                            "raw_mb_per_s": round(n * raw / block_seconds / 1e6, 1)},
            "single_sample_reads": {"samples_per_s": round(len(singles) / single_seconds, 1)}}


def measure_packed_reads(source: Path, folder: Path, shard_blocks: int, seed: int = 0) -> dict:
    """The read cache packed into shards of ``shard_blocks`` blocks (``lare2 cache pack``), read the same way."""
    from lare2.shared.cache import pack_cache

    started = time.perf_counter()
    packed = pack_cache(source, folder, shard_blocks=shard_blocks, progress=False)
    return {"shard_blocks": shard_blocks, "pack_seconds": round(time.perf_counter() - started, 2), **_time_reads(packed, seed)}


def measure_creation(folder: Path, samples: int) -> dict:
    from lare2.shared.cache import CacheLayout, FeatureCache

    rows = {"sample_id": [f"{i:016x}" for i in range(samples)], "path": [f"gen/train/1_fake/{i}.png" for i in range(samples)],
            "label": [i % 2 for i in range(samples)], "generator": ["gen"] * samples, "split": ["train"] * samples,
            "class_name": ["goldfish"] * samples}
    started = time.perf_counter()
    FeatureCache.create(folder, rows, CacheLayout(), {})
    seconds = time.perf_counter() - started
    files = sum(1 for p in folder.rglob("*") if p.is_file())
    return {"samples": samples, "seconds": round(seconds, 2), "files": files,
            "genimage_seconds_estimate": round(seconds * GENIMAGE_SAMPLES / samples),
            "genimage_files_estimate": round(files * GENIMAGE_SAMPLES / samples)}


def measure_full_size(manifest: Path, images: int, ensemble: int = 4) -> dict:
    """Seconds per image of SD v1.5-size LaRE (VAE + E UNet calls) and of CLIP RN50, random weights, fp32."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lare2.extract.clip_resnet import load_backbone
    from lare2.extract.lare import LareComputer
    from lare2.extract.models import SD_V1_CONFIGS, LatentDiffusion, ddpm_scheduler_from
    from lare2.extract.tiny_models import build_tiny_sd
    from lare2.extract.run import ManifestImages
    from lare2.shared.config import MAX_IMAGE_PIXELS
    from lare2.shared.manifest import read_manifest

    def config(component: str) -> dict:
        return {k: v for k, v in json.loads((SD_V1_CONFIGS / component / "config.json").read_text()).items()
                if not k.startswith("_")}

    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL.from_config(config("vae")).eval().requires_grad_(False)
        unet = UNet2DConditionModel.from_config(config("unet")).eval().requires_grad_(False)
        text_encoder = CLIPTextModel(CLIPTextConfig(**config("text_encoder"))).eval().requires_grad_(False)
    backbone, _ = load_backbone("random-rn50", device=torch.device("cpu"), dtype=torch.float32)
    build_seconds = time.perf_counter() - started
    model = LatentDiffusion(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=build_tiny_sd()["tokenizer"],
                            scheduler=ddpm_scheduler_from(SD_V1_CONFIGS), source="random-sd-v1", fingerprint="-")
    lare = LareComputer(model, timestep=200, ensemble=ensemble)
    table, root = read_manifest(manifest)
    dataset = ManifestImages(Path(root), table.column("path").to_pylist(), 256, MAX_IMAGE_PIXELS)
    samples = [dataset[i] for i in range(images + 1)]  # the first one warms up
    lare_s, backbone_s, maps = [], [], []
    with torch.no_grad():
        for i, sample in enumerate(samples):
            t0 = time.perf_counter()
            maps.append(lare(sample.lare_image[None], ["a photo of a goldfish"], [i]))
            t1 = time.perf_counter()
            backbone(sample.backbone_image[None])
            t2 = time.perf_counter()
            if i:
                lare_s.append(t1 - t0)
                backbone_s.append(t2 - t1)
    maps_B4hw = torch.cat(maps).numpy()
    return {"images": images, "ensemble": ensemble, "build_seconds": round(build_seconds, 1),
            "lare_seconds_per_image": round(float(np.mean(lare_s)), 2),
            "backbone_seconds_per_image": round(float(np.mean(backbone_s)), 2),
            "unet_parameters_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1),
            "lare_map_shape": list(maps_B4hw.shape[1:]),
            "lare_float32_compression_ratio": _zstd_ratio(maps_B4hw.astype(np.float32)),
            "threads": torch.get_num_threads()}


def _zstd_ratio(array: np.ndarray) -> float:
    """raw / compressed with the cache's codec settings (zstd level 3), as a cross-check of the cache figure."""
    from numcodecs import Zstd

    data = np.ascontiguousarray(array).tobytes()
    return round(len(data) / len(Zstd(level=3).encode(data)), 3)


# ---- report ---------------------------------------------------------------------------------------
def genimage_estimate(sizes: dict) -> dict:
    from lare2.shared.cache import ARRAY_NAMES

    per_sample = sizes["total"]["bytes_per_sample"]
    allocated = sizes["total"]["allocated_per_sample"]
    return {"samples": GENIMAGE_SAMPLES, "bytes_per_sample": per_sample,
            "terabytes": round(per_sample * GENIMAGE_SAMPLES / 1e12, 3),
            "terabytes_allocated": round(allocated * GENIMAGE_SAMPLES / 1e12, 3),
            "uncompressed_terabytes": round(sum(sizes[name]["raw_bytes_per_sample"] for name in ARRAY_NAMES)
                                            * GENIMAGE_SAMPLES / 1e12, 3)}


def markdown(results: dict) -> str:
    lines = ["# Stage 1 benchmarks", "", f"Machine: {results['machine']}", "", "| figure | value |", "| --- | --- |"]
    tiny = results.get("tiny_extraction")
    if tiny:
        lines.append(f"| extraction, tiny models, end to end | {tiny['images_per_s']} img/s ({tiny['images']} images) |")
    rn50 = results.get("tiny_sd_rn50_extraction")
    if rn50:
        lines.append(f"| extraction, tiny SD + full-size RN50 | {rn50['images_per_s']} img/s |")
    full = results.get("full_size")
    if full:
        lines.append(f"| SD v1.5-size LaRE (VAE + {full['ensemble']} UNet calls), fp32 CPU | "
                     f"{full['lare_seconds_per_image']} s/img |")
        lines.append(f"| CLIP RN50, fp32 CPU | {full['backbone_seconds_per_image']} s/img |")
    sizes = results.get("cache_bytes")
    if sizes:
        for name in ("lare", "pooled", "fmap", "metadata"):
            s = sizes[name]
            ratio = f", {s['compression_ratio']}x" if s["compression_ratio"] else ""
            lines.append(f"| cache `{name}` on disk | {s['bytes_per_sample'] / 1e3:.1f} kB/sample{ratio} |")
        lines.append(f"| cache total on disk | {sizes['total']['bytes_per_sample'] / 1e3:.1f} kB/sample |")
    estimate = results.get("genimage_estimate")
    if estimate:
        lines.append(f"| GenImage ({estimate['samples']:,} images) cache | {estimate['terabytes']} TB "
                     f"(uncompressed {estimate['uncompressed_terabytes']} TB) |")
    reads = results.get("reads")
    if reads:
        lines.append(f"| cache reads, random blocks | {reads['block_reads']['samples_per_s']} samples/s "
                     f"({reads['block_reads']['raw_mb_per_s']} MB/s decoded) |")
        lines.append(f"| cache reads, random single samples | {reads['single_sample_reads']['samples_per_s']} samples/s |")
    packed = results.get("packed_reads")
    if reads and packed:
        lines.append(f"| packed cache ({packed['shard_blocks']} blocks per shard), random blocks | "
                     f"{packed['block_reads']['samples_per_s']} samples/s, {packed['files']} files instead of {reads['files']} "
                     f"(packed in {packed['pack_seconds']} s) |")
        lines.append(f"| packed cache, random single samples | {packed['single_sample_reads']['samples_per_s']} samples/s |")
    creation = results.get("creation")
    if creation:
        lines.append(f"| cache creation, {creation['samples']:,} samples | {creation['seconds']} s, {creation['files']:,} files "
                     f"(GenImage: ~{creation['genimage_seconds_estimate']} s, ~{creation['genimage_files_estimate']:,} files) |")
    return "\n".join(lines) + "\n"


def run(
    out: Path = typer.Option(Path("bench/results"), "--out", help="Folder for bench.json and bench.md."),
    samples: int = typer.Option(64, help="Photo crops for the extraction and cache-size figures."),
    full_size_images: int = typer.Option(2, help="Images timed with the full-size models (0 skips them)."),
    read_blocks: int = typer.Option(32, help="Chunk-sized blocks in the read-throughput cache."),
    create_samples: int = typer.Option(20_000, help="Samples in the cache-creation timing (0 skips it)."),
) -> None:
    """Measure stage 1 on this machine and write the figures."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                                f"torch {torch.__version__}, {torch.get_num_threads()} threads"}
    with tempfile.TemporaryDirectory(prefix="lare2-bench-") as tmp:
        work = Path(tmp)
        _log(f"writing {samples} photo crops")
        manifest = write_photo_tree(work / "data", samples)

        _log("extraction with the tiny models")
        results["tiny_extraction"] = measure_extraction(manifest, work / "tiny", chunk_samples=32)
        _log("extraction with tiny SD + full-size random RN50 (realistic feature maps for the cache size)")
        results["tiny_sd_rn50_extraction"] = measure_extraction(manifest, work / "rn50", backbone="random-rn50",
                                                                chunk_samples=32)
        results["cache_bytes"] = store_bytes(work / "rn50")
        results["genimage_estimate"] = genimage_estimate(results["cache_bytes"])

        _log("cache reads")
        results["reads"] = measure_reads(work / "rn50", work / "reads", read_blocks)
        _log("packed cache reads")
        results["packed_reads"] = measure_packed_reads(work / "reads", work / "packed", shard_blocks=min(64, read_blocks))
        if create_samples:
            _log(f"cache creation for {create_samples} samples")
            results["creation"] = measure_creation(work / "created", create_samples)
        if full_size_images:
            _log(f"full-size SD v1.5 + RN50, random weights, {full_size_images} images")
            results["full_size"] = measure_full_size(manifest, full_size_images)

    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(results))
    _log(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    from lare2.shared.logs import console

    console.print(markdown(results), markup=False)


def main(argv: list[str] | None = None) -> None:
    app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)
    app.command()(run)
    app(args=argv, prog_name="bench/run_bench.py")


if __name__ == "__main__":
    main()
