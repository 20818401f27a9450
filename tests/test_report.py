"""The Secondary Capture result: the patient's name survives in its character set, the UIDs
and references put it in the source study, the labels say what it is; dciodvfy accepts it."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import kermany_files, need, reread, to_bytes
from make_samples import upsample, wrap
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from cxr_worker import decode, gate, report
from cxr_worker.errors import OutOfScopeError
from cxr_worker.labels import Label, Population
from cxr_worker.model.preprocess import load_grey_image

CFG = report.ReportConfig("1.2.826.0.1.3680043.10.1187.", 9901, "cxr-worker")
GATE = gate.GateConfig(
    accept_dx_for_processing=False, require_body_part_chest=True, allow_missing_body_part=True,
    view_positions=("PA", "AP"), allow_missing_view_position=True, min_age_years=1.0,
    max_age_years=5.0, refuse_outside_age_range=False, uid_prefix=CFG.uid_prefix,
    manufacturer=CFG.manufacturer, series_number=CFG.series_number)

CHARSETS = [
    pytest.param("ISO_IR 192", "Müller^Zoë", id="utf-8"),
    # an empty first value is ISO 2022 IR 6 (PS3.3 C.12.1.1.2); highdicom 0.28 rejects it
    pytest.param(["", "ISO 2022 IR 87"], "ヤマダ^タロウ=山田^太郎=やまだ^たろう", id="japanese"),
    pytest.param("ISO_IR 100", "Buc^Jérôme", id="latin-1"),
    pytest.param("GB18030", "王^小东", id="gb18030"),
]


def charsets(ds: Dataset) -> list[str]:
    value: Any = ds.get("SpecificCharacterSet", [])
    return [value] if isinstance(value, str) else [str(v) for v in value]


@pytest.fixture(scope="module")
def grey() -> NDArray[np.float32]:
    return upsample(load_grey_image(kermany_files("PNEUMONIA", 1)[0]), 320, 280)


def received(grey: NDArray[np.float32], name: str = "Sample^Patient",
             charset: str | list[str] = "ISO_IR 192", seed: str = "report") -> Dataset:
    """A CR as the worker holds it after reception: encoded in ``charset``, read back."""
    ds = wrap(grey, bits_stored=12, window=True, seed=seed, patient_name=name)
    ds.SpecificCharacterSet = charset
    return reread(ds)


IN_POPULATION = "IN VALIDATED POPULATION (age 3 years; validated 1-5 years)"
OUTSIDE = "OUTSIDE VALIDATED POPULATION (age 81 years; validated 1-5 years)"
UNKNOWN = "POPULATION UNKNOWN (no usable patient age; validated 1-5 years)"


def build(source: Dataset, model_version: str = "pneumonia-test-1",
          probability: float = 0.73, label: str = Label.SUSPECTED, *,
          population: str = Population.IN, population_text: str = IN_POPULATION) -> Dataset:
    sc = report.build_secondary_capture(
        source, decode.display_image(source), probability=probability, label=label,
        threshold=0.5, model_version=model_version, cfg=CFG, population=population,
        population_text=population_text)
    return reread(sc)


@pytest.mark.parametrize(("charset", "name"), CHARSETS)
def test_patient_name_and_character_set_survive(grey: NDArray[np.float32],
                                                charset: str | list[str], name: str) -> None:
    source = received(grey, name, charset)
    assert str(source.PatientName) == name, (
        f"test set-up: the source did not round-trip {name!r} (got {source.PatientName!r})")

    sc = build(source)

    assert charsets(sc) == charsets(source), (
        f"Specific Character Set changed: {charsets(source)} -> {charsets(sc)}")
    assert str(sc.PatientName) == name, f"Patient's Name {name!r} came back as {sc.PatientName!r}"
    assert sc.PatientName.original_string == source.PatientName.original_string, (
        "Patient's Name is encoded differently in the result: "
        f"{source.PatientName.original_string!r} -> {sc.PatientName.original_string!r}")
    assert sc.PatientID == source.PatientID


# Not the Japanese name: encoded with its escape sequences it is 73 bytes, over PN's 64, so
# dciodvfy rejects the source value itself.
@pytest.mark.parametrize(("charset", "name"), [c for c in CHARSETS if c.id != "japanese"])
def test_dciodvfy_finds_no_errors(grey: NDArray[np.float32], tmp_path: Path,
                                  charset: str | list[str], name: str) -> None:
    path = tmp_path / "sc.dcm"
    path.write_bytes(to_bytes(build(received(grey, name, charset))))
    res = subprocess.run([need("dciodvfy"), str(path)], capture_output=True, text=True,
                         timeout=60, check=False)
    errors = [line for line in (res.stdout + res.stderr).splitlines()
              if line.startswith("Error")]
    assert not errors, "dciodvfy:\n" + "\n".join(errors)


def test_secondary_capture_round_trip(grey: NDArray[np.float32]) -> None:
    source = received(grey)
    sc = build(source)

    assert sc.SOPClassUID == report.SECONDARY_CAPTURE
    assert sc.StudyInstanceUID == source.StudyInstanceUID, "result filed outside the study"
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID, "result written into the source series"
    assert str(sc.SeriesInstanceUID).startswith(CFG.uid_prefix)
    assert str(sc.SOPInstanceUID).startswith(CFG.uid_prefix)
    assert sc.SeriesNumber == CFG.series_number
    assert list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert sc.BurnedInAnnotation == "YES"
    assert report.NOT_FOR_DIAGNOSTIC_USE in sc.ImageComments
    assert sc.Manufacturer == "cxr-worker"
    assert sc.PatientName == source.PatientName

    ref = sc.SourceImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == source.SOPClassUID
    code = ref.PurposeOfReferenceCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("121322", "DCM"), (
        f"purpose of reference is {code.CodeValue}/{code.CodingSchemeDesignator}")
    assert sc.ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_result_sop_instance_uid_is_deterministic(grey: NDArray[np.float32]) -> None:
    """A replay replaces the earlier result: same source + model -> same UID."""
    source = received(grey)
    first = build(source, "pneumonia-test-1")
    again = build(source, "pneumonia-test-1", probability=0.2, label=Label.NEGATIVE)
    other_model = build(source, "pneumonia-test-2")
    other_source = build(received(grey, seed="another image"), "pneumonia-test-1")

    assert again.SOPInstanceUID == first.SOPInstanceUID, "a replay would add a second result"
    assert other_model.SOPInstanceUID != first.SOPInstanceUID, (
        "a new model version would overwrite the old model's result")
    assert other_source.SOPInstanceUID != first.SOPInstanceUID
    assert again.SeriesInstanceUID == first.SeriesInstanceUID, "one AI series per study+model"
    assert other_model.SeriesInstanceUID != first.SeriesInstanceUID


def test_the_gate_refuses_our_own_result(grey: NDArray[np.float32]) -> None:
    """Loop guard: a result sent back to the worker is not scored."""
    sc = build(received(grey))
    sc.Modality = "CR"  # even if a PACS rewrote it
    with pytest.raises(OutOfScopeError) as err:
        gate.check(sc, GATE)
    assert err.value.rule == "own_output", f"refused by {err.value.rule}, not the loop guard"


@pytest.mark.parametrize(("population", "text"), [
    (Population.OUTSIDE, OUTSIDE), (Population.UNKNOWN, UNKNOWN), (Population.IN, IN_POPULATION),
])
def test_banner_shows_the_population_beside_the_label(grey: NDArray[np.float32],
                                                      population: str, text: str) -> None:
    source = received(grey)
    sc = build(source, probability=0.999, population=population, population_text=text)
    comments = str(sc.ImageComments).split(" / ")
    assert comments[:3] == ["SUSPECTED PNEUMONIA", text,
                            "probability > 0.99 (threshold 0.50, model card)"]
    assert text in sc.DerivationDescription and "> 0.99" in sc.DerivationDescription
    # the population line: on an amber strip when outside or unknown, never otherwise
    pixels = sc.pixel_array
    amber = np.all(pixels == report.POPULATION_WARNING_COLOUR, axis=-1)
    banner_rows = np.flatnonzero(amber.any(axis=1))
    if population == Population.IN:
        assert not banner_rows.size
    else:
        assert banner_rows.size, "no amber strip for the population line"
        assert banner_rows.max() < pixels.shape[0] - source.Rows  # in the banner


def test_banner_lines_order_and_formats() -> None:
    lines = report.banner_lines(Label.NEGATIVE, UNKNOWN, 0.004, 0.1395, "m1")
    assert lines == [Label.NEGATIVE, UNKNOWN, "probability < 0.01 (threshold 0.14, model card)",
                     "model m1", "AI TRIAGE - NOT FOR DIAGNOSTIC USE"]
    site = "site threshold, calibrated 2026-11-26 on 150 images"
    assert report.banner_lines(Label.SUSPECTED, IN_POPULATION, 0.7, 0.62, "m1",
                               threshold_source=site)[2] == (
        f"probability 0.70 (threshold 0.62, {site})")
    assert not any("1.00" in x or "0.00" in x
                   for x in report.banner_lines(Label.SUSPECTED, OUTSIDE, 1.0, 0.5, "m"))
