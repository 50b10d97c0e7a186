"""The zoo folder: where each family's weights lie, the record of their fingerprints, training data.

Layout of ``minigenimage/zoo/``::

    ldm-a/        diffusers Stable Diffusion folder (vae, unet, text_encoder, tokenizer, scheduler)
    ldm-b/        same layout; copies of ldm-a's vae, text_encoder, tokenizer; its own unet
    pixel-ddpm/   unet/ (diffusers UNet2DModel, class-conditional) + scheduler/
    gan/          generator.safetensors + config.json
    zoo.json      per weight file: sha256 of the file, fingerprint of the tensors, the recipe that made it
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from lare2.minigenimage.photos import training_crops
from lare2.shared.errors import InputError
from lare2.shared.logs import get_logger

ZOO_DIR = Path(__file__).resolve().parent / "zoo"
GENERATORS = ("ldm-a", "ldm-b", "pixel-ddpm", "gan")
"""Generator names, as the benchmark's folders name them."""
RECORD_FILE = "zoo.json"

log = get_logger(__name__)


def check_generator(name: str) -> str:
    if name not in GENERATORS:
        raise InputError(f"generator={name!r}: choose from {GENERATORS}")
    return name


def training_images(count_per_photo: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops of the train photographs as float [N, 3, size, size] in [-1, 1], and class indices [N]."""
    crops_NHW3, classes_N = training_crops(count_per_photo, size, seed)
    images_N3HW = torch.from_numpy(crops_NHW3).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return images_N3HW.contiguous(), torch.from_numpy(classes_N)


def batches(count: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """``steps`` batches of random indices in [0, count), drawn from ``generator``."""
    for _ in range(steps):
        yield torch.randint(0, count, (batch_size,), generator=generator)


class StepLogger:
    """Logs the mean loss every ``every`` steps with the rate and time left."""

    def __init__(self, name: str, steps: int, every: int = 50) -> None:
        self.name, self.steps, self.every = name, steps, every
        self.start, self.losses = time.perf_counter(), []

    def __call__(self, step: int, loss: float) -> None:
        self.losses.append(loss)
        done = step + 1
        if done % self.every == 0 or done == self.steps:
            elapsed = time.perf_counter() - self.start
            left = elapsed / done * (self.steps - done)
            log.info("%s step %d/%d loss %.4f (%.2f s/step, %.0f s left)",
                     self.name, done, self.steps, float(np.mean(self.losses[-self.every:])), elapsed / done, left)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def store_in_half_precision(path: Path) -> None:
    """Rewrite a float32 safetensors file in float16: half the bytes in git; models upcast on load."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    if all(t.dtype != torch.float32 for t in state.values()):
        return
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file({k: t.half() if t.dtype == torch.float32 else t for k, t in state.items()}, str(path), metadata=metadata)


def record_weights(zoo_dir: Path, family: str, recipe: dict) -> None:
    """Store every ``*.safetensors`` under ``zoo_dir/family`` in float16 and record its fingerprint in ``zoo.json``."""
    from safetensors.torch import load_file

    from lare2.shared.provenance import fingerprint_state_dict, package_versions

    record_path = zoo_dir / RECORD_FILE
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    files = {}
    for path in sorted((zoo_dir / family).rglob("*.safetensors")):
        store_in_half_precision(path)
        files[path.relative_to(zoo_dir).as_posix()] = {
            "sha256": file_sha256(path),
            "fingerprint": fingerprint_state_dict(load_file(str(path))),
            "bytes": path.stat().st_size,
        }
    recipes = record.get(family, {}).get("recipe", {}) | recipe  # a family may be made by two scripts (vae + unet)
    record[family] = {"files": files, "recipe": dict(sorted(recipes.items())),
                      "versions": package_versions(("torch", "diffusers", "transformers"))}
    record_path.write_text(json.dumps(dict(sorted(record.items())), indent=2) + "\n")
    log.info("recorded %d weight files of %s in %s", len(files), family, record_path)


def read_record(zoo_dir: Path = ZOO_DIR) -> dict:
    path = zoo_dir / RECORD_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no zoo record; train the zoo first (lare2 minigenimage zoo)")
    return json.loads(path.read_text())


@dataclass(kw_only=True)
class ZooTrainConfig:
    """What every recipe of the zoo sets; each family's config adds its own fields and defaults."""

    zoo: str = str(ZOO_DIR)
    """Zoo folder the weights are written to."""
    seed: int = 0
    """Seeds the crops, the initial weights, the batches and the noise."""
    crops_per_photo: int = 20
    """Training crops per photograph of the ``zoo`` pool (73 photographs: 1,460 crops)."""
    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 32
    lr: float = 1e-3

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.crops_per_photo) < 1:
            raise InputError("steps, batch_size and crops_per_photo must be >= 1")


def optimizer_step(loss: torch.Tensor, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   schedule: torch.optim.lr_scheduler.LRScheduler, max_grad_norm: float = 1.0) -> None:
    """Backward, clip the gradient norm, step the optimizer and its schedule."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    schedule.step()


def recipe_from_args(config_type: type[ZooTrainConfig], description: str, argv: list[str] | None) -> ZooTrainConfig:
    """The command line of a family's training script: ``--zoo``, ``--steps``, ``--seed`` (defaults: the recipe's)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--zoo", default=str(ZOO_DIR))
    parser.add_argument("--steps", type=int, default=config_type.steps)
    parser.add_argument("--seed", type=int, default=config_type.seed)
    args = parser.parse_args(argv)
    return config_type(zoo=args.zoo, steps=args.steps, seed=args.seed)
