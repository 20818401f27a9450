"""``cxr-worker calibrate``: the site's own operating point, chosen on its labelled images.

The shipped threshold was chosen on the training hospital's images; another site's detectors,
processing and patients move the scores. A site that labels a few hundred of its own images
(``NORMAL/`` and ``PNEUMONIA/`` folders of DICOM, PNG or JPEG, or a CSV of ``path,label``)
gets a threshold that meets its sensitivity target on *its* images:

- every image goes through the service's own path (:func:`cxr_worker.assess.assess_file`:
  gate, decode, preprocessing contract, calibrated score); images the gate refuses are
  counted and listed, never scored;
- the threshold is the most specific one whose sensitivity on the site's pneumonias is at
  least the target (:func:`cxr_worker.model.metrics.select_threshold`), with a bootstrap
  confidence interval; sensitivity and specificity (Wilson 95% intervals) are reported at it
  and at the model card's threshold;
- fewer than :data:`MIN_PER_CLASS` scored images of either class: refused, saying how many
  more are needed (with 50 pneumonias, one miss is already 2% of sensitivity);
- ``--apply`` records it in the database (value, target, counts, sha256 of the file list,
  time); the service, ``score`` and ``replay`` then use it for this model version and name it
  in every output.
"""

from __future__ import annotations

import csv
import hashlib
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxr_worker.assess import assess_file
from cxr_worker.errors import CalibrationError, NotScoredError
from cxr_worker.inputs import is_image_input
from cxr_worker.model import metrics

MIN_PER_CLASS = 50
CLASS_NAMES = ("NORMAL", "PNEUMONIA")
_LABELS = {"normal": 0, "0": 0, "negative": 0, "pneumonia": 1, "1": 1, "positive": 1}


@dataclass(frozen=True)
class Labelled:
    path: Path
    label: int


def labelled_inputs(data: Path) -> tuple[list[Labelled], list[Path]]:
    """(labelled images, skipped non-image files) from a class-folder tree or a CSV."""
    if data.is_file():
        return _from_csv(data), []
    if not data.is_dir():
        raise CalibrationError(f"--data {data}: no such folder or CSV file")
    missing = [c for c in CLASS_NAMES if not (data / c).is_dir()]
    if missing:
        raise CalibrationError(
            f"--data {data}: lacks the folder(s) {', '.join(missing)} (expected NORMAL/ and "
            "PNEUMONIA/, or a CSV of path,label)")
    items: list[Labelled] = []
    skipped: list[Path] = []
    for label, cls in enumerate(CLASS_NAMES):
        for p in sorted(q for q in (data / cls).rglob("*") if q.is_file()):
            if is_image_input(p):
                items.append(Labelled(p, label))
            else:
                skipped.append(p)
    return items, skipped


def _from_csv(path: Path) -> list[Labelled]:
    items: list[Labelled] = []
    with open(path, newline="", encoding="utf-8") as f:
        for n, row in enumerate(csv.reader(f), start=1):
            if not row or row[0].startswith("#"):
                continue
            if len(row) < 2:
                raise CalibrationError(f"{path}:{n}: expected 'path,label'")
            name, label = row[0].strip(), row[1].strip().lower()
            if n == 1 and label == "label":
                continue  # the header line
            if label not in _LABELS:
                raise CalibrationError(
                    f"{path}:{n}: label {row[1]!r} is not NORMAL/PNEUMONIA (or 0/1)")
            p = Path(name)
            items.append(Labelled(p if p.is_absolute() else path.parent / p, _LABELS[label]))
    return items


