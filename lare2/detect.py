"""Scoring new images with a trained detector: ``Detector``, built once from a run, under ``lare2 score``.

    from lare2 import Detector
    det = Detector.from_run("runs/egre", sd="/models/sd-v1-5", clip="/models/RN50.pt", device="cuda")
    results = det.score(["a.png", "b.jpg"])    # list[Result], in input order
    result = det.score("a.png")                # one input (a path, bytes or a PIL image): one Result
    det.heatmap(result, "a_heat.png")          # the image, its LaRE map and EGRE's attention

Features are computed exactly as for the caches the detector was trained on: the run records their
extraction config (models, t, draws, prompt mode, image size, dtypes, seed) and the fingerprint of
that extraction, and a detector whose models at hand give another fingerprint is refused. Images
are decoded in DataLoader workers and prepared by stage 1's own ``prepare_sample`` (``extract/loader.py``);
each image's draws are seeded from its bytes (``sample_seed(seed, content_id(bytes))``, as in a cache), the outputs go
through the cache's storage dtypes, then one pass of the model gives p(fake) and EGRE's attention (a run
trained with ``--train-backbone-top`` feeds the stored fmap through its own layer4 + attention pool). A file's
p(fake) therefore equals what ``lare2 extract`` + ``lare2 eval`` give it, to float tolerance
(batches differ). The run's
``normalize`` chain (its own preprocessing, e.g. ``jpeg:96``) is applied to every image after
decoding, seeded like its draws; its ``perturb`` (a test condition of some cache) never is.

Inputs: paths (``str`` or ``Path``), bytes or PIL images, one alone or in a list; anything else is a
``TypeError`` naming its type (a ``str`` is one path, never a sequence of characters). A PIL image
opened from a file (``Image.open`` keeps its ``filename``) is seeded from that file's bytes, so it
scores as the file does; any other in-memory image is seeded from its pixels. An image that cannot be
used is an error row, never an exception.

Prompts follow the run's ``prompt_mode`` and the rule its extraction recorded (``ExtractConfig.prompt_for``,
one rule for training and scoring). ``fixed`` and ``empty`` need nothing. ``class`` needs the image's
ImageNet class: ``class_name`` when given (checked against the class names, ``check_class_name``);
``"auto"``: CLIP's zero-shot classifier (``extract/clip_text.py``: the text tower of the ``--clip``
file, the tokenizer of the SD folder), for every image; otherwise the GenImage file-name rule
(``shared/classnames.py``). An image without such a name gets the empty prompt when the run was
extracted with ``classless_prompt=empty`` (as its classless training rows did; a run recorded before that
setting existed is read so, ``current_keys``), and is otherwise an error row that says so. The same bytes
give the same p(fake) whatever the file is called only with ``fixed``/``empty`` prompts, an explicit class
or ``auto``.
"""

from __future__ import annotations

import collections.abc
import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence, Union, overload

import numpy as np
import torch
from torch.utils.data import Dataset

from lare2.extract.images import ImageError, decode_rgb, oriented_rgb
from lare2.extract.loader import DecodedBatch, DecodedSample, collate_decoded, prepare_sample
from lare2.shared.cache import STATUS_ERROR, STATUS_OK, nonfinite_rows
from lare2.shared.errors import InputError, MissingInputError
from lare2.shared.manifest import content_id, is_image_name
from lare2.shared.perturbations import Step, apply_chain
from lare2.shared.seeding import sample_seed

if TYPE_CHECKING:
    from PIL import Image

    from lare2.extract.clip_text import ZeroShotImageNet
    from lare2.extract.features import Models
    from lare2.shared.config import ExtractConfig
    from lare2.train.checkpoint import DetectorConfig

AUTO_CLASS = "auto"
"""``class_name`` value that asks for CLIP zero-shot ImageNet classes."""
ROW_FIELDS = ("path", "p_fake", "is_fake", "threshold", "prompt", "status", "error")
"""The columns of ``lare2 score``'s CSV and JSON rows."""
ImageInput = Union[str, Path, bytes, "Image.Image"]
ONE_INPUT_TYPES = "a path (str or pathlib.Path), bytes or a PIL image"


def is_one_input(item: Any) -> bool:
    """A path, bytes or a PIL image: one image to score."""
    from PIL import Image

    return isinstance(item, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image))


