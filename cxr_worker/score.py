"""Scoring: load the model once, check it against its card, warm up, score one image.

Lifecycle ``load -> preprocess -> predict -> postprocess`` with a ``ready`` flag. The served
runtime is TensorFlow Lite (LiteRT), which does not import TensorFlow; the Keras files beside it
are for training, evaluation and Grad-CAM.

- the model may be a small ensemble: the card's ``members``, each a TFLite network with its own
  preprocessing contract version (:func:`cxr_worker.model.card.members`); the raw score is the
  sigmoid of the members' mean logit;
- preprocess: :meth:`Scorer.prepare` applies, for each member, the contract version *its card
  entry names*, so a network is always fed what it was trained on;
- postprocess: the raw score goes through the card's calibration (Platt scaling) and is
  compared with the threshold in force;
- heatmap: a member whose card entry names a ``head`` file has a second output, its last
  feature map; :meth:`Scorer.score` keeps it in the :class:`Prepared` image, and
  :meth:`Scorer.heatmap` turns it into Grad-CAM in NumPy (:mod:`cxr_worker.model.heatmap`)
  without a second inference (:meth:`Scorer.score_and_heatmap` does both).

:meth:`Scorer.score_dataset` is the one path from a DICOM data set to a score (the display
image at the resolution asked for, each member's input, the score): the service, ``score``,
``calibrate`` and ``replay`` all go through it, so they give the same scores.

The threshold in force, by precedence: ``[model] threshold`` in the settings (an explicit
override), else the site threshold recorded by ``cxr-worker calibrate --apply`` for this model
version, else the model card's. :attr:`Scorer.threshold_source` names it in every output.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from cxr_worker import decode
from cxr_worker.errors import ModelIntegrityError
from cxr_worker.labels import Label, format_threshold
from cxr_worker.model import card as model_card
from cxr_worker.model import heatmap as cam
from cxr_worker.model.calibration import Platt, logit, sigmoid_one
from cxr_worker.model.preprocess import INPUT_SIZE, SUPPORTED_VERSIONS, to_model_input

logger = logging.getLogger(__name__)

SHIPPED_MODEL_DIR = Path(__file__).parent / "model" / "shipped"


@dataclass(frozen=True)
class Score:
    probability: float  # calibrated
    label: Label
    threshold: float
    model_version: str
    raw: float = float("nan")  # the networks' combined sigmoid output, before calibration
    threshold_source: str = "model card"


@dataclass(frozen=True)
class ThresholdChoice:
    """A threshold and the words that name where it came from."""

    value: float
    source: str


@dataclass(frozen=True)
class Prepared:
    """One image as every member's input (224, 224, 3), keyed by contract version; after
    scoring, each member's feature map (by member index) for :meth:`Scorer.heatmap`."""

    by_version: dict[int, NDArray[np.float32]]
    features: dict[int, NDArray[np.float32]] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Scored:
    """One data set as :meth:`Scorer.score_dataset` saw it: the display image it was decoded
    to (what the Secondary Capture draws), each member's input (with the feature maps the
    score kept, for :meth:`Scorer.heatmap`) and the score."""

    display: decode.DisplayImage
    prepared: Prepared
    score: Score


StageTimer = Callable[[str], AbstractContextManager[object]]
"""``timer("decode")`` times a block (e.g. :meth:`cxr_worker.metrics.Metrics.stage`)."""


def _untimed(_stage: str) -> AbstractContextManager[object]:
    return nullcontext()


