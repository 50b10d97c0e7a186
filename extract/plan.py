"""What an extraction will do, settled before any model loads (torch-free, so a refusal answers in about a second).

``plan_extraction`` reads the manifest selection and the cache at ``cfg.out`` and refuses, as a user error:

- class prompts for rows without an ImageNet class, unless ``classless_prompt=empty`` says to give them the
  empty prompt (docs/method.md §1.4; how many get it is logged, never silent). This check, not the identity,
  guards a resume: ``classless_prompt`` is no identity key (``ExtractConfig.classless_prompt``);
- an ``--out`` that cannot hold a cache (a file, a folder holding other files, an unwritable place);
- a cache there made with other settings or from another selection, naming each key. The models'
  fingerprints are compared once the models load (``lare2.extract.run.open_or_create_cache``).

The plan also says how much of this shard is left, so that a resume with nothing left loads no model.
"""

from __future__ import annotations

import collections
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from lare2.shared.cache import CacheError, FeatureCache
from lare2.shared.config import ClasslessError, ExtractConfig, current_keys, diff_identity
from lare2.shared.logs import get_logger
from lare2.shared.manifest import CACHE_COLUMNS, empty_manifest_error, read_manifest_metadata, read_selection
from lare2.shared.wording import counted, shown

log = get_logger(__name__)

SELECTION_KEY = "manifest selection (sample ids)"


def manifest_digest(sample_ids: Sequence[str]) -> str:
    """What identifies a cache's selection: a digest of its sample ids, in order."""
    return hashlib.sha256("\n".join(sample_ids).encode()).hexdigest()[:16]


@dataclass
class ExtractionPlan:
    """The selection, and what the cache at ``--out`` already holds of it."""

    rows: dict
    """Manifest columns (``CACHE_COLUMNS``) of the selected rows, in order."""
    root: Path
    """The folder the manifest's paths are relative to."""
    classless: int = 0
    """Rows that get the empty prompt for lack of an ImageNet class (class prompts, ``classless_prompt=empty``)."""
    cache_exists: bool = False
    shard_blocks: list[int] = field(default_factory=list)
    """This array-job shard's blocks (an existing cache only)."""
    done_blocks: int = 0
    """How many of ``shard_blocks`` are done."""
    same_models: bool = False
    """The cache was made from the models this run names (the same ``sd`` and ``clip``)."""
    counts: dict = field(default_factory=dict)
    """The existing cache's status counts."""

    @property
    def nothing_to_do(self) -> bool:
        """A finished shard of a cache made with these settings and models: no model needs to load."""
        return self.cache_exists and self.same_models and self.done_blocks == len(self.shard_blocks)


def selected_rows(cfg: ExtractConfig) -> tuple[dict, Path]:
    """(manifest columns of the selection, the images' root); CacheError for an empty selection."""
    table = read_selection(cfg.manifest, split=cfg.split, generators=cfg.generators, limit=cfg.limit)
    if table.num_rows == 0 and read_selection(cfg.manifest).num_rows == 0:
        raise empty_manifest_error(cfg.manifest)
    if table.num_rows == 0:
        raise CacheError(f"{cfg.manifest}: no rows for split={cfg.split or 'all'} "
                         f"generators={','.join(cfg.generators) or 'all'}; check --split and --generator "
                         "against lare2 manifest show")
    root = read_manifest_metadata(cfg.manifest)["root"]
    return {c: table.column(c).to_pylist() for c in CACHE_COLUMNS}, Path(root)