def as_inputs(items: Any) -> tuple[list, bool]:
    """(the inputs as a list, whether ``items`` was one input alone). ``TypeError`` naming the type of anything
    that is neither one input nor a list, tuple or iterator of them (a ``str`` is one path)."""
    if is_one_input(items):
        inputs, alone = [items], True
    elif isinstance(items, (list, tuple, collections.abc.Iterator)):
        inputs, alone = list(items), False
    else:
        raise TypeError(f"Detector.score: got a {type(items).__module__}.{type(items).__qualname__}; expected "
                        f"{ONE_INPUT_TYPES}, or a list of them")
    for index, item in enumerate(inputs):
        if not is_one_input(item):
            raise TypeError(f"Detector.score: input {index} is a {type(item).__module__}.{type(item).__qualname__}; "
                            f"expected {ONE_INPUT_TYPES}")
    return [Path(item) if isinstance(item, os.PathLike) else item for item in inputs], alone


@dataclass
class Result:
    """One image's outcome. ``p_fake`` and ``is_fake`` are None when ``status`` is ``error`` and ``error`` says why."""

    path: str
    """The file, or ``<image N>`` / ``<bytes N>`` for the N-th in-memory input (0-based)."""
    p_fake: float | None
    """The detector's probability that the image is generated."""
    is_fake: bool | None
    """``p_fake > threshold``."""
    threshold: float
    """The decision threshold used: the run's calibrated one unless overridden."""
    prompt: str
    """The prompt the LaRE map was conditioned on ("" when none was used or the image failed first)."""
    status: str
    """``ok`` or ``error``."""
    error: str = ""
    """Why the image was not scored."""
    lare: np.ndarray | None = field(default=None, repr=False, compare=False)
    """The LaRE map [L, h, w] the detector saw (storage dtype round trip), for heatmaps."""
    attention: np.ndarray | None = field(default=None, repr=False, compare=False)
    """EGRE's spatial attention [H, W] (sums to 1), None for models without one."""
    source: Any = field(default=None, repr=False, compare=False)
    """The input as given (a path, bytes or a PIL image), to draw the heatmap from."""

    def row(self) -> dict:
        """The CSV/JSON row: ``ROW_FIELDS``."""
        return {name: getattr(self, name) for name in ROW_FIELDS}


def collect_inputs(inputs: Iterable[str | Path]) -> tuple[list[Path], list[Path]]:
    """(files to score, files skipped): files as given; folders searched recursively (sorted within each folder),
    where files without an image name (``.png``, ``.jpg``, ...) are skipped. A missing input raises
    ``MissingInputError`` (a ``FileNotFoundError``)."""
    from lare2.shared.manifest.sources import files_under

    files, skipped = [], []
    for item in map(Path, inputs):
        if item.is_dir():
            for path in files_under(item):
                (files if is_image_name(path.name) else skipped).append(path)
        elif item.is_file():
            files.append(item)
        else:
            raise MissingInputError(f"{item}: no such file or folder")
    return files, skipped


def _label(item: Any, index: int) -> str:
    if isinstance(item, (str, Path)):
        return str(item)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return f"<bytes {index}>"
    return getattr(item, "filename", "") or f"<image {index}>"


def model_image(item: Any, max_pixels: int, steps: Sequence[Step], run_seed: int) -> "Image.Image":
    """``decode_item``, then the run's ``normalize`` chain: the image the models saw (before their resize and crop)."""
    image, key = decode_item(item, max_pixels)
    return apply_chain(image, steps, sample_seed(run_seed, key))  # seeded as prepare_sample seeds it


def backing_file(item: Any) -> Path | None:
    """The file an input comes from: a path, or the file a PIL image was opened from while it is still there."""
    if isinstance(item, (str, Path)):
        return Path(item)
    filename = getattr(item, "filename", "")
    with contextlib.suppress(OSError):
        if isinstance(filename, str) and filename and Path(filename).is_file():
            return Path(filename)
    return None


def decode_item(item: Any, max_pixels: int) -> tuple["Image.Image", str]:
    """(RGB image, content id seeding its draws) of a path, bytes or a PIL image."""
    if isinstance(item, (str, Path)):
        data = Path(item).read_bytes()
        return decode_rgb(data, max_pixels=max_pixels), content_id(data)
    if isinstance(item, (bytes, bytearray, memoryview)):
        data = bytes(item)
        return decode_rgb(data, max_pixels=max_pixels), content_id(data)
    if not hasattr(item, "convert"):
        raise ImageError(f"not a path, bytes or PIL image: {type(item).__name__}")
    item.load()
    if item.size[0] * item.size[1] > max_pixels:
        raise ImageError(f"{item.size[0]}x{item.size[1]} pixels, over the limit of {max_pixels} "
                         "(decompression bomb guard)")
    image = oriented_rgb(item)
    source = backing_file(item)
    if source is not None:  # seeded as the file itself is
        return image, content_id(source.read_bytes())
    return image, content_id(b"lare2:pixels:%dx%d:" % image.size + image.tobytes())


