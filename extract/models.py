"""Stable Diffusion-style latent diffusion models for the LaRE map (docs/method.md §1.1).

``load_latent_diffusion(spec)`` accepts
- a local diffusers folder (``vae/ unet/ text_encoder/ tokenizer/ scheduler/``, the
  ``runwayml/stable-diffusion-v1-5`` layout);
- a single-file checkpoint (``.safetensors`` / ``.ckpt``, original LDM keys), built with the SD v1
  component configs shipped in ``configs/sd-v1``; its CLIP tokenizer comes from ``tokenizer=`` or
  from a ``tokenizer/`` folder (or ``vocab.json`` + ``merges.txt``) next to the checkpoint;
- a hub id ``org/name``, only when it does not look like a path (no leading ``.``, ``/`` or ``~``,
  a single slash, no weight-file suffix), is not on disk, and a model hub is reachable
  (``HF_HUB_OFFLINE`` unset and the endpoint answers within a few seconds);
- ``tiny``: seeded random weights in SD's geometry (``lare2.extract.tiny_models``), for tests, the
  debug preset and benchmarks.

Anything else raises a one-line ``ModelSourceError`` naming the argument, what was tried and the
remedy. diffusers and transformers are imported on first load, so the errors (and the constants)
are cheap to import.

Whatever the scheduler subfolder names (SD v1.5 ships ``PNDMScheduler``), the model gets a
``DDPMScheduler`` from that config: only ``alphas_cumprod`` and ``add_noise`` are used.
"""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lare2.shared.errors import UserError
from lare2.shared.provenance import fingerprint_state_dict
from lare2.shared.weights import read_state_dict

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

SD_V1_CONFIGS = Path(__file__).resolve().parent / "configs" / "sd-v1"
"""Diffusers-layout component configs of SD v1 (no weights), for single-file checkpoints."""

COMPONENT_FOLDERS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
TOKENIZER_FILES = ("vocab.json", "merges.txt")
LDM_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.")
"""Key prefixes of the UNet, VAE and CLIP text encoder in an original (LDM) SD v1 checkpoint."""
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
"""``org/name``: one slash, no leading ``.``/``/``/``~``, no backslash or drive letter."""
WEIGHT_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
"""A spec ending in one of these names a file, never a hub id."""
HUB_PROBE_TIMEOUT_S = 3.0
SD_REMEDY = (f"pass a diffusers folder ({' '.join(f'{c}/' for c in COMPONENT_FOLDERS)}), "
             f"a {'/'.join(SINGLE_FILE_SUFFIXES)} file, or 'tiny'")

# SD's training noise schedule (docs/method.md §1.1): the tiny model uses it too, so t=200 means the same noise level.
SD_BETA_START, SD_BETA_END, SD_TRAIN_STEPS = 0.00085, 0.012, 1000
SD_VAE_SCALING_FACTOR = 0.18215


class ModelSourceError(UserError, ValueError):
    """A model argument (``--sd``, ``--clip``) that names nothing loadable; the message is one line."""


class ModelNotFoundError(ModelSourceError, FileNotFoundError):
    """Nothing loadable where the argument points (a ``FileNotFoundError`` too)."""


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
        from lare2.extract.tiny_models import build_tiny_sd

        return _finish(**build_tiny_sd(seed=0), source="tiny", device=device, dtype=dtype)
    path = Path(spec).expanduser()
    if path.is_dir():
        parts = _load_diffusers_folder(path)
    elif path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ModelSourceError(
                f"{path}: unsupported model file type {path.suffix!r}; expected a single-file checkpoint "
                f"({', '.join(SINGLE_FILE_SUFFIXES)}) or a diffusers folder with {'/, '.join(COMPONENT_FOLDERS)}/"
            )
        parts = _load_single_file(path, tokenizer, Path(config))
    else:
        parts = _load_from_hub(spec, path)
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


def ddpm_scheduler_from(folder: str | Path, subfolder: str | None = "scheduler", **load_kwargs) -> DDPMScheduler:
    """A ``DDPMScheduler`` from a scheduler config, whatever scheduler class the config names."""
    from diffusers import DDPMScheduler

    config = DDPMScheduler.load_config(str(folder), subfolder=subfolder, **load_kwargs)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    return DDPMScheduler.from_config(config)


