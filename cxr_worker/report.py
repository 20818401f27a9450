"""The result object: a Secondary Capture with the triage result burned in (highdicom).

- same Study Instance UID as the source; a new series whose UID is derived from the study and
  the model version (one AI series per study and model), stable configurable Series Number;
- SOP Instance UID derived from the source SOP Instance UID and the model version, so a
  replay replaces the earlier result instead of adding one;
- Source Image Sequence (purpose 121322 "Source image for image processing operation"),
  Referenced Image Sequence, Derivation Description;
- a banner above a downscaled copy of the radiograph: the result, probability, threshold,
  model version and "NOT FOR DIAGNOSTIC USE"; Burned In Annotation YES; the same words in
  Image Comments; the worker as Manufacturer / Model Name / Software Versions;
- Patient and Study modules (and Specific Character Set) copied from the source.
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxr_worker import __version__
from cxr_worker.labels import Label

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MAX_SIDE = 1024
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"
SERIES_DESCRIPTION = "AI triage result: pneumonia (cxr-worker)"
MODEL_NAME = "cxr-worker pneumonia triage"


@dataclass(frozen=True)
class ReportConfig:
    uid_prefix: str
    series_number: int
    manufacturer: str


def result_sop_instance_uid(prefix: str, source_sop_uid: str, model_version: str) -> str:
    """Deterministic: the same source and model always give the same result UID."""
    return str(generate_uid(prefix, entropy_srcs=[source_sop_uid, model_version, "sc"]))


def result_series_instance_uid(prefix: str, study_uid: str, model_version: str) -> str:
    return str(generate_uid(prefix, entropy_srcs=[study_uid, model_version, "series"]))


def banner_lines(label: str, probability: float, threshold: float, model_version: str,
                 note: str | None = None) -> list[str]:
    lines = [
        label,
        f"probability {probability:.3f} (threshold {threshold:.3f})",
        f"model {model_version}",
    ]
    if note:
        lines.append(note.upper())
    lines.append(f"AI TRIAGE - {NOT_FOR_DIAGNOSTIC_USE}")
    return lines


def render(display: NDArray[np.floating], lines: list[str], suspected: bool) -> NDArray[np.uint8]:
    """RGB image: the banner above the radiograph downscaled to at most 1024 px a side."""
    h, w = display.shape
    scale = min(1.0, MAX_SIDE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    grey = Image.fromarray(np.clip(display, 0, 255).astype(np.float32), mode="F")
    grey = grey.resize(size, Image.Resampling.BILINEAR).convert("L")
    width = max(size[0], 512)
    font_size = max(14, width // 36)
    font = ImageFont.load_default(size=font_size)
    line_h = int(font_size * 1.35)
    banner_h = line_h * len(lines) + font_size
    canvas = Image.new("RGB", (width, size[1] + banner_h), (0, 0, 0))
    colour = (170, 20, 20) if suspected else (20, 90, 40)
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([0, 0, width, banner_h - 1], fill=colour)
    for i, text in enumerate(lines):
        draw.text((font_size // 2, font_size // 2 + i * line_h), text, fill=(255, 255, 255),
                  font=font)
    canvas.paste(grey.convert("RGB"), ((width - size[0]) // 2, banner_h))
    return np.asarray(canvas, dtype=np.uint8)


def _source_reference(source: Dataset, purpose: bool) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if purpose:
        code = Dataset()
        code.CodeValue = "121322"
        code.CodingSchemeDesignator = "DCM"
        code.CodeMeaning = "Source image for image processing operation"
        item.PurposeOfReferenceCodeSequence = Sequence([code])
    return item


def build_secondary_capture(
    source: Dataset,
    display: NDArray[np.floating],
    *,
    probability: float,
    label: str,
    threshold: float,
    model_version: str,
    cfg: ReportConfig,
    note: str | None = None,
) -> hd.sc.SCImage:
    """The Secondary Capture for one scored source image; valid when this returns."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability {probability} outside [0, 1]")
    if label not in (Label.SUSPECTED, Label.NEGATIVE):
        raise ValueError(f"unknown label {label!r}")
    lines = banner_lines(label, probability, threshold, model_version, note)
    pixels = render(display, lines, label == Label.SUSPECTED)
    orientation = tuple(str(v) for v in source.get("PatientOrientation", []) or []) or ("L", "F")
    if len(orientation) != 2:
        orientation = ("L", "F")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=result_series_instance_uid(
            cfg.uid_prefix, str(source.StudyInstanceUID), model_version),
        series_number=cfg.series_number,
        sop_instance_uid=result_sop_instance_uid(
            cfg.uid_prefix, str(source.SOPInstanceUID), model_version),
        instance_number=1,
        manufacturer=cfg.manufacturer,
        patient_orientation=orientation,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        manufacturer_model_name=MODEL_NAME,
        software_versions=[f"cxr-worker {__version__}", model_version],
        series_description=SERIES_DESCRIPTION,
        # highdicom 0.28 rejects an empty first value (ISO 2022 IR 6, PS3.3 C.12.1.1.2), which
        # Japanese ISO 2022 studies use: build without it and copy the source's value below
        specific_character_set=None,
    )
    if "SpecificCharacterSet" in source:
        sc.SpecificCharacterSet = source.SpecificCharacterSet
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = " / ".join(lines)[:10240]
    sc.DerivationDescription = (
        f"Pneumonia triage by {MODEL_NAME}, model {model_version}: {label}, "
        f"probability {probability:.3f}, threshold {threshold:.3f}. {NOT_FOR_DIAGNOSTIC_USE}."
    )[:1024]
    # Only chest images are scored (the gate); naming the body part also settles General
    # Series Laterality (Type 2C, required for paired body parts only)
    sc.BodyPartExamined = str(source.get("BodyPartExamined", "") or "CHEST")
    sc.SourceImageSequence = Sequence([_source_reference(source, purpose=True)])
    sc.ReferencedImageSequence = Sequence([_source_reference(source, purpose=False)])
    return sc
