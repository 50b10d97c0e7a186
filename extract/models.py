"""Stable Diffusion-style latent diffusion models for the LaRE map (SPEC 2.1).

``load_latent_diffusion(spec)`` accepts
- a local diffusers folder (``vae/ unet/ text_encoder/ tokenizer/ scheduler/``, the
  ``runwayml/stable-diffusion-v1-5`` layout);
- a single-file checkpoint (``.safetensors`` / ``.ckpt``, original LDM keys), built with the SD v1
  component configs shipped in ``configs/sd-v1``; its CLIP tokenizer comes from ``tokenizer=`` or
  from a ``tokenizer/`` folder (or ``vocab.json`` + ``merges.txt``) next to the checkpoint;
- a hub id ``org/name``, only when a model hub is reachable (``HF_HUB_OFFLINE`` unset);
- ``tiny``: seeded random weights in SD's geometry (4 latent channels, x8 downsampling), for
  tests and the demo.

Whatever the scheduler subfolder names (SD v1.5 ships ``PNDMScheduler``), the model gets a
``DDPMScheduler`` from that config: only ``alphas_cumprod`` and ``add_noise`` are used.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from lare2.extract.toy_tokenizer import toy_vocab, write_toy_tokenizer
from lare2.shared.provenance import fingerprint_state_dict
from lare2.shared.weights import read_state_dict

SD_V1_CONFIGS = Path(__file__).resolve().parent / "configs" / "sd-v1"
"""Diffusers-layout component configs of SD v1 (no weights), for single-file checkpoints."""

COMPONENT_FOLDERS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
TOKENIZER_FILES = ("vocab.json", "merges.txt")
LDM_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.")
"""Key prefixes of the UNet, VAE and CLIP text encoder in an original (LDM) SD v1 checkpoint."""
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# SD's training noise schedule (SPEC 4): the tiny model uses it too, so t=200 means the same noise level.
SD_BETA_START, SD_BETA_END, SD_TRAIN_STEPS = 0.00085, 0.012, 1000
SD_VAE_SCALING_FACTOR = 0.18215


@dataclass(kw_only=True)
class LatentDiffusion:
    """The parts of a latent diffusion model that the LaRE map needs, frozen, in eval mode."""

    vae: AutoencoderKL
    """Image <-> latent autoencoder; ``vae.config.scaling_factor`` scales the posterior sample."""
    unet: UNet2DConditionModel
    """Text-conditioned noise (or velocity) predictor."""
    text_encoder: CLIPTextModel
    """CLIP text transformer; its last hidden state conditions the UNet."""
    tokenizer: CLIPTokenizer
    """CLIP BPE tokenizer; prompts are padded to ``model_max_length`` (77)."""
    scheduler: DDPMScheduler
    """Training noise schedule (``alphas_cumprod``, ``add_noise``, ``get_velocity``)."""
    source: str
    """What was loaded: a folder, a checkpoint file, a hub id, or ``tiny``."""
    fingerprint: str
    """``fingerprint_state_dict`` over the vae, unet and text encoder weights (prefixed by component)."""

    @property
    def prediction_type(self) -> str:
        """``epsilon`` or ``v_prediction``: what the UNet predicts, hence the LaRE target."""
        return self.scheduler.config.prediction_type


def load_latent_diffusion(
    spec: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    tokenizer: str | Path | None = None,
    config: str | Path = SD_V1_CONFIGS,
) -> LatentDiffusion:
    """Load a latent diffusion model from ``spec`` (see the module docstring), frozen, on ``device``.

    Single-file checkpoints only: ``tokenizer`` is a folder with ``vocab.json`` + ``merges.txt``
    (they carry no tokenizer), ``config`` a diffusers-layout folder with the component configs
    (default: the shipped SD v1 configs). Other specs ship their own and ignore both.
    """
    spec = str(spec)
    if spec == "tiny":
        parts = build_tiny_sd(seed=0)
        source = "tiny"
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            parts = _load_diffusers_folder(path)
        elif path.is_file():
            if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
                raise ValueError(
                    f"{path}: unsupported model file type {path.suffix!r}; expected a single-file checkpoint "
                    f"({', '.join(SINGLE_FILE_SUFFIXES)}) or a diffusers folder with {'/, '.join(COMPONENT_FOLDERS)}/"
                )
            parts = _load_single_file(path, tokenizer, Path(config))
        elif HUB_ID.match(spec) and not _hub_offline():
            parts = _load_from_hub(spec)
        else:
            offline = " (HF_HUB_OFFLINE is set, so hub ids are not tried)" if HUB_ID.match(spec) and _hub_offline() else ""
            raise FileNotFoundError(
                f"latent diffusion model {spec!r} not found{offline}: expected a diffusers folder with subfolders "
                f"{', '.join(f'{c}/' for c in COMPONENT_FOLDERS)}, a single-file checkpoint "
                f"({', '.join(SINGLE_FILE_SUFFIXES)}), a hub id 'org/name' when a hub is reachable, or 'tiny'"
            )
        source = str(path.resolve()) if path.exists() else spec
    return _finish(**parts, source=source, device=device, dtype=dtype)


def _finish(*, vae, unet, text_encoder, tokenizer, scheduler, source: str, device, dtype) -> LatentDiffusion:
    """Fingerprint the weights as loaded, then freeze and move the modules."""
    weights = {}
    for name, module in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder)):
        weights.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    fingerprint = fingerprint_state_dict(weights)
    for module in (vae, unet, text_encoder):
        module.to(device=device).eval().requires_grad_(False)
        if module.dtype != dtype:  # diffusers warns on every dtype-carrying .to(), even a no-op one
            module.to(dtype=dtype)
    return LatentDiffusion(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                           scheduler=scheduler, source=source, fingerprint=fingerprint)


def ddpm_scheduler_from(folder: str | Path, subfolder: str | None = "scheduler") -> DDPMScheduler:
    """A ``DDPMScheduler`` from a scheduler config, whatever scheduler class the config names."""
    config = DDPMScheduler.load_config(str(folder), subfolder=subfolder)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    return DDPMScheduler.from_config(config)


# ---- local diffusers folder ---------------------------------------------------------------------
def _load_diffusers_folder(folder: Path) -> dict:
    missing = [c for c in COMPONENT_FOLDERS if not (folder / c).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{folder}: not a diffusers model folder, missing subfolder(s) {', '.join(f'{c}/' for c in missing)} "
            f"(expected {', '.join(f'{c}/' for c in COMPONENT_FOLDERS)} as in runwayml/stable-diffusion-v1-5)"
        )
    return {
        "vae": AutoencoderKL.from_pretrained(str(folder), subfolder="vae", local_files_only=True),
        "unet": UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", local_files_only=True),
        "text_encoder": CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder", local_files_only=True),
        "tokenizer": CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer", local_files_only=True),
        "scheduler": ddpm_scheduler_from(folder),
    }


# ---- hub id -------------------------------------------------------------------------------------
def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off")


def _load_from_hub(hub_id: str) -> dict:
    """Each component from the hub (or the local hub cache), in the diffusers layout."""
    return {
        "vae": AutoencoderKL.from_pretrained(hub_id, subfolder="vae"),
        "unet": UNet2DConditionModel.from_pretrained(hub_id, subfolder="unet"),
        "text_encoder": CLIPTextModel.from_pretrained(hub_id, subfolder="text_encoder"),
        "tokenizer": CLIPTokenizer.from_pretrained(hub_id, subfolder="tokenizer"),
        "scheduler": ddpm_scheduler_from(hub_id),
    }


# ---- single-file checkpoint ---------------------------------------------------------------------
def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or ``.ckpt`` file (pickles load with ``weights_only=True``)."""
    return read_state_dict(path)


