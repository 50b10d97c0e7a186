"""Metrics against scikit-learn on hand-made scores; threshold calibration on validation reals."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score

from lare2.train.calibration import calibrate_threshold
from lare2.train.metrics import detection_metrics, tpr_at_fpr


def test_metrics_equal_sklearn_and_hand_counts() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 0])
    scores = np.array([0.1, 0.4, 0.6, 0.2, 0.9, 0.3, 0.8, 0.55, 0.7, 0.05])
    m = detection_metrics(labels, scores, threshold=0.35)
    assert m["acc"] == pytest.approx(accuracy_score(labels, scores > 0.5)) == pytest.approx(0.8)
    assert m["real_acc"] == pytest.approx(4 / 5)  # only the 0.6 real is called fake
    assert m["fake_acc"] == pytest.approx(4 / 5)  # only the 0.3 fake is missed
    assert m["ap"] == pytest.approx(average_precision_score(labels, scores))
    assert m["auc"] == pytest.approx(roc_auc_score(labels, scores))
    assert m["acc@thr"] == pytest.approx(accuracy_score(labels, scores > 0.35)) == pytest.approx(0.7)
    assert m["real_acc@thr"] == pytest.approx(3 / 5) and m["fake_acc@thr"] == pytest.approx(4 / 5)
    assert (m["n_real"], m["n_fake"]) == (5, 5)
    # TPR at FPR 0: fakes above the highest real (0.6): 0.9, 0.8, 0.7 -> 3/5; at FPR 20%: one real above -> 0.55 too
    assert tpr_at_fpr(labels, scores, 0.0) == pytest.approx(3 / 5)
    assert tpr_at_fpr(labels, scores, 0.2) == pytest.approx(4 / 5)
    assert m["tpr@0.01fpr"] == pytest.approx(3 / 5)


def test_one_class_gives_nan_ranking_metrics_but_class_accuracy() -> None:
    m = detection_metrics(np.ones(4, int), np.array([0.9, 0.2, 0.7, 0.6]))
    assert m["fake_acc"] == pytest.approx(0.75) and np.isnan(m["real_acc"])
    assert np.isnan(m["ap"]) and np.isnan(m["auc"]) and np.isnan(m["tpr@0.05fpr"])


@pytest.mark.parametrize("target", [0.01, 0.05, 0.2])
def test_calibrated_threshold_holds_its_fpr_on_validation_reals(target: float) -> None:
    reals = np.random.default_rng(0).beta(2, 5, size=997)
    t = calibrate_threshold(reals, target)
    fpr = float((reals > t).mean())
    assert fpr <= target
    assert fpr > target - 2 / reals.size  # as tight as the sample allows (no ties here)
    assert t in reals  # an observed score, found without any fake or test label


def test_calibration_with_ties_never_exceeds_the_target() -> None:
    reals = np.array([0.1] * 50 + [0.9] * 50)
    assert (reals > calibrate_threshold(reals, 0.05)).mean() <= 0.05
    with pytest.raises(ValueError, match="no real"):
        calibrate_threshold(np.empty(0), 0.05)


def test_balanced_accuracy_weighs_both_classes_equally() -> None:
    labels = np.array([0] * 8 + [1] * 2)
    scores = np.array([0.1] * 8 + [0.9, 0.2])  # reals all right, one fake of two right
    plain, balanced = detection_metrics(labels, scores, 0.5), detection_metrics(labels, scores, 0.5, balanced=True)
    assert plain["acc"] == pytest.approx(0.9) and plain["acc@thr"] == pytest.approx(0.9)
    assert balanced["acc"] == pytest.approx(0.75) and balanced["acc@thr"] == pytest.approx(0.75)
    assert balanced["real_acc"] == plain["real_acc"] == 1.0 and balanced["fake_acc"] == 0.5
