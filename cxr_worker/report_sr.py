"""The result as a DICOM Structured Report: Comprehensive 3D SR, TID 1500 "Measurement Report"
as the IHE Radiology AI Results (AIR) profile uses it (highdicom).

A reading workflow, a worklist or another system can read the finding out of it, which no one
can from the Secondary Capture's pixels. The content tree::

    Imaging Measurement Report (TID 1500)
      Language of Content Item and Descendants: English (United States)
      Observer Type: Device (TID 1004): Device Observer UID, Name "cxr-worker", Manufacturer,
                     Model Name (the algorithm and its version)
      Procedure reported: Plain chest X-ray (SNOMED CT 399208008)
      Image Library (TID 1600): the source image with its modality, rows, columns and, when
                     the source has them, patient orientation and imager pixel spacing
      Imaging Measurements
        Measurement Group (TID 1501)
          Tracking Identifier / Tracking Unique Identifier
          Finding: Pneumonia (SNOMED CT 233604007)
          Finding Site: Lung
          Algorithm Identification (TID 4019): name, version, parameters (threshold and where it
                     comes from, model card sha256, worker version)
          Probability (TID 300): the calibrated probability, UCUM "1" (no units), 0..1
          Decision threshold (TID 300, local code 99CXRW): the operating point, UCUM "1"
          Pneumonia: Present | Absent      (the decision at the operating point)
          Source: the source image
      Qualitative Evaluations (TID 1500 row 12)
        Validated population (TEXT, local code): e.g. "OUTSIDE VALIDATED POPULATION (...)"
        Comment: "AI triage - NOT FOR DIAGNOSTIC USE"

Decisions:

- Comprehensive 3D SR, the SOP class IHE AIR names (no 3D coordinates are needed here, the
  finding is about the whole image);
- the probability's unit is UCUM ``1`` ("no units"), the value the calibrated probability in
  0..1, the same scale as the threshold: a percentage beside a 0..1 threshold invites misreading,
  and ``1`` is the dimensionless unit every UCUM reader knows;
- the threshold and the population note have no standard concept: they use the local coding
  scheme ``99CXRW`` (PS3.3 8.2: "99" designators are private), described in the Coding Scheme
  Identification Sequence;
- Procedure reported (and the Performed Procedure Code Sequence) is SNOMED CT 399208008 "Plain
  chest X-ray": TID 1500 takes it from CID 100, which is extensible and has no chest
  radiograph (only "XR unspecified body region");
- Completion Flag COMPLETE, Verification Flag UNVERIFIED, Preliminary Flag PRELIMINARY: a
  triage aid's result, not a verified or final report;
- same study as the source, an SR series of its own (Series Number ``cfg.series_number + 1``
  unless given), its UID derived from the study and the model version;
- the SOP Instance UID depends on the source image, the model version AND the decision (label
  and threshold, :func:`sr_sop_instance_uid`): another decision is another object, which a PACS
  that keeps the first instance of a UID (Orthanc's default) cannot silently drop, and the same
  decision keeps its UID (an idempotent resend). An earlier result it replaces is named in the
  Predecessor Documents Sequence (``predecessor``);
- Patient and Study modules and the Specific Character Set come from the source as for the
  Secondary Capture: invalid Type 2 values (dates, times, sex) are left empty rather than
  failing the result, and are logged by keyword, never by value.

A result that a later decision replaced is withdrawn from the PACS with a rejection note
(:func:`build_rejection_note`): a Key Object Selection Document (TID 2010) titled "Rejected
for Quality Reasons" (DCM 113001), as IHE IOCM defines it, that lists the replaced Secondary
Capture and SR in its content tree and its Current Requested Procedure Evidence Sequence; the
worker as device observer; a Key Object Description saying what replaced them; same study,
a KO series of its own (Series Number ``cfg.series_number + 2``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DA, TM

from cxr_worker import __version__, sop_classes
from cxr_worker.labels import Label, Population
from cxr_worker.report import MODEL_NAME, NOT_FOR_DIAGNOSTIC_USE, ReportConfig, result_character_set

logger = logging.getLogger(__name__)

COMPREHENSIVE_3D_SR = sop_classes.COMPREHENSIVE_3D_SR  # the SR's SOP class
KEY_OBJECT_SELECTION = sop_classes.KEY_OBJECT_SELECTION  # the rejection note's
# each result's Series Number: ``report.series_number`` (the Secondary Capture's) + this
SR_SERIES_OFFSET = 1
KOS_SERIES_OFFSET = 2
SR_SERIES_DESCRIPTION = "AI triage result: pneumonia, structured report (cxr-worker)"
KOS_SERIES_DESCRIPTION = "AI triage result: rejection notes (cxr-worker)"
REJECTED_FOR_QUALITY_REASONS = codes.DCM.RejectedForQualityReasons  # 113001
DEVICE_OBSERVER_NAME = "cxr-worker"

LOCAL_SCHEME = "99CXRW"
LOCAL_SCHEME_NAME = "cxr-worker local codes"

PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
PRESENT = codes.SCT.Present  # 52101004
ABSENT = codes.SCT.Absent  # 272519000
LUNG = codes.SCT.Lung  # 39607008
PLAIN_CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")
PROBABILITY = codes.DCM.Probability  # 122157
NO_UNITS = codes.UCUM.NoUnits  # "1"
DECISION_THRESHOLD = Code("threshold", LOCAL_SCHEME, "Decision threshold")
VALIDATED_POPULATION = Code("population", LOCAL_SCHEME, "Validated population")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
COMMENT = codes.DCM.Comment  # 121106
IMAGE_LIBRARY_SOURCE = Code("260753009", "SCT", "Source")
PIXELS = Code("{pixels}", "UCUM", "Pixels")
TRACKING_ID = "pneumonia"

_MODALITY_CODES = {
    "CR": codes.cid29.ComputedRadiography,
    "DX": codes.cid29.DigitalRadiography,
}


@dataclass(frozen=True)
class ResultReference:
    """An earlier result object (for the Predecessor Documents Sequence)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str

    @classmethod
    def of(cls, ds: Dataset) -> ResultReference:
        return cls(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPClassUID),
                   str(ds.SOPInstanceUID))

    def as_dataset(self) -> Dataset:
        ds = Dataset()
        ds.StudyInstanceUID = self.study_instance_uid
        ds.SeriesInstanceUID = self.series_instance_uid
        ds.SOPClassUID = self.sop_class_uid
        ds.SOPInstanceUID = self.sop_instance_uid
        return ds


