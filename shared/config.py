"""Stage 1 configuration: one typed dataclass, presets as plain functions returning one.

Choices are ``Literal`` types and checked, with every field's type, by ``lare2.shared.settings``
(which also converts ``--set KEY=VALUE``); ranges are checked in ``__post_init__``. The *identity*
of an extraction (``ExtractConfig.identity``) is the set of settings that change what a cache
holds; appending to a cache made with another identity is refused, naming the keys. Its
*fingerprint* (``identity_fingerprint``) says whether a detector may score a cache: the same, except
that a test-condition ``perturb`` does not count (a detector trained on clean features scores
perturbed test caches; ``normalize``, the detector's own preprocessing, does count), nor do ``views``
(a views cache's evaluation view is computed exactly as a plain cache's features, in its own backbone
call, so the two are equal bit for bit; the views are extra training material).

One prompt rule (``ExtractConfig.prompt_for``) serves extraction and scoring: with class prompts, an image
without an ImageNet class is refused unless ``classless_prompt=empty`` says to give it the empty prompt. That
field is recorded with the extraction config (in the cache and the run, so scoring applies it) but is no part of
the identity: a cache holds the same features for the same rows under either value (see the field).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal, Mapping, get_args

from lare2.shared.devices import DeviceName
from lare2.shared.errors import InputError
from lare2.shared.perturbations import Step, chain_text, parse_chain
from lare2.shared.settings import SettingsError, check_fields, check_range, field_types, make_config, pick_preset

PromptMode = Literal["class", "fixed", "empty"]
ClasslessPrompt = Literal["refuse", "empty"]
ComputeDtype = Literal["float32", "float16", "bfloat16"]
StorageDtype = Literal["float16", "float32"]
PROMPT_MODES: tuple[str, ...] = get_args(PromptMode)

MAX_IMAGE_PIXELS = 89_478_485
"""Decompression-bomb guard: Pillow's default limit on the pixels an image may declare."""


class ClasslessError(SettingsError):
    """A class prompt is needed for an image that has no ImageNet class, and ``classless_prompt`` is ``refuse``."""


