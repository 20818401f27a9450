"""Check the shipped model card against the full validation split it was computed on.

``python -m cxr_worker.training.verify DATA_DIR [MODEL_DIR]``: rebuilds the card's
patient-grouped split of ``DATA_DIR`` (seed and fraction from the card), checks that its
validation files are the ones whose raw scores the card records, scores each with the served
runtime and compares. CI runs it when the training data is available (the test suite checks
the 120 validation images that ship with the repository). Exit 0 when every score matches.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from cxr_worker.model import card as model_card
from cxr_worker.model.preprocess import load_grey_image
from cxr_worker.score import SHIPPED_MODEL_DIR, Scorer

TOLERANCE = 1e-5


def verify(data_dir: Path, model_dir: Path = SHIPPED_MODEL_DIR) -> list[str]:
    """The mismatches (empty when the card holds)."""
    from cxr_worker.training import data

    card = model_card.load_card(model_dir)
    split = card["training_data"]
    samples = data.list_samples(data_dir)
    _, val = data.split_by_patient(samples, float(split["val_fraction"]), int(split["seed"]))
    stored = card["validation"]["scores"]
    names = [f"{data.CLASSES[s.label]}/{s.path.name}" for s in val]
    if names != stored["files"]:
        return [f"the validation split of {data_dir} is not the card's ({len(names)} files vs "
                f"{len(stored['files'])})"]
    scorer = Scorer(model_dir)
    raw = np.array([scorer.score_grey(load_grey_image(s.path)).raw for s in val])
    diff = np.abs(raw - np.array(stored["raw"]))
    bad = [f"{n}: {r:.6f} vs card {c:.6f}" for n, r, c, d
           in zip(names, raw, stored["raw"], diff, strict=True) if d > TOLERANCE]
    print(f"{len(val)} validation images scored; max |difference| to the card "
          f"{diff.max():.2e} ({len(bad)} over {TOLERANCE:g})", flush=True)
    return bad


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        print("usage: python -m cxr_worker.training.verify DATA_DIR [MODEL_DIR]", file=sys.stderr)
        return 2
    bad = verify(Path(args[0]), Path(args[1]) if len(args) > 1 else SHIPPED_MODEL_DIR)
    for line in bad[:20]:
        print(line, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
