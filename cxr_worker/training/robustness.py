"""Simulated acquisition shifts, to see whether an operating point survives a change of site.

Validation images come from the same acquisitions as the training images. Each shift below
is a fixed, deterministic degradation of the kind another detector, processing chain or
export path produces; the figure that matters is the specificity (and sensitivity) at the
shipped threshold, because a shift moves scores before it reorders them.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFilter

from cxr_worker.model import metrics

Grey = NDArray[np.float32]


def _u8(g: Grey) -> Image.Image:
    return Image.fromarray(np.clip(np.round(g), 0, 255).astype(np.uint8))


def _jpeg(g: Grey, quality: int) -> NDArray[Any]:
    buf = io.BytesIO()
    _u8(g).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf), np.float32)


def _contrast(g: Grey, factor: float) -> NDArray[Any]:
    out: NDArray[Any] = np.clip((g - g.mean()) * factor + g.mean(), 0, 255)
    return out


def _noise(g: Grey, sigma: float) -> NDArray[Any]:
    # the same pattern for every image (seed 0): deterministic, and a fair comparison
    rng = np.random.default_rng(0)
    out: NDArray[Any] = np.clip(g + rng.normal(0.0, sigma, g.shape), 0, 255)
    return out


def _burned_in_text(g: Grey) -> NDArray[Any]:
    img = _u8(g)
    draw = ImageDraw.Draw(img)
    h, w = g.shape
    draw.text((round(0.04 * w), round(0.04 * h)), "R", fill=255)
    draw.text((round(0.55 * w), round(0.90 * h)), "PORTABLE AP 08:42", fill=255)
    draw.rectangle((round(0.80 * w), round(0.05 * h), round(0.95 * w), round(0.09 * h)),
                   fill=230)
    return np.asarray(img, np.float32)


SHIFTS: dict[str, Callable[[Grey], NDArray[Any]]] = {
    "gamma 0.5": lambda g: 255 * (g / 255) ** 0.5,
    "gamma 2.0": lambda g: 255 * (g / 255) ** 2.0,
    "contrast x0.6": lambda g: _contrast(g, 0.6),
    "contrast x1.5": lambda g: _contrast(g, 1.5),
    "brightness +40": lambda g: np.clip(g + 40, 0, 255),
    "brightness -40": lambda g: np.clip(g - 40, 0, 255),
    "blur sigma 2": lambda g: np.asarray(_u8(g).filter(ImageFilter.GaussianBlur(2)), np.float32),
    "JPEG quality 20": lambda g: _jpeg(g, 20),
    "zoom in 15%": lambda g: np.asarray(
        _u8(g).crop((17, 17, g.shape[1] - 17, g.shape[0] - 17)).resize(g.shape[::-1]),
        np.float32),
    "black border 15%": lambda g: np.pad(g, round(0.075 * g.shape[0]), mode="constant"),
    "noise sigma 8": lambda g: _noise(g, 8.0),
    "edge enhancement": lambda g: np.asarray(
        _u8(g).filter(ImageFilter.UnsharpMask(radius=4, percent=150, threshold=0)), np.float32),
    "rotation 7 degrees": lambda g: np.asarray(
        _u8(g).rotate(7, resample=Image.Resampling.BILINEAR), np.float32),
    "burned-in text": _burned_in_text,
}
"""Each a fixed degradation. Contrast, brightness and gamma changes are nearly undone by the
contract's histogram equalisation (version 2); the others (blur, JPEG, noise, edge
enhancement, borders, rotation, burned-in text) are not, and are there to keep the battery
honest about what equalisation does not fix."""

VALIDATION = "validation"
"""The name of the unshifted condition in :func:`condition_scores`."""


def condition_scores(
    score_grey: Callable[[Grey], float], images: list[Grey]
) -> dict[str, NDArray[np.float64]]:
    """Scores of every image unshifted (``validation``) and under each shift.

    ``images`` are raw grey images (display values, before the preprocessing contract);
    ``score_grey`` applies the model's own contract (e.g. ``Scorer.score_grey``).
    """
    conditions: dict[str, Callable[[Grey], Any]] = {VALIDATION: lambda g: g, **SHIFTS}
    return {name: np.array([score_grey(shift(g)) for g in images])
            for name, shift in conditions.items()}


def shift_report(
    score_grey: Callable[[Grey], float], images: list[Grey], labels: Any, threshold: float,
) -> dict[str, dict[str, float]]:
    """AUC, sensitivity and specificity at ``threshold`` under each shift."""
    out: dict[str, dict[str, float]] = {}
    for name, p in condition_scores(score_grey, images).items():
        if name == VALIDATION:
            continue
        c = metrics.confusion(labels, p, threshold)
        out[name] = {"auc": metrics.roc_auc(labels, p), "sensitivity": c.sensitivity,
                     "specificity": c.specificity}
    return out
