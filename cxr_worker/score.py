"""Scoring: load the model once, check it against its card, warm up, score one image.

Lifecycle ``load -> preprocess -> predict -> postprocess`` with a ``ready`` flag. The served
runtime is TensorFlow Lite (LiteRT), which does not import TensorFlow; the Keras file beside it
is for training, evaluation and Grad-CAM.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from cxr_worker.labels import Label
from cxr_worker.model import card as model_card
from cxr_worker.model.preprocess import INPUT_SIZE

logger = logging.getLogger(__name__)

SHIPPED_MODEL_DIR = Path(__file__).parent / "model" / "shipped"


@dataclass(frozen=True)
class Score:
    probability: float
    label: str
    threshold: float
    model_version: str


class Scorer:
    def __init__(self, model_dir: str | Path | None = None, threshold: float | None = None,
                 num_threads: int = 2) -> None:
        from cxr_worker.model.runtime import TFLiteScorer

        self.model_dir = Path(model_dir) if model_dir else SHIPPED_MODEL_DIR
        self.card = model_card.load_card(self.model_dir)
        path = model_card.verify_file(self.model_dir, model_card.TFLITE_FILE, self.card)
        self.model_version: str = self.card["model_version"]
        self.threshold: float = float(threshold if threshold is not None
                                      else self.card["threshold"])
        self._runtime = TFLiteScorer(path, num_threads=num_threads)
        self.ready = False

    def warm_up(self) -> float:
        """One inference on a blank image so the first real one is not slow; returns seconds."""
        t = time.perf_counter()
        self._runtime.predict(np.zeros((INPUT_SIZE, INPUT_SIZE, 3), np.float32))
        self.ready = True
        return time.perf_counter() - t

    def score(self, x: NDArray[np.float32]) -> Score:
        p = self._runtime.predict(x)
        label = Label.SUSPECTED if p >= self.threshold else Label.NEGATIVE
        return Score(p, str(label), self.threshold, self.model_version)
