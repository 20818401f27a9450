"""The one scoring path outside the queue (``score``, ``calibrate``): what the service would
conclude for one file, without recording, quarantining or sending anything.

A DICOM file goes the service's way: header read, the gate, then
:meth:`cxr_worker.score.Scorer.score_dataset` at the service's resolution
(:data:`cxr_worker.decode.FOR_SCORE_AND_REPORT`), so ``score`` and ``calibrate`` give the
service's scores. A PNG or JPEG file has no header: no gate, no population.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cxr_worker import decode, gate
from cxr_worker.errors import NotScoredError
from cxr_worker.inputs import IMAGE_SUFFIXES
from cxr_worker.score import Score, Scorer


@dataclass(frozen=True)
class Assessment:
    """What the service would conclude for one file: the gate's verdict and the score."""

    score: Score
    gate: gate.GateResult | None  # None for PNG/JPEG input (no header to check)


def assess_file(path: Path, scorer: Scorer, gate_cfg: gate.GateConfig) -> Assessment:
    """Read, gate and score one DICOM, PNG or JPEG file as the service does.

    Raises :class:`NotScoredError` (the gate's :class:`OutOfScopeError` with its rule, or a
    :class:`DecodeError`) for an image the service would not score, ``OSError`` when the file
    cannot be read.
    """
    if path.suffix.lower() in IMAGE_SUFFIXES:
        from cxr_worker.model.preprocess import load_grey_image

        try:
            grey = load_grey_image(path)
        except OSError as exc:  # Pillow: not an image it can read
            raise NotScoredError(f"unreadable image: {exc}") from exc
        return Assessment(scorer.score_grey(grey), None)
    ds = decode.read_file(path)
    verdict = gate.check(ds, gate_cfg)
    return Assessment(scorer.score_dataset(ds, need=decode.FOR_SCORE_AND_REPORT).score, verdict)
