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
from PIL import Image, ImageFilter

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
}


def shift_report(
    score: Callable[[NDArray[np.float32]], float], images: list[Grey], labels: Any,
    threshold: float
) -> dict[str, dict[str, float]]:
    """AUC, sensitivity and specificity at ``threshold`` under each shift."""
    from cxr_worker.model.preprocess import to_model_input

    out: dict[str, dict[str, float]] = {}
    for name, shift in SHIFTS.items():
        p = np.array([score(to_model_input(shift(g))) for g in images])
        c = metrics.confusion(labels, p, threshold)
        out[name] = {"auc": metrics.roc_auc(labels, p), "sensitivity": c.sensitivity,
                     "specificity": c.specificity}
    return out
