"""Stage 1 benchmarks on this machine -> ``OUT/bench.json`` + ``OUT/bench.md`` (``make bench``).

Figures:
- extraction throughput with the tiny models (img/s), end to end (decode, LaRE, backbone, cache);
- full-size models with random weights (SD v1.5 UNet + VAE from ``extract/configs/sd-v1``, CLIP RN50
  ``random-rn50``), seconds per image, on a few images;
- cache bytes per sample on disk with the real codec, for a cache of photo crops (tiny SD maps,
  float32; full-size random RN50 features, float16), and the GenImage full-size disk estimate;
- cache read throughput for training: random chunk-sized blocks, and random single samples;
- cache creation time (metadata of N samples), extrapolated to GenImage;
- side-by-side cost ratios (``bench/stage1.py``): a DIRE-style feature over LaRE (tiny models; full
  size with ``--dire-full-size-images``), lare2's batched extraction over a reference-style loop,
  end-to-end extraction over the models alone;
- host-side capacity (``bench/host.py``): decode + preprocess images/s per loader worker, cache writes
  per second, and the loader workers a GPU needs (its rate from ``bench/results/gpu.json`` when
  ``bench/gpu.sh`` has written one, else the 400 images/s H200 goal);
- the cache writer beside the model (``bench/writer.py``): writes inline, in the extractor's writer thread
  and in a writer process, alone and beside a stand-in model at 400 images/s;
- FLOPs per image of the VAE encoder, the 4 UNet calls and RN50 (``bench/flops.py``);
- stage 2's reader and training throughput (``bench/reader.py``).

Random weights change values, not cost: the full-size timings hold for the real weights. Compressed
sizes of ``fmap`` depend on the weights (sparsity after the ReLU); the measured figure is an estimate.

A run that skips a measurement by its options (``--full-size-images 0``, no ``--dire-full-size-images``,
``--create-samples 0``, ``--reader-samples 0``) keeps that section of the previous ``bench.json``, marked
``"measured"`` with the date, commit and command of the run that measured it (``carry_forward``).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script (bench/run_bench.py): the repository root makes ``bench.*`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import typer
from lare2.shared.jsonio import write_json

from bench.record import carry_forward, read_previous
from bench.report import markdown

GENIMAGE_SAMPLES = 2_681_167
"""GenImage: 1,331,167 real + 1,350,000 generated images (train + val, 8 generators)."""
H200_GOAL_IMAGES_PER_S = 400.0
"""The stated stage-1 goal for one H200 (models only), used for the workers-per-GPU figure until gpu.json exists."""
GPU_RESULTS = Path(__file__).resolve().parent / "results" / "gpu.json"
SKIPPABLE_SECTIONS = {("full_size",): "full_size_images", ("dire_vs_lare", "full_size"): "dire_full_size_images",
                      ("creation",): "create_samples", ("reader",): "reader_samples"}
"""bench.json sections (key paths) -> the ``run`` option whose 0 skips them."""


def _log(message: str) -> None:
    from lare2.shared.logs import console

    console.log(message)


# ---- inputs ---------------------------------------------------------------------------------------
def write_photo_tree(root: Path, count: int, size: int = 320, seed: int = 0) -> Path:
    """``count`` JPEG crops of the MiniGenImage photographs in a 0_real/1_fake tree; returns the manifest."""
    from lare2.minigenimage.photos import photos_of, random_crops
    from lare2.shared.manifest import build_folders, write_built
    from PIL import Image

    photos = photos_of("detector-train")
    for i in range(count):
        crop_HW3 = random_crops(photos[i % len(photos)], 1, size, seed=seed + i)[0]
        folder = root / "images" / "bench" / "train" / ("0_real" if i % 2 == 0 else "1_fake")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(crop_HW3).save(folder / f"{i % 1000 + 1}_photo_{i:05d}.jpg", quality=95)
    return write_built(root / "manifest.parquet", build_folders(root / "images", progress=False))


# ---- measurements ---------------------------------------------------------------------------------
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
        owner = next((name for name, folder in parts.items() if folder is not None and folder in file.parents),
                     "metadata")
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


def measure_reads(source: Path, folder: Path, blocks: int, seed: int = 0) -> tuple[dict, dict]:
    """Cache writes, then random block reads and random single-sample reads, of a cache of ``blocks``
    copies of a real block (``bench.host.tiled_cache``): (read figures, write figures)."""
    from bench.host import cache_write_figures, tiled_cache

    cache, write_seconds = tiled_cache(source, folder, blocks)
    return ({"samples": len(cache), **_time_reads(cache, seed),
             "note": "warm page cache (just written); cold reads on a shared file system are slower"},
            cache_write_figures(cache, write_seconds))


def _time_reads(cache, seed: int) -> dict:
    """Every block once in random order, then 64 random single samples; and the files the cache takes."""
    from lare2.shared.cache import ARRAY_NAMES
    from lare2.shared.cache.chunks import folder_file_count

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
    return {"files": folder_file_count(cache.path),
            "block_reads": {"samples_per_s": round(n / block_seconds, 1),
                            "raw_mb_per_s": round(n * raw / block_seconds / 1e6, 1)},
            "single_sample_reads": {"samples_per_s": round(len(singles) / single_seconds, 1)}}


def measure_packed_reads(source: Path, folder: Path, pack_blocks: int, seed: int = 0) -> dict:
    """The read cache packed with ``pack_blocks`` blocks per file (``lare2 cache pack``), read the same way."""
    from lare2.shared.cache import pack_cache

    started = time.perf_counter()
    packed = pack_cache(source, folder, pack_blocks=pack_blocks, progress=False)
    seconds = round(time.perf_counter() - started, 2)
    return {"pack_blocks": pack_blocks, "pack_seconds": seconds, **_time_reads(packed, seed)}


def measure_creation(folder: Path, samples: int) -> dict:
    from lare2.shared.cache import CacheLayout, FeatureCache

    rows = {"sample_id": [f"{i:016x}" for i in range(samples)],
            "path": [f"gen/train/1_fake/{i}.png" for i in range(samples)],
            "label": [i % 2 for i in range(samples)], "generator": ["gen"] * samples, "split": ["train"] * samples,
            "class_name": ["goldfish"] * samples}
    started = time.perf_counter()
    FeatureCache.create(folder, rows, CacheLayout(), {})
    seconds = time.perf_counter() - started
    files = sum(1 for p in folder.rglob("*") if p.is_file())
    return {"samples": samples, "seconds": round(seconds, 2), "files": files,
            "genimage_seconds_estimate": round(seconds * GENIMAGE_SAMPLES / samples),
            "genimage_files_estimate": round(files * GENIMAGE_SAMPLES / samples)}


def measure_full_size(model, manifest: Path, images: int, ensemble: int = 4) -> dict:
    """Seconds per image of SD v1.5-size LaRE (VAE + E UNet calls) and of CLIP RN50, random weights, fp32."""
    import torch
    from lare2.extract.lare import LareComputer
    from lare2.extract.loader import ManifestImages
    from lare2.shared.config import MAX_IMAGE_PIXELS
    from lare2.shared.manifest import read_manifest

    from bench.models import build_backbone

    backbone = build_backbone("full")
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
    return {"images": images, "ensemble": ensemble,
            "lare_seconds_per_image": round(float(np.mean(lare_s)), 2),
            "backbone_seconds_per_image": round(float(np.mean(backbone_s)), 2),
            "unet_parameters_m": round(sum(p.numel() for p in model.unet.parameters()) / 1e6, 1),
            "lare_map_shape": list(maps_B4hw.shape[1:]),
            "lare_float32_compression_ratio": _zstd_ratio(maps_B4hw.astype(np.float32)),
            "threads": torch.get_num_threads()}


def gpu_rate(path: Path = GPU_RESULTS) -> tuple[float, str]:
    """The best images/s of a real (not dry) ``bench/gpu.sh`` run, else the H200 goal; and where it came from."""
    if path.is_file():
        gpu = json.loads(path.read_text())
        if not gpu.get("dry_run") and gpu.get("best"):
            best = gpu["best"]
            return float(best["images_per_s"]), (f"{path.name}: {gpu['device']}, {best['dtype']}, "
                                                 f"batch {best['batch_size']}, {gpu['date']}")
    return H200_GOAL_IMAGES_PER_S, "goal: 400 images/s on one H200 (bench/gpu.sh has not been run)"


def _zstd_ratio(array: np.ndarray) -> float:
    """raw / compressed with the cache's codec settings (zstd level 3), as a cross-check of the cache figure."""
    from numcodecs import Zstd

    data = np.ascontiguousarray(array).tobytes()
    return round(len(data) / len(Zstd(level=3).encode(data)), 3)


