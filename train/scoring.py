"""p(fake) from a trained detector: for feature arrays in memory and for every ok sample of a cache split.

Training (validation each epoch), calibration, ``lare2 eval`` and scoring new images (``lare2.detect``)
all score through these two functions, so that their numbers agree.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lare2.train.data import CacheSplit, ReadSettings
from lare2.train.models import predict_features

SCORING_READ = ReadSettings(workers=2, ahead=2)
"""How ``lare2 eval`` and ``calibrate`` read a cache split: two threads read blocks ahead, as in training
(same values, same order)."""


def score_features(model: nn.Module, pooled: torch.Tensor | np.ndarray | None, fmap: torch.Tensor | np.ndarray | None,
                   lare: torch.Tensor | np.ndarray | None) -> torch.Tensor:
    """p(fake) [B] float64 for cached-style inputs (any float dtype; cast to float32 on the model's device)."""
    return predict_features(model, pooled, fmap, lare).p_fake


@torch.no_grad()
def score_split(model: nn.Module, split: CacheSplit,
                batch_size: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels [N], p_fake [N], cache row indices [N]) for every ok sample of ``split``, in store order."""
    labels, scores, indices = [], [], []
    for batch in split.sequential_batches(batch_size):
        scores.append(score_features(model, batch.pooled, batch.fmap, batch.lare).cpu().numpy())
        labels.append(batch.label.numpy())
        indices.append(batch.index)
    if not scores:
        return np.empty(0, np.int64), np.empty(0, np.float64), np.empty(0, np.int64)
    return np.concatenate(labels), np.concatenate(scores).astype(np.float64), np.concatenate(indices)
