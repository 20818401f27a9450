"""The input gate: each rule refuses with its name, on synthetic and on real (NIH) headers."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import NIH
from make_samples import wrap
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from cxr_worker import gate
from cxr_worker.errors import OutOfScopeError

CFG = gate.GateConfig(
    accept_dx_for_processing=False, require_body_part_chest=True, allow_missing_body_part=True,
    view_positions=("PA", "AP"), allow_missing_view_position=True, min_age_years=1.0,
    max_age_years=5.0, refuse_outside_age_range=False,
    uid_prefix="1.2.826.0.1.3680043.8.498.7717.", manufacturer="cxr-worker", series_number=9901)


def image(**kw):
    return wrap(np.full((128, 128), 100.0), modality=kw.pop("modality", "DX"), **kw)


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
    (lambda ds: setattr(ds, "SOPClassUID", gate.DX_PROCESSING), "sop_class"),
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


def test_age_outside_the_validated_population_is_flagged_or_refused():
    adult = image(patient_age="045Y")
    res = gate.check(adult, CFG)
    assert res.outside_population and "outside validated population" in (res.note or "")
    assert not gate.check(image(patient_age="030M"), CFG).outside_population  # 2.5 years
    assert gate.check(image(patient_age="006M"), CFG).outside_population
    refuse = gate.GateConfig(**{**CFG.__dict__, "refuse_outside_age_range": True})
    assert rule_of(adult, refuse) == "patient_age"
    assert not gate.check(image(patient_age=None), CFG).outside_population


def test_dx_for_processing_only_when_configured():
    ds = image()
    ds.SOPClassUID = gate.DX_PROCESSING
    ds.PresentationIntentType = "FOR PROCESSING"
    allowed = gate.GateConfig(**{**CFG.__dict__, "accept_dx_for_processing": True})
    assert rule_of(ds) == "sop_class"
    assert rule_of(ds, allowed) is None


def test_real_nih_headers():
    # test1: DX CHEST PA (Secondary Capture SOP class); test4: same with RIBCAGE
    assert rule_of(dcmread(NIH / "test1.dcm")) is None
    assert rule_of(dcmread(NIH / "test2.dcm")) is None  # AP
    assert rule_of(dcmread(NIH / "test4.dcm")) == "body_part"


@pytest.mark.parametrize(("value", "years"), [
    ("004Y", 4.0), ("018M", 1.5), ("052W", 52 * 7 / 365.25), ("010D", 10 / 365.25),
    ("4Y", None), ("", None), ("004X", None),
])
def test_age_strings(value, years):
    got = gate.age_years(value)
    assert got == (pytest.approx(years) if years is not None else None)
