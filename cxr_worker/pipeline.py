"""The pipeline: claim a job, then gate -> decode -> score -> report, or send.

Composes the stage modules (the only module besides the composition root that sees them all).
A job's outcome is always written to the worklist:

- gate refusal: ``not_scored`` with the rule and reason; the file stays in the spool;
- unreadable or undecodable file: ``not_scored`` with the reason, the file moved to quarantine;
- a result that cannot be built from the source's header (highdicom refuses a value it
  copies): ``not_scored``, at once (it would fail the same way on every attempt);
- unexpected error: retried with exponential backoff, then ``failed`` (dead letter);
- scored: the outputs (``[outputs] kinds``: the Secondary Capture, always built; the
  Structured Report; the HL7 ORU; a rejection note when an earlier delivered result is
  replaced) are written under ``results/`` before the row says ``scored``, and their
  deliveries (:mod:`cxr_worker.worklist.deliveries`) are recorded in the same transaction;
  each is then sent to its destination until it accepts it, or dead-lettered (its image
  keeps its score and label; the delivery shows as undelivered until ``cxr-worker retry``).

**Result UIDs follow the decision.** Each output's SOP Instance UID (MSH-10 for the ORU) is
:func:`cxr_worker.report_sr.decision_uid` of the source, the model version, the output kind
and the decision (label and threshold): the same decision is the same object (a resend is
idempotent), another decision another object. When a replay changes the decision of a result
that may already be at the PACS, the new SR names the old one in its Predecessor Documents,
a rejection note ("Rejected for Quality Reasons", IHE IOCM) withdraws the old SC and SR from
the PACS, the new ORU is a correction (OBR-25 ``C``), and the worklist keeps the replaced
deliveries with what replaced them. A UID once withdrawn is never used again for the image
(a decision that comes back gets a fresh one), so a PACS that honours the rejection never
hides the newest result.

Scoring and delivery are separate loops (:meth:`Pipeline.process_pending`,
:meth:`Pipeline.send_pending`) that the service runs on threads of their own
(:mod:`cxr_worker.jobs`; one for the PACS, one for the RIS): a PACS that hangs delays only
delivery, never triage. Each scored result wakes the senders (:attr:`Pipeline.on_scored`).
Nothing is sent while an admin paused sending (:func:`cxr_worker.worklist.control.sending_paused`).
:meth:`Pipeline.drain` runs both in turn on the caller's thread, for one-shot use (tests, and
the same order as ``replay``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid
from sqlalchemy import Engine

from cxr_worker import decode, gate, hl7v2, report, report_sr, send
from cxr_worker.errors import (
    DecodeError,
    NotScoredError,
    OutOfScopeError,
    QuarantinedError,
    SendError,
)
from cxr_worker.inputs import IMAGE_SUFFIXES
from cxr_worker.labels import format_threshold
from cxr_worker.metrics import Metrics
from cxr_worker.model import card as model_card
from cxr_worker.model import heatmap as cam
from cxr_worker.score import Score, Scorer
from cxr_worker.spool import Spool, atomic_write, heatmap_path_for
from cxr_worker.worklist import control, deliveries, queue
from cxr_worker.worklist.deliveries import DICOM_KINDS, Planned, Previous
from cxr_worker.worklist.models import utcnow

logger = logging.getLogger(__name__)


def new_owner_id() -> str:
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


HL7_DESTINATION = "HL7"  # the metrics' destination label of the RIS (no host, no patient)


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


class Pipeline:
    def __init__(
        self,
        *,
        engine: Engine,
        spool: Spool,
        scorer: Scorer,
        gate_cfg: gate.GateConfig,
        report_cfg: report.ReportConfig,
        retry: queue.RetryPolicy,
        pacs: send.Peer | None,
        owner: str | None = None,
        hold_results: bool = False,
        only_ids: set[int] | None = None,
        metrics: Metrics | None = None,
        outputs: Outputs | None = None,
    ) -> None:
        self.engine = engine
        self.spool = spool
        self.scorer = scorer
        self.gate_cfg = gate_cfg
        self.report_cfg = report_cfg
        self.retry = retry
        self.pacs = pacs
        self.owner = owner or new_owner_id()
        self.hold_results = hold_results  # replay --no-send: build results, never send
        self.only_ids = only_ids  # replay: touch only the replayed instances
        self.stopping = threading.Event()  # set at shutdown: finish the current job only
        # the outbound associations of this pipeline's sends, aborted at shutdown
        self.outbound = send.Outbound()
        # the results go over one association kept open (pacs.idle_release_seconds)
        self.sender = send.Sender(pacs, self.outbound) if pacs is not None else None
        # called after each result that is to be sent is scored (the service wakes its
        # sender); from the scoring thread, so it must not block
        self.on_scored: Callable[[], None] = _nothing
        self.metrics = metrics if metrics is not None else Metrics()
        # [outputs]: by default the Secondary Capture, to the PACS when there is one
        self.outputs = outputs if outputs is not None else Outputs(
            delivered=("sc",) if pacs is not None else ())
        if pacs is None and self.outputs.pacs_kinds:
            raise ValueError("outputs to the PACS need a PACS")
        if self.outputs.pacs_kinds:
            self.metrics.add_destination(pacs.ae_title if pacs is not None else "")
        if "hl7" in self.outputs.delivered:
            self.metrics.add_destination(HL7_DESTINATION)
        self._card_sha256: str | None = None

    # -- processing ---------------------------------------------------------------------
    def process_next(self) -> bool:
        """Process one due job; False when there was none."""
        job = queue.claim(self.engine, "process", self.owner, self.retry.lease_seconds,
                          self.only_ids)
        if job is None:
            return False
        try:
            self._process(job)
        except NotScoredError as exc:
            logger.info("not scored %s: %s", job.sop_instance_uid, exc.reason)
            # the row follows a quarantined file, so replay and retention still find it
            extra = {"spool_path": str(exc.path)} if isinstance(exc, QuarantinedError) else {}
            if isinstance(exc, OutOfScopeError) and exc.population:  # refused for its age
                extra["population"] = exc.population
            queue.mark_not_scored(self.engine, job, self.owner, exc.reason, **extra)
        except Exception as exc:
            logger.exception("processing %s failed", job.sop_instance_uid)
            queue.mark_attempt_failed(self.engine, job, self.owner, "process",
                                      f"{type(exc).__name__}: {exc}", policy=self.retry)
        return True

    def _quarantine(self, job: queue.Job, reason: str) -> QuarantinedError:
        dest = self.spool.quarantine(Path(job.spool_path), reason)
        logger.warning("quarantined %s: %s", job.sop_instance_uid, reason)
        return QuarantinedError(f"{reason} (file kept in quarantine as {dest.name})", dest)

    def _process(self, job: queue.Job) -> None:
        m = self.metrics
        try:
            with m.stage("decode"):  # header read; pixels below (after the gate)
                ds = decode.read_file(job.spool_path)
        except FileNotFoundError:
            raise NotScoredError("spooled file is missing (removed by retention?)") from None
        except DecodeError as exc:
            raise self._quarantine(job, exc.reason) from exc
        gate_result = gate.check(ds, self.gate_cfg)
        try:
            with m.stage("decode"):
                # only the resolution the model and the Secondary Capture use (1024 px)
                display = decode.display_image(ds, need=decode.FOR_SCORE_AND_REPORT)
                x = self.scorer.prepare(display)
        except DecodeError as exc:
            raise self._quarantine(job, exc.reason) from exc
        with m.stage("score"):
            score = self.scorer.score(x)
        with m.stage("report"):
            # Grad-CAM from the feature maps the score kept: no second inference
            heat = self.scorer.heatmap(x) if self.report_cfg.heatmap else None
            previous = deliveries.previous(self.engine, job.id)
            uids = result_uids(self.report_cfg.uid_prefix, job.sop_instance_uid, score,
                               previous, deliveries.used_uids(self.engine, job.id))
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
        scored = queue.mark_scored(
            self.engine, job, self.owner, hold=self.hold_results,
            deliveries=lambda s: deliveries.apply_plan(
                s, job.id, planned, hold=self.hold_results, label=score.label,
                threshold=score.threshold, model_version=score.model_version),
            probability=score.probability, label=score.label, threshold=score.threshold,
            model_version=score.model_version, population=str(gate_result.population),
            result_path=str(result_path), result_sop_instance_uid=str(sc.SOPInstanceUID))
        if scored:  # from the row insert, or from the re-queue (replay, duplicate C-STORE)
            since = job.received_at if job.attempts else max(job.received_at,
                                                              job.next_attempt_at)
            m.time_to_flag.observe(max((utcnow() - since).total_seconds(), 0.0))
        logger.info("scored %s: %s p=%.3f (%s)", job.sop_instance_uid, score.label,
                    score.probability, gate_result.population)
        if scored and not self.hold_results and planned:
            self.on_scored()

    # -- the outputs besides the Secondary Capture --------------------------------------
    def _card_hash(self) -> str | None:
        if self._card_sha256 is None:
            path = Path(self.scorer.model_dir) / model_card.CARD_FILE
            try:
                self._card_sha256 = model_card.sha256_file(path)
            except OSError:
                return None
        return self._card_sha256

    def _other_outputs(self, job: queue.Job, ds: Dataset, *, score: Score,
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

    # -- sending ------------------------------------------------------------------------
    def send_next(self, kinds: Collection[str] | None = None) -> bool:
        """Deliver one due output (of ``kinds``; default every delivered kind); False when
        there was none, nothing is delivered, or sending is paused."""
        if self.hold_results:
            return False
        live = (*self.outputs.pacs_kinds, *(("hl7",) if "hl7" in self.outputs.delivered else ()))
        wanted = [k for k in live if kinds is None or k in kinds]
        if not wanted or control.sending_paused(self.engine):
            return False
        job = deliveries.claim(self.engine, self.owner, self.retry.lease_seconds, wanted,
                               self.only_ids)
        if job is None:
            return False
        destination = HL7_DESTINATION if job.kind == "hl7" else \
            self.pacs.ae_title if self.pacs is not None else ""
        try:
            if not job.path:
                raise SendError("no result file recorded (removed by retention?)")
            with self.metrics.stage("send"):
                self._send(job)
        except (SendError, OSError, InvalidDicomError) as exc:
            if self.stopping.is_set():
                # aborted by the shutdown, not refused by the PACS: no attempt counted; the
                # lease is given back and the result sent again at the next start
                logger.info("sending the %s of %s interrupted by the shutdown", job.kind,
                            job.sop_instance_uid)
                deliveries.give_back(self.engine, job, self.owner)
                return True
            self.metrics.delivery_failures.labels(destination).inc()
            status = deliveries.mark_failed(self.engine, job, self.owner, str(exc),
                                            policy=self.retry)
            logger.warning("sending the %s of %s failed (%s): %s", job.kind,
                           job.sop_instance_uid, status, exc)
        else:
            self.metrics.deliveries.labels(destination).inc()
            deliveries.mark_sent(self.engine, job, self.owner)
            logger.info("sent %s %s for %s", job.kind, job.result_uid, job.sop_instance_uid)
        return True

    def _send(self, job: deliveries.DeliveryJob) -> None:
        assert job.path is not None
        if job.kind == "hl7":
            assert self.outputs.hl7 is not None
            # bytes: read_text's universal newlines would turn the segments' CR into LF
            hl7v2.send(self.outputs.hl7, Path(job.path).read_bytes().decode("utf-8"))
            return
        if self.pacs is None or self.sender is None:
            raise SendError("no PACS configured (pacs.ae_title)")
        ds = dcmread(job.path)
        if str(ds.SOPInstanceUID) != job.result_uid:
            # the image was processed again and its file rebuilt meanwhile: that result
            # has deliveries of its own
            raise SendError(f"the result file now holds {ds.SOPInstanceUID}, not "
                            f"{job.result_uid} (rebuilt by a later processing)")
        self.sender.store(ds)

    def abort_sends(self) -> int:
        """Abort the association of the send in progress, if any, and start no other (at
        shutdown, from another thread); returns how many associations were aborted."""
        return self.outbound.abort_all(refuse_new=True)

    def close_sends(self, timeout: float = 1.0) -> None:
        """Release the association kept open to the PACS (its answer waited for ``timeout``
        seconds at most, then aborted): at shutdown, and at the end of a replay."""
        if self.sender is not None:
            self.sender.close(timeout)

    def process_pending(self, max_jobs: int = 100) -> int:
        """Score until nothing is due (or ``max_jobs``, or shutdown); returns jobs done."""
        done = 0
        while done < max_jobs and not self.stopping.is_set() and self.process_next():
            done += 1
        return done

    def send_pending(self, max_jobs: int = 100, kinds: Collection[str] | None = None) -> int:
        """Deliver until nothing is due (or ``max_jobs``, or shutdown); returns jobs done."""
        done = 0
        while done < max_jobs and not self.stopping.is_set() and self.send_next(kinds):
            done += 1
        return done

    def drain(self, max_jobs: int = 100) -> int:
        """Process, then send, until nothing is due (or ``max_jobs``); returns jobs done."""
        done = 0
        while done < max_jobs and not self.stopping.is_set():
            worked = self.process_next()
            worked = self.send_next() or worked
            if not worked:
                break
            done += 1
        return done


def _nothing() -> None:
    pass


def _dicom_writer(path: Path, ds: Any) -> Callable[[], object]:
    return lambda: atomic_write(path, lambda f: ds.save_as(f, enforce_file_format=True))


def _bytes_writer(path: Path, data: bytes) -> Callable[[], object]:
    def write(f: BinaryIO) -> None:
        f.write(data)

    return lambda: atomic_write(path, write)


# -- the one scoring path outside the queue (score, calibrate) -------------------------------
@dataclass(frozen=True)
class Assessment:
    """What the service would conclude for one file: the gate's verdict and the score."""

    score: Score
    gate: gate.GateResult | None  # None for PNG/JPEG input (no header to check)


def assess_file(path: Path, scorer: Scorer, gate_cfg: gate.GateConfig) -> Assessment:
    """Read, gate, decode, prepare and score one DICOM, PNG or JPEG file as the service does,
    without the queue or its side effects (nothing is quarantined or recorded).

    Raises :class:`NotScoredError` (the gate's :class:`OutOfScopeError` with its rule, or a
    :class:`DecodeError`) for an image the service would not score, ``OSError`` when the file
    cannot be read.
    """
    if path.suffix.lower() in IMAGE_SUFFIXES:
        from cxr_worker.model.preprocess import load_grey_image

        try:
            grey = load_grey_image(path)
        except OSError as exc:  # Pillow: not an image it can read
            raise NotScoredError(f"unreadable image: {exc}") from exc
        return Assessment(scorer.score_grey(grey), None)
    ds = decode.read_file(path)
    verdict = gate.check(ds, gate_cfg)
    # the service's resolution, so that `score` and `calibrate` give the service's scores
    shown = decode.display_image(ds, need=decode.FOR_SCORE_AND_REPORT)
    return Assessment(scorer.score_grey(shown), verdict)
