"""Make the test data in ``tests/data`` (committed, so the tests need nothing outside the clone).

    python sample_dicom/make_test_data.py [--kermany DIR] [--nih DIR] [--out tests/data]

- ``kermany_val/{NORMAL,PNEUMONIA}/*.jpeg``: the first ``--per-class`` images (sorted by file
  name) of each class of the patient-grouped *validation* split
  (``cxr_worker.training.data.split_by_patient(list_samples(KERMANY), 0.15, 0)``, the split the
  shipped model is validated on), copied byte for byte under their original names. They are
  held out from training.
- ``nih/test{1,2,3,4}.dcm``: byte copies of the four NIH ChestX-ray14 DICOM files.

Existing files in the output folders are replaced; ``tests/data/README.md`` is not touched.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

VAL_FRACTION = 0.15
SEED = 0
NIH_FILES = ("test1.dcm", "test2.dcm", "test3.dcm", "test4.dcm")


def held_out(kermany: Path, per_class: int) -> dict[str, list[Path]]:
    """The first ``per_class`` validation images of each class, sorted by file name."""
    from cxr_worker.training import data

    _, val = data.split_by_patient(data.list_samples(kermany), VAL_FRACTION, SEED)
    out: dict[str, list[Path]] = {}
    for label, cls in enumerate(data.CLASSES):
        paths = sorted((s.path for s in val if s.label == label), key=lambda p: p.name)
        if len(paths) < per_class:
            raise SystemExit(f"only {len(paths)} {cls} validation images, {per_class} wanted")
        out[cls] = paths[:per_class]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kermany", type=Path, default=REPO.parent / "shared/data/kermany224/train",
                    help="the Kermany training folder (NORMAL/ PNEUMONIA/)")
    ap.add_argument("--nih", type=Path, default=REPO.parent / "shared/data/nih-dicom",
                    help="the folder holding the NIH ChestX-ray14 test{1..4}.dcm")
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "data")
    ap.add_argument("--per-class", type=int, default=60)
    args = ap.parse_args()

    for cls, paths in held_out(args.kermany, args.per_class).items():
        dest = args.out / "kermany_val" / cls
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        for src in paths:
            shutil.copyfile(src, dest / src.name)
        print(f"{dest}: {len(paths)} images")

    dest = args.out / "nih"
    dest.mkdir(parents=True, exist_ok=True)
    for name in NIH_FILES:
        shutil.copyfile(args.nih / name, dest / name)
    print(f"{dest}: {len(NIH_FILES)} files")


if __name__ == "__main__":
    main()