def file_list_sha256(items: Iterable[Labelled]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(f"{CLASS_NAMES[it.label]} {it.path.name} ".encode())
        h.update(hashlib.sha256(it.path.read_bytes()).hexdigest().encode() + b"\n")
    return h.hexdigest()


def _operating_point(y: Any, p: Any, threshold: float) -> dict[str, Any]:
    c = metrics.confusion(y, p, threshold)
    return {
        "threshold": threshold,
        "sensitivity": c.sensitivity,
        "sensitivity_ci95": list(metrics.wilson_interval(c.tp, c.tp + c.fn)),
        "specificity": c.specificity,
        "specificity_ci95": list(metrics.wilson_interval(c.tn, c.tn + c.fp)),
        "positive_rate": float((np.asarray(p) >= threshold).mean()),
        "confusion": {"tn": c.tn, "fp": c.fp, "fn": c.fn, "tp": c.tp},
    }


def calibrate(data: Path, scorer: Any, gate_cfg: Any, target_sensitivity: float = 0.98,
              progress: bool | None = None) -> dict[str, Any]:
    """Score the site's images and choose its threshold; returns the report (JSON-ready)."""
    from tqdm import tqdm

    if not 0.5 <= target_sensitivity < 1.0:
        raise CalibrationError(
            f"--target-sensitivity {target_sensitivity}: must be in [0.5, 1)")
    items, skipped = labelled_inputs(data)
    scored: list[tuple[Labelled, float]] = []
    refused: list[dict[str, Any]] = []
    show = sys.stderr.isatty() if progress is None else progress
    for it in tqdm(items, desc="scoring", unit="image", disable=not show):
        try:
            result = assess_file(it.path, scorer, gate_cfg)
        except NotScoredError as exc:
            refused.append({"path": str(it.path), "label": CLASS_NAMES[it.label],
                            "rule": getattr(exc, "rule", None), "reason": exc.reason})
            continue
        except OSError as exc:
            refused.append({"path": str(it.path), "label": CLASS_NAMES[it.label],
                            "rule": None, "reason": f"cannot read: {exc.strerror or exc}"})
            continue
        scored.append((it, result.score.probability))
    y = np.array([it.label for it, _ in scored], dtype=np.int64)
    p = np.array([prob for _, prob in scored], dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int(y.size - y.sum())
    out: dict[str, Any] = {
        "data": str(data), "model_version": scorer.model_version,
        "target_sensitivity": target_sensitivity,
        "n": {"NORMAL": n_neg, "PNEUMONIA": n_pos, "refused": len(refused),
              "skipped_not_images": len(skipped)},
        "refused": refused, "skipped": [str(s) for s in skipped],
    }
    short = {c: MIN_PER_CLASS - n for c, n in (("NORMAL", n_neg), ("PNEUMONIA", n_pos))
             if n < MIN_PER_CLASS}
    if short:
        need = ", ".join(f"{k} {v} more" for k, v in short.items())
        raise CalibrationError(
            f"too few scored images to choose a threshold: {n_neg} NORMAL and {n_pos} "
            f"PNEUMONIA (at least {MIN_PER_CLASS} of each are needed: add {need})"
            + (f"; {len(refused)} image(s) were refused by the gate" if refused else ""))
    threshold = metrics.select_threshold(y, p, target_sensitivity)
    out.update(
        auc=metrics.roc_auc(y, p),
        threshold=threshold,
        threshold_ci95=list(metrics.bootstrap_threshold_ci(y, p, target_sensitivity)),
        at_site_threshold=_operating_point(y, p, threshold),
        at_model_threshold=_operating_point(y, p, scorer.card_threshold),
        file_list_sha256=file_list_sha256(it for it, _ in scored),
    )
    return out


def apply(engine: Any, report: dict[str, Any]) -> Any:
    """Record the chosen threshold as the site's for this model version."""
    from cxr_worker.worklist import site

    at = report["at_site_threshold"]
    row = site.SiteThreshold(
        model_version=report["model_version"], threshold=report["threshold"],
        target_sensitivity=report["target_sensitivity"], n_normal=report["n"]["NORMAL"],
        n_pneumonia=report["n"]["PNEUMONIA"], n_refused=report["n"]["refused"],
        sensitivity=at["sensitivity"], specificity=at["specificity"],
        positive_rate=at["positive_rate"], file_list_sha256=report["file_list_sha256"],
        data=report["data"])
    return site.record(engine, row)