def decision_uid(prefix: str, kind: str, *, source_sop_uid: str, model_version: str,
                 label: Label, threshold: float) -> str:
    """A result object's SOP Instance UID: the same for the same source image, model version,
    object kind (``"sr"``, ``"sc"``, ...) and decision (label and the exact threshold), and a
    new one when any of them changes."""
    return str(generate_uid(prefix, entropy_srcs=[
        source_sop_uid, model_version, kind, str(label), repr(float(threshold))]))


def sr_sop_instance_uid(prefix: str, source_sop_uid: str, model_version: str, label: Label,
                        threshold: float) -> str:
    return decision_uid(prefix, "sr", source_sop_uid=source_sop_uid,
                        model_version=model_version, label=label, threshold=threshold)


def sr_series_instance_uid(prefix: str, study_uid: str, model_version: str) -> str:
    """One SR series per study and model version."""
    return str(generate_uid(prefix, entropy_srcs=[study_uid, model_version, "sr-series"]))


def device_observer_uid(prefix: str, manufacturer: str) -> str:
    return str(generate_uid(prefix, entropy_srcs=[manufacturer, MODEL_NAME, "device"]))


# Type 2 attributes highdicom reads from the evidence (it requires them present) with the
# check each must pass; an absent or invalid one becomes empty in the result
_TYPE2_CHECKED: dict[str, Callable[[Any], object] | None] = {
    "PatientName": None,
    "PatientID": None,
    "PatientBirthDate": DA,
    "PatientSex": hd.PatientSexValues,
    "AccessionNumber": None,
    "StudyID": None,
    "StudyDate": DA,
    "StudyTime": TM,
}