def genimage_estimate(sizes: dict) -> dict:
    from lare2.shared.cache import ARRAY_NAMES

    per_sample = sizes["total"]["bytes_per_sample"]
    allocated = sizes["total"]["allocated_per_sample"]
    return {"samples": GENIMAGE_SAMPLES, "bytes_per_sample": per_sample,
            "terabytes": round(per_sample * GENIMAGE_SAMPLES / 1e12, 3),
            "terabytes_allocated": round(allocated * GENIMAGE_SAMPLES / 1e12, 3),
            "uncompressed_terabytes": round(sum(sizes[name]["raw_bytes_per_sample"] for name in ARRAY_NAMES)
                                            * GENIMAGE_SAMPLES / 1e12, 3)}


# ---- the run --------------------------------------------------------------------------------------
def _write(out: Path, results: dict) -> None:
    write_json(out / "bench.json", results)
    (out / "bench.md").write_text(markdown(results))


def _remeasure_reader(out: Path, samples: int) -> None:
    """Only the stage-2 reader figures, into the existing ``bench.json`` (marked with their own date and command)."""
    from lare2.shared.provenance import git_sha

    from bench.reader import measure_reader

    results = json.loads((out / "bench.json").read_text())
    with tempfile.TemporaryDirectory(prefix="lare2-bench-") as tmp:
        reader = measure_reader(Path(tmp), samples=samples)
    reader["measured"] = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                          "commit": git_sha(), "command": " ".join(["python", *sys.argv]),
                          "load_average": [round(v, 2) for v in os.getloadavg()]}
    results["reader"] = reader
    _write(out, results)


