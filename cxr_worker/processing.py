"""One image's work, without the database: read -> gate -> decode -> score -> report, and its
result files written under ``results/``.

:class:`Processor` is what the pipeline runs for each claimed job, either in the claiming
thread (``[jobs] workers = 1``) or in one of the worker processes of
:mod:`cxr_worker.workers` (more than one: decoding, scoring and drawing the result are CPU
work that one Python interpreter cannot spread over cores, measured: two threads processed
12 images in 0.56 s where one took 0.59 s). It reads and writes files only; what it found
comes back as an :data:`Outcome` (plain, picklable values), which the pipeline records in the
worklist. It never logs patient data (it logs nothing: the pipeline logs the outcome).
"""

from __future__ import annotations

import hashlib
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from cxr_worker import decode, gate, hl7v2, report, report_sr, sop_classes
from cxr_worker.errors import DecodeError, NotScoredError, OutOfScopeError, QuarantinedError
from cxr_worker.labels import format_threshold
from cxr_worker.model import card as model_card
from cxr_worker.model import heatmap as cam
from cxr_worker.score import Score, Scorer
from cxr_worker.spool import Spool, atomic_write, heatmap_path_for
from cxr_worker.worklist.deliveries import DICOM_KINDS, Planned, Previous


@dataclass(frozen=True)
class Outputs:
    """``[outputs]``: the kinds delivered (those with a destination:
    :attr:`cxr_worker.settings.Settings.delivered_kinds`) and the RIS. The Secondary Capture
    is built in any case (the worklist's own record); the SR and the ORU only when delivered."""

    delivered: tuple[str, ...] = ()
    hl7: hl7v2.Hl7Config | None = None
    pacs_kinds: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if "hl7" in self.delivered and self.hl7 is None:
            raise ValueError("an hl7 output needs its Hl7Config")
        pacs = tuple(k for k in self.delivered if k in DICOM_KINDS)
        # the rejection note goes where the results it withdraws went
        object.__setattr__(self, "pacs_kinds", (*pacs, "kos") if pacs else ())


def _salted(kind: str, base: str, n: int, prefix: str) -> str:
    """The ``n``-th replacement of a withdrawn UID (n >= 2), deterministic."""
    if kind == "hl7":
        return hashlib.sha256(f"{base}#{n}".encode()).hexdigest()[:20]
    return str(generate_uid(prefix, entropy_srcs=[base, f"#{n}"]))


def result_uids(prefix: str, source_sop_uid: str, score: Score,
                previous: dict[str, Previous], used: set[str]) -> dict[str, str]:
    """Each output's UID for this decision: :func:`report_sr.decision_uid` (MSH-10:
    :func:`hl7v2.message_control_id`); the current one when it is the same object; never a
    UID this image's deliveries had before and gave up (a withdrawn result)."""
    out = {}
    for kind in ("sc", "sr", "hl7"):
        if kind == "hl7":
            base = hl7v2.message_control_id(source_sop_uid, score.model_version, score.label,
                                            score.threshold)
        else:
            base = report_sr.decision_uid(
                prefix, kind, source_sop_uid=source_sop_uid,
                model_version=score.model_version, label=score.label,
                threshold=score.threshold)
        current = previous.get(kind)
        n, uid = 1, base
        while uid in used and (current is None or uid != current.result_uid):
            n += 1
            uid = _salted(kind, base, n, prefix)
        out[kind] = uid
    return out



@dataclass(frozen=True)
class Job:
    """What processing needs of a claimed job (:class:`cxr_worker.worklist.queue.Job`)."""

    sop_instance_uid: str
    study_instance_uid: str
    spool_path: str


@dataclass(frozen=True)
class Built:
    """A scored image: its score, population, the written outputs' deliveries (``planned``)
    and the Secondary Capture's file and UID."""

    score: Score
    population: str
    planned: tuple[Planned, ...]
    result_path: str
    result_sop_instance_uid: str
    stages: dict[str, float] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Refused:
    """Not scored, with the reason; ``extra``: the row's new ``spool_path`` (a quarantined
    file) and ``population`` (refused for its age)."""

    reason: str
    extra: dict[str, str]
    quarantined: bool = False
    stages: dict[str, float] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Crashed:
    """An unexpected error (retried with backoff, then the dead letter): the exception's type
    and message, and its traceback for the log."""

    error: str
    trace: str
    stages: dict[str, float] = field(default_factory=dict, compare=False)


Outcome = Built | Refused | Crashed


