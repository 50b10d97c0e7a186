"""How well the mean LaRE of an image tells ``ldm-a``'s own samples from photographs it never saw, on validation data.

The LaRE map (docs/method.md §1) can only help a detector if the LaRE model reconstructs its own
samples better than unseen photographs. This measures that gap directly, with no detector: the
fakes are ``ldm-a``'s validation samples (the build's seeds and classes, with a chosen DDIM sampler),
the reals are the build's crops of the **val** pool of photographs; each image's LaRE map is computed
as stage 1 computes it (same prompts, same per-sample seeds), averaged to one number, and the score is
the ROC AUC of "lower mean LaRE = fake" (1.0: every sample reconstructs better than every photograph;
0.5: no separation). The test pool is refused: settings chosen here must not have seen it.

One run samples the fakes once and then computes one row per (timestep, draws), appended to ``--out``
(JSON lines) as it is done::

    python -m lare2.minigenimage.study --zoo minigenimage/zoo --timesteps 50 200 --draws 1 4 \
        --ddim-steps 20 --eta 0 --count 120 --out /tmp/study/rows.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lare2.minigenimage.build import SPLIT_POOL, fake_plan, png_bytes, real_images
from lare2.minigenimage.models import IMAGE_SIZE, LATENT_CHANNELS
from lare2.minigenimage.photos import CLASS_NAMES
from lare2.minigenimage.sampling import DDIM_STEPS, LatentDiffusionSampler, sample, start_noise, to_uint8
from lare2.minigenimage.zoo import ZOO_DIR, log, read_record
from lare2.shared.errors import InputError, MissingInputError
from lare2.shared.seeding import sample_seed

STUDY_SPLITS = ("val",)
"""Splits the study may read: validation only (its reals are crops of the ``val`` pool)."""
LARE_MODEL = "ldm-a"
"""The generator whose samples are the fakes and whose model computes the LaRE maps."""


@dataclass(kw_only=True)
class StudyConfig:
    """One study run: a zoo, a sampler for ``ldm-a``'s fakes, and the LaRE settings to sweep."""

    zoo: str = str(ZOO_DIR)
    """Zoo folder; its ``ldm-a`` both makes the fakes and computes the LaRE maps."""
    split: str = "val"
    """Which split's seeds and photographs: only ``val`` (the test pool is never read)."""
    count: int = 120
    """Fake images, and as many real ones."""
    seed: int = 0
    """The build seed: fake seeds and classes, real crops and LaRE draws follow it as in the demo."""
    timesteps: list[int] = field(default_factory=lambda: [200])
    """LaRE timesteps to sweep (docs/method.md §1: the paper's t = 200)."""
    draws: list[int] = field(default_factory=lambda: [4])
    """LaRE noise draws per image to sweep (the paper's 4)."""
    ddim_steps: int = DDIM_STEPS
    """DDIM steps of ``ldm-a``'s sampler (the benchmark's 20)."""
    eta: float = 0.0
    """DDIM eta (the benchmark's 0: deterministic after the starting noise; 1: ancestral)."""
    batch_size: int = 16
    """Images per LaRE call."""
    out: str = ""
    """JSON lines file the rows are appended to; empty: log them only."""

    def __post_init__(self) -> None:
        if self.split not in STUDY_SPLITS:
            pool = SPLIT_POOL.get(self.split, self.split)
            raise InputError(f"split={self.split!r}: the study reads validation data only, never the {pool!r} pool "
                             f"(settings chosen on it would have seen it); use split='val'")
        if min(self.count, self.ddim_steps, self.batch_size, *self.draws) < 1 or not self.timesteps:
            raise InputError("count, ddim_steps, batch_size and every draws value must be >= 1, timesteps non-empty")
        if min(self.timesteps) < 0 or self.eta < 0:
            raise InputError("timesteps and eta must be >= 0")
        if not (Path(self.zoo) / LARE_MODEL / "unet").is_dir():
            raise MissingInputError(f"{Path(self.zoo) / LARE_MODEL}: no ldm-a in this zoo; "
                                    f"train one with `lare2 minigenimage zoo --zoo {self.zoo} --family ldm-a`")


class StudySampler(LatentDiffusionSampler):
    """``ldm-a``'s DDIM with a chosen number of steps and eta; eta > 0 draws each image's step noise from
    its own generator, so an image never depends on its batch. Steps 20, eta 0 are the benchmark's sampler."""

    def __init__(self, folder: Path, steps: int, eta: float) -> None:
        super().__init__(folder)
        self.steps, self.eta = steps, eta

    @torch.no_grad()
    def __call__(self, seeds: Sequence[int], classes: Sequence[int]) -> np.ndarray:
        if self.steps == DDIM_STEPS and self.eta == 0:
            return super().__call__(seeds, classes)
        latent_hw = IMAGE_SIZE // 8
        z_B4hw = start_noise(seeds, (LATENT_CHANNELS, latent_hw, latent_hw)) * self.scheduler.init_noise_sigma
        step_generators = [torch.Generator().manual_seed(sample_seed(s, "ddim-eta")) for s in seeds]
        text_BLD = self.text_CLD[torch.as_tensor(classes)]
        self.scheduler.set_timesteps(self.steps)
        for t in self.scheduler.timesteps:
            eps_B4hw = self.unet(z_B4hw, t, text_BLD).sample
            z_B4hw = self.scheduler.step(eps_B4hw, t, z_B4hw, eta=self.eta, generator=step_generators).prev_sample
        return to_uint8(self.vae.decode(z_B4hw / self.vae.config.scaling_factor).sample)