def find_tokenizer(checkpoint: Path, tokenizer: str | Path | None) -> Path:
    """The tokenizer folder of a single-file checkpoint: ``tokenizer`` or one found next to it."""
    candidates = [Path(tokenizer)] if tokenizer else [checkpoint.parent / "tokenizer", checkpoint.parent]
    for folder in candidates:
        if all((folder / f).is_file() for f in TOKENIZER_FILES):
            return folder
    where = f"in {candidates[0]}" if tokenizer else f"in {candidates[0]} or {candidates[1]}"
    raise FileNotFoundError(
        f"{checkpoint}: a single-file checkpoint carries no CLIP tokenizer and none was found {where}; "
        f"pass tokenizer=FOLDER or put a tokenizer/ folder ({' + '.join(TOKENIZER_FILES)}, e.g. from "
        f"runwayml/stable-diffusion-v1-5) next to the checkpoint"
    )


def _load_single_file(path: Path, tokenizer: str | Path | None, config_folder: Path) -> dict:
    from diffusers.loaders.single_file_utils import SingleFileComponentError, create_diffusers_clip_model_from_ldm

    tokenizer_folder = find_tokenizer(path, tokenizer)  # fail before reading gigabytes
    checkpoint = read_checkpoint(path)
    missing = [p for p in LDM_PREFIXES if not any(k.startswith(p) for k in checkpoint)]
    if missing:
        raise ValueError(
            f"{path}: not a Stable Diffusion v1 single-file checkpoint: no keys under {', '.join(missing)} "
            f"(found e.g. {sorted(checkpoint)[:3]})"
        )
    config = str(config_folder)
    try:
        unet = UNet2DConditionModel.from_single_file(checkpoint, config=config, subfolder="unet", local_files_only=True)
        vae = AutoencoderKL.from_single_file(checkpoint, config=config, subfolder="vae", local_files_only=True)
        text_encoder = create_diffusers_clip_model_from_ldm(
            CLIPTextModel, checkpoint, subfolder="text_encoder", config=config, local_files_only=True)
    except (KeyError, ValueError, RuntimeError, SingleFileComponentError) as err:
        raise ValueError(
            f"{path}: not a Stable Diffusion v1 single-file checkpoint matching {config_folder} "
            f"({err})"
        ) from err
    return {
        "vae": vae, "unet": unet, "text_encoder": text_encoder,
        "tokenizer": CLIPTokenizer.from_pretrained(str(tokenizer_folder), local_files_only=True),
        "scheduler": ddpm_scheduler_from(config_folder),
    }