def _evidence(source: Dataset) -> Dataset:
    """The source as highdicom should copy it: every :data:`_TYPE2_CHECKED` attribute present,
    invalid values left empty (logged by keyword, never by value); the source is not changed."""
    ref = Dataset()
    ref.update(source)
    dropped = []
    for keyword, check in _TYPE2_CHECKED.items():
        value = ref.get(keyword)
        if value is None:
            setattr(ref, keyword, "")
            continue
        if check is None or value == "":
            continue
        try:
            check(value)
        except (ValueError, TypeError):
            setattr(ref, keyword, "")
            dropped.append(keyword)
    if dropped:
        logger.warning("SR for %s: %s not valid in the source; left empty in the result",
                       source.get("SOPInstanceUID", "?"), ", ".join(dropped))
    return ref


def _image_library(source: Dataset) -> hd.sr.ContentSequence:
    """TID 1600 with one TID 1601 entry for the source: modality, rows, columns (TID 1602) and,
    where the source has them, patient orientation and imager pixel spacing (TID 1603).

    highdicom's ``ImageLibrary`` needs Imager Pixel Spacing for CR/DX, which is Type 3 in CR
    and often absent; nothing is made up for a missing descriptor."""
    modality = _MODALITY_CODES.get(str(source.get("Modality", "")))
    descriptors: list[hd.sr.ContentItem] = []
    acq = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT
    if modality is not None:
        descriptors.append(hd.sr.CodeContentItem(codes.DCM.Modality, modality, acq))
    descriptors += [
        hd.sr.NumContentItem(codes.DCM.PixelDataRows, int(source.Rows), PIXELS, None, acq),
        hd.sr.NumContentItem(codes.DCM.PixelDataColumns, int(source.Columns), PIXELS, None,
                             acq),
    ]
    orientation = [str(v) for v in source.get("PatientOrientation", []) or []]
    if len(orientation) == 2 and all(orientation):
        descriptors += [
            hd.sr.TextContentItem(codes.DCM.PatientOrientationRow, orientation[0], acq),
            hd.sr.TextContentItem(codes.DCM.PatientOrientationColumn, orientation[1], acq),
        ]
    spacing = source.get("ImagerPixelSpacing")
    if spacing is not None and len(spacing) == 2:
        descriptors += [
            hd.sr.NumContentItem(codes.DCM.HorizontalPixelSpacing, float(spacing[1]),
                                 codes.UCUM.Millimeter, None, acq),
            hd.sr.NumContentItem(codes.DCM.VerticalPixelSpacing, float(spacing[0]),
                                 codes.UCUM.Millimeter, None, acq),
        ]
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    image = hd.sr.ImageContentItem(
        name=IMAGE_LIBRARY_SOURCE, referenced_sop_class_uid=str(source.SOPClassUID),
        referenced_sop_instance_uid=str(source.SOPInstanceUID), relationship_type=contains)
    image.ContentSequence = hd.sr.ContentSequence(descriptors)
    group = hd.sr.ContainerContentItem(codes.DCM.ImageLibraryGroup, relationship_type=contains)
    group.ContentSequence = hd.sr.ContentSequence([image])
    library = hd.sr.ContainerContentItem(codes.DCM.ImageLibrary, relationship_type=contains)
    library.ContentSequence = hd.sr.ContentSequence([group])
    return hd.sr.ContentSequence([library])


def algorithm_parameters(threshold: float, threshold_source: str,
                         model_card_sha256: str | None) -> list[str]:
    """TID 4019 "Algorithm Parameters" (TEXT items), in this order."""
    params = [f"threshold={float(threshold)!r}", f"threshold source: {threshold_source}"]
    if model_card_sha256:
        params.append(f"model card sha256: {model_card_sha256}")
    params.append(f"cxr-worker {__version__}")
    return params


