"""Stage-1 cost ratios, each measured side by side in one run (``bench.timing.alternate``, medians):

- ``measure_dire_vs_lare``: a DIRE-style feature (``bench.dire``) against the LaRE map, same models and images;
- ``measure_batched_vs_reference``: ``LareComputer`` batches (prompt embeddings cached) against a
  reference-style loop (one image at a time, its prompt encoded each time, float32);
- ``measure_pipeline``: ``run_extraction`` end to end (the real job: its cache writes overlap the model in
  ``lare2.extract.block_writer``'s thread) against the models alone (``compute_images`` on images already
  decoded), same batches.

Shapes: B images, E ensemble draws, L tokens (77), D text width, h = w = image size / 8.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from lare2.extract.lare import LareComputer, draw_sample_noise
from lare2.extract.models import LatentDiffusion
from torch import Tensor

from bench.dire import DDIM_STEPS, ddim_scheduler, dire_maps
from bench.timing import alternate, median, rounded


@dataclass
class Inputs:
    """Decoded photo crops with their prompts and seeds, as an extraction run would see them."""

    lare_images: Tensor
    """[N, 3, 256, 256] in [-1, 1]."""
    backbone_images: Tensor
    """[N, 3, 224, 224], ImageNet-normalised."""
    prompts: list[str]
    seeds: list[int]

    def __len__(self) -> int:
        return len(self.prompts)

    def batches(self, batch_size: int) -> list[slice]:
        return [slice(i, min(i + batch_size, len(self))) for i in range(0, len(self), batch_size)]


def decoded_inputs(manifest: Path, count: int | None = None) -> Inputs:
    """The first ``count`` rows of ``manifest`` decoded as ``run_extraction`` decodes them (``debug`` preset
    settings)."""
    from lare2.extract.loader import ManifestImages
    from lare2.extract.plan import selected_rows
    from lare2.shared.config import debug
    from lare2.shared.seeding import sample_seed

    cfg = debug(manifest=str(manifest), out="-", device="cpu")
    rows, root = selected_rows(cfg)
    n = len(rows["path"]) if count is None else min(count, len(rows["path"]))
    dataset = ManifestImages(root, rows["path"][:n], cfg.image_size, cfg.max_image_pixels)
    samples = [dataset[i] for i in range(n)]
    bad = [s.error for s in samples if s.error]
    if bad:
        raise ValueError(f"{manifest}: {len(bad)} bench images failed to decode, e.g. {bad[0]}")
    return Inputs(torch.stack([s.lare_image for s in samples]), torch.stack([s.backbone_image for s in samples]),
                  [cfg.prompt_for(c) for c in rows["class_name"][:n]],
                  [sample_seed(cfg.seed, i) for i in rows["sample_id"][:n]])


class CallCounter:
    """Counts a module's forward calls while active (a forward pre-hook)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module, self.calls = module, 0

    def __enter__(self) -> CallCounter:
        self.handle = self.module.register_forward_pre_hook(lambda *_: setattr(self, "calls", self.calls + 1))
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