def _version(member: dict[str, object]) -> int:
    version = int(str(member.get("preprocessing_version", 1)))
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
        self.model_version: str = self.card["model_version"]
        self._members = [
            (TFLiteScorer(model_card.verify_file(self.model_dir, str(m["tflite"]), self.card),
                          num_threads=num_threads), _version(m))
            for m in model_card.members(self.card)]
        self.versions = sorted({v for _, v in self._members})
        self._heads = self._load_heads()
        try:
            self.calibration = Platt.from_card(self.card)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelIntegrityError(f"model card calibration is unusable: {exc}") from exc
        self.card_threshold = float(self.card["threshold"])
        self.threshold = self.card_threshold
        self.threshold_source = "model card"
        if isinstance(threshold, ThresholdChoice):
            self.use_threshold(threshold)
        elif threshold is not None:
            self.threshold, self.threshold_source = float(threshold), "settings model.threshold"
        self.ready = False

    def _load_heads(self) -> list[cam.Head] | None:
        """Each member's head (for the heatmap), or None when a member has none (an older
        model: scored as before, without a heatmap)."""
        listed = model_card.members(self.card)
        if not all(m.get("head") for m in listed):
            return None
        heads = []
        for m, (rt, _) in zip(listed, self._members, strict=True):
            path = model_card.verify_file(self.model_dir, str(m["head"]), self.card)
            try:
                head = cam.Head.load(path)
            except (OSError, ValueError, KeyError) as exc:
                raise ModelIntegrityError(f"{path.name} is not a usable head: {exc}") from exc
            if not rt.has_features:
                raise ModelIntegrityError(
                    f"the model card names {path.name} but {m['tflite']} has no feature-map "
                    "output")
            heads.append(head)
        return heads

    @property
    def heatmap_available(self) -> bool:
        return self._heads is not None

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
        self.score_grey(np.zeros((INPUT_SIZE, INPUT_SIZE), np.float32))
        self.ready = True
        return time.perf_counter() - t

    def prepare(self, grey: NDArray[np.floating] | NDArray[np.integer]) -> Prepared:
        """A grey display image (0..255) as the input of each member (its contract)."""
        return Prepared({v: to_model_input(grey, v) for v in self.versions})

    def raw_score(self, prepared: Prepared) -> float:
        """The members' combined output (sigmoid of the mean logit), before calibration."""
        logits = []
        for i, (rt, v) in enumerate(self._members):
            p, feats = rt.predict_with_features(prepared.by_version[v])
            if feats is not None:
                prepared.features[i] = feats
            logits.append(float(logit(p)))
        return sigmoid_one(sum(logits) / len(logits))

    def score(self, prepared: Prepared) -> Score:
        """Score a prepared image (:meth:`prepare`)."""
        raw = self.raw_score(prepared)
        p = self.calibration.one(raw)
        label = Label.SUSPECTED if p >= self.threshold else Label.NEGATIVE
        return Score(p, label, self.threshold, self.model_version, raw,
                     self.threshold_source)

    def score_grey(self, grey: NDArray[np.floating] | NDArray[np.integer]) -> Score:
        return self.score(self.prepare(grey))

    def score_dataset(self, ds: Dataset, *,
                      need: decode.Need | None = decode.FOR_SCORE_AND_REPORT,
                      timer: StageTimer = _untimed) -> Scored:
        """Decode ``ds``'s pixels to the display image (only the resolution ``need`` asks
        for: :data:`~cxr_worker.decode.FOR_SCORE_AND_REPORT`, the service's, by default),
        prepare each member's input and score it. ``timer("decode")`` wraps the decoding and
        the preparation, ``timer("score")`` the inference.

        Raises :class:`~cxr_worker.errors.DecodeError` (from the decoding only) for pixels
        that cannot be shown. The heatmap stays apart (:meth:`heatmap` of
        :attr:`Scored.prepared`): it reuses this inference's feature maps.
        """
        with timer("decode"):
            display = decode.display_image(ds, need=need)
            prepared = self.prepare(display)
        with timer("score"):
            score = self.score(prepared)
        return Scored(display, prepared, score)

    def heatmap(self, prepared: Prepared, size: int = INPUT_SIZE
                ) -> NDArray[np.float32] | None:
        """Grad-CAM of the served score, ``size`` x ``size`` in [0, 1] (the 224x224 model
        input's frame: the whole image squashed), or None when the model has no heatmap
        outputs. Uses the feature maps kept by :meth:`score`; runs the networks only for an
        image not scored yet."""
        if self._heads is None:
            return None
        if len(prepared.features) != len(self._members):
            self.raw_score(prepared)
        feats = [prepared.features[i] for i in range(len(self._members))]
        return cam.gradcam(feats, self._heads, size)

    def score_and_heatmap(self, prepared: Prepared
                          ) -> tuple[Score, NDArray[np.float32] | None]:
        """:meth:`score` and :meth:`heatmap` from one inference per member."""
        return self.score(prepared), self.heatmap(prepared)
