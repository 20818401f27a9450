"""Probability calibration: Platt scaling of the model's logit, fitted on validation.

The network's sigmoid output ranks cases well but its values are not frequencies (class
weights and augmentation push them around). The served probability is
``sigmoid(a * logit(p_raw) + b)``, with ``a`` and ``b`` fitted by maximum likelihood on the
validation split and recorded in the model card (``calibration``); with ``a = 1/T, b = 0``
this is temperature scaling. The map is monotonic, so it never reorders cases: the threshold is
expressed on the calibrated scale and decides exactly what it decided on the raw one.

The calibrated probability is the frequency of pneumonia among validation images scored alike
(validation prevalence: 74% pneumonia). At a site with fewer pneumonias the same image has a
lower chance of pneumonia; that is what ``cxr-worker calibrate`` is for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

_EPS = 1e-7


def logit(p: ArrayLike) -> NDArray[np.float64]:
    q = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    out: NDArray[np.float64] = np.log(q) - np.log1p(-q)
    return out


def sigmoid_one(z: float) -> float:
    """The logistic function of one value, without overflow for large ``|z|``."""
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def _sigmoid(z: NDArray[np.float64]) -> NDArray[np.float64]:
    out: NDArray[np.float64] = 0.5 * (1.0 + np.tanh(0.5 * z))
    return out


@dataclass(frozen=True)
class Platt:
    """``p = sigmoid(a * logit(raw) + b)``; the identity is ``Platt(1, 0)``."""

    a: float = 1.0
    b: float = 0.0

    def __call__(self, raw: ArrayLike) -> NDArray[np.float64]:
        return _sigmoid(self.a * logit(raw) + self.b)

    def one(self, raw: float) -> float:
        return sigmoid_one(self.a * float(logit(raw)) + self.b)

    def as_dict(self) -> dict[str, float | str]:
        return {"method": "platt", "a": self.a, "b": self.b}

    @classmethod
    def from_card(cls, card: dict[str, object]) -> Platt:
        cal = card.get("calibration")
        if not isinstance(cal, dict):
            return cls()  # a model card from before calibration: raw probabilities
        if cal.get("method") != "platt":
            raise ValueError(f"unknown calibration method {cal.get('method')!r}")
        a, b = float(cal["a"]), float(cal["b"])
        if not a > 0:
            raise ValueError(f"calibration slope a={a} must be positive (monotonic map)")
        return cls(a, b)


def fit_platt(y_true: ArrayLike, raw: ArrayLike, iterations: int = 100) -> Platt:
    """Maximum-likelihood ``a, b`` by Newton's method on the logistic log-loss.

    Uses Platt's (1999) target smoothing, ``(n_pos + 1) / (n_pos + 2)`` for positives and
    ``1 / (n_neg + 2)`` for negatives, so a separable validation set cannot push ``a`` to
    infinity (which would print certainties nothing supports).
    """
    t = np.asarray(y_true, dtype=np.float64).ravel()
    z = logit(raw).ravel()
    n_pos, n_neg = t.sum(), t.size - t.sum()
    if n_pos == 0 or n_neg == 0:
        raise ValueError("calibration needs cases of both classes")
    target = np.where(t == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    def loss(a: float, b: float) -> float:
        q = np.clip(_sigmoid(a * z + b), 1e-15, 1 - 1e-15)
        return float(-(target * np.log(q) + (1 - target) * np.log1p(-q)).sum())

    a, b = 1.0, 0.0
    current = loss(a, b)
    for _ in range(iterations):
        p = _sigmoid(a * z + b)
        g = p - target
        w = np.maximum(p * (1 - p), 1e-12)
        grad = np.array([(g * z).sum(), g.sum()])
        hess = np.array([[(w * z * z).sum(), (w * z).sum()], [(w * z).sum(), w.sum()]])
        step = np.linalg.solve(hess + np.eye(2) * 1e-9, grad)
        # damped Newton: halve the step until the loss does not rise (Newton alone can
        # overshoot far from the optimum)
        scale = 1.0
        while scale > 1e-6 and loss(a - scale * step[0], b - scale * step[1]) > current:
            scale /= 2
        a, b = a - scale * step[0], b - scale * step[1]
        current = loss(a, b)
        if np.abs(scale * step).max() < 1e-10:
            break
    if not a > 0:
        raise ValueError("calibration found no increasing relation between score and label")
    return Platt(float(a), float(b))