class ScoreInputs(Dataset):
    """Inputs -> (model inputs, file name), decoded in DataLoader workers; a failure is the row's error."""

    def __init__(self, items: Sequence[Any], image_size: int, max_pixels: int, zero_shot: bool, *,
                 steps: Sequence[Step] = (), run_seed: int = 0) -> None:
        """``steps``: the run's ``normalize`` chain, applied after decoding with ``sample_seed(run_seed, content id)``;
        ``zero_shot``: also prepare CLIP's zero-shot input."""
        self.items, self.image_size, self.max_pixels, self.zero_shot = list(items), image_size, max_pixels, zero_shot
        self.steps, self.run_seed = tuple(steps), run_seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[DecodedSample, str]:
        item = self.items[index]
        sample = prepare_sample(index, lambda: decode_item(item, self.max_pixels), self.image_size, steps=self.steps,
                                run_seed=self.run_seed, zero_shot=self.zero_shot)
        source = backing_file(item)
        return sample, "" if source is None else source.name


def collate_scored(rows: list[tuple[DecodedSample, str]]) -> tuple[DecodedBatch, list[str]]:
    """(the batch, each row's file name), rows in order."""
    return collate_decoded([sample for sample, _ in rows]), [name for _, name in rows]


class Detector:
    """A trained detector with its stage-1 models, loaded once; scores paths, bytes and PIL images in batches."""

    def __init__(self, model: torch.nn.Module, config: DetectorConfig, extraction: ExtractConfig, models: Models,
                 device: torch.device, *, run_dir: str | Path = "",
                 threshold: float | None = None, num_workers: int = 2, batch_size: int | None = None) -> None:
        """Use ``Detector.from_run``. ``config``: the run's ``DetectorConfig``; ``extraction``: the ``ExtractConfig``
        features are recomputed with; ``models``: stage 1's ``Models`` for it."""
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise InputError(f"threshold={threshold}: expected a probability in [0, 1]")
        self.model, self.config, self.extraction, self.models, self.device = model, config, extraction, models, device
        self.run_dir = str(run_dir)
        self.threshold = config.threshold if threshold is None else float(threshold)
        """Decision threshold on p(fake): the run's calibrated one unless overridden."""
        self.num_workers = num_workers
        self.batch_size = batch_size or extraction.batch_size
        self._zero_shot: ZeroShotImageNet | None = None

    @classmethod
    def from_run(cls, run: str | Path, sd: str | None = None, clip: str | None = None, device: str = "auto", *,
                 threshold: float | None = None, num_workers: int = 2, batch_size: int | None = None) -> "Detector":
        """Load a finished run and the stage-1 models its features came from.

        ``sd`` / ``clip``: the latent diffusion and CLIP weights, when not where the run recorded them;
        they must be the same weights (fingerprints checked). ``device``: ``auto`` (CUDA when present),
        ``cpu`` or ``cuda``. ``threshold`` overrides the calibrated one; ``num_workers`` decode images
        (0: in this process). Raises ``CheckpointError`` (a user error) for an unusable run or other weights.
        """
        from lare2.extract.features import load_models, stored_config
        from lare2.shared.config import identity_fingerprint
        from lare2.shared.devices import resolve_device
        from lare2.train.checkpoint import CheckpointError, load_detector

        torch_device = resolve_device(device)
        model, config = load_detector(run, device=torch_device)
        if config.extraction is None:
            raise CheckpointError(f"{run}: the run does not record its extraction config; "
                                  "calibrate it on a cache first (lare2 calibrate RUN --val CACHE)")
        # a cache's test perturbation is no part of the detector; its normalisation is (kept)
        extraction = stored_config({**config.extraction.to_dict(), "perturb": ""}, torch_device, sd=sd, clip=clip)
        models = load_models(extraction, torch_device)
        if identity_fingerprint(extraction.identity(models.fingerprints)) != config.extraction_fingerprint:
            expected = config.extra.get("model_fingerprints") or "fingerprints not recorded"
            raise CheckpointError(
                f"{run}: the models at hand ({models.fingerprints}) are not those the detector was trained on "
                f"(expected {expected}, recorded as sd={config.extraction.sd!r}, "
                f"clip={config.extraction.clip!r}); pass --sd/--clip pointing at the same weights")
        return cls(model, config, extraction, models, torch_device, run_dir=run, threshold=threshold,
                   num_workers=num_workers, batch_size=batch_size)

    @property
    def prompt_mode(self) -> str:
        """The run's prompt mode (``class``, ``fixed`` or ``empty``): scoring uses the same."""
        return self.extraction.prompt_mode

    def prepare_zero_shot(self) -> ZeroShotImageNet:
        """Load CLIP's text tower and encode the 1,000 class prompts (once); raises ModelSourceError without one."""
        if self._zero_shot is None:
            from lare2.extract.clip_text import ZeroShotImageNet, load_text_tower

            tower = load_text_tower(self.extraction.clip, device=self.device, dtype=self.models.dtype)
            self._zero_shot = ZeroShotImageNet(tower, self.models.tokenizer, self.extraction.prompt_template)
        return self._zero_shot

    @overload
    def score(self, items: ImageInput, class_name: str | None = None) -> Result: ...

    @overload
    def score(self, items: Sequence[ImageInput], class_name: str | None = None) -> list[Result]: ...

    def score(self, items, class_name=None):
        """One input (a path, bytes or a PIL image) -> its ``Result``; a list (tuple, iterator) of them -> one
        ``Result`` per input, in input order (see ``iter_score``). ``TypeError`` for other types."""
        inputs, alone = as_inputs(items)
        results = list(self.iter_score(inputs, class_name))
        return results[0] if alone else results

    def score_image(self, image: ImageInput, class_name: str | None = None) -> Result:
        """The ``Result`` of one image (a PIL image, bytes or a path): ``score(image)``."""
        inputs, _ = as_inputs([image])
        return self.score(inputs, class_name)[0]

    def iter_score(self, items: Sequence[ImageInput], class_name: str | None = None) -> Iterator[Result]:
        """Results in input order, a batch at a time, as they are computed.

        ``class_name`` (class-prompt runs only): the ImageNet class of every image (``InputError`` unless it
        is one, ``check_class_name``), or ``"auto"`` for CLIP zero-shot classes; None: from GenImage-style file
        names, others getting the empty prompt under ``classless_prompt=empty`` and else being error rows."""
        from torch.utils.data import DataLoader

        from lare2.shared.classnames import check_class_name

        items, _ = as_inputs(items)
        if class_name and class_name != AUTO_CLASS and self.prompt_mode == "class":
            check_class_name(class_name)
        zero_shot = self.prompt_mode == "class" and class_name == AUTO_CLASS
        if zero_shot:
            self.prepare_zero_shot()
        dataset = ScoreInputs(items, self.extraction.image_size, self.extraction.max_image_pixels, zero_shot,
                              steps=self.extraction.normalize_steps(), run_seed=self.extraction.seed)
        loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=False, collate_fn=collate_scored,
                            num_workers=self.num_workers if len(items) > 1 else 0,
                            pin_memory=self.device.type == "cuda")
        for batch, names in loader:
            yield from self._score_batch(items, batch, names, class_name)

    def _prompts(self, good: list[int], names: dict[int, str], clip_images: torch.Tensor | None,
                 class_name: str | None) -> dict[int, tuple[str, str]]:
        """Row -> (prompt, "") or ("", why there is none)."""
        from lare2.shared.classnames import class_name as imagenet_name
        from lare2.shared.classnames import class_name_from_filename

        if self.prompt_mode != "class":
            return {i: (self.extraction.prompt_for(""), "") for i in good}
        if class_name and class_name != AUTO_CLASS:
            return {i: (self.extraction.prompt_for(class_name), "") for i in good}
        if class_name == AUTO_CLASS:
            pooled = self.models.backbone(clip_images.to(self.device, self.models.dtype)).pooled if good else None
            classes = self._zero_shot.classify(pooled) if good else []
            return {i: (self.extraction.prompt_for(imagenet_name(c)), "") for i, c in zip(good, classes)}
        prompts = {}
        for i in good:
            found = class_name_from_filename(names[i]) if names[i] else ""
            if found or self.extraction.classless_prompt == "empty":  # the rule training used (prompt_for)
                prompts[i] = (self.extraction.prompt_for(found), "")
                continue
            what = (f"{names[i]!r} is not a GenImage-style file name" if names[i]
                    else "an in-memory image has no file name")
            prompts[i] = ("", f"no ImageNet class for the class prompt the detector was trained with: {what}; "
                              "pass --class-name NAME, or --class-name auto for CLIP zero-shot classes")
        return prompts

    @torch.inference_mode()
    def _score_batch(self, items: list, batch: DecodedBatch, names: list[str], class_name: str | None) -> list[Result]:
        prompts = self._prompts(batch.good_indices, dict(zip(batch.indices, names)), batch.clip_images, class_name)
        ready = [i for i in batch.good_indices if not prompts[i][1]]
        scored = self._score_ready(batch, ready, [prompts[i][0] for i in ready]) if ready else {}
        results = []
        for index, decode_error in zip(batch.indices, batch.errors):
            prompt, why = prompts.get(index, ("", decode_error))
            common = dict(path=_label(items[index], index), threshold=self.threshold, prompt=prompt,
                          source=items[index])
            if index not in scored:
                results.append(Result(p_fake=None, is_fake=None, status=STATUS_ERROR, error=why, **common))
                continue
            p, lare, attention, bad = scored[index]
            if bad or not np.isfinite(p):  # never let a failed computation read as "real"
                why = f"non-finite model output in {', '.join(bad) or 'p_fake'} (in its storage dtype)"
                results.append(Result(p_fake=None, is_fake=None, status=STATUS_ERROR, error=why, **common))
                continue
            results.append(Result(p_fake=p, is_fake=bool(p > self.threshold), status=STATUS_OK, lare=lare,
                                  attention=attention, **common))
        return results

    def _score_ready(self, batch: DecodedBatch, ready: list[int], prompts: list[str]) -> dict[int, tuple]:
        """Row -> (p_fake, LaRE map [L, h, w], attention [H, W] or None, names of non-finite arrays) for the
        ``ready`` rows (decoded, with a prompt): one batch through stage 1's models, one pass of the detector."""
        from lare2.extract.features import compute_images
        from lare2.train.models import predict_features

        position = {index: k for k, index in enumerate(batch.good_indices)}
        take = [position[i] for i in ready]
        keys = dict(zip(batch.indices, batch.keys))
        arrays = compute_images(self.models, batch.lare_images[take], batch.backbone_images[take], prompts,
                                [sample_seed(self.extraction.seed, keys[i]) for i in ready], self.device)
        stored = {name: a.astype(self.models.layout.dtype(name)).astype(np.float32) for name, a in arrays.items()}
        # only what the model reads: a run with a trainable backbone top (docs/method.md §2.4) recomputes
        # pooled from the stored fmap with its own top, never reading the frozen backbone's pooled
        reads = [stored[name] if name in type(self.model).input_names else None for name in ("pooled", "fmap", "lare")]
        output = predict_features(self.model, *reads)  # p(fake) and EGRE's attention from the same pass
        p_fake = output.p_fake.cpu().numpy()
        attention = None if output.attention is None else output.attention.float().cpu().numpy()
        scored = {}
        nonfinite = {name: nonfinite_rows(a) for name, a in stored.items()}
        for k, i in enumerate(ready):
            bad = [name for name, rows in nonfinite.items() if rows[k]]
            scored[i] = (float(p_fake[k]), stored["lare"][k], None if attention is None else attention[k], bad)
        return scored

    def heatmap(self, result: Result, out_png: str | Path) -> dict:
        """Save the image, its LaRE map and EGRE's attention side by side, p(fake) in the title.

        Returns ``{"png": path, "pixels": [width, height]}``; ``InputError`` for an error row."""
        from lare2.heatmaps import render_heatmap

        if result.status != STATUS_OK or result.lare is None:
            raise InputError(f"{result.path}: not scored ({result.error or 'no maps kept'}): no heatmap")
        # drawn over the image the maps come from: after the run's normalize chain (a size:N changes the geometry)
        image = model_image(result.source, self.extraction.max_image_pixels, self.extraction.normalize_steps(),
                            self.extraction.seed)
        verdict = "FAKE" if result.is_fake else "real"
        title = (f"{Path(result.path).name}: p(fake) = {result.p_fake:.3f}, {verdict} at threshold "
                 f"{result.threshold:.3f}" + (f"; prompt {result.prompt!r}" if result.prompt else ""))
        return render_heatmap(image, result.lare, result.attention, title, out_png,
                              no_attention_note=f"no spatial attention\n(model kind {self.config.model.kind!r})")
