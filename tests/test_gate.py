"""The input gate: each rule refuses with its name, on synthetic and on real (NIH) headers;
the patient's age in every form and the population it puts an image in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from make_samples import wrap
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from cxr_worker import gate, sop_classes
from cxr_worker.errors import OutOfScopeError
from cxr_worker.labels import Population

NIH_DATA = Path(__file__).parent / "data" / "nih"  # copies of the NIH files (tests/data/README)

CFG = gate.GateConfig(
    accept_dx_for_processing=False, require_body_part_chest=True, allow_missing_body_part=True,
    view_positions=("PA", "AP"), allow_missing_view_position=True, min_age_years=1.0,
    max_age_years=5.0, refuse_outside_age_range=False,
    uid_prefix="1.2.826.0.1.3680043.8.498.7717.", manufacturer="cxr-worker", series_number=9901)


def image(**kw):
    age = kw.pop("patient_age", "003Y")
    ds = wrap(np.full((128, 128), 100.0), modality=kw.pop("modality", "DX"), patient_age=None,
              **kw)
    if age is not None:
        # as read from a modality's file: pydicom's setter would warn on "81" or "4Y"
        value = age.encode() + b" " * (len(age) % 2)
        ds[0x00101010] = RawDataElement(Tag(0x00101010), "AS", len(value), value, 0, True, True)
    return ds


def rule_of(ds, cfg=CFG) -> str | None:
    try:
        gate.check(ds, cfg)
    except OutOfScopeError as exc:
        assert exc.reason.startswith(f"out of scope ({exc.rule})")
        return exc.rule
    return None


def test_a_frontal_chest_radiograph_passes():
    assert rule_of(image()) is None
    assert rule_of(image(modality="CR", view_position="AP")) is None


@pytest.mark.parametrize(("change", "rule"), [
    (lambda ds: setattr(ds, "SOPClassUID", "1.2.840.10008.5.1.4.1.1.2"), "sop_class"),
    (lambda ds: setattr(ds, "SOPClassUID", sop_classes.DX_PROCESSING), "sop_class"),
    (lambda ds: setattr(ds, "Manufacturer", "cxr-worker"), "own_output"),
    (lambda ds: setattr(ds, "SOPInstanceUID", "1.2.826.0.1.3680043.8.498.7717.5"), "own_output"),
    (lambda ds: (setattr(ds, "ImageType", ["DERIVED", "SECONDARY"]),
                 setattr(ds, "SeriesNumber", 9901)), "own_output"),
    (lambda ds: setattr(ds, "Modality", "CT"), "modality"),
    (lambda ds: setattr(ds, "BodyPartExamined", "RIBCAGE"), "body_part"),
    (lambda ds: setattr(ds, "ViewPosition", "LL"), "view_position"),
    (lambda ds: setattr(ds, "ViewPosition", "RL"), "view_position"),
    (lambda ds: setattr(ds, "PresentationIntentType", "FOR PROCESSING"), "presentation_intent"),
])
def test_each_rule_refuses_with_its_name(change, rule):
    ds = image()
    change(ds)
    assert rule_of(ds) == rule


def test_invalid_series_number_is_not_an_exception():
    ds = image()
    ds.ImageType = ["DERIVED", "SECONDARY"]
    # as read from a modality's file: pydicom keeps the invalid IS as a string, with a warning
    ds[0x00200011] = RawDataElement(Tag(0x00200011), "IS", 4, b"abc ", 0, True, True)
    with pytest.warns(UserWarning, match="Invalid value for VR IS"):
        assert rule_of(ds) is None


def test_missing_body_part_and_view_configurable():
    ds = image(body_part=None, view_position=None)
    assert rule_of(ds) is None
    strict = gate.GateConfig(**{**CFG.__dict__, "allow_missing_body_part": False})
    assert rule_of(ds, strict) == "body_part"
    strict = gate.GateConfig(**{**CFG.__dict__, "allow_missing_view_position": False})
    assert rule_of(ds, strict) == "view_position"


def population_of(ds, cfg=CFG) -> str:
    return str(gate.check(ds, cfg).population)


def test_age_outside_the_validated_population_is_labelled_or_refused():
    adult = image(patient_age="045Y")
    res = gate.check(adult, CFG)
    assert res.population == Population.OUTSIDE and res.outside_population
    assert res.population_text == \
        "OUTSIDE VALIDATED POPULATION (age 45 years; validated 1-5 years)"
    assert population_of(image(patient_age="030M")) == "in_population"  # 2.5 years
    assert population_of(image(patient_age="006M")) == "outside"
    refuse = gate.GateConfig(**{**CFG.__dict__, "refuse_outside_age_range": True})
    with pytest.raises(OutOfScopeError) as err:
        gate.check(adult, refuse)
    assert err.value.rule == "patient_age" and err.value.population == "outside"
    assert "OUTSIDE VALIDATED POPULATION" in err.value.reason
    assert "refuse_outside_age_range" in err.value.reason
    # refusing "outside" does not refuse "unknown", nor in-population images
    assert population_of(image(patient_age=None), refuse) == "unknown"
    assert population_of(image(patient_age="003Y"), refuse) == "in_population"


def test_no_usable_age_is_population_unknown_never_inside():
    ds = image(patient_age=None)
    res = gate.check(ds, CFG)
    assert res.population == Population.UNKNOWN and not res.outside_population
    assert res.population_text.startswith("POPULATION UNKNOWN (no usable patient age")
    assert res.note == res.population_text
    assert gate.check(image(patient_age="003Y"), CFG).note is None
    refuse = gate.GateConfig(**{**CFG.__dict__, "refuse_unknown_age": True})
    with pytest.raises(OutOfScopeError) as err:
        gate.check(ds, refuse)
    assert err.value.rule == "patient_age" and err.value.population == "unknown"
    assert "refuse_unknown_age" in err.value.reason
    assert population_of(image(patient_age="081Y"), refuse) == "outside"  # scored, labelled
    assert population_of(image(patient_age="4Y"), refuse) == "in_population"


def _nih_like(age: str) -> Dataset:
    """The header of the NIH ChestX-ray14 DICOM files: an adult whose Patient Age is a bare
    number of years, DX CHEST, Secondary Capture SOP class, no dates, no View Position."""
    ds = image(patient_age=age, view_position=None)
    ds.SOPClassUID = sop_classes.SECONDARY_CAPTURE
    del ds.StudyDate
    del ds.PatientBirthDate
    return ds


@pytest.mark.parametrize("age", ["81", "58", "77"])
def test_nih_adults_with_bare_number_ages_are_outside(age):
    """The bug this fixes: '81' did not parse and the adult was scored as in population."""
    res = gate.check(_nih_like(age), CFG)
    assert res.population == Population.OUTSIDE
    assert res.age_years == float(age)
    assert res.population_text == \
        f"OUTSIDE VALIDATED POPULATION (age {age} years; validated 1-5 years)"


@pytest.mark.parametrize("name", ["test1.dcm", "test2.dcm", "test3.dcm"])
def test_real_nih_files_are_labelled_outside_population(name):
    ds = dcmread(NIH_DATA / name)
    res = gate.check(ds, CFG)
    assert res.population == Population.OUTSIDE, res.population_text
    assert res.population_text.startswith("OUTSIDE VALIDATED POPULATION (age ")


def test_dx_for_processing_only_when_configured():
    ds = image()
    ds.SOPClassUID = sop_classes.DX_PROCESSING
    ds.PresentationIntentType = "FOR PROCESSING"
    allowed = gate.GateConfig(**{**CFG.__dict__, "accept_dx_for_processing": True})
    assert rule_of(ds) == "sop_class"
    assert rule_of(ds, allowed) is None


def test_real_nih_headers():
    # test1: DX CHEST PA (Secondary Capture SOP class); test4: same with RIBCAGE
    assert rule_of(dcmread(NIH_DATA / "test1.dcm")) is None
    assert rule_of(dcmread(NIH_DATA / "test2.dcm")) is None  # AP
    assert rule_of(dcmread(NIH_DATA / "test4.dcm")) == "body_part"


YEAR = 365.25


@pytest.mark.parametrize(("value", "years"), [
    ("004Y", 4.0), ("4Y", 4.0), ("4y", 4.0), (" 004Y ", 4.0), ("81", 81.0), ("003", 3.0),
    ("0", 0.0), ("018M", 1.5), ("18m", 1.5), ("036M", 3.0), ("052W", 52 * 7 / YEAR),
    ("010w", 10 * 7 / YEAR), ("010D", 10 / YEAR), ("020d", 20 / YEAR), ("130Y", 130.0),
    # blank or unparseable: unknown
    ("", None), ("   ", None), (None, None), ("004X", None), ("4.5Y", None), ("-3Y", None),
    ("3 Y", None), ("Y", None), ("1000", None), ("abc", None), ("004YY", None),
    ("999Y", None),  # placeholder for "unknown" on some modalities: implausible
])
def test_age_strings(value, years):
    got = gate.age_years(value)
    assert got == (pytest.approx(years) if years is not None else None)


def _dated(age: str | None = None, birth: str | None = None, study: str | None = None,
           acquisition: str | None = None) -> Dataset:
    ds = image(patient_age=age)
    for tag, value in ((0x00100030, birth), (0x00080020, study), (0x00080022, acquisition)):
        if tag in ds:
            del ds[tag]
        if value is not None:  # as read from a file (invalid dates included)
            raw = value.encode() + b" " * (len(value) % 2)
            ds[tag] = RawDataElement(Tag(tag), "DA", len(raw), raw, 0, True, True)
    return ds


@pytest.mark.parametrize(("age", "birth", "study", "acquisition", "years"), [
    # Patient Age wins when usable
    ("003Y", "19450101", "20260101", None, 3.0),
    ("81", "20230101", "20260101", None, 81.0),
    # else birth date against the study date
    (None, "20230101", "20260101", None, 3.0),
    ("", "20230101", "20260101", None, 3.0),  # blank age
    ("  ", "20230101", "20260101", None, 3.0),
    ("4.5Y", "20230101", "20260101", None, 3.0),  # unparseable age
    (None, "20230101", "20260701", None, 3 + 181 / 365),
    (None, "20250101", "20260101", "20270101", 1.0),  # the study date, not acquisition
    (None, "20250301", "20260301", None, 1.0),  # the first birthday is 1.0 exactly
    (None, "20240229", "20250301", None, 1.0),  # 29 February: 1 March in common years
    (None, "20240229", "20250228", None, 365 / 366),
    (None, "20260101", "20260101", None, 0.0),  # the day of birth
    # else against the acquisition date
    (None, "20230101", None, "20260101", 3.0),
    (None, "20230101", "", "20260101", 3.0),
    (None, "20230101", "20261399", "20260101", 3.0),  # invalid study date: acquisition
    # unknown
    (None, None, "20260101", None, None),  # no age, no birth date
    (None, "", "20260101", "20260101", None),
    (None, "20230101", None, None, None),  # no date to compare with
    (None, "20230101", "", "", None),
    (None, "20231301", "20260101", None, None),  # month 13
    (None, "20230230", "20260101", None, None),  # 30 February
    (None, "2023-01-01", "20260101", None, None),  # not DA
    (None, "202301", "20260101", None, None),
    (None, "20230101", "20260230", "20260231", None),  # both dates invalid
    (None, "20270101", "20260101", None, None),  # born after the study
    (None, "20270101", "20260101", "20280101", None),  # ... no other date is tried
    (None, "18500101", "20260101", None, None),  # implausible
])
def test_patient_age_from_age_or_dates(age, birth, study, acquisition, years):
    got = gate.patient_age_years(_dated(age, birth, study, acquisition))
    assert got == (pytest.approx(years) if years is not None else None)


@pytest.mark.parametrize(("birth", "study", "population"), [
    ("20230101", "20260101", "in_population"),
    ("19450101", "20260101", "outside"),
    ("20250601", "20260101", "outside"),  # 7 months
    ("20230101", "", "unknown"),
    ("20270101", "20260101", "unknown"),
])
def test_population_from_dates(birth, study, population):
    assert population_of(_dated(None, birth, study)) == population


@pytest.mark.parametrize(("years", "text"), [
    (81.0, "81 years"), (1.0, "1 year"), (5.5, "5.5 years"), (0.5, "6 months"),
    (1 / 12, "1 month"), (10 * 7 / YEAR, "2 months"), (20 / YEAR, "20 days"),
    (1 / YEAR, "1 day"),
])
def test_age_descriptions(years, text):
    assert gate.describe_age(years) == text