def check_class_prompts(cfg: ExtractConfig, class_names: Sequence[str], *, quiet: bool = False) -> int:
    """How many rows get the empty prompt for lack of a class; ``ClasslessError`` when class prompts are refused."""
    if cfg.prompt_mode != "class":
        return 0
    missing = sum(not name for name in class_names)
    if missing and cfg.classless_prompt == "refuse":
        where = f" (split {cfg.split})" if cfg.split else ""
        raise ClasslessError(
            f"{cfg.manifest}: {missing} of {counted(len(class_names), 'selected row')}{where} have no ImageNet "
            "class for prompt_mode=class (their file names are not GenImage-style); pass --prompt-mode empty "
            "for one empty prompt everywhere, or --set classless_prompt=empty to give only those rows the "
            "empty prompt (recorded, so lare2 score does the same)")
    if missing and not quiet:
        log.info("%s: %d of %s have no ImageNet class and get the empty prompt (classless_prompt=empty)",
                 cfg.manifest, missing, counted(len(class_names), "selected row"))
    return missing


def shard_blocks(num_blocks: int, num_shards: int, shard_index: int) -> list[int]:
    """Blocks owned by one array-job shard: ``block % num_shards == shard_index``."""
    return list(range(shard_index, num_blocks, num_shards))


def check_out(out: Path) -> None:
    """CacheError when ``out`` cannot become or be a cache: a file, a folder of other files, nowhere to write."""
    if (out / "zarr.json").exists():
        return
    if out.exists() and not out.is_dir():
        raise CacheError(f"{out}: a file, not a cache folder; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        raise CacheError(f"{out}: a folder holding other files, not a lare2 cache (no zarr.json); choose a new "
                         "or empty folder for --out")
    parent = next(p for p in (out, *out.parents) if p.exists() or p == Path(p.anchor))
    if not parent.is_dir():
        raise CacheError(f"{out}: {parent} is a file, not a folder; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CacheError(f"{out}: cannot write into {parent} (permission denied); choose another --out")


def mismatch_error(out: Path, differing: dict[str, tuple]) -> CacheError:
    """The refusal to extract into a cache made otherwise, naming each differing key and both values."""
    lines = "; ".join(f"{key}: cache has {shown(ours)}, this run {shown(theirs)}"
                      for key, (ours, theirs) in differing.items())
    return CacheError(f"{out}: refusing to extract into a cache made with another configuration ({lines}). "
                      f"Use another --out, or the cache's own settings.")


def settings_differences(cfg: ExtractConfig, attrs: dict, digest: str) -> dict[str, tuple]:
    """{key: (cache's, this run's)} for every setting (model fingerprints aside) and the selection that differ."""
    stored = {k: v for k, v in attrs.get("identity", {}).items() if not k.startswith("fingerprint.")}
    differing = diff_identity(stored, cfg.identity({}))
    stored_digest = attrs.get("manifest", {}).get("digest")
    if stored_digest != digest:
        differing[SELECTION_KEY] = (stored_digest, digest)
    return differing


def plan_extraction(cfg: ExtractConfig, *, quiet: bool = False) -> ExtractionPlan:
    """Check ``cfg`` against its manifest and ``cfg.out`` before any model loads (see the module doc).

    ``quiet``: do not log the rows given the empty prompt (a caller that plans before extracting)."""
    rows, root = selected_rows(cfg)
    plan = ExtractionPlan(rows=rows, root=root, classless=check_class_prompts(cfg, rows["class_name"], quiet=quiet))
    out = Path(cfg.out)
    check_out(out)
    if not (out / "zarr.json").exists():
        return plan
    cache = FeatureCache.open(out)
    differing = settings_differences(cfg, cache.attrs, manifest_digest(rows["sample_id"]))
    if differing:
        raise mismatch_error(out, differing)
    stored = current_keys(cache.attrs.get("extract_config", {}))  # caches made before the rename too
    done = cache.done_blocks()
    plan.cache_exists = True
    plan.shard_blocks = shard_blocks(cache.num_blocks, cfg.num_shards, cfg.shard_index)
    plan.done_blocks = int(sum(done[b] for b in plan.shard_blocks))
    plan.same_models = (stored.get("sd"), stored.get("clip")) == (cfg.sd, cfg.clip)
    plan.counts = dict(cache.attrs.get("counts") or collections.Counter(cache.column("status")))
    return plan
