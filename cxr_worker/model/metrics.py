"""Classification metrics for a binary triage model, in plain NumPy.

Positive class = pneumonia. Probabilities are the model's sigmoid outputs. These functions are
used by ``train`` (validation), ``evaluate`` and the tests, which check them against
hand-computed cases.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray


def _arrays(y_true: ArrayLike, y_prob: ArrayLike) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    t = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(y_prob, dtype=np.float64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"labels and probabilities differ in length: {t.size} vs {p.size}")
    if not np.isin(t, (0, 1)).all():
        raise ValueError("labels must be 0 (normal) or 1 (pneumonia)")
    return t, p


def roc_auc(y_true: ArrayLike, y_prob: ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties)."""
    t, p = _arrays(y_true, y_prob)
    n_pos = int(t.sum())
    n_neg = t.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs at least one case of each class")
    order = np.argsort(p, kind="mergesort")
    sorted_p = p[order]
    ranks = np.empty(p.size, dtype=np.float64)
    # mid-ranks over runs of equal scores
    boundaries = np.flatnonzero(np.diff(sorted_p)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [p.size]))
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    u = ranks[t == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(
    y_true: ArrayLike, y_prob: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """(false positive rate, true positive rate, thresholds), thresholds descending."""
    t, p = _arrays(y_true, y_prob)
    thresholds = np.concatenate(([np.inf], np.unique(p)[::-1]))
    tpr = np.array([((p >= th) & (t == 1)).sum() for th in thresholds]) / max(t.sum(), 1)
    fpr = np.array([((p >= th) & (t == 0)).sum() for th in thresholds]) / max((t == 0).sum(), 1)
    return fpr.astype(np.float64), tpr.astype(np.float64), thresholds


@dataclass(frozen=True)
class Confusion:
    """Counts at one threshold; a case is called positive when probability >= threshold."""

    tn: int
    fp: int
    fn: int
    tp: int

    @property
    def sensitivity(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")

    @property
    def specificity(self) -> float:
        return self.tn / (self.tn + self.fp) if self.tn + self.fp else float("nan")

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")

    @property
    def accuracy(self) -> float:
        return (self.tp + self.tn) / (self.tp + self.tn + self.fp + self.fn)

    @property
    def f1(self) -> float:
        p, r = self.precision, self.sensitivity
        return 2 * p * r / (p + r) if p + r else float("nan")

    def as_dict(self) -> dict[str, float | int]:
        return {
            **asdict(self),
            "sensitivity": self.sensitivity,
            "specificity": self.specificity,
            "precision": self.precision,
            "accuracy": self.accuracy,
            "f1": self.f1,
        }


def confusion(y_true: ArrayLike, y_prob: ArrayLike, threshold: float) -> Confusion:
    t, p = _arrays(y_true, y_prob)
    pred = p >= threshold
    return Confusion(
        tn=int(((~pred) & (t == 0)).sum()),
        fp=int((pred & (t == 0)).sum()),
        fn=int(((~pred) & (t == 1)).sum()),
        tp=int((pred & (t == 1)).sum()),
    )


def bootstrap_auc_ci(
    y_true: ArrayLike, y_prob: ArrayLike, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUC (resampling cases, both classes kept)."""
    t, p = _arrays(y_true, y_prob)
    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(n_boot):
        idx = rng.integers(0, t.size, t.size)
        if t[idx].min() == t[idx].max():
            continue
        aucs.append(roc_auc(t[idx], p[idx]))
    lo, hi = np.quantile(aucs, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def expected_calibration_error(y_true: ArrayLike, y_prob: ArrayLike, n_bins: int = 10) -> float:
    """ECE with equal-width bins: sum over bins of |accuracy - confidence| weighted by bin size."""
    t, p = _arrays(y_true, y_prob)
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            ece += mask.mean() * abs(t[mask].mean() - p[mask].mean())
    return float(ece)


def reliability_bins(
    y_true: ArrayLike, y_prob: ArrayLike, n_bins: int = 10
) -> list[dict[str, float | int]]:
    """Per-bin mean predicted probability, observed frequency and count (for the diagram)."""
    t, p = _arrays(y_true, y_prob)
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    out: list[dict[str, float | int]] = []
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            out.append(
                {
                    "bin": b,
                    "mean_probability": float(p[mask].mean()),
                    "observed_frequency": float(t[mask].mean()),
                    "count": int(mask.sum()),
                }
            )
    return out


def select_threshold(
    y_true: ArrayLike, y_prob: ArrayLike, min_sensitivity: float = 0.98
) -> float:
    """The decision threshold: the most specific one whose sensitivity is >= ``min_sensitivity``.

    A higher threshold can only lower sensitivity and raise specificity. The pneumonia case
    that must still be caught is the ``allowed + 1``-th lowest positive score; the threshold
    lies midway between that score and the next lower score of any case, so that a
    re-computation of the same probabilities with another runtime (TFLite vs Keras differ by
    ~1e-6) cannot flip the boundary case.
    """
    t, p = _arrays(y_true, y_prob)
    pos = np.sort(p[t == 1])
    if pos.size == 0:
        raise ValueError("threshold selection needs pneumonia cases")
    # allowed misses: at most floor((1 - s) * n_pos) positives may fall below the threshold
    allowed = int(np.floor((1.0 - min_sensitivity) * pos.size + 1e-9))
    boundary = pos[allowed]
    below = p[p < boundary]
    return float((boundary + below.max()) / 2.0) if below.size else float(boundary)


def select_threshold_robust(
    y_true: ArrayLike, y_prob_by_condition: Mapping[str, ArrayLike], min_sensitivity: float = 0.98
) -> tuple[float, str]:
    """The shift-robust operating point: the highest threshold that keeps sensitivity >=
    ``min_sensitivity`` under *every* condition (validation and each simulated acquisition
    shift), i.e. the lowest of the per-condition thresholds of :func:`select_threshold`.

    Returns the threshold and the condition that set it. Missing a pneumonia is the costly
    error, so the operating point is chosen where the model is weakest, not where it is best.
    """
    if not y_prob_by_condition:
        raise ValueError("no condition to choose a threshold on")
    per = {name: select_threshold(y_true, p, min_sensitivity)
           for name, p in y_prob_by_condition.items()}
    binding = min(per, key=lambda k: per[k])
    return per[binding], binding


def tradeoff_table(
    y_true: ArrayLike, y_prob_by_condition: Mapping[str, ArrayLike], thresholds: ArrayLike
) -> list[dict[str, object]]:
    """Rows ``{threshold, conditions: {name: {sensitivity, specificity}}}`` for the card."""
    rows: list[dict[str, object]] = []
    for th in np.asarray(thresholds, dtype=np.float64):
        cells: dict[str, dict[str, float]] = {}
        for name, p in y_prob_by_condition.items():
            c = confusion(y_true, p, float(th))
            cells[name] = {"sensitivity": c.sensitivity, "specificity": c.specificity}
        rows.append({"threshold": float(th), "conditions": cells})
    return rows


def histogram(y_prob: ArrayLike, n_bins: int = 10) -> list[float]:
    """Fraction of scores in each of ``n_bins`` equal-width bins of [0, 1]."""
    p = np.asarray(y_prob, dtype=np.float64).ravel()
    if p.size == 0:
        return [0.0] * n_bins
    counts = np.bincount(np.minimum((p * n_bins).astype(int), n_bins - 1), minlength=n_bins)
    return [float(c) for c in counts / p.size]


def bootstrap_threshold_ci(
    y_true: ArrayLike, y_prob: ArrayLike, min_sensitivity: float, *, n_boot: int = 1000,
    seed: int = 0, level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`select_threshold` (cases resampled per class)."""
    t, p = _arrays(y_true, y_prob)
    rng = np.random.default_rng(seed)
    pos, neg = p[t == 1], p[t == 0]
    values = []
    for _ in range(n_boot):
        bp = rng.choice(pos, pos.size)
        bn = rng.choice(neg, neg.size)
        yy = np.concatenate([np.ones(bp.size), np.zeros(bn.size)])
        values.append(select_threshold(yy, np.concatenate([bp, bn]), min_sensitivity))
    lo, hi = np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% by default); (nan, nan) when ``n`` is 0."""
    if n == 0:
        return float("nan"), float("nan")
    phat = successes / n
    denom = 1 + z * z / n
    centre = (phat + z * z / (2 * n)) / denom
    half = z * np.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / denom
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))
