"""Stage-1 model throughput on one GPU -> ``OUT/gpu.json`` + ``OUT/gpu.md`` (``bench/gpu.sh``).

Full-size models with random weights (random weights change values, not cost): SD v1.5-shaped VAE,
UNet and text encoder (``extract/configs/sd-v1``) and CLIP RN50 (``random-rn50``), run through the
library's own batch path, ``compute_images``: VAE encode at 256 px, the E = 4 UNet calls of each
image as one UNet batch of B x E latents, RN50 at 224 px, the per-image noise drawn on the CPU, the
outputs copied back to the host. Inputs are random images in pinned host memory; prompts are 10
class prompts, encoded once per configuration (in its warm-up), as an extraction run caches them.

Configurations: batch size x compute dtype (``fp32`` with TF32 tensor cores, ``bf16``, ``fp16``) x
``channels_last`` x ``torch.compile``, run in a priority order (``plan``). Each is time-boxed
(``--case-seconds`` after one warm-up batch); once the overall budget (``--budget-seconds``) cannot
fit the next one, the rest are listed as skipped. The results are rewritten after every
configuration, so a run killed on its time limit keeps what it measured.

Per configuration: images/s, seconds per batch, peak memory (``torch.cuda.max_memory_allocated``)
and the fraction of the GPU's dense peak FLOP/s reached, from the FLOPs per image that
``bench/flops.py`` counts (VAE encoder + 4 UNet calls + RN50; ``PEAK_TFLOPS`` by device name, or
``--peak-tflops``).

``--dry-run``: the same code on the CPU with the tiny models, small batches and a few
configurations (``torch.compile`` with the ``eager`` backend), for the test suite. Without it, a
machine without CUDA is refused in one line.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script (bench/gpu_bench.py): the repository root makes ``bench.*`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import typer

from bench.flops import stage1_flops
from bench.models import build_backbone, build_latent_diffusion

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Compute dtypes; ``fp32`` runs matmuls and convolutions on TF32 tensor cores (``allow_tf32``)."""
PEAK_KEY = {"fp32": "tf32", "bf16": "bf16", "fp16": "fp16"}
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    # dense tensor-core peaks from the vendor datasheets (no 2:4 sparsity; fp16/bf16 with fp32 accumulation);
    # matched in order against torch.cuda.get_device_name(), so "L40S" precedes "L40" and "L4", "A100" precedes "A10"
    ("H200", {"bf16": 989.5, "fp16": 989.5, "tf32": 494.7}),
    ("H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5}),
    ("H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0}),
    ("H100", {"bf16": 989.5, "fp16": 989.5, "tf32": 494.7}),  # SXM ("NVIDIA H100 80GB HBM3")
    ("B200", {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0}),
    ("L40S", {"bf16": 362.1, "fp16": 362.1, "tf32": 183.2}),
    ("L40", {"bf16": 181.0, "fp16": 181.0, "tf32": 90.5}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0}),
    ("RTX 6000 Ada", {"bf16": 364.2, "fp16": 364.2, "tf32": 182.1}),
    ("RTX 4090", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5}),
)
DRY_RUN_BATCH_SIZES = (1, 2)
DRY_RUN_DTYPES = ("fp32", "bf16")
COMPILE_RESERVE_S = 120.0
"""Budget a torch.compile configuration needs on top of its time box: compiling the UNet, VAE encoder
and RN50 takes about a minute or two, and cannot be cut short."""
PROMPTS = tuple(f"a photo of a {c}" for c in ("goldfish", "tench", "robin", "bison", "tabby cat", "golden retriever",
                                             "school bus", "espresso", "volcano", "daisy"))


@dataclass(frozen=True)
class Case:
    """One configuration."""

    dtype: str
    channels_last: bool
    compile: bool
    batch_size: int | None
    """None: the best eager batch size measured so far for this dtype and layout (compile runs one size)."""
    reference: bool = False
    """A reference-style loop instead of ``compute_images``: one image at a time, its prompt encoded
    for it (``bench.stage1.reference_lare_map``), then RN50 on it; float32 and batch 1 in ``plan``."""


def peak_tflops(device_name: str, dtype: str) -> float | None:
    """Dense peak TFLOP/s of ``device_name`` for ``dtype`` (``PEAK_TFLOPS``), or None for an unknown device."""
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peaks[PEAK_KEY[dtype]]
    return None