def _measure_extraction(results: dict, work: Path, manifest: Path, repeats: int, save: Callable[[], None]) -> Path:
    """Extraction end to end and models only, tiny models and tiny SD + full-size RN50; returns the latter's cache."""
    from bench.stage1 import measure_pipeline

    results["pipeline_efficiency"] = {}
    for name, settings in (("tiny", {}), ("tiny_sd_rn50", {"clip": "random-rn50"})):
        _log(f"extraction end to end and models only, {name}, {repeats} rounds")
        p = measure_pipeline(manifest, work / name, repeats=repeats, keep=work / f"{name}-cache",
                             chunk_samples=32, **settings)
        results["pipeline_efficiency"][name] = p
        results[f"{name}_extraction"] = {**p["median_run"], "images_per_s": p["end_to_end_images_per_s"],
                                         "settings": p["settings"]}
        save()
    return work / "tiny_sd_rn50-cache"  # tiny SD maps, full-size RN50 features: the full-size layout


def _measure_cache(results: dict, cache: Path, work: Path, read_blocks: int, create_samples: int) -> None:
    """Bytes on disk, the GenImage estimate, writes and reads (plain and packed), the writer beside the model
    (``bench.writer``, on blocks of ``cache``: the full-size layout), creation."""
    from bench.writer import measure_writer

    results["cache_bytes"] = store_bytes(cache)
    results["genimage_estimate"] = genimage_estimate(results["cache_bytes"])
    _log("cache writes and reads")
    results["reads"], results["cache_writes"] = measure_reads(cache, work / "reads", read_blocks)
    _log("packed cache reads")
    results["packed_reads"] = measure_packed_reads(work / "reads", work / "packed", pack_blocks=min(64, read_blocks))
    _log("cache writer beside a stand-in model: inline, thread, process")
    results["cache_writer"] = measure_writer(work, source=cache)  # its caches in a temporary folder under work
    if create_samples:
        _log(f"cache creation for {create_samples} samples")
        results["creation"] = measure_creation(work / "created", create_samples)


def _measure_costs(results: dict, manifest: Path, dire_images: int, reference_images: int, repeats: int) -> None:
    """FLOPs per image; DIRE-style / LaRE and batched / reference-style loop with the tiny models."""
    from lare2.extract.models import load_latent_diffusion

    from bench.flops import stage1_flops
    from bench.stage1 import decoded_inputs, measure_batched_vs_reference, measure_dire_vs_lare

    _log("FLOPs per image, full-size configs (meta tensors)")
    results["flops"] = stage1_flops("full")
    _log(f"DIRE-style / LaRE and batched / reference-style loop, tiny models, {repeats} rounds")
    tiny = load_latent_diffusion("tiny")
    results["dire_vs_lare"] = {"tiny": measure_dire_vs_lare(tiny, decoded_inputs(manifest, dire_images),
                                                             batch_size=8, repeats=repeats)}
    results["batched_vs_reference"] = measure_batched_vs_reference(tiny, decoded_inputs(manifest, reference_images),
                                                                   batch_size=8, repeats=repeats)


def _measure_host(results: dict, host_images: int, repeats: int) -> None:
    from bench.host import imagenet_like_jpegs, measure_worker, workers_needed

    _log(f"loader worker on {host_images} ImageNet-like JPEGs, {repeats} rounds")
    rate, source = gpu_rate()
    worker = measure_worker(imagenet_like_jpegs(host_images), repeats=repeats)
    needed = workers_needed(worker, results["cache_writes"], rate, source)
    results["host"] = {"worker": worker, "workers_per_gpu": needed}


