"""Stage 1 configuration: one typed dataclass, presets as functions.

The *identity* of an extraction (``ExtractConfig.identity``) is the set of settings that change
what a cache holds; appending to a cache made with another identity is refused, naming the keys.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

PROMPT_MODES = ("class", "fixed", "empty")


@dataclass(kw_only=True)
class ExtractConfig:
    """Everything stage 1 needs to turn a manifest selection into a cache."""

    manifest: str = ""
    """Parquet manifest (see ``lare2 manifest build``)."""
    out: str = "cache/train"
    """Cache directory (a Zarr v3 group); created, or resumed when it exists with the same identity."""
    split: str | None = None
    """Only rows of this split (``train``/``val``/``test``); None = all rows."""
    generators: list[str] = field(default_factory=list)
    """Only rows of these generators; empty = all."""
    limit: int | None = None
    """Only the first N selected rows (quick checks)."""

    sd_model: str = "tiny"
    """Latent diffusion model: a diffusers folder, a single-file checkpoint (.safetensors/.ckpt),
    a hub id (only when a hub is reachable), or ``tiny`` (seeded random tiny SD, tests/demo)."""
    backbone: str = "tiny"
    """CLIP RN50 weights: ``RN50.pt`` (TorchScript), a state dict (.pt/.pth/.bin/.safetensors,
    keys ``visual.*`` or bare), ``random-rn50`` (full size, random) or ``tiny``."""

    timestep: int = 200
    """Diffusion timestep t at which the latent is noised (SPEC 2.1)."""
    ensemble: int = 4
    """Independent noise draws per image; the map is the mean squared error over them."""
    image_size: int = 256
    """Images are resized to image_size x image_size (aspect ignored, bicubic) before the VAE."""
    prompt_mode: str = "class"
    """``class``: ``prompt_template`` with the image's class name; ``fixed``: ``prompt_text``; ``empty``: ""."""
    prompt_template: str = "a photo of a {}"
    """Template for ``prompt_mode=class``."""
    prompt_text: str = ""
    """Prompt for ``prompt_mode=fixed``."""
    seed: int = 0
    """Run seed; each image's generator is seeded from (seed, sample_id)."""

    feature_dtype: str = "float16"
    """Storage dtype of backbone features."""
    compute_dtype: str = "float32"
    """Dtype the models run in (float16 only on GPU; the VAE posterior and the error stay float32)."""
    chunk_samples: int = 32
    """Samples per cache chunk and per work block."""

    batch_size: int = 8
    """Images per model call (the UNet sees batch_size x ensemble latents)."""
    num_workers: int = 2
    """DataLoader workers that decode and preprocess images."""
    device: str = "auto"
    """``auto`` (Accelerate's device), ``cpu`` or ``cuda``."""
    num_shards: int = 1
    """Independent array jobs sharing one cache: blocks are split ``block % num_shards == shard_index``."""
    shard_index: int = 0
    """This job's shard (0-based)."""
    max_image_pixels: int = 89_478_485
    """Decompression-bomb guard: images declaring more pixels than this are refused (Pillow's default)."""

    def __post_init__(self) -> None:
        if self.prompt_mode not in PROMPT_MODES:
            raise ValueError(f"prompt_mode={self.prompt_mode!r}: choose from {PROMPT_MODES}")
        if self.prompt_mode == "fixed" and not self.prompt_text:
            raise ValueError("prompt_mode='fixed' needs prompt_text")
        if "{}" not in self.prompt_template:
            raise ValueError(f"prompt_template must contain '{{}}', got {self.prompt_template!r}")
        if not 0 <= self.timestep < 1000:
            raise ValueError(f"timestep must be in [0, 1000), got {self.timestep}")
        if self.ensemble < 1 or self.batch_size < 1:
            raise ValueError("ensemble and batch_size must be >= 1")
        if self.image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8 (VAE downsampling), got {self.image_size}")
        if self.compute_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"compute_dtype={self.compute_dtype!r}: choose float32, float16, bfloat16")
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"shard_index {self.shard_index} not in [0, num_shards={self.num_shards})")

    # Keys that change what the cache holds. Batch size, workers, device and sharding do not change
    # any draw (SPEC 2.1), so they may differ between resumed runs; batched kernels may then round
    # differently (~1e-6 relative), which is why recomputation checks are exact only per batch.
    IDENTITY_KEYS = (
        "timestep", "ensemble", "image_size", "prompt_mode", "prompt_template", "prompt_text",
        "seed", "feature_dtype", "compute_dtype", "chunk_samples",
    )

    def identity(self, fingerprints: dict[str, str]) -> dict:
        """What must match to append to an existing cache: settings + model fingerprints."""
        ident = {k: getattr(self, k) for k in self.IDENTITY_KEYS}
        ident.update({f"fingerprint.{k}": v for k, v in sorted(fingerprints.items())})
        return ident

    def to_dict(self) -> dict:
        return asdict(self)

    def prompt_for(self, class_name: str) -> str:
        if self.prompt_mode == "class":
            return self.prompt_template.format(class_name) if class_name else ""
        return self.prompt_text if self.prompt_mode == "fixed" else ""


def identity_fingerprint(identity: dict) -> str:
    """sha256 of an extraction identity (sorted JSON): equal iff two caches' features are comparable."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def diff_identity(stored: dict, wanted: dict) -> dict[str, tuple]:
    """Keys whose values differ: {key: (stored, wanted)}."""
    return {k: (stored.get(k), wanted.get(k)) for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)}


# ---- presets ------------------------------------------------------------------------------------
def paper(**overrides) -> ExtractConfig:
    """The paper's settings (SPEC 2.1): SD v1.5, t=200, 4 draws, class prompts, 256 px."""
    return ExtractConfig(**{"sd_model": "runwayml/stable-diffusion-v1-5", "backbone": "RN50.pt", **overrides})


def debug(**overrides) -> ExtractConfig:
    """Tiny seeded random models: runs in seconds on a CPU."""
    return ExtractConfig(**{"sd_model": "tiny", "backbone": "tiny", "batch_size": 4, "chunk_samples": 8,
                            "num_workers": 0, **overrides})


PRESETS = {"paper": paper, "debug": debug}


def preset(name: str, **overrides) -> ExtractConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name](**overrides)