class _Stages:
    """Seconds per stage, summed (``decode`` is timed in two parts, around the gate)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[object]:
        t = time.perf_counter()
        try:
            yield None
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t


class Processor:
    """Builds one image's outputs from its spooled file (see the module's docstring)."""

    def __init__(self, *, spool: Spool, scorer: Scorer, gate_cfg: gate.GateConfig,
                 report_cfg: report.ReportConfig, outputs: Outputs) -> None:
        self.spool = spool
        self.scorer = scorer
        self.gate_cfg = gate_cfg
        self.report_cfg = report_cfg
        self.outputs = outputs
        self._card_sha256: str | None = None

    def outcome(self, job: Job, previous: dict[str, Previous], used: set[str]) -> Outcome:
        """:meth:`run`, its exceptions turned into values (for a worker process)."""
        stages = _Stages()
        try:
            return self.run(job, previous, used, stages)
        except NotScoredError as exc:
            extra = {"spool_path": str(exc.path)} if isinstance(exc, QuarantinedError) else {}
            if isinstance(exc, OutOfScopeError) and exc.population:  # refused for its age
                extra["population"] = exc.population
            return Refused(exc.reason, extra, isinstance(exc, QuarantinedError), stages.seconds)
        except Exception as exc:
            return Crashed(f"{type(exc).__name__}: {exc}", traceback.format_exc())

    def warm_up(self, source: Dataset) -> float:
        """Build (and drop) one Secondary Capture, SR and ORU for ``source`` so that the first
        image does not pay highdicom's and the fonts' first-use cost (~200 ms); seconds."""
        t = time.perf_counter()
        scored = self.scorer.score_dataset(source)
        display, score = scored.display, scored.score
        heat = self.scorer.heatmap(scored.prepared) if self.report_cfg.heatmap else None
        verdict = gate.check(source, self.gate_cfg)
        report.build_secondary_capture(
            source, display, probability=score.probability, label=score.label,
            threshold=score.threshold, model_version=score.model_version, cfg=self.report_cfg,
            population=verdict.population, population_text=verdict.population_text,
            threshold_source=score.threshold_source, heatmap=heat)
        if heat is not None:
            cam.png_bytes(heat)
        job = Job(str(source.SOPInstanceUID), str(source.StudyInstanceUID), "")
        uids = result_uids(self.report_cfg.uid_prefix, job.sop_instance_uid, score, {}, set())
        self._other_outputs(job, source, score=score, gate_result=verdict, uids=uids,
                            previous={})
        return time.perf_counter() - t

    def _quarantine(self, job: Job, reason: str) -> QuarantinedError:
        dest = self.spool.quarantine(Path(job.spool_path), reason)
        return QuarantinedError(f"{reason} (file kept in quarantine as {dest.name})", dest)

    def run(self, job: Job, previous: dict[str, Previous], used: set[str],
            stages: _Stages | None = None) -> Built:
        """Read, gate, decode, score, build and write the outputs (``previous``: the image's
        current deliveries, ``used``: every result UID it ever had). Raises
        :class:`NotScoredError` for an image not scored (a quarantined file moved)."""
        stage = stages if stages is not None else _Stages()
        try:
            with stage("decode"):  # header read; pixels below (after the gate)
                ds = decode.read_file(job.spool_path)
        except FileNotFoundError:
            raise NotScoredError("spooled file is missing (removed by retention?)") from None
        except DecodeError as exc:
            raise self._quarantine(job, exc.reason) from exc
        gate_result = gate.check(ds, self.gate_cfg)
        try:
            # only the resolution the model and the Secondary Capture use (1024 px)
            scored = self.scorer.score_dataset(ds, timer=stage)
        except DecodeError as exc:
            raise self._quarantine(job, exc.reason) from exc
        display, x, score = scored.display, scored.prepared, scored.score
        with stage("report"):
            # Grad-CAM from the feature maps the score kept: no second inference
            heat = self.scorer.heatmap(x) if self.report_cfg.heatmap else None
            uids = result_uids(self.report_cfg.uid_prefix, job.sop_instance_uid, score,
                               previous, used)
            try:
                sc = report.build_secondary_capture(
                    ds, display, probability=score.probability, label=score.label,
                    threshold=score.threshold, model_version=score.model_version,
                    cfg=self.report_cfg, population=gate_result.population,
                    population_text=gate_result.population_text,
                    threshold_source=score.threshold_source, heatmap=heat,
                    sop_instance_uid=uids["sc"])
                others = self._other_outputs(job, ds, score=score, gate_result=gate_result,
                                             uids=uids, previous=previous)
            except (ValueError, TypeError) as exc:
                # highdicom refuses a source value it copies: the same on every attempt, so
                # not retried; the message is not quoted (it may quote patient data)
                raise NotScoredError(
                    f"the result cannot be built from this image's patient or study "
                    f"attributes ({type(exc).__name__}; the value is not shown)") from None
            result_path = self.spool.result_path(job.study_instance_uid, job.sop_instance_uid)
            heat_path = heatmap_path_for(result_path)
            if heat is None:  # off, or a model without heatmap outputs: none left from before
                heat_path.unlink(missing_ok=True)
            else:
                png = cam.png_bytes(heat)
                atomic_write(heat_path, lambda f: f.writelines([png]))
            atomic_write(result_path, lambda f: sc.save_as(f, enforce_file_format=True))
            planned: list[Planned] = []
            if "sc" in self.outputs.delivered:
                planned.append(Planned("sc", uids["sc"], str(result_path),
                                       report.SECONDARY_CAPTURE, str(sc.SeriesInstanceUID)))
            for planned_output, write in others:
                write()
                planned.append(planned_output)
        return Built(score, str(gate_result.population), tuple(planned), str(result_path),
                     str(sc.SOPInstanceUID), stage.seconds)

    # -- the outputs besides the Secondary Capture --------------------------------------
    def _card_hash(self) -> str | None:
        if self._card_sha256 is None:
            path = Path(self.scorer.model_dir) / model_card.CARD_FILE
            try:
                self._card_sha256 = model_card.sha256_file(path)
            except OSError:
                return None
        return self._card_sha256

    def _other_outputs(self, job: Job, ds: Dataset, *, score: Score,
                       gate_result: gate.GateResult, uids: dict[str, str],
                       previous: dict[str, Previous]
                       ) -> list[tuple[Planned, Callable[[], object]]]:
        """The SR, the ORU and a rejection note, built (each raises what the builders raise)
        but not yet written: ``(planned delivery, write its file)`` for each."""
        out: list[tuple[Planned, Callable[[], object]]] = []
        delivered = self.outputs.delivered
        study, sop = job.study_instance_uid, job.sop_instance_uid
        # the earlier results this one replaces and that may be at their destination
        replaced = {k: p for k, p in previous.items()
                    if k in uids and p.result_uid != uids[k] and p.may_be_delivered}
        if "sr" in delivered:  # (none without a PACS: the SC is the local record)
            old = replaced.get("sr")
            sr = report_sr.build_sr(
                ds, probability=score.probability, label=score.label,
                threshold=score.threshold, model_version=score.model_version,
                population=str(gate_result.population),
                population_text=gate_result.population_text, cfg=self.report_cfg,
                threshold_source=score.threshold_source, model_card_sha256=self._card_hash(),
                sop_instance_uid=uids["sr"],
                predecessor=self._reference(study, old) if old is not None else None)
            path = self.spool.output_path(study, sop, "sr", uids["sr"])
            out.append((Planned("sr", uids["sr"], str(path), report_sr.COMPREHENSIVE_3D_SR,
                                str(sr.SeriesInstanceUID)), _dicom_writer(path, sr)))
        if "hl7" in delivered and self.outputs.hl7 is not None:
            message = hl7v2.build_oru(
                ds, probability=score.probability, label=score.label,
                threshold=score.threshold, model_version=score.model_version,
                cfg=self.outputs.hl7, population_text=gate_result.population_text,
                control_id=uids["hl7"], result_status="C" if "hl7" in replaced else "F")
            path = self.spool.output_path(study, sop, "hl7", uids["hl7"])
            out.append((Planned("hl7", uids["hl7"], str(path)),
                        _bytes_writer(path, message.encode("utf-8"))))
        rejected = [self._reference(study, p) for k, p in replaced.items() if k in DICOM_KINDS]
        if rejected and self.outputs.pacs_kinds:
            kos = report_sr.build_rejection_note(
                ds, rejected, cfg=self.report_cfg,
                description=f"Withdrawn by cxr-worker: replaced by a new AI triage result "
                f"({score.label} at threshold {format_threshold(score.threshold)}, model "
                f"{score.model_version})")
            uid = str(kos.SOPInstanceUID)
            path = self.spool.output_path(study, sop, "kos", uid)
            out.append((Planned("kos", uid, str(path), report_sr.KEY_OBJECT_SELECTION,
                                str(kos.SeriesInstanceUID),
                                rejects=tuple(r.sop_instance_uid for r in rejected)),
                        _dicom_writer(path, kos)))
        return out

    def _reference(self, study_uid: str, p: Previous) -> report_sr.ResultReference:
        """An earlier result as a reference (rows from before migration 0006 have no series:
        the series the Secondary Capture and the SR of that model were put in)."""
        sop_class = p.sop_class_uid or (report_sr.COMPREHENSIVE_3D_SR if p.kind == "sr"
                                        else report.SECONDARY_CAPTURE)
        series = p.series_instance_uid
        if series is None:
            prefix, model = self.report_cfg.uid_prefix, p.model_version or ""
            series = (report_sr.sr_series_instance_uid(prefix, study_uid, model)
                      if p.kind == "sr" else
                      report.result_series_instance_uid(prefix, study_uid, model))
        return report_sr.ResultReference(study_uid, series, sop_class, p.result_uid)


def _dicom_writer(path: Path, ds: Any) -> Callable[[], object]:
    return lambda: atomic_write(path, lambda f: ds.save_as(f, enforce_file_format=True))


def _bytes_writer(path: Path, data: bytes) -> Callable[[], object]:
    def write(f: BinaryIO) -> None:
        f.write(data)

    return lambda: atomic_write(path, write)


def synthetic_source(rows: int = 512, cols: int = 416) -> Dataset:
    """A made-up frontal chest radiograph (a smooth grey ramp, a fictitious patient, fresh
    UIDs) for :meth:`Processor.warm_up`: it is never stored or sent."""
    import numpy as np
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_classes.CR
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = (
        generate_uid() for _ in range(3))
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = \
        "WARM^UP", "WARMUP", "20230101", "O"
    ds.PatientAge = "003Y"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ramp = np.add.outer(np.arange(rows), np.arange(cols)) * (4095 // (rows + cols))
    ds.PixelData = ramp.astype(np.uint16).tobytes()
    return ds
