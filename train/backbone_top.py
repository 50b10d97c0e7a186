"""``--train-backbone-top``: the backbone's layer4 + attention pool, from the weights a cache was made with
(docs/method.md §2.4).

The weights are read by the same code as stage 1's (``shared/clip_weights.py::load_tower``), so a
file, a state dict or a named seeded tower (``tiny``, ``small``) gives the fingerprint stage 1
recorded in the cache (``attrs["fingerprints"]["backbone"]``); any other weights are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from lare2.shared.clip_blocks import TOP_PREFIXES
from lare2.shared.clip_weights import load_tower
from lare2.shared.config import current_keys
from lare2.train.checkpoint import CheckpointError


@dataclass
class TopWeights:
    """A tower's top, ready to load into a model's ``backbone_top``."""

    state: dict[str, torch.Tensor]
    """float32 ``layer4.*`` and ``attnpool.*`` tensors (BatchNorm statistics included)."""
    depth: int
    """Bottlenecks in layer4."""
    heads: int
    """Attention-pool heads."""
    fingerprint: str
    """Fingerprint of the whole tower: equal to the cache's."""
    source: str
    """The weights argument that was loaded."""


def load_top_weights(clip: str, cache_attrs: Mapping[str, Any], cache_path: str | Path) -> TopWeights:
    """The top of ``clip`` (``""``: the ``clip`` weights the cache's extraction recorded), checked against the cache.

    ``CheckpointError`` (one line, both fingerprints named) when the tower is not the one the cache was made with."""
    recorded = (cache_attrs.get("fingerprints") or {}).get("backbone")
    extracted_with = current_keys(cache_attrs.get("extract_config") or {}).get("clip")
    if not recorded:
        raise CheckpointError(f"{cache_path}: records no backbone fingerprint (attrs fingerprints.backbone); "
                              "--train-backbone-top needs a cache made by `lare2 extract`")
    spec = clip or extracted_with
    if not spec:
        raise CheckpointError(f"{cache_path}: records no CLIP weights (extract_config clip); "
                              "pass --clip with those it was extracted with")
    import torch

    # building the tower draws initial weights; keep the global generator where the trainer seeded it, so
    # the head starts from the same weights whatever file the tower is read from (as without a top)
    with torch.random.fork_rng(devices=[]):
        try:
            tower, fingerprint = load_tower(spec)
        except FileNotFoundError as err:
            if clip:
                raise
            raise CheckpointError(f"{err}; it is the backbone {cache_path} recorded: pass --clip with those weights "
                                  "(e.g. when training from another folder than the extraction ran in)") from None
    if fingerprint != recorded:
        source = f"--clip {spec}" if clip else f"backbone {spec!r} (the cache's recorded weights, as found here)"
        raise CheckpointError(
            f"{source}: its fingerprint {fingerprint} differs from {recorded}, the backbone fingerprint "
            f"{cache_path} records (extracted with backbone={extracted_with!r}); pass --clip with the weights "
            "the cache was made with")
    state = {k: v.detach().clone() for k, v in tower.state_dict().items() if k.startswith(TOP_PREFIXES)}
    return TopWeights(state=state, depth=tower.config.layers[3], heads=tower.config.heads, fingerprint=fingerprint,
                      source=str(spec))