# ---- tiny model ---------------------------------------------------------------------------------
def tiny_component_configs() -> dict[str, dict]:
    """Configs of the tiny SD (SPEC 4): SD's geometry, millisecond forward passes on a CPU."""
    vocab = toy_vocab()
    return {
        "vae": dict(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
            block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256, scaling_factor=SD_VAE_SCALING_FACTOR,
        ),
        "unet": dict(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8,
        ),
        "text_encoder": dict(
            vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=64,
            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        ),
        "scheduler": dict(
            num_train_timesteps=SD_TRAIN_STEPS, beta_start=SD_BETA_START, beta_end=SD_BETA_END,
            beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False,
        ),
    }


def build_tiny_sd(seed: int = 0) -> dict:
    """The tiny SD's components with weights drawn from ``seed`` (the global RNG is left untouched)."""
    configs = tiny_component_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**configs["vae"])
        unet = UNet2DConditionModel(**configs["unet"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(str(write_toy_tokenizer(tmp)))
    return {"vae": vae, "unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": DDPMScheduler(**configs["scheduler"])}


def save_tiny_sd(folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny SD as a diffusers folder (safetensors weights); loadable offline by ``load_latent_diffusion``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parts = build_tiny_sd(seed)
    for name in ("vae", "unet", "text_encoder"):
        parts[name].save_pretrained(folder / name, safe_serialization=True)
    parts["scheduler"].save_pretrained(folder / "scheduler")
    write_toy_tokenizer(folder / "tokenizer")
    model_index = json.loads((SD_V1_CONFIGS / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2))
    return folder