def build_sr(
    source: Dataset,
    *,
    probability: float,
    label: Label,
    threshold: float,
    model_version: str,
    population: str,
    population_text: str,
    cfg: ReportConfig,
    threshold_source: str = "model card",
    model_card_sha256: str | None = None,
    sop_instance_uid: str | None = None,
    predecessor: ResultReference | None = None,
    series_number: int | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The Structured Report for one scored source image; valid when this returns.

    ``label`` is a :class:`~cxr_worker.labels.Label` (the decision at ``threshold``),
    ``population`` a :class:`~cxr_worker.labels.Population` and ``population_text`` the gate's
    line. ``model_card_sha256``: the sha256 of the model card file
    (``cxr_worker.model.card.sha256_file``), recorded among the algorithm parameters.
    ``sop_instance_uid`` defaults to :func:`sr_sop_instance_uid`; ``predecessor`` is the
    earlier result this one replaces (Predecessor Documents Sequence); ``series_number``
    defaults to ``cfg.series_number + 1``.
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability {probability} outside [0, 1]")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold {threshold} outside (0, 1)")
    if label not in (Label.SUSPECTED, Label.NEGATIVE):
        raise ValueError(f"unknown label {label!r}")
    population = Population(population)
    uid = sop_instance_uid or sr_sop_instance_uid(
        cfg.uid_prefix, str(source.SOPInstanceUID), model_version, label, threshold)

    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_observer_uid(cfg.uid_prefix, cfg.manufacturer),
            name=DEVICE_OBSERVER_NAME,
            manufacturer_name=cfg.manufacturer,
            model_name=f"{MODEL_NAME} {model_version}",
        ),
    )
    algorithm = hd.sr.AlgorithmIdentification(
        name=MODEL_NAME, version=model_version,
        parameters=algorithm_parameters(threshold, threshold_source, model_card_sha256))
    source_image = hd.sr.SourceImageForMeasurement.from_source_image(source)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=str(generate_uid(cfg.uid_prefix, entropy_srcs=[uid, TRACKING_ID])),
            identifier=TRACKING_ID),
        finding_type=PNEUMONIA,
        finding_sites=[hd.sr.FindingSite(anatomic_location=LUNG)],
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(name=PROBABILITY, value=float(probability), unit=NO_UNITS,
                              referenced_images=[source_image]),
            hd.sr.Measurement(name=DECISION_THRESHOLD, value=float(threshold), unit=NO_UNITS),
        ],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(
            name=PNEUMONIA, value=PRESENT if label == Label.SUSPECTED else ABSENT)],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PLAIN_CHEST_XRAY,
        imaging_measurements=[group],
    )
    root = report[0].ContentSequence
    measurements_at = next(i for i, item in enumerate(root)
                           if item.name == codes.DCM.ImagingMeasurements)
    for offset, item in enumerate(_image_library(source)):
        root.insert(measurements_at + offset, item)
    notes = hd.sr.ContainerContentItem(
        QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    notes.ContentSequence = hd.sr.ContentSequence([
        hd.sr.TextContentItem(VALIDATED_POPULATION, population_text, contains),
        hd.sr.TextContentItem(COMMENT, f"AI triage - {NOT_FOR_DIAGNOSTIC_USE}", contains),
    ])
    root.append(notes)

    sr = hd.sr.Comprehensive3DSR(
        evidence=[_evidence(source)],
        content=report,
        series_instance_uid=sr_series_instance_uid(
            cfg.uid_prefix, str(source.StudyInstanceUID), model_version),
        series_number=(cfg.series_number + SR_SERIES_OFFSET if series_number is None
                       else series_number),
        sop_instance_uid=uid,
        instance_number=1,
        manufacturer=cfg.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=[predecessor.as_dataset()] if predecessor is not None else None,
        performed_procedure_codes=[PLAIN_CHEST_XRAY],
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=SR_SERIES_DESCRIPTION,
        manufacturer_model_name=MODEL_NAME,
        software_versions=[f"cxr-worker {__version__}", model_version],
        coding_schemes=[CodingSchemeIdentificationItem(
            designator=LOCAL_SCHEME, name=LOCAL_SCHEME_NAME,
            responsible_organization=cfg.manufacturer)],
        # highdicom 0.28 rejects an empty first value (ISO 2022 IR 6): build without it and
        # copy the source's value below, as the Secondary Capture does
        specific_character_set=None,
    )
    charset = result_character_set(source)
    if charset is not None:
        sr.SpecificCharacterSet = charset
    logger.debug("SR %s built for %s: %s, %s", uid, source.get("SOPInstanceUID", "?"), label,
                 population)
    return sr


# -- the rejection note (IHE IOCM) ------------------------------------------------------------
# the Patient and Study attributes a rejection note's evidence carries (from the source)
_STUDY_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                   "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "StudyInstanceUID",
                   "ReferringPhysicianName")


