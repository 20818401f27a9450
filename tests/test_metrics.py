"""Metrics against hand-computed cases, and the threshold policy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cxr_worker.model import metrics


def test_auc_hand_computed():
    # positives 0.8, 0.4; negatives 0.5, 0.1: pairs (0.8>0.5) (0.8>0.1) (0.4<0.5) (0.4>0.1)
    assert metrics.roc_auc([1, 1, 0, 0], [0.8, 0.4, 0.5, 0.1]) == pytest.approx(3 / 4)


def test_auc_counts_ties_as_half():
    assert metrics.roc_auc([1, 0], [0.3, 0.3]) == pytest.approx(0.5)
    assert metrics.roc_auc([1, 1, 0], [0.9, 0.3, 0.3]) == pytest.approx((1 + 0.5) / 2)


def test_auc_perfect_and_inverted():
    assert metrics.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert metrics.roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0


def test_auc_needs_both_classes():
    with pytest.raises(ValueError, match="each class"):
        metrics.roc_auc([1, 1], [0.2, 0.3])


def test_confusion_hand_computed():
    y = [1, 1, 1, 0, 0, 0, 0]
    p = [0.9, 0.6, 0.2, 0.7, 0.4, 0.1, 0.5]
    c = metrics.confusion(y, p, 0.5)  # >= 0.5 is positive
    assert (c.tp, c.fn, c.fp, c.tn) == (2, 1, 2, 2)
    assert c.sensitivity == pytest.approx(2 / 3)
    assert c.specificity == pytest.approx(2 / 4)
    assert c.precision == pytest.approx(2 / 4)
    assert c.accuracy == pytest.approx(4 / 7)
    assert c.f1 == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))


def test_ece_hand_computed():
    # bin [0.2,0.3): p=0.25 twice, 1 positive -> |0.5-0.25|; bin [0.9,1): p=0.95, positive
    ece = metrics.expected_calibration_error([1, 0, 1], [0.25, 0.25, 0.95])
    assert ece == pytest.approx((2 / 3) * 0.25 + (1 / 3) * 0.05)


def test_bootstrap_interval_contains_the_auc():
    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(100), np.ones(100)]
    p = np.r_[rng.normal(0, 1, 100), rng.normal(1.5, 1, 100)]
    lo, hi = metrics.bootstrap_auc_ci(y, p, n_boot=300)
    auc = metrics.roc_auc(y, p)
    assert lo < auc < hi
    assert hi - lo < 0.2


def test_threshold_keeps_sensitivity_and_is_the_most_specific():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(300), np.ones(200)]
    p = np.r_[rng.beta(2, 5, 300), rng.beta(5, 2, 200)]
    t = metrics.select_threshold(y, p, 0.98)
    assert metrics.confusion(y, p, t).sensitivity >= 0.98
    # the boundary case is the lowest positive above t: a threshold above it loses sensitivity
    above = np.sort(p[(y == 1) & (p > t)])
    assert metrics.confusion(y, p, above[0]).sensitivity >= 0.98
    assert metrics.confusion(y, p, above[1]).sensitivity < 0.98
    assert not ((p > t) & (p < above[0])).any(), "no case lies between t and the boundary"


def test_threshold_hand_computed():
    # 50 positives, 2% may be missed: exactly one below the threshold
    pos = np.linspace(0.1, 0.99, 50)
    y = np.r_[np.ones(50), np.zeros(3)]
    p = np.r_[pos, [0.05, 0.5, 0.95]]
    # the case to keep is pos[1]; the next lower score is pos[0]: midway between them
    assert metrics.select_threshold(y, p, 0.98) == pytest.approx((pos[1] + pos[0]) / 2)
    # all must be caught: midway between the lowest positive and the negative below it
    assert metrics.select_threshold(y, p, 1.0) == pytest.approx((pos[0] + 0.05) / 2)


def test_roc_curve_endpoints():
    fpr, tpr, th = metrics.roc_curve([0, 1, 0, 1], [0.1, 0.9, 0.4, 0.6])
    assert (fpr[0], tpr[0]) == (0, 0) and math.isinf(th[0])
    assert (fpr[-1], tpr[-1]) == (1, 1)


# -- shift-robust operating point, trade-off table, intervals -------------------------------
def test_robust_threshold_is_the_lowest_per_condition_threshold():
    y = [1, 1, 1, 1, 0, 0]
    easy = [0.9, 0.8, 0.7, 0.6, 0.2, 0.1]
    shifted = [0.9, 0.8, 0.7, 0.3, 0.2, 0.1]  # one pneumonia scores lower under the shift
    th, binding = metrics.select_threshold_robust(y, {"validation": easy, "blur": shifted}, 1.0)
    assert binding == "blur"
    assert th == pytest.approx(metrics.select_threshold(y, shifted, 1.0)) == pytest.approx(0.25)
    assert metrics.confusion(y, shifted, th).sensitivity == 1.0
    assert metrics.confusion(y, easy, th).sensitivity == 1.0
    with pytest.raises(ValueError, match="no condition"):
        metrics.select_threshold_robust(y, {})


def test_tradeoff_table_rows():
    rows = metrics.tradeoff_table([1, 0, 1, 0], {"a": [0.9, 0.6, 0.4, 0.1]}, [0.5])
    assert rows == [{"threshold": 0.5,
                     "conditions": {"a": {"sensitivity": 0.5, "specificity": 0.5}}}]


def test_histogram_fractions():
    h = metrics.histogram([0.0, 0.05, 0.55, 1.0], n_bins=10)
    assert h[0] == 0.5 and h[5] == 0.25 and h[9] == 0.25 and sum(h) == pytest.approx(1.0)


def test_wilson_interval_known_values():
    lo, hi = metrics.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = metrics.wilson_interval(50, 100)
    assert (lo, hi) == (pytest.approx(0.4038, abs=1e-4), pytest.approx(0.5962, abs=1e-4))
    assert all(math.isnan(v) for v in metrics.wilson_interval(0, 0))


def test_bootstrap_threshold_ci_brackets_the_estimate():
    rng = np.random.default_rng(1)
    y = np.r_[np.ones(200), np.zeros(200)]
    p = np.r_[rng.beta(5, 2, 200), rng.beta(2, 5, 200)]
    th = metrics.select_threshold(y, p, 0.95)
    lo, hi = metrics.bootstrap_threshold_ci(y, p, 0.95, n_boot=200)
    assert lo <= th <= hi and hi - lo < 0.3
