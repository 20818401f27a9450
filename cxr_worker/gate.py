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
- ``patient_age``: every image that passes gets a population (:class:`GateResult`):
  ``in_population`` (age within ``gate.min_age_years``-``gate.max_age_years``, the validated
  1-5 years), ``outside`` (OUTSIDE VALIDATED POPULATION) or ``unknown`` (POPULATION UNKNOWN:
  no usable age, see :func:`patient_age_years`). No usable age is never taken as "in
  population". By default outside and unknown images are scored and labelled as such;
  ``gate.refuse_outside_age_range`` refuses ``outside``, ``gate.refuse_unknown_age`` refuses
  ``unknown`` (rule ``patient_age``).

Reasons are stored in the worklist and logged: they quote only the value the rule checked
(SOP Class, Modality, Body Part Examined, View Position; escaped and cut to 64 characters by
:func:`cxr_worker.text.quote_value`, the sender writes them), and never a patient's name, ID
or birth date (the age rule names the computed age, not the dates it came from).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from pydicom.dataset import Dataset

from cxr_worker import sop_classes
from cxr_worker.errors import OutOfScopeError
from cxr_worker.labels import Population
from cxr_worker.text import quote_value

# every rule's name, in the order checked (the worklist reason and metrics name them)
RULES = ("sop_class", "own_output", "modality", "body_part", "view_position",
         "presentation_intent", "patient_age")


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
    refuse_unknown_age: bool = False


@dataclass(frozen=True)
class GateResult:
    """What the gate found about an image it lets through.

    ``population`` is shown beside the label everywhere; ``population_text`` is the line a
    person reads, e.g. "OUTSIDE VALIDATED POPULATION (age 81 years; validated 1-5 years)".
    """

    population: Population
    population_text: str
    age_years: float | None = None

    @property
    def outside_population(self) -> bool:
        return self.population == Population.OUTSIDE

    @property
    def note(self) -> str | None:
        """The population line when it is a warning (outside or unknown), else None."""
        return None if self.population == Population.IN else self.population_text


# -- patient age --------------------------------------------------------------------------
# AS as written in the wild: 003Y, 3Y, 81 (no unit: years), 036M, 010W, 020D; any case,
# surrounding spaces
_AGE_RE = re.compile(r"^(\d{1,3})([DWMY]?)$")
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0, "": 1.0}
_DA_RE = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
MAX_PLAUSIBLE_AGE_YEARS = 130.0


def age_years(value: str | None) -> float | None:
    """Patient Age (AS) in years, or None when blank or unparseable.

    Accepted: 1-3 digits and an optional unit D/W/M/Y, upper or lower case, surrounding
    spaces ignored (``003Y``, ``3Y``, ``3y``, `` 036M ``, ``010W``, ``020D``); a bare number
    (``81``) is years. Anything else (``4.5Y``, ``-3Y``, ``3 Y``, ``004X``, ``999Y`` and other
    ages over 130 years) is None: unknown, never guessed.
    """
    m = _AGE_RE.match(str(value or "").strip().upper())
    if not m:
        return None
    years = int(m.group(1)) * _AGE_UNIT_YEARS[m.group(2)]
    return years if years <= MAX_PLAUSIBLE_AGE_YEARS else None


def parse_da(value: object) -> dt.date | None:
    """A DICOM DA (``YYYYMMDD``) as a date, or None when blank or not a valid date."""
    if isinstance(value, dt.date):
        return value
    m = _DA_RE.match(str(value or "").strip())
    if not m:
        return None
    try:
        return dt.date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    except ValueError:  # 20230230, month 13, ...
        return None


def _birthday(birth: dt.date, year: int) -> dt.date:
    try:
        return birth.replace(year=year)
    except ValueError:  # born on 29 February: 1 March in common years
        return dt.date(year, 3, 1)


def years_between(birth: dt.date, on: dt.date) -> float | None:
    """Age in years on ``on``: completed years plus the elapsed fraction of the current one
    (so the first birthday is exactly 1.0); None when ``birth`` is after ``on``."""
    if birth > on:
        return None
    years = on.year - birth.year
    if _birthday(birth, on.year) > on:
        years -= 1
    last, following = _birthday(birth, birth.year + years), _birthday(birth, birth.year + years + 1)
    return years + (on - last).days / (following - last).days