def _measure_full_size_models(results: dict, manifest: Path, images: int, dire_images: int,
                              save: Callable[[], None]) -> None:
    """SD v1.5 + RN50 seconds per image (``images``) and the full-size DIRE-style / LaRE ratio (``dire_images``)."""
    from bench.models import build_latent_diffusion
    from bench.stage1 import decoded_inputs, measure_dire_vs_lare

    _log("building the full-size SD v1.5 models, random weights")
    t0 = time.perf_counter()
    full = build_latent_diffusion("full")
    build_seconds = round(time.perf_counter() - t0, 1)
    if images:
        _log(f"full-size SD v1.5 + RN50, {images} images")
        results["full_size"] = {**measure_full_size(full, manifest, images), "build_seconds": build_seconds}
        save()
    if dire_images:
        _log(f"DIRE-style / LaRE, full size, batch 1, {dire_images} images")
        results["dire_vs_lare"]["full_size"] = measure_dire_vs_lare(
            full, decoded_inputs(manifest, dire_images), batch_size=1, repeats=dire_images,
            per_round=True, warm_up=not images)  # measure_full_size warmed these models up
        save()


def _machine_record() -> dict:
    import torch
    from lare2.shared.provenance import git_sha

    return {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                       f"torch {torch.__version__}, {torch.get_num_threads()} threads",
            "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "commit": git_sha(),
            "command": " ".join(["python", *sys.argv]) if sys.argv and sys.argv[0].endswith("run_bench.py")
                       else "bench/run_bench.py (called as a function)"}


def run(
    out: Path = typer.Option(Path("bench/results"), "--out", help="Folder for bench.json and bench.md."),
    samples: int = typer.Option(32, help="Photo crops for the extraction, pipeline and cache-size figures "
                                         "(32: one cache block)."),
    full_size_images: int = typer.Option(2, help="Images timed with the full-size models (0 skips them)."),
    dire_full_size_images: int = typer.Option(0, help="Images (batch 1) of the full-size DIRE-style / LaRE ratio, "
                                                      "~1 min each on 2 CPU cores (make bench FULL=1: 2)."),
    repeats: int = typer.Option(3, help="Rounds of every side-by-side ratio (medians are reported)."),
    dire_images: int = typer.Option(8, help="Images of the tiny-model DIRE-style / LaRE ratio (batch 8)."),
    reference_images: int = typer.Option(16, help="Images of the batched / reference-style loop ratio (batch 8)."),
    host_images: int = typer.Option(96, help="500 x 375 JPEGs of the loader-worker figure."),
    read_blocks: int = typer.Option(32, help="Chunk-sized blocks in the read and write throughput cache."),
    create_samples: int = typer.Option(20_000, help="Samples in the cache-creation timing (0 skips it)."),
    reader_samples: int = typer.Option(1024, help="Samples of the stage-2 reader figures (0 skips them)."),
    only_reader: bool = typer.Option(False, "--only-reader", help="Remeasure only the stage-2 reader figures into "
                                     "the existing bench.json (marked with their date, commit and command)."),
) -> None:
    """Measure stage 1 on this machine and write the figures."""
    if only_reader:
        _remeasure_reader(out, reader_samples)
        return
    from bench.reader import measure_reader

    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict = _machine_record()
    previous = read_previous(out / "bench.json")
    given = {"full_size_images": full_size_images, "dire_full_size_images": dire_full_size_images,
             "create_samples": create_samples, "reader_samples": reader_samples}
    skipped = [path for path, option in SKIPPABLE_SECTIONS.items() if not given[option]]

    def save() -> None:  # after every measurement: an interrupted run keeps what it measured
        results["seconds"] = round(time.perf_counter() - started, 1)
        results["load_average_now"] = [round(v, 2) for v in os.getloadavg()]
        _write(out, carry_forward(previous, results, skipped))

    with tempfile.TemporaryDirectory(prefix="lare2-bench-") as tmp:
        work = Path(tmp)
        _log(f"writing {samples} photo crops")
        manifest = write_photo_tree(work / "data", samples)
        cache = _measure_extraction(results, work, manifest, repeats, save)
        _measure_cache(results, cache, work, read_blocks, create_samples)
        save()
        _measure_costs(results, manifest, dire_images, reference_images, repeats)
        save()
        _measure_host(results, host_images, repeats)
        save()
        if full_size_images or dire_full_size_images:
            _measure_full_size_models(results, manifest, full_size_images, dire_full_size_images, save)
        if reader_samples:
            _log(f"stage-2 reader on {reader_samples} samples")
            results["reader"] = measure_reader(work / "reader", samples=reader_samples)
    save()
    _log(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    from lare2.shared.logs import console

    console.print(markdown(carry_forward(previous, results, skipped)), markup=False)


def main(argv: list[str] | None = None) -> None:
    app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)
    app.command()(run)
    app(args=argv, prog_name="bench/run_bench.py")


if __name__ == "__main__":
    main()