def separation_auc(fake_scores: np.ndarray, real_scores: np.ndarray) -> float:
    """ROC AUC of "lower mean LaRE = fake" over ``fake_scores`` [F] and ``real_scores`` [R]."""
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.ones(len(fake_scores)), np.zeros(len(real_scores))]
    return float(roc_auc_score(labels, -np.r_[fake_scores, real_scores]))


def study_images(cfg: StudyConfig) -> tuple[np.ndarray, list[str], np.ndarray, list[str]]:
    """The fakes (uint8 [N, 64, 64, 3]) and their class names, then the reals and theirs, as the build makes them."""
    seeds, classes = fake_plan(LARE_MODEL, cfg.split, cfg.count, cfg.seed)
    sampler = StudySampler(Path(cfg.zoo) / LARE_MODEL, cfg.ddim_steps, cfg.eta)
    fakes_NHW3 = sample(sampler, seeds, classes)
    reals = real_images(LARE_MODEL, cfg.split, cfg.count, cfg.seed)
    reals_NHW3 = np.stack([pixels for _, _, pixels in reals])
    return fakes_NHW3, [CLASS_NAMES[c] for c in classes], reals_NHW3, [name for _, name, _ in reals]


def mean_lare(computer, pixels_NHW3: np.ndarray, class_names: list[str], run_seed: int, batch_size: int) -> np.ndarray:
    """Mean LaRE per image [N], with stage 1's inputs, class prompts and per-sample seeds (the build's sample ids)."""
    from PIL import Image

    from lare2.extract.images import lare_input
    from lare2.minigenimage.train_ldm import PROMPT_TEMPLATE

    out = []
    for start in range(0, len(pixels_NHW3), batch_size):
        batch = pixels_NHW3[start:start + batch_size]
        images_B3HW = torch.stack([lare_input(Image.fromarray(p), IMAGE_SIZE) for p in batch])
        prompts = [PROMPT_TEMPLATE.format(name) for name in class_names[start:start + batch_size]]
        seeds = [sample_seed(run_seed, hashlib.sha256(png_bytes(p)).hexdigest()[:32]) for p in batch]
        out.append(computer(images_B3HW, prompts, seeds).mean(dim=(1, 2, 3)).numpy())  # [B, 4, h, w] -> [B]
    return np.concatenate(out)


def run_study(cfg: StudyConfig) -> list[dict]:
    """Sample, then one row per (timestep, draws): AUC, mean LaRE of fakes and reals, seconds."""
    from lare2.extract.lare import LareComputer
    from lare2.extract.models import load_latent_diffusion

    model = load_latent_diffusion(Path(cfg.zoo) / LARE_MODEL)
    num_steps = model.scheduler.config.num_train_timesteps
    if max(cfg.timesteps) >= num_steps:
        raise InputError(f"timesteps {cfg.timesteps}: each must be < {num_steps} (the model's training steps)")
    started = time.perf_counter()
    fakes, fake_classes, reals, real_classes = study_images(cfg)
    sampling_s = time.perf_counter() - started
    recipe = read_record(Path(cfg.zoo)).get(LARE_MODEL, {}).get("recipe", {}).get("unet", {})
    rows = []
    for timestep in cfg.timesteps:
        for draws in cfg.draws:
            started = time.perf_counter()
            computer = LareComputer(model, timestep=timestep, ensemble=draws)
            fake_lare = mean_lare(computer, fakes, fake_classes, cfg.seed, cfg.batch_size)
            real_lare = mean_lare(computer, reals, real_classes, cfg.seed, cfg.batch_size)
            row = {"zoo": cfg.zoo, "unet_steps": recipe.get("steps"), "unet_width": recipe.get("width"),
                   "ddim_steps": cfg.ddim_steps, "eta": cfg.eta, "timestep": timestep, "draws": draws,
                   "split": cfg.split, "count": cfg.count, "seed": cfg.seed,
                   "auc": round(separation_auc(fake_lare, real_lare), 4),
                   "mean_lare_fake": round(float(fake_lare.mean()), 4),
                   "mean_lare_real": round(float(real_lare.mean()), 4),
                   "lare_s": round(time.perf_counter() - started, 1), "sampling_s": round(sampling_s, 1)}
            log.info("t=%d draws=%d ddim=%d eta=%g: AUC %.3f (mean LaRE fake %.3f, real %.3f) %.0f s",
                     timestep, draws, cfg.ddim_steps, cfg.eta, row["auc"], row["mean_lare_fake"],
                     row["mean_lare_real"], row["lare_s"])
            if cfg.out:
                Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
                with open(cfg.out, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row, sort_keys=True) + "\n")
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    import typer

    from lare2.shared.cli_errors import user_errors

    defaults = StudyConfig.__dataclass_fields__
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default=str(ZOO_DIR))
    parser.add_argument("--split", default="val", help="only val; the test pool is refused")
    parser.add_argument("--count", type=int, default=defaults["count"].default)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timesteps", type=int, nargs="+", default=[200])
    parser.add_argument("--draws", type=int, nargs="+", default=[4])
    parser.add_argument("--ddim-steps", type=int, default=DDIM_STEPS)
    parser.add_argument("--eta", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"].default)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    try:
        with user_errors():
            run_study(StudyConfig(**vars(args)))
    except typer.Exit as err:  # a user error: its one line is printed
        raise SystemExit(err.exit_code) from None


if __name__ == "__main__":
    main()
