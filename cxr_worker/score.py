"""Scoring: load the model once, check it against its card, warm up, score one image.

Lifecycle ``load -> preprocess -> predict -> postprocess`` with a ``ready`` flag. The served
runtime is TensorFlow Lite (LiteRT), which does not import TensorFlow; the Keras file beside it
is for training, evaluation and Grad-CAM.

- preprocess: :meth:`Scorer.prepare` applies the preprocessing contract *of the model's card*
  (``preprocessing.version``), so a model is always fed what it was trained on;
- postprocess: the raw sigmoid output goes through the card's calibration (Platt scaling) and
  is compared with the threshold in force.

The threshold in force, by precedence: ``[model] threshold`` in the settings (an explicit
override), else the site threshold recorded by ``cxr-worker calibrate --apply`` for this model
version, else the model card's. :attr:`Scorer.threshold_source` names it in every output.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from cxr_worker.errors import ModelIntegrityError
from cxr_worker.labels import Label, format_threshold
from cxr_worker.model import card as model_card
from cxr_worker.model.calibration import Platt
from cxr_worker.model.preprocess import INPUT_SIZE, SUPPORTED_VERSIONS, to_model_input

logger = logging.getLogger(__name__)

SHIPPED_MODEL_DIR = Path(__file__).parent / "model" / "shipped"


@dataclass(frozen=True)
class Score:
    probability: float  # calibrated
    label: str
    threshold: float
    model_version: str
    raw: float = float("nan")  # the network's sigmoid output, before calibration
    threshold_source: str = "model card"


@dataclass(frozen=True)
class ThresholdChoice:
    """A threshold and the words that name where it came from."""

    value: float
    source: str


def preprocessing_version(card: dict[str, object]) -> int:
    """The contract version a model was trained with (cards before version 2 had none)."""
    pre = card.get("preprocessing")
    version = int(str(pre.get("version", 1))) if isinstance(pre, dict) else 1
    if version not in SUPPORTED_VERSIONS:
        raise ModelIntegrityError(
            f"the model was trained with preprocessing contract version {version}, which this "
            f"cxr-worker does not implement (it has {SUPPORTED_VERSIONS}): upgrade cxr-worker")
    return version


class Scorer:
    def __init__(self, model_dir: str | Path | None = None,
                 threshold: float | ThresholdChoice | None = None,
                 num_threads: int = 2) -> None:
        from cxr_worker.model.runtime import TFLiteScorer

        self.model_dir = Path(model_dir) if model_dir else SHIPPED_MODEL_DIR
        self.card = model_card.load_card(self.model_dir)
        path = model_card.verify_file(self.model_dir, model_card.TFLITE_FILE, self.card)
        self.model_version: str = self.card["model_version"]
        self.preprocessing_version = preprocessing_version(self.card)
        try:
            self.calibration = Platt.from_card(self.card)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelIntegrityError(f"model card calibration is unusable: {exc}") from exc
        self.card_threshold = float(self.card["threshold"])
        self.threshold = self.card_threshold
        self.threshold_source = "model card"
        if isinstance(threshold, ThresholdChoice):
            self.threshold, self.threshold_source = threshold.value, threshold.source
        elif threshold is not None:
            self.threshold, self.threshold_source = float(threshold), "settings model.threshold"
        self._runtime = TFLiteScorer(path, num_threads=num_threads)
        self.ready = False

    def use_threshold(self, choice: ThresholdChoice) -> None:
        if not 0.0 < choice.value < 1.0:
            raise ValueError(f"threshold {choice.value} ({choice.source}) is not in (0, 1)")
        self.threshold, self.threshold_source = choice.value, choice.source

    def describe_threshold(self) -> str:
        """E.g. ``"0.62 (site threshold, calibrated 2026-11-26 on 150 images)"``."""
        return f"{format_threshold(self.threshold)} ({self.threshold_source})"

    def warm_up(self) -> float:
        """One inference on a blank image so the first real one is not slow; returns seconds."""
        t = time.perf_counter()
        self._runtime.predict(np.zeros((INPUT_SIZE, INPUT_SIZE, 3), np.float32))
        self.ready = True
        return time.perf_counter() - t

    def prepare(self, grey: NDArray[np.floating] | NDArray[np.integer]) -> NDArray[np.float32]:
        """A grey display image (0..255) to this model's input (its card's contract)."""
        return to_model_input(grey, self.preprocessing_version)

    def score(self, x: NDArray[np.float32]) -> Score:
        """Score a prepared input (:meth:`prepare`)."""
        raw = self._runtime.predict(x)
        p = self.calibration.one(raw)
        label = Label.SUSPECTED if p >= self.threshold else Label.NEGATIVE
        return Score(p, str(label), self.threshold, self.model_version, raw,
                     self.threshold_source)

    def score_grey(self, grey: NDArray[np.floating] | NDArray[np.integer]) -> Score:
        return self.score(self.prepare(grey))
