"""The training data: a ``NORMAL/`` ``PNEUMONIA/`` folder of images, split by patient.

File names of the Kermany set carry a patient number (``personNNN_bacteria_*``,
``IM-XXXX-*``, ``NORMAL2-IM-XXXX-*``). Several images of one patient must fall on the same side
of the split or validation figures leak; byte-identical duplicates are dropped first.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from cxr_worker.model.preprocess import INPUT_SIZE, load_grey_image, to_model_input

CLASSES = ("NORMAL", "PNEUMONIA")
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_"),
    re.compile(r"^((?:NORMAL2-)?IM-\d+)-"),
)


def patient_id(file_name: str) -> str:
    """Patient key of a Kermany file name; an unknown pattern is its own patient."""
    for pattern in _PATIENT_PATTERNS:
        m = pattern.match(file_name)
        if m:
            return m.group(1)
    return Path(file_name).stem


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 normal, 1 pneumonia
    patient: str
    sha256: str


def list_samples(data_dir: str | Path) -> list[Sample]:
    """All images under ``data_dir/{NORMAL,PNEUMONIA}``, sorted, byte duplicates dropped."""
    root = Path(data_dir)
    missing = [c for c in CLASSES if not (root / c).is_dir()]
    if missing:
        raise FileNotFoundError(f"{root} lacks the class folder(s) {', '.join(missing)}")
    samples: list[Sample] = []
    seen: set[str] = set()
    for label, cls in enumerate(CLASSES):
        for path in sorted((root / cls).iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest in seen:
                continue
            seen.add(digest)
            samples.append(Sample(path, label, f"{cls}/{patient_id(path.name)}", digest))
    if not samples:
        raise FileNotFoundError(f"no images under {root}")
    return samples


def file_list_hash(samples: list[Sample]) -> str:
    """sha256 over "class/name sha256" lines: identifies exactly which files were used."""
    h = hashlib.sha256()
    for s in samples:
        h.update(f"{CLASSES[s.label]}/{s.path.name} {s.sha256}\n".encode())
    return h.hexdigest()


def split_by_patient(
    samples: list[Sample], val_fraction: float = 0.15, seed: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """Stratified split with every patient on one side only (fixed seed)."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_splits = max(2, round(1 / val_fraction))
    labels = np.array([s.label for s in samples])
    groups = np.array([s.patient for s in samples])
    skf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train_idx, val_idx = next(skf.split(np.zeros(len(samples)), labels, groups))
    return [samples[i] for i in train_idx], [samples[i] for i in val_idx]


def load_arrays(samples: list[Sample]) -> tuple[NDArray[np.uint8], NDArray[np.float32]]:
    """Images squashed to (N, 224, 224) uint8 grey (contract version 1: before equalisation,
    so augmentation can act on the raw image first), labels float32."""
    images = np.empty((len(samples), INPUT_SIZE, INPUT_SIZE), dtype=np.uint8)
    for i, s in enumerate(samples):
        x = to_model_input(load_grey_image(s.path), version=1)[:, :, 0]  # equalised later
        images[i] = np.round(x).astype(np.uint8)
    labels = np.array([s.label for s in samples], dtype=np.float32)
    return images, labels