# ---- a. LaRE against a DIRE-style feature ---------------------------------------------------------
@torch.no_grad()
def measure_dire_vs_lare(model: LatentDiffusion, inputs: Inputs, *, batch_size: int, repeats: int,
                         steps: int = DDIM_STEPS, ensemble: int = 4, per_round: bool = False,
                         warm_up: bool = True) -> dict:
    """Seconds per image of the LaRE map and of the DIRE-style feature, alternated.

    ``per_round``: round r times batch r only (for slow models, each batch timed once); else every
    round times all of ``inputs``. ``warm_up``: one untimed batch of each first (the last batch
    when ``per_round``, so that the timed ones stay unseen); skip it when the models already ran.
    """
    lare = LareComputer(model, timestep=200, ensemble=ensemble)
    scheduler = ddim_scheduler(model, steps)
    batches = inputs.batches(batch_size)
    text_NLD = lare.encode_prompts(inputs.prompts)  # both features condition on the same cached embeddings
    calls = {"lare": [0, 0], "dire": [0, 0]}  # UNet calls, batches

    def run(name: str, b: slice) -> None:
        with CallCounter(model.unet) as counter:
            if name == "lare":
                lare(inputs.lare_images[b], inputs.prompts[b], inputs.seeds[b])
            else:
                dire_maps(model, scheduler, inputs.lare_images[b], text_NLD[b])
        calls[name][0] += counter.calls
        calls[name][1] += 1

    if per_round and len(batches) < repeats + warm_up:
        raise ValueError(f"per_round needs {repeats + warm_up} batches, got {len(batches)}")
    if warm_up:
        for name in calls:
            run(name, batches[-1] if per_round else batches[0])
    if per_round:
        seconds = alternate({name: lambda r, n=name: run(n, batches[r]) for name in calls}, repeats)
        images = [batches[r].stop - batches[r].start for r in range(repeats)]
    else:
        seconds = alternate({name: lambda r, n=name: [run(n, b) for b in batches] for name in calls}, repeats)
        images = [len(inputs)] * repeats
    per_image = {k: [s / n for s, n in zip(v, images)] for k, v in seconds.items()}
    ratios = [d / lo for d, lo in zip(per_image["dire"], per_image["lare"])]
    return {"images_per_round": images, "batch_size": batch_size, "repeats": repeats, "ddim_steps": steps,
            "ensemble": ensemble, "unet_calls_per_batch": {k: c / n for k, (c, n) in calls.items()},
            "lare_seconds_per_image": round(median(per_image["lare"]), 4),
            "dire_seconds_per_image": round(median(per_image["dire"]), 4),
            "dire_over_lare": round(median(ratios), 2), "ratios": rounded(ratios, 2),
            "seconds": {k: rounded(v) for k, v in seconds.items()}}


# ---- b. batched extraction against a reference-style loop -----------------------------------------
@torch.no_grad()
def reference_lare_map(model: LatentDiffusion, image_3HW: Tensor, prompt: str, seed: int, *, timestep: int = 200,
                       ensemble: int = 4) -> Tensor:
    """One image the way a reference-style extractor computes it: its prompt tokenized and encoded for
    it, batch 1, in the models' dtype (float32 for the reference) on ``image_3HW``'s device; the same
    draws as ``LareComputer`` (``draw_sample_noise``). -> [4, h, w], float32."""
    vae, unet, scheduler, tokenizer = model.vae, model.unet, model.scheduler, model.tokenizer
    device, dtype = image_3HW.device, vae.dtype
    ids_1L = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt").input_ids.to(device)
    text_ELD = model.text_encoder(ids_1L)[0].expand(ensemble, -1, -1)
    moments_12Chw = vae.encode(image_3HW[None].to(dtype)).latent_dist.parameters.float()
    mean_1Chw, logvar_1Chw = moments_12Chw.chunk(2, dim=1)
    posterior_1Chw, noise_EChw = (d.to(device) for d in draw_sample_noise(seed, tuple(mean_1Chw.shape[1:]), ensemble))
    std_1Chw = torch.exp(0.5 * logvar_1Chw.clamp(-30.0, 20.0))
    z0_1Chw = (mean_1Chw + std_1Chw * posterior_1Chw) * vae.config.scaling_factor
    t_E = torch.full((ensemble,), timestep, dtype=torch.long, device=device)
    zt_EChw = scheduler.add_noise(z0_1Chw.expand(ensemble, -1, -1, -1), noise_EChw, t_E)
    prediction_EChw = unet(zt_EChw.to(dtype), t_E, encoder_hidden_states=text_ELD).sample.float()
    return (prediction_EChw - noise_EChw).square().mean(dim=0)


@torch.no_grad()
def measure_batched_vs_reference(model: LatentDiffusion, inputs: Inputs, *, batch_size: int, repeats: int) -> dict:
    """Images/s of ``LareComputer`` in batches of ``batch_size`` (its prompt cache warm) and of the
    reference-style loop, alternated; and the largest difference between their maps."""
    if model.prediction_type != "epsilon":
        raise ValueError(f"prediction_type={model.prediction_type!r}: the reference-style loop supports ('epsilon',)")
    lare = LareComputer(model, timestep=200, ensemble=4)
    batches = inputs.batches(batch_size)

    def batched(_: int) -> Tensor:
        return torch.cat([lare(inputs.lare_images[b], inputs.prompts[b], inputs.seeds[b]) for b in batches])

    def reference(_: int) -> Tensor:
        return torch.stack([reference_lare_map(model, inputs.lare_images[i], inputs.prompts[i], inputs.seeds[i])
                            for i in range(len(inputs))])

    difference = float((batched(0) - reference(0)).abs().max())  # also the warm-up of both
    seconds = alternate({"batched": batched, "reference": reference}, repeats)
    rates = {k: [len(inputs) / s for s in v] for k, v in seconds.items()}
    ratios = [b / r for b, r in zip(rates["batched"], rates["reference"])]
    return {"images": len(inputs), "batch_size": batch_size, "repeats": repeats,
            "distinct_prompts": len(set(inputs.prompts)),
            "batched_images_per_s": round(median(rates["batched"]), 2),
            "reference_images_per_s": round(median(rates["reference"]), 2),
            "batched_over_reference": round(median(ratios), 2), "ratios": rounded(ratios, 2),
            "max_abs_map_difference": difference, "seconds": {k: rounded(v) for k, v in seconds.items()}}