def plan(batch_sizes: list[int], dtypes: list[str], *, with_compile: bool = True) -> list[Case]:
    """Configurations in priority order: the reference-style loop (fp32, batch 1, for the batched /
    reference ratio); the first dtype channels_last eager at every batch size; the other dtypes
    likewise; torch.compile of the first dtype at its best batch; the first dtype without
    channels_last; torch.compile of the other dtypes."""
    first, others = dtypes[0], dtypes[1:]
    cases = [Case("fp32", False, False, 1, reference=True)]
    cases += [Case(first, True, False, b) for b in batch_sizes]
    cases += [Case(d, True, False, b) for d in others for b in batch_sizes]
    if with_compile:
        cases.append(Case(first, True, True, None))
    cases += [Case(first, False, False, b) for b in batch_sizes]
    if with_compile:
        cases += [Case(d, True, True, None) for d in others]
    return cases


# ---- models -------------------------------------------------------------------------------------
@dataclass
class Stage1:
    """The full-size models on the device, in one dtype and memory format at a time."""

    diffusion: object  # LatentDiffusion
    backbone: torch.nn.Module
    device: torch.device
    dtype: torch.dtype = torch.float32
    channels_last: bool = False

    def set(self, dtype: torch.dtype, channels_last: bool) -> None:
        """Cast the weights and set their memory format in place (random weights: the round trips cost no
        accuracy that matters)."""
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        for module in (self.diffusion.vae, self.diffusion.unet, self.diffusion.text_encoder, self.backbone):
            if next(module.parameters()).dtype != dtype:
                module.to(dtype=dtype)
        for module in (self.diffusion.vae, self.diffusion.unet, self.backbone):
            module.to(memory_format=memory_format)
        self.dtype, self.channels_last = dtype, channels_last


def build_stage1(size: str, device: torch.device) -> Stage1:
    diffusion = build_latent_diffusion(size, device=device)
    backbone = build_backbone(size, device=device)
    return Stage1(diffusion, backbone, device)


def step_fn(stage1: Stage1, batch_size: int, compiled: bool, compile_backend: str, reference: bool = False):
    """A zero-argument callable running one batch through ``compute_images`` (or, ``reference``, the
    reference-style loop over its images); undo() restores the models."""
    from lare2.extract.lare import LareComputer
    from lare2.extract.features import Models, compute_images

    from bench.stage1 import reference_lare_map

    diffusion, backbone = stage1.diffusion, stage1.backbone
    vae = diffusion.vae
    originals = (vae.encoder, diffusion.unet)
    if compiled:
        vae.encoder = torch.compile(vae.encoder, backend=compile_backend)
        diffusion.unet = torch.compile(diffusion.unet, backend=compile_backend)
        backbone = torch.compile(backbone, backend=compile_backend)
    lare = LareComputer(diffusion, timestep=200, ensemble=4, device=stage1.device, dtype=stage1.dtype)
    models = Models(lare, backbone, {}, None)
    generator = torch.Generator().manual_seed(batch_size)
    memory_format = torch.channels_last if stage1.channels_last else torch.contiguous_format
    pin = stage1.device.type == "cuda"

    def host(*shape: int) -> torch.Tensor:
        x = (torch.rand(*shape, generator=generator) * 2 - 1).contiguous(memory_format=memory_format)
        return x.pin_memory() if pin else x

    lare_images, backbone_images = host(batch_size, 3, 256, 256), host(batch_size, 3, 224, 224)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]
    seeds = list(range(batch_size))

    def step() -> None:
        # ends in .cpu(): synchronous
        compute_images(models, lare_images, backbone_images, prompts, seeds, stage1.device)

    @torch.no_grad()
    def reference_step() -> None:
        for i in range(batch_size):
            lare_4hw = reference_lare_map(diffusion, lare_images[i].to(stage1.device), prompts[i], seeds[i])
            out = backbone(backbone_images[i : i + 1].to(stage1.device, stage1.dtype))
            lare_4hw.cpu(), out.pooled.cpu(), out.fmap.cpu()

    def undo() -> None:
        vae.encoder, diffusion.unet = originals

    return (reference_step if reference else step), undo


