"""Detection metrics on p(fake) scores (scikit-learn) and the validation loss.

Convention: label 1 = fake (positive), 0 = real; an image is called fake when ``p_fake > threshold``
(the threshold itself is set in ``lare2.train.calibration``).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, average_precision_score, balanced_accuracy_score, roc_auc_score, roc_curve

TPR_AT_FPR = (0.01, 0.05)


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr_target: float) -> float:
    """Highest TPR on the ROC curve whose FPR does not exceed ``fpr_target``."""
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(tpr[fpr <= fpr_target + 1e-12].max())


def _class_accuracy(labels: np.ndarray, predicted_fake: np.ndarray, cls: int) -> float:
    mask = labels == cls
    return float((predicted_fake[mask] == bool(cls)).mean()) if mask.any() else float("nan")


def detection_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float | None = None, *,
                      balanced: bool = False) -> dict[str, float]:
    """ACC/real ACC/fake ACC at 0.5, AP, ROC-AUC, TPR at 1% and 5% FPR, ACC at ``threshold``, counts.

    ``acc`` is accuracy over all samples, or with ``balanced`` the mean of the real and fake
    accuracies (for a row whose reals are pooled from elsewhere and so outnumber its fakes).
    Ranking metrics (AP, AUC, TPR@FPR) need both classes and are NaN otherwise; the class
    accuracies are NaN for an absent class.
    """
    labels = np.asarray(labels).astype(np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must be equal 1-d shapes")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf")
    predicted = scores > 0.5
    both = (labels == 0).any() and (labels == 1).any()
    accuracy = balanced_accuracy_score if balanced and both else accuracy_score
    out = {
        "acc": float(accuracy(labels, predicted.astype(np.int64))) if labels.size else float("nan"),
        "real_acc": _class_accuracy(labels, predicted, 0),
        "fake_acc": _class_accuracy(labels, predicted, 1),
        "ap": float(average_precision_score(labels, scores)) if both else float("nan"),
        "auc": float(roc_auc_score(labels, scores)) if both else float("nan"),
    }
    for target in TPR_AT_FPR:
        out[f"tpr@{target:g}fpr"] = tpr_at_fpr(labels, scores, target) if both else float("nan")
    if threshold is not None:
        calibrated = scores > threshold
        out["acc@thr"] = float(accuracy(labels, calibrated.astype(np.int64))) if labels.size else float("nan")
        out["real_acc@thr"] = _class_accuracy(labels, calibrated, 0)
        out["fake_acc@thr"] = _class_accuracy(labels, calibrated, 1)
    out["n_real"] = int((labels == 0).sum())
    out["n_fake"] = int((labels == 1).sum())
    return out


def validation_loss(labels: np.ndarray, p_fake: np.ndarray) -> float:
    """Mean cross-entropy of the scores (p clipped to [1e-7, 1 - 1e-7])."""
    p = np.clip(p_fake, 1e-7, 1 - 1e-7)
    return float(-np.mean(np.where(labels == 1, np.log(p), np.log1p(-p))))
