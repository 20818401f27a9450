"""Make the sample DICOM chest radiographs in this folder from the Kermany training images.

    python sample_dicom/make_samples.py [--data DIR] [--out sample_dicom]

Each sample is a 224x224 training JPEG (grey) upsampled to a realistic detector size and
wrapped with the headers a CR or DX modality writes. The pixel values are chosen so that the
display image after Modality LUT, window and photometric inversion equals the upsampled grey
image: every sample of one source scores the same as that JPEG resized. :func:`wrap` is also
what the tests use to build DICOM variants.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

CR = "1.2.840.10008.5.1.4.1.1.1"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
SAMPLE_ROOT = "1.2.826.0.1.3680043.8.498.4242."


def upsample(grey: NDArray[np.uint8], rows: int, cols: int) -> NDArray[np.float32]:
    img = Image.fromarray(grey.astype(np.float32), mode="F")
    return np.asarray(img.resize((cols, rows), Image.Resampling.BILINEAR), dtype=np.float32)


def wrap(
    display: NDArray[np.floating] | NDArray[np.integer],
    *,
    modality: str = "CR",
    bits_stored: int = 8,
    monochrome1: bool = False,
    rescale: tuple[float, float] | None = None,
    window: bool = False,
    view_position: str | None = "PA",
    body_part: str | None = "CHEST",
    study_uid: str | None = None,
    seed: str = "sample",
    patient_name: str = "Sample^Patient",
    patient_age: str | None = "003Y",
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> Dataset:
    """A CR/DX dataset whose display image is ``display`` (values 0..255).

    Stored values are ``display * (2**bits_stored - 1) / 255`` (inverted for MONOCHROME1).
    With ``rescale=(slope, intercept)`` the modality values are ``stored * slope + intercept``;
    with ``window`` a window covering exactly that range is written (otherwise 8-bit data
    needs none, and deeper data relies on the automatic window).
    """
    d = np.clip(np.asarray(display, dtype=np.float64), 0, 255)
    maxv = 2**bits_stored - 1
    v = d * maxv / 255.0
    if monochrome1:
        v = maxv - v
    slope, intercept = rescale or (1.0, 0.0)
    dtype = np.uint8 if bits_stored <= 8 else np.uint16
    stored = np.round(v).astype(dtype)
    lo, hi = intercept, intercept + slope * maxv

    ds = _patient_study_series(seed, study_uid, patient_name, patient_age, modality)
    if body_part:
        ds.BodyPartExamined = body_part
    if view_position:
        ds.ViewPosition = view_position
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PresentationLUTShape = "INVERSE" if monochrome1 else "IDENTITY"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if rescale is not None or modality == "CR":
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        ds.RescaleType = "US"
    if window:
        ds.WindowCenter = f"{(lo + hi) / 2 + 0.5:g}"
        ds.WindowWidth = f"{hi - lo + 1:g}"
        ds.VOILUTFunction = "LINEAR"
    ds.PixelData = stored.tobytes()
    ds["PixelData"].VR = "OB" if ds.BitsAllocated == 8 else "OW"
    if transfer_syntax == ExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    elif transfer_syntax != ImplicitVRLittleEndian:
        ds.compress(transfer_syntax, generate_instance_uid=False)  # keep the derived UID
    return ds


def _patient_study_series(seed: str, study_uid: str | None, patient_name: str,
                          patient_age: str | None, modality: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CR if modality == "CR" else DX
    ds.SOPInstanceUID = generate_uid(SAMPLE_ROOT, entropy_srcs=[seed, "sop"])
    ds.StudyInstanceUID = study_uid or generate_uid(SAMPLE_ROOT, entropy_srcs=[seed, "study"])
    ds.SeriesInstanceUID = generate_uid(SAMPLE_ROOT, entropy_srcs=[seed, "series"])
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName = patient_name
    # one patient per study (PACS key their studies on Patient ID + Study Instance UID)
    ds.PatientID = "SAMPLE-" + hashlib.sha256(str(ds.StudyInstanceUID).encode()).hexdigest()[:8]
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    if patient_age:
        ds.PatientAge = patient_age
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "A" + hashlib.sha256(str(ds.StudyInstanceUID).encode()).hexdigest()[:9]
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Manufacturer = "Sample Modality"
    ds.PatientOrientation = ["L", "F"]
    return ds


SAMPLES = [
    # name, class folder, index, options
    ("cr_pa_normal_12bit.dcm", "NORMAL", 0,
     dict(modality="CR", bits_stored=12, window=True, shape=(1536, 1280))),
    ("cr_pa_pneumonia_12bit_rescale.dcm", "PNEUMONIA", 0,
     dict(modality="CR", bits_stored=12, rescale=(1.0, -1024.0), window=True,
          shape=(1536, 1280))),
    ("dx_ap_pneumonia_14bit_mono1_rle.dcm", "PNEUMONIA", 1,
     dict(modality="DX", bits_stored=14, monochrome1=True, window=True, view_position="AP",
          shape=(2048, 1700), transfer_syntax=RLELossless)),
    ("dx_pa_normal_8bit.dcm", "NORMAL", 1,
     dict(modality="DX", bits_stored=8, shape=(1024, 1024),
          transfer_syntax=ImplicitVRLittleEndian)),
    ("dx_lateral_refused.dcm", "NORMAL", 2,
     dict(modality="DX", bits_stored=8, view_position="LL", shape=(1024, 1024))),
]


def main() -> None:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--data", default=str(here.parent.parent / "shared/data/kermany224/train"))
    ap.add_argument("--out", default=str(here))
    args = ap.parse_args()
    out = Path(args.out)
    for name, cls, index, opts in SAMPLES:
        src = sorted((Path(args.data) / cls).iterdir())[index]
        grey = np.asarray(Image.open(src).convert("L"))
        shape = opts.pop("shape")
        ds = wrap(upsample(grey, *shape), seed=name, **opts)
        ds.save_as(out / name, enforce_file_format=True)
        print(f"{name}: from {cls}/{src.name}, {ds.Rows}x{ds.Columns}, "
              f"{ds.BitsStored}-bit {ds.PhotometricInterpretation}, "
              f"{ds.file_meta.TransferSyntaxUID.name}")


if __name__ == "__main__":
    main()