def patient_age_years(ds: Dataset) -> float | None:
    """The patient's age in years at the time of the image, or None (population unknown).

    Decisions:

    - Patient Age (0010,1010) first, when :func:`age_years` can read it (AS in every form
      seen in the wild; a bare number is years; blank or unreadable is "no usable age");
    - else Patient's Birth Date (0010,0030) against Study Date (0008,0020), or Acquisition
      Date (0008,0022) when the Study Date is absent or invalid; dates must be valid
      ``YYYYMMDD`` (anything else is absent);
    - a birth date after that date is an error in the header: None, no other date is tried;
    - an age over 130 years is implausible: None.
    """
    years = age_years(str(ds.get("PatientAge", "") or ""))
    if years is not None:
        return years
    birth = parse_da(ds.get("PatientBirthDate", ""))
    if birth is None:
        return None
    on = parse_da(ds.get("StudyDate", "")) or parse_da(ds.get("AcquisitionDate", ""))
    if on is None:
        return None
    years = years_between(birth, on)
    return years if years is not None and years <= MAX_PLAUSIBLE_AGE_YEARS else None


def describe_age(years: float) -> str:
    """``81 years``, ``5.5 years``, ``6 months``, ``20 days`` (for the population line)."""
    if years >= 1:
        whole = round(years)
        if abs(years - whole) < 1e-9:
            return f"{whole} year{'s' if whole != 1 else ''}"
        return f"{years:.1f} years"
    months = int(years * 12 + 1e-9)
    if months >= 1:
        return f"{months} month{'s' if months != 1 else ''}"
    days = round(years * 365.25)
    return f"{days} day{'s' if days != 1 else ''}"


def assess_population(ds: Dataset, cfg: GateConfig) -> GateResult:
    """The image's population and the line a person reads about it (no refusal here)."""
    age = patient_age_years(ds)
    validated = f"validated {cfg.min_age_years:g}-{cfg.max_age_years:g} years"
    if age is None:
        return GateResult(Population.UNKNOWN,
                          f"{Population.UNKNOWN.text} (no usable patient age; {validated})")
    population = (Population.IN if cfg.min_age_years <= age <= cfg.max_age_years
                  else Population.OUTSIDE)
    return GateResult(population, f"{population.text} (age {describe_age(age)}; {validated})",
                      age)


def check(ds: Dataset, cfg: GateConfig) -> GateResult:
    """Raise :class:`OutOfScopeError` naming the rule, or return flags for the result."""
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in sop_classes.accepted(cfg.accept_dx_for_processing):
        raise OutOfScopeError("sop_class",
                              f"SOP Class {quote_value(sop_class)} is not a radiograph we score")

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
        raise OutOfScopeError(
            "modality", f"Modality {quote_value(modality) or '(absent)'} is not CR or DX")

    body_part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if cfg.require_body_part_chest:
        if not body_part and not cfg.allow_missing_body_part:
            raise OutOfScopeError("body_part", "Body Part Examined absent")
        if body_part and body_part != "CHEST":
            raise OutOfScopeError(
                "body_part", f"Body Part Examined {quote_value(body_part)} is not CHEST")

    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    if not view and not cfg.allow_missing_view_position:
        raise OutOfScopeError("view_position", "View Position absent")
    if view and view not in cfg.view_positions:
        raise OutOfScopeError(
            "view_position",
            f"View Position {quote_value(view)} (only {'/'.join(cfg.view_positions)} scored)")

    intent = str(ds.get("PresentationIntentType", "") or "").strip().upper()
    if intent == "FOR PROCESSING" and not cfg.accept_dx_for_processing:
        raise OutOfScopeError("presentation_intent", "FOR PROCESSING image (raw detector data)")

    result = assess_population(ds, cfg)
    if result.population == Population.OUTSIDE and cfg.refuse_outside_age_range:
        raise _age_refusal(f"{result.population_text}; refused by gate.refuse_outside_age_range",
                           result.population)
    if result.population == Population.UNKNOWN and cfg.refuse_unknown_age:
        raise _age_refusal(f"{result.population_text}; refused by gate.refuse_unknown_age",
                           result.population)
    return result


def _age_refusal(detail: str, population: Population) -> OutOfScopeError:
    return OutOfScopeError("patient_age", detail, population=str(population))
