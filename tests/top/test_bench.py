"""The benchmark code (bench/): the DIRE-style DDIM pair, the reference-style loop, FLOP counts,
the host-side and cache-writer figures, bench.json's carried-over sections and gpu_bench's CPU smoke mode."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lare2.extract.lare import LareComputer
from lare2.extract.models import LatentDiffusion, load_latent_diffusion

from bench import gpu_bench
from bench.dire import ddim_invert, ddim_reconstruct, ddim_scheduler, dire_maps
from bench.flops import stage1_flops
from bench.host import imagenet_like_jpegs, measure_worker, workers_needed
from bench.stage1 import CallCounter, Inputs, measure_dire_vs_lare, reference_lare_map
from bench.timing import alternate


@pytest.fixture(scope="module")
def tiny() -> LatentDiffusion:
    return load_latent_diffusion("tiny")


class ConstantUNet(torch.nn.Module):
    """A noise predictor that ignores its input: DDIM inversion is then exactly undone by reconstruction."""

    def __init__(self, eps_1Chw: torch.Tensor) -> None:
        super().__init__()
        self.eps_1Chw = eps_1Chw

    def forward(self, z_BChw, t_B, encoder_hidden_states):
        return SimpleNamespace(sample=self.eps_1Chw.expand_as(z_BChw).clone())


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 256, 256, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---- DIRE-style path --------------------------------------------------------------------------------
def test_inversion_then_reconstruction_returns_the_start_with_a_constant_predictor(tiny) -> None:
    generator = torch.Generator().manual_seed(0)
    eps_1Chw = torch.randn(1, 4, 32, 32, generator=generator)
    model = dataclasses.replace(tiny, unet=ConstantUNet(eps_1Chw))
    scheduler = ddim_scheduler(model, 20)
    z0_BChw = torch.randn(2, 4, 32, 32, generator=generator)
    text_BLD = torch.zeros(2, 77, 64)
    with CallCounter(model.unet) as calls:
        zT_BChw = ddim_invert(model, scheduler, z0_BChw, text_BLD)
        assert calls.calls == 20
        z0_rec_BChw = ddim_reconstruct(model, scheduler, zT_BChw, text_BLD)
    assert calls.calls == 40
    # the inversion climbs to the top timestep: with a constant eps, z_T has its closed form
    a_top, a_start = scheduler.alphas_cumprod[int(scheduler.timesteps[0])], scheduler.final_alpha_cumprod
    assert int(scheduler.timesteps[0]) >= 900
    x0_BChw = (z0_BChw - (1 - a_start).sqrt() * eps_1Chw) / a_start.sqrt()
    torch.testing.assert_close(zT_BChw, a_top.sqrt() * x0_BChw + (1 - a_top).sqrt() * eps_1Chw, atol=1e-5, rtol=1e-5)
    assert (zT_BChw - z0_BChw).abs().mean() > 0.5  # far from the start...
    torch.testing.assert_close(z0_rec_BChw, z0_BChw, atol=1e-4, rtol=1e-4)  # ...and back


def test_dire_maps_of_the_tiny_model(tiny) -> None:
    scheduler = ddim_scheduler(tiny, 2)
    text_BLD = LareComputer(tiny).encode_prompts(["a photo of a dog"] * 2)
    with CallCounter(tiny.unet) as calls:
        maps_B3HW = dire_maps(tiny, scheduler, images(2), text_BLD)
    assert calls.calls == 4
    assert maps_B3HW.shape == (2, 3, 256, 256)
    assert torch.isfinite(maps_B3HW).all() and maps_B3HW.min() >= 0 and maps_B3HW.max() > 0


def test_dire_vs_lare_measurement_counts_the_unet_calls(tiny) -> None:
    inputs = Inputs(images(2), torch.zeros(2, 3, 224, 224), ["a photo of a cat", "a photo of a dog"], [1, 2])
    result = measure_dire_vs_lare(tiny, inputs, batch_size=1, repeats=2, steps=3, per_round=True, warm_up=False)
    assert result["unet_calls_per_batch"] == {"lare": 1.0, "dire": 6.0}
    assert result["images_per_round"] == [1, 1] and len(result["ratios"]) == 2
    assert result["dire_over_lare"] > 0


def test_reference_style_loop_gives_the_batched_maps(tiny) -> None:
    prompts, seeds = ["a photo of a cat", "a photo of a dog"], [3, 4]
    batched_B4hw = LareComputer(tiny, timestep=200, ensemble=4)(images(2), prompts, seeds)
    for i in range(2):
        torch.testing.assert_close(reference_lare_map(tiny, images(2)[i], prompts[i], seeds[i]), batched_B4hw[i],
                                   atol=1e-5, rtol=1e-5)


def test_alternate_reverses_the_order_every_other_round() -> None:
    order = []
    seconds = alternate({"a": lambda r: order.append(("a", r)), "b": lambda r: order.append(("b", r))}, 3)
    assert order == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2)]
    assert [len(v) for v in seconds.values()] == [3, 3]


# ---- FLOPs --------------------------------------------------------------------------------------------
def test_flop_counts_are_positive_and_the_unet_scales_with_the_ensemble() -> None:
    two, four = stage1_flops("tiny", ensemble=2), stage1_flops("tiny", ensemble=4)
    assert all(v > 0 for v in four["flops_per_image"].values())
    assert four["flops_per_image"]["unet"] == 2 * two["flops_per_image"]["unet"]
    assert four["flops_per_image"]["unet"] == 4 * four["flops_per_image"]["unet_one_call"]
    assert four["flops_per_image"]["vae_encoder"] == two["flops_per_image"]["vae_encoder"]
    parts = four["flops_per_image"]
    assert parts["total"] == parts["vae_encoder"] + parts["unet"] + parts["backbone"]


@pytest.mark.slow
def test_full_size_flop_counts() -> None:
    flops = stage1_flops("full")
    g = flops["gflop_per_image"]
    assert 150 < flops["gflop_other"]["unet_one_call"] < 220  # SD v1.5 UNet at a 32 x 32 latent
    assert 200 < g["vae_encoder"] < 350 and 8 < g["backbone"] < 15  # RN50 at 224: ~5.4 GMAC + attention pool
    assert 7 < flops["gflop_other"]["dire_style_over_lare"] < 10


# ---- host side ------------------------------------------------------------------------------------------
def test_worker_figures_and_workers_per_gpu() -> None:
    files = imagenet_like_jpegs(3)
    assert files[0][:2] == b"\xff\xd8" and len(set(files)) == 3
    worker = measure_worker(files, repeats=1)
    assert set(worker["images_per_s"]) == {"decode", "decode_lare_input", "decode_backbone_input", "decode_both"}
    assert all(v > 0 for v in worker["images_per_s"].values())
    needed = workers_needed({"images_per_s": {"decode_both": 150.0}}, {"samples_per_s": 1000.0}, 400.0, "goal")
    assert needed["loader_workers"] == 3 and needed["cache_writers"] == 1
    assert needed["cache_write_share_of_one_process"] == 0.4


def test_gpu_rate_reads_a_real_gpu_run_only(tmp_path) -> None:
    from bench.run_bench import H200_GOAL_IMAGES_PER_S, gpu_rate

    path = tmp_path / "gpu.json"
    assert gpu_rate(path)[0] == H200_GOAL_IMAGES_PER_S
    best = {"images_per_s": 512.0, "dtype": "bf16", "batch_size": 64}
    path.write_text(json.dumps({"dry_run": True, "best": best, "device": "CPU", "date": "-"}))
    assert gpu_rate(path)[0] == H200_GOAL_IMAGES_PER_S
    path.write_text(json.dumps({"dry_run": False, "best": best, "device": "NVIDIA H200", "date": "-"}))
    rate, source = gpu_rate(path)
    assert rate == 512.0 and "NVIDIA H200" in source


# ---- gpu_bench --------------------------------------------------------------------------------------------
def test_peak_table_and_plan() -> None:
    assert gpu_bench.peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.5
    assert gpu_bench.peak_tflops("NVIDIA H100 80GB HBM3", "fp16") == 989.5
    assert gpu_bench.peak_tflops("NVIDIA L40S", "fp32") == 183.2
    assert gpu_bench.peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 156.0
    assert gpu_bench.peak_tflops("NVIDIA H200", "bf16") == 989.5
    assert gpu_bench.peak_tflops("Some Accelerator", "bf16") is None
    cases = gpu_bench.plan([16, 32], ["bf16", "fp16"])
    assert cases[0] == gpu_bench.Case("fp32", False, False, 1, reference=True)
    assert cases[1:3] == [gpu_bench.Case("bf16", True, False, 16), gpu_bench.Case("bf16", True, False, 32)]
    assert [c for c in cases if c.compile] == [gpu_bench.Case("bf16", True, True, None),
                                               gpu_bench.Case("fp16", True, True, None)]
    assert len(cases) == 1 + 2 + 2 + 1 + 2 + 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_gpu_bench_refuses_a_machine_without_cuda(tmp_path, capsys) -> None:
    assert gpu_bench.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device" in err and "--dry-run" in err
    assert not (tmp_path / "gpu.json").exists()


def _check_smoke(out: Path, compiled: bool) -> dict:
    results = json.loads((out / "gpu.json").read_text())
    assert {"device", "dry_run", "machine", "date", "command", "flops", "peak_tflops_dense", "cases", "best",
            "batched_over_reference", "notes", "elapsed_s"} <= set(results)
    assert results["dry_run"] is True and results["flops"]["size"] == "tiny"
    ok = [c for c in results["cases"] if c["status"] == "ok"]
    assert len(ok) == len(results["cases"]) == 4 + compiled
    assert ok[0]["reference"] is True and ok[0]["batch_size"] == 1 and results["batched_over_reference"] > 0
    for case in ok:
        assert {"batch_size", "dtype", "channels_last", "compile", "images_per_s", "seconds_per_batch",
                "peak_memory_gib", "achieved_tflops", "peak_fraction"} <= set(case)
        assert case["images_per_s"] > 0 and case["peak_fraction"] > 0 and case["peak_memory_gib"] is None
    assert {c["dtype"] for c in ok} == {"fp32", "bf16"} and {c["channels_last"] for c in ok} == {True, False}
    assert results["best"]["images_per_s"] == max(c["images_per_s"] for c in ok if not c["reference"])
    assert "| batch | dtype |" in (out / "gpu.md").read_text()
    return results


def test_gpu_bench_smoke_mode_on_cpu(tmp_path) -> None:
    assert gpu_bench.main(["--dry-run", "--no-compile", "--peak-tflops", "1", "--out", str(tmp_path)]) == 0
    _check_smoke(tmp_path, compiled=False)


@pytest.mark.slow
def test_gpu_bench_smoke_mode_with_torch_compile(tmp_path) -> None:
    assert gpu_bench.main(["--dry-run", "--peak-tflops", "1", "--out", str(tmp_path)]) == 0
    results = _check_smoke(tmp_path, compiled=True)
    last = results["cases"][-1]
    assert last["compile"] is True and last["batch_size"] in gpu_bench.DRY_RUN_BATCH_SIZES


@pytest.mark.slow
def test_pipeline_measurement_runs_extraction_and_the_models_alone(tmp_path) -> None:
    from bench.run_bench import write_photo_tree
    from bench.stage1 import measure_pipeline

    manifest = write_photo_tree(tmp_path / "data", 8)
    result = measure_pipeline(manifest, tmp_path / "work", repeats=1, keep=tmp_path / "kept", chunk_samples=8)
    assert result["images"] == 8 and result["median_run"]["images"] == 8
    assert 0 < result["end_to_end_over_models_only"] and result["settings"]["batch_size"] == 4
    assert (tmp_path / "kept" / "zarr.json").exists()
    assert not any(p.name.startswith("end-to-end") for p in (tmp_path / "work").iterdir())


# ---- bench.json: sections a run skips are carried over, dated -------------------------------------------
def test_skipped_sections_are_carried_over_with_the_run_that_measured_them() -> None:
    from bench.record import carry_forward
    from bench.report import markdown
    from bench.run_bench import SKIPPABLE_SECTIONS

    previous = {"machine": "m", "date": "2026-12-01T14:30:50+00:00", "commit": "0123456789abcdef+dirty",
                "command": "python bench/run_bench.py --dire-full-size-images 2", "load_average_at_start": [4.5],
                "full_size": {"ensemble": 4, "lare_seconds_per_image": 14.8, "backbone_seconds_per_image": 0.23},
                "dire_vs_lare": {"tiny": {"dire_over_lare": 8.0},
                                 "full_size": {"dire_over_lare": 10.2, "ddim_steps": 20, "batch_size": 1,
                                               "dire_seconds_per_image": 163.8, "lare_seconds_per_image": 15.9,
                                               "repeats": 2}},
                "creation": {"samples": 10, "measured": {"date": "2026-11-30T09:00:00+00:00", "commit": "feed"}}}
    results = {"machine": "m", "date": "2026-12-05T06:00:00+00:00", "commit": "fedcba9876543210",
               "dire_vs_lare": {"tiny": {"dire_over_lare": 8.4}}, "creation": {"samples": 20}}
    merged = carry_forward(previous, results, SKIPPABLE_SECTIONS)
    assert merged["dire_vs_lare"]["tiny"] == {"dire_over_lare": 8.4}  # remeasured: the new figure, unmarked
    assert merged["creation"] == {"samples": 20}
    carried = merged["dire_vs_lare"]["full_size"]
    assert carried["dire_over_lare"] == 10.2 and carried["measured"]["date"] == previous["date"]
    assert carried["measured"]["commit"] == previous["commit"]
    assert "--dire-full-size-images" in carried["measured"]["command"]
    assert merged["full_size"]["measured"]["date"] == previous["date"]
    assert "reader" not in merged and "full_size" not in results["dire_vs_lare"]  # nothing invented, input kept
    # carried again by a third run: still dated by the run that measured it
    again = carry_forward(merged, {"date": "2026-12-06", "creation": {"samples": 30}}, SKIPPABLE_SECTIONS)
    assert again["full_size"]["measured"]["date"] == previous["date"]
    assert "measured" not in again["creation"]
    table = markdown({"machine": "m", "full_size": merged["full_size"], "dire_vs_lare": {"full_size": carried}})
    assert "10.2x" in table and "measured 2026-12-01, commit 0123456789 + changes" in table
    assert "14.8 s/img; measured 2026-12-01" in table


@pytest.mark.slow
def test_writer_figures_and_their_rows(tmp_path) -> None:
    from bench.report import markdown
    from bench.writer import measure_writer

    writer = measure_writer(tmp_path, blocks=1, repeats=1, model_images_per_s=1000.0)
    for figures in (writer["writer_samples_per_s"], writer["extraction_samples_per_s"]):
        assert set(figures) == {"inline", "thread", "process"} and all(v > 0 for v in figures.values())
    assert not any(tmp_path.iterdir())  # every timing's cache removed
    table = markdown({"machine": "m", "cache_writer": writer})
    assert f"{writer['writer_samples_per_s']['thread']} /" in table and "model at 1000 img/s" in table
