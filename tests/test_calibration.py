"""Platt scaling: fitted by maximum likelihood, monotonic, read from the model card."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_worker.model import metrics
from cxr_worker.model.calibration import Platt, fit_platt, logit


def _synthetic(a: float, b: float, n: int = 20000, seed: int = 0):
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, n)
    p_true = 1 / (1 + np.exp(-(a * z + b)))
    y = (rng.random(n) < p_true).astype(int)
    raw = 1 / (1 + np.exp(-z))  # an over- or under-confident model's output
    return y, raw


@pytest.mark.parametrize(("a", "b"), [(0.5, 0.0), (2.0, -0.5), (1.0, 1.0)])
def test_fit_recovers_the_generating_map(a, b):
    y, raw = _synthetic(a, b)
    fit = fit_platt(y, raw)
    assert fit.a == pytest.approx(a, rel=0.08)
    assert fit.b == pytest.approx(b, abs=0.08)


def test_calibration_lowers_ece_and_keeps_the_ranking():
    y, raw = _synthetic(0.4, 0.8)  # raw scores far too confident
    fit = fit_platt(y, raw)
    cal = fit(raw)
    assert metrics.expected_calibration_error(y, cal) < 0.02
    assert metrics.expected_calibration_error(y, raw) > 0.1
    assert metrics.roc_auc(y, cal) == pytest.approx(metrics.roc_auc(y, raw))
    assert np.all(np.diff(cal[np.argsort(raw)]) >= 0)


def test_separable_data_gives_a_finite_slope():
    fit = fit_platt([0, 0, 0, 1, 1, 1], [0.01, 0.02, 0.03, 0.97, 0.98, 0.99])
    assert 0 < fit.a < 10 and fit(np.array([0.999]))[0] < 0.999


def test_one_and_identity():
    f = Platt(1.7, -0.3)
    for raw in (1e-9, 0.02, 0.5, 0.93, 1 - 1e-9):
        assert f.one(raw) == pytest.approx(float(f(np.array([raw]))[0]))
    assert Platt().one(0.37) == pytest.approx(0.37)
    assert float(logit(0.5)) == 0.0


def test_from_card():
    assert Platt.from_card({}) == Platt()  # a card from before calibration: raw scores
    assert Platt.from_card({"calibration": {"method": "platt", "a": 2, "b": 1}}) == Platt(2, 1)
    with pytest.raises(ValueError, match="unknown calibration"):
        Platt.from_card({"calibration": {"method": "isotonic"}})
    with pytest.raises(ValueError, match="positive"):
        Platt.from_card({"calibration": {"method": "platt", "a": -1, "b": 0}})


def test_fit_needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        fit_platt([1, 1], [0.2, 0.3])