def rejection_note_uid(prefix: str, source_sop_uid: str, rejected: Iterable[str]) -> str:
    """The rejection note's SOP Instance UID: the same for the same rejected objects (a
    resend), another for another set."""
    return str(generate_uid(prefix, entropy_srcs=[source_sop_uid, "kos", *sorted(rejected)]))


def kos_series_instance_uid(prefix: str, study_uid: str) -> str:
    """One rejection-note series per study."""
    return str(generate_uid(prefix, entropy_srcs=[study_uid, "kos-series"]))


def _rejected_evidence(source: Dataset, ref: ResultReference) -> Dataset:
    """What highdicom needs of a rejected object: the study's Patient and Study attributes
    (from the source, as the object itself carried them) and the object's UIDs; Rows and
    Columns for an image, which makes its content item IMAGE rather than COMPOSITE."""
    study = _evidence(source)
    ds = Dataset()
    for keyword in _STUDY_KEYWORDS:
        if keyword in study:
            setattr(ds, keyword, study[keyword].value)
    ds.StudyInstanceUID = ref.study_instance_uid
    ds.SeriesInstanceUID = ref.series_instance_uid
    ds.SOPClassUID = ref.sop_class_uid
    ds.SOPInstanceUID = ref.sop_instance_uid
    if ref.sop_class_uid not in (COMPREHENSIVE_3D_SR, KEY_OBJECT_SELECTION):
        ds.Rows = ds.Columns = 1  # an image (its size is not part of the reference)
    return ds


def build_rejection_note(
    source: Dataset,
    rejected: Sequence[ResultReference],
    *,
    cfg: ReportConfig,
    description: str,
    sop_instance_uid: str | None = None,
    series_number: int | None = None,
) -> hd.ko.KeyObjectSelectionDocument:
    """A Key Object Selection Document "Rejected for Quality Reasons" (IHE IOCM) that withdraws
    ``rejected`` (earlier results of ``source``, same study); valid when this returns.

    ``description`` (the Key Object Description) says what replaced them; it must not carry
    patient data. ``sop_instance_uid`` defaults to :func:`rejection_note_uid`,
    ``series_number`` to ``cfg.series_number + 2``.
    """
    if not rejected:
        raise ValueError("a rejection note needs at least one rejected object")
    study_uid = str(source.StudyInstanceUID)
    if any(r.study_instance_uid != study_uid for r in rejected):
        raise ValueError("a rejection note rejects objects of the source's study only")
    uid = sop_instance_uid or rejection_note_uid(
        cfg.uid_prefix, str(source.SOPInstanceUID), [r.sop_instance_uid for r in rejected])
    evidence = [_rejected_evidence(source, r) for r in rejected]
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_observer_uid(cfg.uid_prefix, cfg.manufacturer),
            name=DEVICE_OBSERVER_NAME, manufacturer_name=cfg.manufacturer,
            model_name=MODEL_NAME))
    content = hd.ko.KeyObjectSelection(
        document_title=REJECTED_FOR_QUALITY_REASONS, referenced_objects=evidence,
        observer_device_context=observer, description=description[:1024])
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=evidence, content=content,
        series_instance_uid=kos_series_instance_uid(cfg.uid_prefix, study_uid),
        series_number=(cfg.series_number + KOS_SERIES_OFFSET if series_number is None
                       else series_number),
        sop_instance_uid=uid, instance_number=1, manufacturer=cfg.manufacturer,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=KOS_SERIES_DESCRIPTION, manufacturer_model_name=MODEL_NAME,
        software_versions=[f"cxr-worker {__version__}"],
        specific_character_set=None)  # as the SR: the source's, copied below
    charset = result_character_set(source)
    if charset is not None:
        kos.SpecificCharacterSet = charset
    logger.debug("rejection note %s built for %s: %d object(s)", uid,
                 source.get("SOPInstanceUID", "?"), len(rejected))
    return kos