# ---- c. end to end against the models alone --------------------------------------------------------
def measure_pipeline(manifest: Path, work: Path, *, repeats: int, keep: Path | None = None, **settings) -> dict:
    """``run_extraction`` (decode, models, cache writes in the writer thread; ``debug`` preset + ``settings``) against
    ``compute_images`` on the same images already decoded, in the same batches, alternated.

    Each end-to-end round extracts into a fresh folder (not timed: model loading, cache creation);
    the first one is moved to ``keep`` when given, the others are deleted.
    """
    from lare2.extract.block_writer import WRITER_DEPTH
    from lare2.extract.features import compute_images, load_models
    from lare2.extract.loader import ManifestImages, collate_decoded
    from lare2.extract.plan import selected_rows
    from lare2.extract.run import run_extraction
    from lare2.shared.config import debug
    from lare2.shared.seeding import sample_seed

    cfg = debug(manifest=str(manifest), out=str(work / "models-only"), device="cpu", **settings)
    device = torch.device("cpu")
    models = load_models(cfg, device)
    rows, root = selected_rows(cfg)
    dataset = ManifestImages(root, rows["path"], cfg.image_size, cfg.max_image_pixels)
    samples = [dataset[i] for i in range(len(dataset))]
    prompts = [cfg.prompt_for(c) for c in rows["class_name"]]
    seeds = [sample_seed(cfg.seed, i) for i in rows["sample_id"]]
    chunk, size = cfg.chunk_samples, cfg.batch_size
    batches = [slice(s, min(s + size, b + chunk, len(samples)))  # run_extraction's batches: never across a block
               for b in range(0, len(samples), chunk) for s in range(b, min(b + chunk, len(samples)), size)]
    summaries = []

    def models_only(_: int) -> None:
        for b in batches:
            batch = collate_decoded(samples[b])
            compute_images(models, batch.lare_images, batch.backbone_images, prompts[b], seeds[b], device)

    def end_to_end(r: int) -> None:
        out = work / f"end-to-end-{r}"
        summaries.append(run_extraction(debug(manifest=str(manifest), out=str(out), device="cpu", **settings)))
        if r == 0 and keep is not None:
            shutil.move(out, keep)
        else:
            shutil.rmtree(out)

    models_only(0)  # warm-up: first calls allocate
    seconds = alternate({"end_to_end": end_to_end, "models_only": models_only}, repeats)
    n = len(samples)
    # end to end: the run's own clock (from the first batch to the last cache write), not model loading
    e2e_rates = [s.computed / s.seconds for s in summaries]
    models_rates = [n / s for s in seconds["models_only"]]
    ratios = [e / m for e, m in zip(e2e_rates, models_rates)]
    best = min(range(repeats), key=lambda r: abs(e2e_rates[r] - median(e2e_rates)))
    return {"images": n, "repeats": repeats, "batch_size": size,
            "end_to_end_images_per_s": round(median(e2e_rates), 2),
            "models_only_images_per_s": round(median(models_rates), 2),
            "end_to_end_over_models_only": round(median(ratios), 3), "ratios": rounded(ratios, 3),
            "end_to_end_seconds": rounded([s.seconds for s in summaries], 2),
            "models_only_seconds": rounded(seconds["models_only"], 2),
            "median_run": {"images": summaries[best].computed, "seconds": round(summaries[best].seconds, 2)},
            "cache_writer": f"run_extraction's BlockWriter thread, at most {WRITER_DEPTH} blocks waiting",
            "settings": {k: getattr(cfg, k) for k in ("sd", "clip", "image_size", "ensemble", "batch_size",
                                                      "chunk_samples", "num_workers")}}