@dataclass(kw_only=True)
class ExtractConfig:
    """Everything stage 1 needs to turn a manifest selection into a cache."""

    manifest: str = ""
    """Parquet manifest (see ``lare2 manifest build``)."""
    out: str = ""
    """Cache directory (a Zarr v3 group); created, or resumed when it exists with the same identity.
    Empty: ``cache/<split>``, or ``cache/all`` when no split is selected."""
    split: str | None = None
    """Only rows of this split (``train``/``val``/``test``); None = all rows."""
    generators: list[str] = field(default_factory=list)
    """Only rows of these generators; empty = all."""
    limit: int | None = None
    """Only the first N selected rows (quick checks)."""

    sd: str = "tiny"
    """Latent diffusion model (``--sd``): a diffusers folder, a single-file checkpoint (.safetensors/.ckpt),
    a hub id (only when a hub is reachable), or ``tiny`` (seeded random tiny SD, tests/demo)."""
    clip: str = "tiny"
    """CLIP RN50 weights (``--clip``): ``RN50.pt`` (TorchScript), a state dict (.pt/.pth/.bin/.safetensors,
    keys ``visual.*`` or bare), ``random-rn50`` (full size, random) or ``tiny``."""

    timestep: int = 200
    """Diffusion timestep t at which the latent is noised (docs/method.md §1.3)."""
    ensemble: int = 4
    """Independent noise draws per image; the map is the mean squared error over them."""
    image_size: int = 256
    """Images are resized to image_size x image_size (aspect ignored, bicubic) before the VAE."""
    prompt_mode: PromptMode = "class"
    """``class``: ``prompt_template`` with the image's class name; ``fixed``: ``prompt_text``; ``empty``: ""."""
    prompt_template: str = "a photo of a {}"
    """Template for ``prompt_mode=class``."""
    prompt_text: str = ""
    """Prompt for ``prompt_mode=fixed``."""
    classless_prompt: ClasslessPrompt = "refuse"
    """``prompt_mode=class`` only: what a row without an ImageNet class gets. ``refuse`` (default): ``lare2
    extract`` refuses a selection holding such rows before any model loads, and ``lare2 score`` / ``Detector``
    make such an image an error row; ``empty``: the empty prompt, at extraction and (recorded in the run) at
    scoring alike. Never a silent fallback: extraction logs how many rows got the empty prompt.

    Recorded in the cache's and the run's extraction config, but no part of the identity or fingerprint: under
    ``refuse`` a cache has no classless rows, so for the same rows both values give the same features. Resuming
    a cache with the other value is therefore allowed (the selection is part of the check, so no rows can be
    added); the cache keeps the value it was created with, and a resume under ``refuse`` of a cache holding
    classless rows is refused like a new extraction. A stored class-prompt config without this key (made before
    it existed, when classless rows silently got the empty prompt) is read as ``empty`` (``current_keys``)."""
    seed: int = 0
    """Run seed; each image's generator is seeded from (seed, sample_id)."""

    feature_dtype: StorageDtype = "float16"
    """Storage dtype of backbone features."""
    compute_dtype: ComputeDtype = "float32"
    """Dtype the models run in (float16 only on GPU; the VAE posterior and the error stay float32)."""
    chunk_samples: int = 32
    """Samples per cache chunk and per work block."""

    batch_size: int = 8
    """Images per model call (the UNet sees batch_size x ensemble latents)."""
    num_workers: int = 2
    """DataLoader workers that decode and preprocess images."""
    device: DeviceName = "auto"
    """``auto`` (CUDA when present, else CPU), ``cpu`` or ``cuda``."""
    num_shards: int = 1
    """Independent array jobs sharing one cache: blocks are split ``block % num_shards == shard_index``."""
    shard_index: int = 0
    """This job's shard (0-based)."""
    max_image_pixels: int = MAX_IMAGE_PIXELS
    """Decompression-bomb guard: images declaring more pixels than this are refused (Pillow's default)."""
    perturb: str = ""
    """Test condition applied to every image of the split, a chain such as ``jpeg:75+resize:0.5``
    (``lare2.shared.perturbations``); "" = none. Per image: decode -> perturb -> normalize -> the
    LaRE resize (docs/method.md §1.2) and the backbone crop (§2.2). Noise draws use the sample's seed."""
    normalize: str = ""
    """Debiasing applied to every image of every split and to images scored later, e.g. ``jpeg:96`` or
    ``jpeg:96+size:512`` (the detector's own preprocessing, after ``perturb``); "" = none."""
    views: int = 0
    """Augmented training views stored per image besides the evaluation view (the centre crop, in
    ``pooled``/``fmap`` as always): the reference trainer's random crop, JPEG/blur/noise/grey, rotation and
    flip (``lare2.extract.augment``), seeded per sample and view; 0 = none. Views are of the image after
    ``perturb`` and ``normalize``; the LaRE map stays one per image. Training draws one view per sample per epoch."""

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.out:
            self.out = f"cache/{self.split or 'all'}"
        check_range(self, "timestep", min=0, below=1000, why="diffusion timesteps of SD v1")
        check_range(self, "image_size", min=8, multiple_of=8, why="the VAE downsamples by 8")
        for key in ("ensemble", "batch_size", "chunk_samples", "num_shards", "max_image_pixels"):
            check_range(self, key, min=1)
        check_range(self, "num_workers", min=0)
        check_range(self, "views", min=0)
        check_range(self, "limit", min=0)
        check_range(self, "shard_index", min=0, below=self.num_shards, why="shard_index < num_shards")
        if self.prompt_mode == "fixed" and not self.prompt_text:
            raise SettingsError("prompt_mode='fixed' needs prompt_text (--set prompt_text=...)")
        if "{}" not in self.prompt_template:
            raise SettingsError(f"prompt_template={self.prompt_template!r}: expected a template containing '{{}}'")
        self.perturb = chain_text(self.perturb_steps())  # stored canonical: "JPEG:75.0" and "jpeg:75" are one identity
        self.normalize = chain_text(self.normalize_steps())

    def perturb_steps(self) -> tuple[Step, ...]:
        """``perturb`` as steps (``lare2.shared.perturbations.Step``); SettingsError for a bad chain."""
        try:
            return parse_chain(self.perturb, what="perturb")
        except InputError as err:
            raise SettingsError(str(err)) from None

    def normalize_steps(self) -> tuple[Step, ...]:
        """``normalize`` as steps; ``size:N`` allowed. SettingsError for a bad chain."""
        try:
            return parse_chain(self.normalize, allow_size=True, what="normalize")
        except InputError as err:
            raise SettingsError(str(err)) from None

    def image_steps(self) -> tuple[Step, ...]:
        """What stage 1 applies to each decoded image: ``perturb`` then ``normalize``, one chain (so noise
        steps keep distinct positions, hence distinct streams)."""
        return self.perturb_steps() + self.normalize_steps()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], **overrides: Any) -> "ExtractConfig":
        """Rebuild a stored config (a cache's ``attrs["extract_config"]``, a run's ``extraction``) with
        ``overrides`` applied; old key names are read as today's (``RENAMED_KEYS``), a class-prompt config from
        before ``classless_prompt`` as ``empty`` (``current_keys``), keys this lare2 does not know are refused,
        naming them."""
        known = field_types(cls)
        data = current_keys(data)
        unknown = sorted(k for k in {**data, **overrides} if k not in known)
        if unknown:
            raise SettingsError(f"unknown extract_config keys {unknown} (written by another lare2 version?); "
                                f"known: {', '.join(sorted(known))}")
        return cls(**{**data, **overrides})

    RENAMED_KEYS = {"sd_model": "sd", "backbone": "clip"}
    """Field names before the rename -> today's: stored configs (caches, runs) are read with them silently,
    ``--set`` takes them with a warning naming today's. Neither is hashed into the identity, so no cache's or
    run's identity changed; the weights' fingerprints keep their keys (``sd``, ``backbone``)."""

    # Keys that change what the cache holds. Batch size, workers, device and sharding do not change
    # any draw (docs/method.md §1.5), so they may differ between resumed runs; batched kernels may then round
    # differently (~1e-6 relative), which is why recomputation checks are exact only per batch.
    IDENTITY_KEYS = (
        "timestep", "ensemble", "image_size", "prompt_mode", "prompt_template", "prompt_text",
        "seed", "feature_dtype", "compute_dtype", "chunk_samples",
    )

    IMAGE_KEYS = ("perturb", "normalize", "views")
    """Identity keys only when set (non-empty, > 0), so caches and runs made before they existed keep their identity."""

    def identity(self, fingerprints: dict[str, str]) -> dict:
        """What must match to append to an existing cache: settings + model fingerprints."""
        ident = {k: getattr(self, k) for k in self.IDENTITY_KEYS}
        ident.update({k: getattr(self, k) for k in self.IMAGE_KEYS if getattr(self, k)})
        ident.update({f"fingerprint.{k}": v for k, v in sorted(fingerprints.items())})
        return ident

    def to_dict(self) -> dict:
        return asdict(self)

    def prompt_for(self, class_name: str) -> str:
        """The prompt of an image of ImageNet class ``class_name`` ("" for none): one rule for extraction and
        scoring. With class prompts, a missing class gets the empty prompt only when ``classless_prompt`` is
        ``empty``; otherwise ``ClasslessError``."""
        if self.prompt_mode == "class":
            if class_name:
                return self.prompt_template.format(class_name)
            if self.classless_prompt == "empty":
                return ""
            raise ClasslessError("prompt_mode=class: an image without an ImageNet class has no prompt; give its "
                                 "class, or extract with --set classless_prompt=empty or --prompt-mode empty")
        return self.prompt_text if self.prompt_mode == "fixed" else ""