def time_case(step, case_seconds: float, min_iterations: int = 3, max_iterations: int = 200) -> list[float]:
    """Seconds per call of ``step``, after one untimed warm-up call: at least ``min_iterations``, then until
    ``case_seconds``."""
    step()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_iterations or (time.perf_counter() - started < case_seconds and len(times) < max_iterations):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def run_case(stage1: Stage1, case: Case, case_seconds: float, flops_per_image: float, peak: float | None,
             compile_backend: str, min_iterations: int = 3) -> dict:
    cuda = stage1.device.type == "cuda"
    stage1.set(DTYPES[case.dtype], case.channels_last)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(stage1.device)
    step, undo = step_fn(stage1, case.batch_size, case.compile, compile_backend, case.reference)
    started = time.perf_counter()
    try:
        times = time_case(step, case_seconds, min_iterations)
    finally:
        undo()
    seconds = sorted(times)[len(times) // 2]
    images_per_s = case.batch_size / seconds
    achieved = images_per_s * flops_per_image / 1e12
    return {**asdict(case), "status": "ok", "iterations": len(times), "seconds_per_batch": round(seconds, 4),
            "images_per_s": round(images_per_s, 1), "wall_s": round(time.perf_counter() - started, 1),
            "peak_memory_gib": round(torch.cuda.max_memory_allocated(stage1.device) / 2**30, 2) if cuda else None,
            "achieved_tflops": round(achieved, 2), "peak_tflops": peak,
            "peak_fraction": round(achieved / peak, 3) if peak else None}


# ---- report -------------------------------------------------------------------------------------
def best_case(cases: list[dict], **match) -> dict | None:
    """The fastest measured ``compute_images`` configuration with the ``match``ing fields."""
    match = {"reference": False, **match}
    ok = [c for c in cases if c["status"] == "ok" and all(c.get(k, False) == v for k, v in match.items())]
    return max(ok, key=lambda c: c["images_per_s"]) if ok else None


def _cell(case: dict, key: str, fmt: str = "{}") -> str:
    return fmt.format(case[key]) if case.get(key) is not None else "-"


def markdown(results: dict) -> str:
    title = "# Stage 1 on one GPU" + (" (dry run: tiny models on the CPU, no GPU figure)" if results["dry_run"] else "")
    lines = [title, "",
             f"Device: {results['device']}; {results['machine']}; {results['date']}; `{results['command']}`", "",
             f"FLOPs per image (bench/flops.py): {results['flops']['gflop_per_image']['total']} GFLOP "
             f"(VAE encoder {results['flops']['gflop_per_image']['vae_encoder']}, "
             f"{results['flops']['ensemble']} UNet calls {results['flops']['gflop_per_image']['unet']}, "
             f"RN50 {results['flops']['gflop_per_image']['backbone']}); peaks: {results['peak_source']}", "",
             "| batch | dtype | channels_last | compile | images/s | s/batch | peak memory GiB | TFLOP/s | of peak "
             "| status |",
             "| ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for c in results["cases"]:
        batch = f"{c['batch_size']} (reference-style loop)" if c.get("reference") else (c["batch_size"] or "-")
        lines.append(f"| {batch} | {c['dtype']} | {'yes' if c['channels_last'] else 'no'} | "
                     f"{'yes' if c['compile'] else 'no'} | {_cell(c, 'images_per_s')} | "
                     f"{_cell(c, 'seconds_per_batch')} | {_cell(c, 'peak_memory_gib')} | "
                     f"{_cell(c, 'achieved_tflops')} | {_cell(c, 'peak_fraction', '{:.1%}')} | {c['status']} |")
    best = results.get("best")
    if best:
        lines += ["", f"Best: {best['images_per_s']} images/s ({best['dtype']}, batch {best['batch_size']}, "
                      f"channels_last {best['channels_last']}, compile {best['compile']})."]
        if results.get("batched_over_reference"):
            lines.append(f"Best / reference-style loop (batch 1, prompt encoded per image, fp32): "
                         f"{results['batched_over_reference']}x.")
    if results["notes"]:
        lines += ["", *[f"- {n}" for n in results["notes"]]]
    return "\n".join(lines) + "\n"


def write(results: dict, out: Path) -> None:
    results["best"] = best_case(results["cases"])
    reference = next((c for c in results["cases"] if c.get("reference") and c["status"] == "ok"), None)
    results["batched_over_reference"] = (round(results["best"]["images_per_s"] / reference["images_per_s"], 2)
                                         if reference and results["best"] else None)
    (out / "gpu.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "gpu.md").write_text(markdown(results))


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:160]


def parse_list(text: str, what: str, choices: tuple | None = None) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if choices is not None:
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise typer.BadParameter(f"{what} {bad or text!r}: choose from {', '.join(choices)}")
        return items
    try:
        values = [int(t) for t in items]
    except ValueError:
        raise typer.BadParameter(f"{what} {text!r}: expected comma-separated integers") from None
    if not values or min(values) < 1:
        raise typer.BadParameter(f"{what} {text!r}: expected positive integers")
    return values


@dataclass(frozen=True)
class Settings:
    """Where and how the configurations run: the GPU, or the CPU smoke mode (``--dry-run``)."""

    cases: list
    batch_sizes: list
    """The batch sizes asked for, in the order given."""
    case_seconds: float
    compile_backend: str
    size: str
    device: torch.device
    reserve: float
    """Seconds a torch.compile configuration needs on top of its time box."""
    min_iterations: int


def settings_for(batch_sizes: str, dtypes: str, case_seconds: float, no_compile: bool, dry_run: bool) -> Settings:
    """The configurations to run and their settings; on the GPU, TF32 and the cuDNN autotuner switched on."""
    batch_list = list(DRY_RUN_BATCH_SIZES) if dry_run else parse_list(batch_sizes, "--batch-sizes")
    dtype_list = list(DRY_RUN_DTYPES) if dry_run else parse_list(dtypes, "--dtypes", tuple(DTYPES))
    if dry_run:
        cases = [Case("fp32", False, False, 1, reference=True)]
        cases += [Case(dtype_list[0], True, False, b) for b in batch_list]
        cases += [Case(dtype_list[1], False, False, batch_list[0])]
        cases += [] if no_compile else [Case(dtype_list[0], True, True, None)]
        return Settings(cases, batch_list, min(case_seconds, 0.2), "eager", "tiny", torch.device("cpu"), 0.0, 1)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    cases = plan(batch_list, dtype_list, with_compile=not no_compile)
    return Settings(cases, batch_list, case_seconds, "inductor", "full", torch.device("cuda"), COMPILE_RESERVE_S, 3)


def results_header(settings: Settings, dry_run: bool, budget_seconds: float, peak_tflops_given: float | None) -> dict:
    """Everything of ``gpu.json`` but the measured configurations: device, machine, date, FLOPs, peaks."""
    device = settings.device
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU ({platform.processor() or platform.machine()})")
    peaks = {d: (peak_tflops_given if peak_tflops_given else peak_tflops(device_name, d)) for d in DTYPES}
    return {
        "device": device_name, "dry_run": dry_run,
        "machine": f"{platform.node()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                   f"CUDA {torch.version.cuda}",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv[0] else "gpu_bench.run",
        "models": ("full: SD v1.5-shaped VAE + UNet + text encoder, CLIP RN50, random weights"
                   if settings.size == "full" else "tiny SD + tiny backbone (dry run)"),
        "budget_s": budget_seconds, "case_s": settings.case_seconds, "flops": stage1_flops(settings.size),
        "peak_tflops_dense": peaks,
        "peak_source": "--peak-tflops" if peak_tflops_given else
                       ("vendor datasheet, dense (bench/gpu_bench.py PEAK_TFLOPS)" if any(peaks.values())
                        else f"unknown device {device_name!r}: pass --peak-tflops"),
        "cases": [], "notes": [],
    }


def measure_case(stage1: Stage1, case: Case, settings: Settings, results: dict) -> dict:
    """One configuration's row; out of memory, and a failed torch.compile, are its result."""
    from lare2.shared.logs import console

    flops_per_image = results["flops"]["flops_per_image"]["total"]
    peak = results["peak_tflops_dense"][case.dtype]
    try:
        return run_case(stage1, case, settings.case_seconds, flops_per_image, peak, settings.compile_backend,
                        settings.min_iterations)
    except torch.cuda.OutOfMemoryError as err:  # a measured limit of the device, recorded as such
        torch.cuda.empty_cache()
        return {**asdict(case), "status": f"out of memory: {first_line(err)}"}
    except Exception as err:  # a failed torch.compile is that configuration's result; anything else stops the run
        if not case.compile:
            raise
        console.log(f"{case}: torch.compile failed: {first_line(err)}")
        return {**asdict(case), "status": f"compile failed: {first_line(err)}"}


def measure_cases(stage1: Stage1, settings: Settings, results: dict, budget_seconds: float, out: Path) -> list[Case]:
    """Every configuration in order, until the budget cannot fit the next; returns the skipped ones."""
    from lare2.shared.logs import console

    deadline = time.perf_counter() + budget_seconds
    skipped = []
    sizes = settings.batch_sizes
    for case in settings.cases:
        if case.batch_size is None:
            best = best_case(results["cases"], dtype=case.dtype, channels_last=case.channels_last, compile=False)
            case = replace(case, batch_size=best["batch_size"] if best else sizes[len(sizes) // 2])
        need = 2 * settings.case_seconds + (settings.reserve if case.compile else 0.0)
        if time.perf_counter() + need > deadline:
            skipped.append(case)
            results["cases"].append({**asdict(case), "status": "skipped: budget"})
            continue
        console.log(f"{case}")
        results["cases"].append(measure_case(stage1, case, settings, results))
        write(results, out)
    return skipped


def run(
    out: Path = typer.Option(Path("bench/results"), "--out", help="Folder for gpu.json and gpu.md."),
    batch_sizes: str = typer.Option("16,32,64,128", help="Images per batch (the UNet sees 4x as many latents)."),
    dtypes: str = typer.Option("bf16,fp16,fp32", help="Compute dtypes, the first one measured first and most."),
    budget_seconds: float = typer.Option(240.0, help="Time for all configurations (model building not counted)."),
    case_seconds: float = typer.Option(6.0, help="Timed seconds per configuration, after one warm-up batch."),
    peak_tflops_given: float | None = typer.Option(None, "--peak-tflops", help="Dense peak TFLOP/s to divide by, "
                                                   "for every dtype (default: by device name)."),
    no_compile: bool = typer.Option(False, "--no-compile", help="Skip the torch.compile configurations."),
    dry_run: bool = typer.Option(False, "--dry-run", help="CPU smoke mode: tiny models, batches 1 and 2, fp32/bf16, "
                                 "one iteration each, compile with the eager backend."),
) -> None:
    """Measure stage 1's models on one GPU and write the figures."""
    from diffusers.utils import logging as diffusers_logging
    from lare2.shared.logs import console

    diffusers_logging.set_verbosity_error()  # casting random weights warns on every dtype change
    if not dry_run and not torch.cuda.is_available():
        console.print(f"bench/gpu_bench.py: no CUDA device (torch {torch.__version__}, "
                      f"CUDA build {torch.version.cuda}); run it on a GPU machine (bench/gpu.sh), "
                      "or pass --dry-run for the CPU smoke mode",
                      markup=False, soft_wrap=True)
        raise typer.Exit(2)
    started = time.perf_counter()
    settings = settings_for(batch_sizes, dtypes, case_seconds, no_compile, dry_run)
    out.mkdir(parents=True, exist_ok=True)
    results = results_header(settings, dry_run, budget_seconds, peak_tflops_given)
    console.log(f"{results['device']}: building {settings.size} models")
    stage1 = build_stage1(settings.size, settings.device)
    results["build_s"] = round(time.perf_counter() - started, 1)
    skipped = measure_cases(stage1, settings, results, budget_seconds, out)
    if skipped:
        results["notes"].append(f"{len(skipped)} configurations skipped: the {budget_seconds:.0f} s budget ran out "
                                "(rerun with --budget-seconds, or fewer --batch-sizes / --dtypes)")
    results["notes"].append("fp32 = float32 weights and activations with TF32 tensor-core matmuls and convolutions; "
                            "its peak is the TF32 dense peak")
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    write(results, out)
    best = results["best"]
    best_text = f"; best {best['images_per_s']} images/s ({best['dtype']}, batch {best['batch_size']})" if best else ""
    console.log(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'} in {results['elapsed_s']} s{best_text}")


def main(argv: list[str] | None = None) -> int | None:
    """Command line (exits); with ``argv`` (tests), returns the exit code instead: 0 done, 2 no CUDA device."""
    app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)
    app.command()(run)
    code = app(args=argv, prog_name="bench/gpu_bench.py", standalone_mode=argv is None)
    return code or 0


if __name__ == "__main__":
    main()
