"""Stage 1's input side: manifest rows decoded and preprocessed in DataLoader workers, batched by block.

A batch never spans two cache blocks, so blocks complete in order and are written whole; an image
that cannot be used becomes its row's recorded error, never an exception that stops the job.
Each image (``prepare_sample``, which scoring new images uses too): decode -> the config's ``perturb`` then
``normalize`` steps (``lare2.shared.perturbations``, noise seeded with the sample's seed) -> the LaRE input
(docs/method.md §1.2), the backbone input (§2.2) and, with ``views`` K > 0, K augmented backbone inputs
(``lare2.extract.augment``, seeded per sample and view).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from lare2.extract.augment import view_inputs
from lare2.extract.clip_text import zero_shot_input
from lare2.extract.images import ImageError, backbone_input, decode_rgb, lare_input
from lare2.shared.cache import FeatureCache
from lare2.shared.cli_errors import one_line
from lare2.shared.manifest import read_image_bytes
from lare2.shared.perturbations import Step, apply_chain
from lare2.shared.seeding import sample_seed
from PIL import Image
from torch.utils.data import Dataset


@dataclass
class DecodedSample:
    index: int  # row in the cache (in scoring: position in the inputs)
    lare_image: torch.Tensor | None  # [3, S, S] in [-1, 1]
    backbone_image: torch.Tensor | None  # [3, 224, 224] normalised
    error: str
    view_images: torch.Tensor | None = None  # [K, 3, 224, 224] normalised augmented views; None without views
    clip_image: torch.Tensor | None = None  # [3, 224, 224] CLIP's zero-shot input; None unless asked for
    key: str = ""  # the id seeding the image's draws: its sample_id in a cache, its content id in scoring


@dataclass
class DecodedBatch:
    """One batch as the loader yields it: images stacked in the worker, ready for a pinned copy."""

    indices: list[int]
    """Rows of the batch, in order."""
    errors: list[str]
    """Per row: "" when decoded, else why not."""
    lare_images: torch.Tensor
    """[G, 3, S, S] in [-1, 1]: the G decodable rows, in order (G may be 0)."""
    backbone_images: torch.Tensor
    """[G, 3, 224, 224] normalised, same rows."""
    view_images: torch.Tensor | None = None
    """[G, K, 3, 224, 224] normalised augmented views, same rows; None without views."""
    clip_images: torch.Tensor | None = None
    """[G, 3, 224, 224] CLIP's zero-shot inputs, same rows; None unless asked for."""
    keys: list[str] = dataclasses.field(default_factory=list)
    """Per row: the id seeding its draws ("" for a row that failed before it was known)."""

    @property
    def good_indices(self) -> list[int]:
        return [i for i, e in zip(self.indices, self.errors) if not e]

    def pin_memory(self) -> "DecodedBatch":
        """Called by the DataLoader (``pin_memory=True``) so the host-to-GPU copy can be non-blocking."""
        pinned = {name: getattr(self, name).pin_memory() for name in ("view_images", "clip_images")
                  if getattr(self, name) is not None}
        return dataclasses.replace(self, lare_images=self.lare_images.pin_memory(),
                                   backbone_images=self.backbone_images.pin_memory(), **pinned)


def prepare_sample(index: int, read: Callable[[], tuple[Image.Image, str]], image_size: int, *,
                   steps: Sequence[Step] = (), run_seed: int = 0, views: int = 0,
                   zero_shot: bool = False) -> DecodedSample:
    """One image -> its model inputs, or the reason it has none; a failure is the row's error, never an exception.

    The one preparation of an image, for extraction (``ManifestImages``) and scoring (``lare2.detect``) alike.
    ``read()`` gives the decoded RGB image and the key that seeds its draws (``sample_seed(run_seed, key)``);
    ``steps`` (the config's ``perturb`` then ``normalize`` chain) run on it with that seed, then come the LaRE
    input (docs/method.md §1.2), the backbone input (§2.2), ``views`` augmented backbone inputs seeded alike,
    and with ``zero_shot`` CLIP's zero-shot input (``lare2.extract.clip_text``).
    """
    try:
        image, key = read()
        seed = sample_seed(run_seed, key)
        image = apply_chain(image, steps, seed)
        return DecodedSample(index, lare_input(image, image_size), backbone_input(image), "",
                             view_images=view_inputs(image, seed, views) if views else None,
                             clip_image=zero_shot_input(image) if zero_shot else None, key=key)
    except (ImageError, OSError) as err:
        return DecodedSample(index, None, None, one_line(err))
    except Exception as err:  # noqa: BLE001 - any failure of one image is that image's recorded error
        return DecodedSample(index, None, None, f"{type(err).__name__}: {err}")


class ManifestImages(Dataset):
    """Rows of the cache -> decoded model inputs (or the reason they could not be decoded)."""

    def __init__(self, root: Path, paths: Sequence[str], image_size: int, max_pixels: int, *,
                 steps: Sequence[Step] = (), sample_ids: Sequence[str] = (), run_seed: int = 0, views: int = 0):
        """``steps``: applied to each decoded image in order (``ExtractConfig.image_steps()``), seeded
        with ``sample_seed(run_seed, sample_ids[index])``, the seed of the sample's LaRE draws; ``views``:
        augmented views per image (``ExtractConfig.views``), of the image after the steps, seeded alike."""
        self.root, self.paths, self.image_size, self.max_pixels = root, list(paths), image_size, max_pixels
        self.steps, self.sample_ids, self.run_seed, self.views = tuple(steps), list(sample_ids), run_seed, views
        if (self.steps or self.views) and len(self.sample_ids) != len(self.paths):
            raise ValueError(f"image steps and views need one sample id per path ({len(self.sample_ids)} ids, "
                             f"{len(self.paths)} paths)")

    def __len__(self) -> int:
        return len(self.paths)

    def decoded(self, index: int) -> tuple[Image.Image, str]:
        """Row ``index`` decoded, and its sample id ("" when the dataset was given none)."""
        image = decode_rgb(read_image_bytes(self.root, self.paths[index]), max_pixels=self.max_pixels)
        return image, self.sample_ids[index] if self.sample_ids else ""

    def image(self, index: int) -> Image.Image:
        """Row ``index`` as the models see it before their own resize/crop: decoded, perturbed, normalised."""
        image, key = self.decoded(index)
        return apply_chain(image, self.steps, sample_seed(self.run_seed, key))

    def __getitem__(self, index: int) -> DecodedSample:
        return prepare_sample(index, lambda: self.decoded(index), self.image_size, steps=self.steps,
                              run_seed=self.run_seed, views=self.views)


def collate_decoded(samples: list[DecodedSample]) -> DecodedBatch:
    """Samples -> one batch: the decodable rows' inputs stacked, in order."""
    good = [s for s in samples if not s.error]

    def stacked(name: str) -> torch.Tensor | None:
        present = [getattr(s, name) for s in good if getattr(s, name) is not None]
        return torch.stack(present) if present else None

    empty = torch.empty(0)
    return DecodedBatch(
        indices=[s.index for s in samples],
        errors=[s.error for s in samples],
        lare_images=torch.stack([s.lare_image for s in good]) if good else empty,
        backbone_images=torch.stack([s.backbone_image for s in good]) if good else empty,
        view_images=stacked("view_images"),
        clip_images=stacked("clip_image"),
        keys=[s.key for s in samples],
    )


def block_batches(cache: FeatureCache, blocks: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches of row indices; a batch never spans two blocks, so a block completes in order."""
    batches = []
    for block in blocks:
        rows = list(range(*cache.block_slice(block).indices(len(cache))))
        batches += [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    return batches