def current_keys(stored: Mapping[str, Any]) -> dict:
    """A stored extraction config (or part of one) with the field names of ``ExtractConfig.RENAMED_KEYS`` read
    as today's (a today's name present too wins), and, for a class-prompt config written before
    ``classless_prompt`` existed, ``classless_prompt="empty"``: what its classless rows got."""
    renamed = ExtractConfig.RENAMED_KEYS
    current = {**{renamed[k]: v for k, v in stored.items() if k in renamed},
               **{k: v for k, v in stored.items() if k not in renamed}}
    if current.get("prompt_mode") == "class" and "classless_prompt" not in current:
        current["classless_prompt"] = "empty"
    return current


SCORING_IGNORES = ("perturb", "views")
"""Identity keys a detector's fingerprint leaves out: a perturbed test cache is scored by the detector
trained on clean features (that is the point of a robustness curve); a views cache's evaluation view
equals a plain cache's features, so a detector trained on views scores plain caches and images (and the
train and validation caches may differ in views). ``normalize`` is not among them."""


def identity_fingerprint(identity: dict) -> str:
    """sha256 of an extraction identity (sorted JSON) without ``SCORING_IGNORES``: equal iff a detector
    trained on one cache may score the other (same models and settings, any test perturbation)."""
    import hashlib
    import json

    kept = {k: v for k, v in identity.items() if k not in SCORING_IGNORES}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def diff_identity(stored: dict, wanted: dict) -> dict[str, tuple]:
    """Keys whose values differ: {key: (stored, wanted)}."""
    keys = sorted(set(stored) | set(wanted))
    return {k: (stored.get(k), wanted.get(k)) for k in keys if stored.get(k) != wanted.get(k)}


# ---- presets: plain functions returning a config ------------------------------------------------
def paper(**overrides: Any) -> ExtractConfig:
    """The paper's settings (docs/method.md §1): SD v1.5, t=200, 4 draws, class prompts, 256 px."""
    return make_config(ExtractConfig, {"sd": "runwayml/stable-diffusion-v1-5", "clip": "RN50.pt",
                                       **overrides})


def debug(**overrides: Any) -> ExtractConfig:
    """Tiny seeded random models: runs in seconds on a CPU.

    Class prompts as in ``paper`` (so the paper's prompt path is what a quick run exercises), with
    ``classless_prompt=empty`` said explicitly: a quick run on any folder of images works, rows without a
    GenImage-style name get the empty prompt (logged, recorded in the cache and the run), and ``lare2 score``
    gives such images the same empty prompt."""
    return make_config(ExtractConfig, {"sd": "tiny", "clip": "tiny", "batch_size": 4, "chunk_samples": 8,
                                       "num_workers": 0, "classless_prompt": "empty", **overrides})


PRESETS: dict[str, Callable[..., ExtractConfig]] = {"paper": paper, "debug": debug}


def preset(name: str, **overrides: Any) -> ExtractConfig:
    """The preset called ``name`` with ``overrides``; ``SettingsError`` for an unknown preset or key."""
    return pick_preset(PRESETS, name, **overrides)
