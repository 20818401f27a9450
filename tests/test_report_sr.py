"""The Structured Report result (TID 1500 as IHE AI Results uses it): dciodvfy accepts it,
dcmtk's dsrdump reads the finding out of it, and highdicom's SR API reads back the values it
was built with; its UID follows the decision."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, NamedTuple

import highdicom as hd
import pydicom
import pytest
from conftest import DCMTK_ENV, SAMPLES, Orthanc, need, reread, to_bytes
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.tag import Tag

from cxr_worker import gate, report, report_sr
from cxr_worker.errors import OutOfScopeError
from cxr_worker.labels import Label, Population

CFG = report.ReportConfig("1.2.826.0.1.3680043.10.1187.", 9901, "cxr-worker")
MODEL = "cxr-pneumonia-mnv2-a1v1-20261126-3e76406c"
THRESHOLD = 0.3645303807647971  # the shipped card's: more digits than a DS holds
CARD_SHA = "5f2d" * 16
IN_POPULATION = "IN VALIDATED POPULATION (age 3 years; validated 1-5 years)"
OUTSIDE = "OUTSIDE VALIDATED POPULATION (age 81 years; validated 1-5 years)"

SUSPECTED = SAMPLES / "cr_pa_pneumonia_12bit_rescale.dcm"
NORMAL = SAMPLES / "dx_pa_normal_8bit.dcm"


class Case(NamedTuple):
    path: Path
    label: str
    probability: float
    population: str
    population_text: str


CASES = [
    pytest.param(Case(SUSPECTED, Label.SUSPECTED, 0.93, Population.IN, IN_POPULATION),
                 id="suspected-cr"),
    pytest.param(Case(NORMAL, Label.NEGATIVE, 0.04, Population.OUTSIDE, OUTSIDE),
                 id="normal-dx"),
]


def source(path: Path) -> Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def build(src: Dataset, label: str = Label.SUSPECTED, probability: float = 0.93, *,
          threshold: float = THRESHOLD, model_version: str = MODEL,
          population: str = Population.IN, population_text: str = IN_POPULATION,
          **kw: Any) -> Dataset:
    return report_sr.build_sr(
        src, probability=probability, label=label, threshold=threshold,
        threshold_source="site threshold, calibrated 2026-11-26 on 150 images",
        model_version=model_version, model_card_sha256=CARD_SHA, population=population,
        population_text=population_text, cfg=CFG, **kw)


def write(sr: Dataset, tmp_path: Path, name: str = "sr.dcm") -> Path:
    path = tmp_path / name
    path.write_bytes(to_bytes(sr))
    return path


def dciodvfy_errors(path: Path) -> tuple[list[str], str]:
    res = subprocess.run([need("dciodvfy"), str(path)], capture_output=True, text=True,
                         timeout=60, check=False)
    out = res.stdout + res.stderr
    return [line for line in out.splitlines() if line.startswith("Error")], out


def items(container: Any, name: Any) -> list[Any]:
    return hd.sr.utils.find_content_items(container, name=name)


def text_values(container: Any, name: Any) -> list[str]:
    return [str(i.TextValue) for i in items(container, name)]


@pytest.mark.parametrize("case", CASES)
def test_highdicom_reads_back_what_was_built(tmp_path: Path, case: Case) -> None:
    src = source(case.path)
    label, probability, population_text = case.label, case.probability, case.population_text
    built = build(src, label, probability, population=case.population,
                  population_text=population_text)
    sr = hd.sr.srread(write(built, tmp_path))

    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert sr.SOPClassUID == report_sr.COMPREHENSIVE_3D_SR
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert sr.StudyInstanceUID == src.StudyInstanceUID, "SR filed outside the study"
    assert sr.SeriesInstanceUID != src.SeriesInstanceUID, "SR written into the source series"
    assert sr.SeriesNumber == CFG.series_number + 1
    assert str(sr.SOPInstanceUID).startswith(CFG.uid_prefix)
    assert (sr.PatientID, sr.PatientName, sr.AccessionNumber) == (
        src.PatientID, src.PatientName, src.AccessionNumber)
    assert sr.Modality == "SR" and sr.SeriesDescription == report_sr.SR_SERIES_DESCRIPTION

    content = sr.content
    assert isinstance(content, hd.sr.MeasurementReport)
    [procedure] = items(content[0], codes.DCM.ProcedureReported)
    code = procedure.ConceptCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("399208008", "SCT")

    [observer] = content.get_observer_contexts(observer_type=codes.DCM.Device)
    device = observer.observer_identifying_attributes
    assert device.name == "cxr-worker" and device.manufacturer_name == CFG.manufacturer
    assert device.model_name == f"{report.MODEL_NAME} {MODEL}"
    assert str(device.uid).startswith(CFG.uid_prefix)

    [group] = content.get_image_measurement_groups(finding_type=report_sr.PNEUMONIA)
    assert [s.value for s in group.finding_sites] == [report_sr.LUNG]
    [evaluation] = group.get_qualitative_evaluations(name=report_sr.PNEUMONIA)
    expected = report_sr.PRESENT if label == Label.SUSPECTED else report_sr.ABSENT
    assert evaluation.value == expected, f"finding read back as {evaluation.value}"
    [p] = group.get_measurements(name=codes.DCM.Probability)
    assert p.value == probability and p.unit == codes.UCUM.NoUnits
    [t] = group.get_measurements(name=report_sr.DECISION_THRESHOLD)
    # a DS holds 16 characters: the exact value is in the algorithm parameters
    assert t.value == pytest.approx(THRESHOLD, abs=1e-13) and t.unit == codes.UCUM.NoUnits
    assert [img.referenced_sop_instance_uid for img in p.referenced_images] == [
        src.SOPInstanceUID]
    assert [img.referenced_sop_instance_uid for img in group.source_images] == [
        src.SOPInstanceUID]

    assert text_values(group[0], codes.DCM.AlgorithmName) == [report.MODEL_NAME]
    assert text_values(group[0], codes.DCM.AlgorithmVersion) == [MODEL]
    params = text_values(group[0], codes.DCM.AlgorithmParameters)
    assert float(params[0].removeprefix("threshold=")) == THRESHOLD
    assert params[1:3] == ["threshold source: site threshold, calibrated 2026-11-26 on 150 "
                           "images", f"model card sha256: {CARD_SHA}"]

    [notes] = items(content[0], report_sr.QUALITATIVE_EVALUATIONS)
    assert text_values(notes, report_sr.VALIDATED_POPULATION) == [population_text]
    assert text_values(notes, codes.DCM.Comment) == ["AI triage - NOT FOR DIAGNOSTIC USE"]

    [library] = items(content[0], codes.DCM.ImageLibrary)
    images = hd.sr.utils.find_content_items(library, value_type="IMAGE", recursive=True)
    assert [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in images] == [
        src.SOPInstanceUID]
    [evidence] = sr.get_evidence()
    assert evidence == (src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID,
                        src.SOPClassUID)
    assert "PredecessorDocumentsSequence" not in sr


@pytest.mark.parametrize("case", CASES)
def test_dciodvfy_and_dsrdump(tmp_path: Path, case: Case) -> None:
    label, probability = case.label, case.probability
    sr = build(source(case.path), label, probability, population=case.population,
               population_text=case.population_text)
    file = write(sr, tmp_path)
    errors, out = dciodvfy_errors(file)
    assert not errors, "dciodvfy:\n" + out

    res = subprocess.run([need("dsrdump"), str(file)], capture_output=True, text=True,
                         timeout=60, check=False)
    print(res.stdout)  # the content tree, for the test log (pytest -s or on failure)
    assert res.returncode == 0, res.stderr
    value = '(52101004,SCT,"Present")' if label == Label.SUSPECTED else \
        '(272519000,SCT,"Absent")'
    assert f'CODE:(,,"Pneumonia")={value}' in res.stdout, res.stdout
    assert f'NUM:(,,"Probability")="{probability}" (1,UCUM,"no units")' in res.stdout
    assert 'CODE:(,,"Finding")=(233604007,SCT,"Pneumonia")' in res.stdout


def test_dciodvfy_on_a_damaged_header_and_a_predecessor(tmp_path: Path) -> None:
    """Invalid or absent Type 2 values in the source are left empty in the SR (it is still
    built and valid), and a predecessor reference is valid too."""
    src = source(SUSPECTED)
    first = build(src)
    damaged = source(SUSPECTED)
    for tag, vr, value in ((0x00100030, "DA", b"2020-13-45"), (0x00080030, "TM", b"25:99 "),
                           (0x00100040, "CS", b"X ")):
        del damaged[tag]  # as read from a file: invalid values included
        damaged[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, True, True)
    del damaged.AccessionNumber, damaged.StudyID, damaged.PatientOrientation
    sr = build(damaged, Label.NEGATIVE, 0.2, threshold=0.95,
               predecessor=report_sr.ResultReference.of(first))
    back = reread(sr)
    assert (back.PatientBirthDate, back.StudyTime, back.PatientSex, back.AccessionNumber) == (
        "", "", "", "")
    errors, out = dciodvfy_errors(write(sr, tmp_path))
    assert not errors, "dciodvfy:\n" + out


def test_predecessor_documents_sequence(tmp_path: Path) -> None:
    src = source(SUSPECTED)
    first = build(src)
    second = build(src, Label.NEGATIVE, 0.93, threshold=0.95,
                   predecessor=report_sr.ResultReference.of(first))
    back = hd.sr.srread(write(second, tmp_path))
    [study] = back.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == src.StudyInstanceUID
    [series] = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    [instance] = series.ReferencedSOPSequence
    assert (instance.ReferencedSOPClassUID, instance.ReferencedSOPInstanceUID) == (
        report_sr.COMPREHENSIVE_3D_SR, first.SOPInstanceUID)
    assert back.SOPInstanceUID != first.SOPInstanceUID


def test_sop_instance_uid_follows_the_decision() -> None:
    """Same source, model and decision: same UID (an idempotent resend); another decision,
    threshold, model or source: a new UID, so a PACS that keeps the first copy of a UID
    cannot keep the old answer silently."""
    src = source(SUSPECTED)
    first = build(src)
    again = build(src, probability=0.8)  # same decision, another probability
    uids = {
        "label": build(src, Label.NEGATIVE, 0.3).SOPInstanceUID,
        "threshold": build(src, threshold=0.62).SOPInstanceUID,
        "model": build(src, model_version="cxr-pneumonia-other").SOPInstanceUID,
        "source": build(source(NORMAL)).SOPInstanceUID,
    }
    assert again.SOPInstanceUID == first.SOPInstanceUID
    assert first.SOPInstanceUID not in uids.values()
    assert len(set(uids.values())) == len(uids)
    assert build(src, Label.NEGATIVE, 0.3).SeriesInstanceUID == first.SeriesInstanceUID
    assert first.SOPInstanceUID == report_sr.sr_sop_instance_uid(
        CFG.uid_prefix, str(src.SOPInstanceUID), MODEL, Label.SUSPECTED, THRESHOLD)
    sc_uid = report.result_sop_instance_uid(CFG.uid_prefix, str(src.SOPInstanceUID), MODEL)
    assert first.SOPInstanceUID != sc_uid
    assert build(src, sop_instance_uid="1.2.3.4").SOPInstanceUID == "1.2.3.4"


@pytest.mark.parametrize(("charset", "name"), [
    pytest.param("ISO_IR 100", "Buc^Jérôme", id="latin-1"),
    pytest.param(["", "ISO 2022 IR 87"], "ヤマダ^タロウ=山田^太郎=やまだ^たろう", id="japanese"),
])
def test_patient_name_and_character_set_survive(charset: str | list[str], name: str) -> None:
    src = source(SUSPECTED)
    src.SpecificCharacterSet = charset
    src.PatientName = name
    src = reread(src)
    sr = reread(build(src))
    assert sr.SpecificCharacterSet == src.SpecificCharacterSet
    assert str(sr.PatientName) == name
    assert sr.PatientName.original_string == src.PatientName.original_string


def test_the_gate_refuses_our_own_sr() -> None:
    """Loop guard: an SR sent back to the worker is not scored."""
    cfg = gate.GateConfig(
        accept_dx_for_processing=False, require_body_part_chest=True,
        allow_missing_body_part=True, view_positions=("PA", "AP"),
        allow_missing_view_position=True, min_age_years=1.0, max_age_years=5.0,
        refuse_outside_age_range=False, uid_prefix=CFG.uid_prefix,
        manufacturer=CFG.manufacturer, series_number=CFG.series_number)
    with pytest.raises(OutOfScopeError):
        gate.check(reread(build(source(SUSPECTED))), cfg)


@pytest.mark.parametrize("kw", [{"probability": 1.2}, {"label": "MAYBE"},
                                {"threshold": 1.0}, {"population": "adults"}])
def test_refuses_values_it_cannot_report(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        build(source(SUSPECTED), **kw)


def test_orthanc_keeps_both_decisions_and_the_link(tmp_path: Path, orthanc: Orthanc) -> None:
    """A real PACS at its default (OverwriteInstances false) stores the SR; a result with
    another decision is another instance beside it, naming the first as its predecessor;
    the SR as Orthanc holds it passes dciodvfy and reads back with highdicom."""
    src = source(SUSPECTED)
    first = build(src)
    second = build(src, Label.NEGATIVE, 0.93, threshold=0.95,
                   predecessor=report_sr.ResultReference.of(first))
    files = [write(first, tmp_path, "first.dcm"), write(second, tmp_path, "second.dcm")]
    # -R: propose the SOP classes of the files (storescu's default list lacks 3D SR)
    res = subprocess.run(
        [need("storescu"), "-v", "-R", "-aet", "CXR_WORKER", "-aec", orthanc.aet, "127.0.0.1",
         str(orthanc.dicom_port), *map(str, files)],
        env=DCMTK_ENV, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0 and "Received Store Response (Success)" in res.stdout + \
        res.stderr, res.stdout + res.stderr
    held = orthanc.instances_in_series_with_description(
        str(src.StudyInstanceUID), report_sr.SR_SERIES_DESCRIPTION)
    assert len(held) == 2, f"Orthanc holds {len(held)} SRs, expected both decisions"
    stored = tmp_path / "from-orthanc.dcm"
    stored.write_bytes(orthanc.get(f"/instances/{orthanc.find_instance(second.SOPInstanceUID)}"
                                   "/file"))
    errors, out = dciodvfy_errors(stored)
    assert not errors, "dciodvfy on the SR Orthanc holds:\n" + out
    back = hd.sr.srread(stored)
    [group] = back.content.get_image_measurement_groups(finding_type=report_sr.PNEUMONIA)
    [evaluation] = group.get_qualitative_evaluations(name=report_sr.PNEUMONIA)
    assert evaluation.value == report_sr.ABSENT
    pred = back.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert pred.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
