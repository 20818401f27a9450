"""Realistic chest radiographs as DICOM files, from the bundled Kermany validation PNGs.

Each image is 2500 x 2048 (rows x columns), 12 bits stored in 16 (10 MB of pixel data
uncompressed), made as tests/benchmarks/bench_latency.py makes them:
``wrap(upsample(load_grey_image(png), rows, cols), bits_stored=12, window=True, seed=...)``,
alternating NORMAL and PNEUMONIA. A pool of distinct pictures is built once per run (and, per
transfer syntax, encoded once); every file written gets new Study, Series and SOP Instance
UIDs (seeded with the run's start time), so that no receiver ever sees a UID twice.
"""

from __future__ import annotations

import copy
import hashlib
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import KERMANY, log, need
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    generate_uid,
)

SYNTAXES: dict[str, str] = {
    "explicit-le": str(ExplicitVRLittleEndian),
    "jpeg2000-lossless": str(JPEG2000Lossless),
    "jpeg-ls-lossless": str(JPEGLSLossless),
}
SYNTAX_NAMES = {v: k for k, v in SYNTAXES.items()}
# dcmtk storescu's proposal flag for each (it sends a compressed file as it is when the
# receiver accepts its transfer syntax)
STORESCU_PROPOSE = {
    str(ExplicitVRLittleEndian): "-x=",
    str(JPEG2000Lossless): "-xv",
    str(JPEGLSLossless): "-xt",
}
UID_ROOT = "1.2.826.0.1.3680043.8.498.4242."  # pydicom's prefix plus a bench arc


@dataclass(frozen=True)
class Image:
    path: Path
    sop_uid: str
    syntax: str


class ImageFactory:
    """Writes DICOM files with fresh UIDs from a pool of ``distinct`` pictures."""

    def __init__(self, root: Path, rows: int = 2500, cols: int = 2048, distinct: int = 20) -> None:
        self.root = root
        self.rows, self.cols = rows, cols
        self.distinct = max(2, distinct)
        self.seed = str(time.time_ns())
        self._bases: dict[int, Dataset] = {}
        self._encoded: dict[tuple[int, str], Dataset] = {}
        self._counter = 0
        self.notes: list[str] = []  # how each syntax was encoded, for the report
        self._unavailable: dict[str, str] = {}

    # -- the pool --------------------------------------------------------------------------
    def _base(self, i: int) -> Dataset:
        k = i % self.distinct
        if k not in self._bases:
            from make_samples import upsample, wrap

            from cxr_worker.model.preprocess import load_grey_image

            cls = "PNEUMONIA" if k % 2 else "NORMAL"
            src = sorted((KERMANY / cls).iterdir())[k // 2]
            self._bases[k] = wrap(upsample(load_grey_image(src), self.rows, self.cols),
                                  bits_stored=12, window=True, seed=f"bench-{self.seed}-{k}")
        return self._bases[k]

    def _encoded_base(self, i: int, syntax: str) -> Dataset:
        if syntax == str(ExplicitVRLittleEndian):
            return self._base(i)
        k = i % self.distinct
        if (k, syntax) not in self._encoded:
            self._encoded[(k, syntax)] = self._encode(self._base(i), syntax)
        return self._encoded[(k, syntax)]

    def _encode(self, base: Dataset, syntax: str) -> Dataset:
        ds = copy.deepcopy(base)
        try:
            ds.compress(syntax, generate_instance_uid=False)
            self._note(syntax, "pydicom Dataset.compress")
            return ds
        except Exception as exc:  # an encoder plugin missing or broken: dcmtk's, if any
            log(f"pydicom cannot encode {SYNTAX_NAMES[syntax]} ({type(exc).__name__}: {exc})")
            return self._encode_dcmtk(base, syntax, exc)

    def _encode_dcmtk(self, base: Dataset, syntax: str, why: Exception) -> Dataset:
        tool = {str(JPEGLSLossless): "dcmcjpls", str(JPEG2000Lossless): "dcmcjp2k"}[syntax]
        if shutil.which(tool) is None and not Path("/usr/bin", tool).is_file():
            raise RuntimeError(f"{SYNTAX_NAMES[syntax]}: pydicom cannot encode it "
                               f"({type(why).__name__}) and dcmtk has no {tool}") from why
        tmp_in, tmp_out = self.root / "enc-in.dcm", self.root / "enc-out.dcm"
        base.save_as(tmp_in, enforce_file_format=True)
        subprocess.run([need(tool), str(tmp_in), str(tmp_out)], check=True,
                       capture_output=True, timeout=120)
        ds = dcmread(tmp_out)
        ds.PixelData  # noqa: B018 (read it now: the file goes)
        tmp_in.unlink()
        tmp_out.unlink()
        self._note(syntax, f"dcmtk {tool} (pydicom could not: {type(why).__name__})")
        return ds

    def _note(self, syntax: str, how: str) -> None:
        line = f"{SYNTAX_NAMES[syntax]}: {how}"
        if line not in self.notes:
            self.notes.append(line)

    def available(self, syntax: str) -> str | None:
        """None when files of ``syntax`` can be made, else why not."""
        if syntax not in self._unavailable:
            try:
                self._encoded_base(0, syntax)
                self._unavailable[syntax] = ""
            except Exception as exc:
                self._unavailable[syntax] = f"{type(exc).__name__}: {exc}"
        return self._unavailable[syntax] or None

    def prepare(self, syntaxes: list[str]) -> None:
        """Build the whole pool (and its encodings) now, outside any timed section."""
        t0 = time.perf_counter()
        for syntax in syntaxes:
            if self.available(syntax) is None:
                for i in range(self.distinct):
                    self._encoded_base(i, syntax)
        log(f"image pool: {self.distinct} pictures x {len(syntaxes)} syntaxes in "
            f"{time.perf_counter() - t0:.1f} s")

    # -- files -----------------------------------------------------------------------------
    def write(self, directory: Path, n: int, syntax: str = str(ExplicitVRLittleEndian),
              tag: str = "img") -> list[Image]:
        """``n`` files in ``directory`` (made), each with UIDs never used before."""
        directory.mkdir(parents=True, exist_ok=True)
        out = []
        for i in range(n):
            ds = self._encoded_base(i, syntax)
            self._counter += 1
            sop = self._fresh_uids(ds, f"{tag}-{self._counter}")
            path = directory / f"{tag}{i:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            out.append(Image(path, sop, syntax))
        return out

    def _fresh_uids(self, ds: Dataset, key: str) -> str:
        def uid(what: str) -> str:
            return str(generate_uid(UID_ROOT, entropy_srcs=[self.seed, key, what]))

        study = uid("study")
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = uid("series")
        sop = generate_uid(UID_ROOT, entropy_srcs=[self.seed, key, "sop"])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
        digest = hashlib.sha256(study.encode()).hexdigest()
        ds.PatientID = "BENCH-" + digest[:8]
        ds.AccessionNumber = "B" + digest[8:17]
        return str(ds.SOPInstanceUID)


def remove(images: list[Image]) -> None:
    for im in images:
        im.path.unlink(missing_ok=True)


def describe(rows: int, cols: int) -> dict[str, Any]:
    return {"rows": rows, "cols": cols, "bits_stored": 12, "bits_allocated": 16,
            "uncompressed_mb": round(rows * cols * 2 / 1e6, 1),
            "sop_class": "CR Image Storage (make_samples.wrap's default)"}