# ---- local diffusers folder ---------------------------------------------------------------------
def _load_diffusers_folder(folder: Path) -> dict:
    missing = [c for c in COMPONENT_FOLDERS if not (folder / c).is_dir()]
    if missing:
        files = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in SINGLE_FILE_SUFFIXES)
        hint = f"; it holds {', '.join(files[:3])}: pass that file instead" if files else ""
        raise ModelNotFoundError(
            f"{folder}: not a diffusers model folder, missing subfolder(s) {', '.join(f'{c}/' for c in missing)} "
            f"(expected {', '.join(f'{c}/' for c in COMPONENT_FOLDERS)} as in runwayml/stable-diffusion-v1-5){hint}"
        )
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

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


def looks_like_hub_id(spec: str) -> bool:
    """``org/name`` and nothing path-like (see ``HUB_ID``), without a weight-file suffix."""
    return bool(HUB_ID.match(spec)) and not spec.lower().endswith(WEIGHT_FILE_SUFFIXES)


def hub_unavailable(timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Why hub ids cannot be tried now, or ``None`` when the hub endpoint answers (any HTTP status)."""
    if _hub_offline():
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        return f"hub unreachable ({endpoint}: {reason})"
    return None


def _source_error(spec: str, path: Path, as_hub_id: str, cls: type = ModelNotFoundError) -> ModelSourceError:
    """The one-line error for ``spec``, not on disk at ``path``: what was tried as a hub id, and the remedy."""
    resolved = str(path.resolve())
    where = f" (no {resolved})" if resolved != spec else ""
    return cls(f"latent diffusion model {spec!r}: not a folder or file on disk{where}; {as_hub_id}; {SD_REMEDY}")


def _load_from_hub(spec: str, path: Path) -> dict:
    """Each component of hub id ``spec`` (not on disk at ``path``), in the diffusers layout; one clear error
    without network traffic when ``spec`` looks like a path or the hub is offline or unreachable."""
    if not looks_like_hub_id(spec):
        raise _source_error(spec, path, "not a hub id either ('org/name', without a path prefix or file suffix)")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    # no hub at hand: a copy already in the local hub cache still loads, without network traffic
    reason = hub_unavailable()
    local = {"local_files_only": True} if reason else {}
    try:
        return {
            "vae": AutoencoderKL.from_pretrained(spec, subfolder="vae", **local),
            "unet": UNet2DConditionModel.from_pretrained(spec, subfolder="unet", **local),
            "text_encoder": CLIPTextModel.from_pretrained(spec, subfolder="text_encoder", **local),
            "tokenizer": CLIPTokenizer.from_pretrained(spec, subfolder="tokenizer", **local),
            "scheduler": ddpm_scheduler_from(spec, **local),
        }
    except (OSError, ValueError) as err:  # no such repo, gated, no such subfolder, connection lost
        if reason:
            raise _source_error(spec, path, f"as a hub id: {reason}, and not in the local hub cache") from err
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise _source_error(spec, path, f"as a hub id: {first}", cls=ModelSourceError) from err


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
    raise ModelNotFoundError(
        f"{checkpoint}: a single-file checkpoint carries no CLIP tokenizer and none was found {where}; "
        f"pass tokenizer=FOLDER or put a tokenizer/ folder ({' + '.join(TOKENIZER_FILES)}, e.g. from "
        f"runwayml/stable-diffusion-v1-5) next to the checkpoint"
    )


def _load_single_file(path: Path, tokenizer: str | Path | None, config_folder: Path) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import SingleFileComponentError, create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer_folder = find_tokenizer(path, tokenizer)  # fail before reading gigabytes
    checkpoint = read_checkpoint(path)
    missing = [p for p in LDM_PREFIXES if not any(k.startswith(p) for k in checkpoint)]
    if missing:
        raise ModelSourceError(
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
        raise ModelSourceError(
            f"{path}: not a Stable Diffusion v1 single-file checkpoint matching {config_folder} "
            f"({err})"
        ) from err
    return {
        "vae": vae, "unet": unet, "text_encoder": text_encoder,
        "tokenizer": CLIPTokenizer.from_pretrained(str(tokenizer_folder), local_files_only=True),
        "scheduler": ddpm_scheduler_from(config_folder),
    }
