"""The input gate: is this image one the model may score? Each refusal has a named rule.

Rules, in order (each configurable in ``[gate]``/``[listener]``; see README "The gate"):

- ``sop_class``: CR, DX For Presentation, Secondary Capture (DX For Processing only when
  ``listener.accept_dx_for_processing``);
- ``own_output`` (loop guard): our UID root, our Manufacturer, or DERIVED\\SECONDARY with
  our Series Number: never score our own results;
- ``modality``: CR or DX (Secondary Captures converted from radiographs carry CR/DX too);
- ``body_part``: CHEST (absent allowed by default);
- ``view_position``: PA or AP (laterals and others refused; absent allowed by default);
- ``presentation_intent``: FOR PROCESSING refused unless allowed;
- ``patient_age``: outside the validated 1-5 years: scored and flagged by default, refused
  when ``gate.refuse_outside_age_range``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.dataset import Dataset

from cxr_worker.errors import OutOfScopeError

CR = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@dataclass(frozen=True)
class GateConfig:
    accept_dx_for_processing: bool
    require_body_part_chest: bool
    allow_missing_body_part: bool
    view_positions: tuple[str, ...]
    allow_missing_view_position: bool
    min_age_years: float
    max_age_years: float
    refuse_outside_age_range: bool
    uid_prefix: str
    manufacturer: str
    series_number: int


@dataclass(frozen=True)
class GateResult:
    outside_population: bool
    note: str | None = None


_AGE_RE = re.compile(r"^(\d{3})([DWMY])$")
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def age_years(value: str) -> float | None:
    """Patient Age (AS, e.g. ``004Y``, ``018M``) in years, or None when absent or malformed."""
    m = _AGE_RE.match(value.strip())
    if not m:
        return None
    return int(m.group(1)) * _AGE_UNIT_YEARS[m.group(2)]


def check(ds: Dataset, cfg: GateConfig) -> GateResult:
    """Raise :class:`OutOfScopeError` naming the rule, or return flags for the result."""
    sop_class = str(ds.get("SOPClassUID", ""))
    allowed = {CR, DX_PRESENTATION, SECONDARY_CAPTURE} | (
        {DX_PROCESSING} if cfg.accept_dx_for_processing else set())
    if sop_class not in allowed:
        raise OutOfScopeError("sop_class", f"SOP Class {sop_class} is not a radiograph we score")

    image_type = [str(v).upper() for v in ds.get("ImageType", [])]
    # Series Number compared as text: an invalid IS value (pydicom keeps "abc" as a string)
    # must not raise here
    series_number = str(ds.get("SeriesNumber", "") or "").strip()
    if (
        str(ds.get("SOPInstanceUID", "")).startswith(cfg.uid_prefix)
        or str(ds.get("Manufacturer", "")) == cfg.manufacturer
        or (image_type[:2] == ["DERIVED", "SECONDARY"]
            and series_number == str(cfg.series_number))
    ):
        raise OutOfScopeError("own_output", "this is a result object of cxr-worker")

    modality = str(ds.get("Modality", "")).upper()
    if modality not in ("CR", "DX"):
        raise OutOfScopeError("modality", f"Modality {modality or '(absent)'} is not CR or DX")

    body_part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if cfg.require_body_part_chest:
        if not body_part and not cfg.allow_missing_body_part:
            raise OutOfScopeError("body_part", "Body Part Examined absent")
        if body_part and body_part != "CHEST":
            raise OutOfScopeError("body_part", f"Body Part Examined {body_part} is not CHEST")

    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    if not view and not cfg.allow_missing_view_position:
        raise OutOfScopeError("view_position", "View Position absent")
    if view and view not in cfg.view_positions:
        raise OutOfScopeError(
            "view_position", f"View Position {view} (only {'/'.join(cfg.view_positions)} scored)")

    intent = str(ds.get("PresentationIntentType", "") or "").strip().upper()
    if intent == "FOR PROCESSING" and not cfg.accept_dx_for_processing:
        raise OutOfScopeError("presentation_intent", "FOR PROCESSING image (raw detector data)")

    age = age_years(str(ds.get("PatientAge", "") or ""))
    outside = age is not None and not cfg.min_age_years <= age <= cfg.max_age_years
    if outside and cfg.refuse_outside_age_range:
        raise OutOfScopeError(
            "patient_age",
            f"age outside the validated {cfg.min_age_years:g}-{cfg.max_age_years:g} years")
    note = (f"outside validated population (age {cfg.min_age_years:g}-"
            f"{cfg.max_age_years:g} years)") if outside else None
    return GateResult(outside_population=outside, note=note)
