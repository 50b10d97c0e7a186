"""ImageNet class of a GenImage file, from its name alone (the LaRE^2 authors' rule).

GenImage names its images so that the ImageNet class can be read back; LaRE extraction puts the
class's first synonym in the prompt ``a photo of a {class}``. The rule, on the part of the file
name before the first ``_``:

- 3 characters or fewer: it is the class index (``371_sdv5_00145.png`` -> 371; ADM, BigGAN,
  Midjourney, SD, Wukong);
- ``ILSVRC2012``: an ImageNet validation image (``ILSVRC2012_val_00000001.JPEG``): its synset
  from the validation table, then the synset's index (real images);
- ``GLIDE`` or ``VQDM``: the class index is the 5th ``_``-separated field (index 4);
- otherwise a WordNet synset ``n\\d{8}`` (``n03594945_36929.JPEG``: ImageNet train images).

A name that fits none of these yields ``None`` / ``""`` and a debug log line, never an error:
manifests of non-GenImage data simply carry no class name. Data: ``shared/data/`` (see its
``ATTRIBUTION.md``). ``check_class_name`` checks a class given by hand (``lare2 score --class-name``)
against the names prompts use, suggesting close ones.
"""

from __future__ import annotations

import gzip
import json
import re
from functools import lru_cache
from importlib import resources

from lare2.shared.logs import get_logger

logger = get_logger(__name__)

NUM_CLASSES = 1000
NUM_VAL_IMAGES = 50_000

_SYNSET = re.compile(r"n\d{8}")
_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})(\.[A-Za-z]+)?")
# Prefixes whose class index sits in the 5th field: GLIDE_1000_200_08_808_glide_00000.png -> 808.
_INDEX_IN_FIFTH_FIELD = ("GLIDE", "VQDM")


def _data_text(name: str) -> str:
    return resources.files("lare2.shared").joinpath("data", name).read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def _synonyms() -> dict[int, str]:
    """Class index -> comma-separated synonyms."""
    return {int(k): v for k, v in json.loads(_data_text("idx_to_clsname.json")).items()}


@lru_cache(maxsize=1)
def _synset_to_index() -> dict[str, int]:
    """Synset folder -> class index, from lines ``mv IDX/ SYNSET/``."""
    table = {}
    for line in _data_text("idx_to_folder.txt").splitlines():
        if line.strip():
            _, index, synset = line.split()
            table[synset.rstrip("/")] = int(index.rstrip("/"))
    return table


@lru_cache(maxsize=1)
def _val_synsets() -> tuple[str, ...]:
    """Entry i-1 is the synset of ``ILSVRC2012_val_{i:08d}.JPEG``."""
    raw = resources.files("lare2.shared").joinpath("data", "imagenet_val_synsets.txt.gz").read_bytes()
    synsets = tuple(gzip.decompress(raw).decode("ascii").split())
    if len(synsets) != NUM_VAL_IMAGES:
        raise RuntimeError(f"imagenet_val_synsets.txt.gz holds {len(synsets)} entries, expected {NUM_VAL_IMAGES}")
    return synsets


def _basename(name: str) -> str:
    """File name without folders (posix or Windows separators, or a tar ``shard::member``)."""
    return re.split(r"[/\\:]", name)[-1]


def _parse_index(text: str) -> int | None:
    index = int(text) if text.isdigit() else -1
    return index if 0 <= index < NUM_CLASSES else None


def class_index_from_filename(name: str) -> int | None:
    """ImageNet class index (0..999) of a GenImage file name, or None when no rule applies.

    ``name`` may carry folders; only the file name counts.
    """
    filename = _basename(name)
    fields = filename.split("_")
    prefix = fields[0]
    index: int | None = None
    if "_" not in filename:
        pass
    elif len(prefix) <= 3:
        index = _parse_index(prefix)
    elif prefix == "ILSVRC2012":
        # The authors key on the full name "ILSVRC2012_val_XXXXXXXX.JPEG"; any image extension
        # is accepted here so that re-encoded copies (.png) keep their class.
        match = _VAL_NAME.fullmatch(filename)
        number = int(match.group(1)) if match else 0
        if 1 <= number <= NUM_VAL_IMAGES:
            index = _synset_to_index().get(_val_synsets()[number - 1])
    elif prefix in _INDEX_IN_FIFTH_FIELD:
        index = _parse_index(fields[4]) if len(fields) > 4 else None
    elif _SYNSET.fullmatch(prefix):
        index = _synset_to_index().get(prefix)
    if index is None:
        logger.debug("no ImageNet class in file name %r", filename)
    return index


def class_name(index: int) -> str:
    """First synonym of an ImageNet class (``0`` -> ``"tench"``)."""
    synonyms = _synonyms()
    if index not in synonyms:
        raise ValueError(f"ImageNet class index must be in [0, {NUM_CLASSES}), got {index!r}")
    return synonyms[index].split(",")[0].strip()


def class_name_from_filename(name: str) -> str:
    """First synonym of the file's ImageNet class, ``""`` when no rule applies."""
    index = class_index_from_filename(name)
    return "" if index is None else class_name(index)


@lru_cache(maxsize=1)
def class_names() -> tuple[str, ...]:
    """The 1,000 names prompts use: each class's first synonym, by class index."""
    return tuple(class_name(index) for index in range(NUM_CLASSES))


def check_class_name(value: str, what: str = "class name") -> str:
    """``value`` when it is a class name prompts use (``class_names()``); else ``InputError`` naming it and the
    closest names (difflib), among them the first synonym of a class that ``value`` is another synonym of."""
    import difflib

    from lare2.shared.errors import InputError

    if value in class_names():
        return value
    lowered = value.strip().lower()
    same_class = [class_name(i) for i, synonyms in _synonyms().items()
                  if lowered in (s.strip().lower() for s in synonyms.split(","))]
    close = same_class + difflib.get_close_matches(lowered, class_names(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(repr(c) for c in dict.fromkeys(close))}? " if close else ""
    raise InputError(f"{what} {value!r}: not an ImageNet class name (the first synonym of one of the "
                     f"{NUM_CLASSES} classes, as prompts use it); {hint}the names are in "
                     "shared/data/idx_to_clsname.json; 'auto' asks CLIP's zero-shot classifier")
