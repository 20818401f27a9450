"""The pipeline: claim a job, then gate -> decode -> score -> report, or send.

Composes the stage modules (the only module besides the composition root that sees them all).
A job's outcome is always written to the worklist:

- gate refusal: ``not_scored`` with the rule and reason; the file stays in the spool;
- unreadable or undecodable file: ``not_scored`` with the reason, the file moved to quarantine;
- a result that cannot be built from the source's header (highdicom refuses a value it
  copies): ``not_scored``, at once (it would fail the same way on every attempt);
- unexpected error: retried with exponential backoff, then ``failed`` (dead letter);
- scored: the Secondary Capture is written under ``results/`` before the row says ``scored``,
  then sent (when a PACS is configured) until the PACS accepts it.

Scoring and delivery are separate loops (:meth:`Pipeline.process_pending`,
:meth:`Pipeline.send_pending`) that the service runs on threads of their own
(:mod:`cxr_worker.jobs`): a PACS that hangs delays only delivery, never triage. Each scored
result wakes the sender (:attr:`Pipeline.on_scored`). :meth:`Pipeline.drain` runs both in turn
on the caller's thread, for one-shot use (tests, and the same order as ``replay``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import Engine

from cxr_worker import decode, gate, report, send
from cxr_worker.errors import (
    DecodeError,
    NotScoredError,
    OutOfScopeError,
    QuarantinedError,
    SendError,
)
from cxr_worker.inputs import IMAGE_SUFFIXES
from cxr_worker.metrics import Metrics
from cxr_worker.model import heatmap as cam
from cxr_worker.score import Score, Scorer
from cxr_worker.spool import Spool, atomic_write, heatmap_path_for
from cxr_worker.worklist import queue
from cxr_worker.worklist.models import utcnow

logger = logging.getLogger(__name__)


def new_owner_id() -> str:
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


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
        # called after each result that is to be sent is scored (the service wakes its
        # sender); from the scoring thread, so it must not block
        self.on_scored: Callable[[], None] = _nothing
        self.metrics = metrics if metrics is not None else Metrics()
        if pacs is not None:
            self.metrics.add_destination(pacs.ae_title)

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
                display = decode.display_image(ds)
                x = self.scorer.prepare(display)
        except DecodeError as exc:
            raise self._quarantine(job, exc.reason) from exc
        with m.stage("score"):
            score = self.scorer.score(x)
        with m.stage("report"):
            # Grad-CAM from the feature maps the score kept: no second inference
            heat = self.scorer.heatmap(x) if self.report_cfg.heatmap else None
            try:
                sc = report.build_secondary_capture(
                    ds, display, probability=score.probability, label=score.label,
                    threshold=score.threshold, model_version=score.model_version,
                    cfg=self.report_cfg, population=gate_result.population,
                    population_text=gate_result.population_text,
                    threshold_source=score.threshold_source, heatmap=heat)
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
        scored = queue.mark_scored(
            self.engine, job, self.owner, hold=self.hold_results,
            probability=score.probability, label=score.label, threshold=score.threshold,
            model_version=score.model_version, population=str(gate_result.population),
            result_path=str(result_path), result_sop_instance_uid=str(sc.SOPInstanceUID))
        if scored:  # from the row insert, or from the re-queue (replay, duplicate C-STORE)
            since = job.received_at if job.attempts else max(job.received_at,
                                                              job.next_attempt_at)
            m.time_to_flag.observe(max((utcnow() - since).total_seconds(), 0.0))
        logger.info("scored %s: %s p=%.3f (%s)", job.sop_instance_uid, score.label,
                    score.probability, gate_result.population)
        if scored and not self.hold_results and self.pacs is not None:
            self.on_scored()

    # -- sending ------------------------------------------------------------------------
    def send_next(self) -> bool:
        """Deliver one due result to the PACS; False when there was none (or no PACS)."""
        if self.pacs is None or self.hold_results:
            return False
        job = queue.claim(self.engine, "send", self.owner, self.retry.lease_seconds,
                          self.only_ids)
        if job is None:
            return False
        destination = self.pacs.ae_title
        try:
            if not job.result_path:
                raise SendError("no result file recorded")
            with self.metrics.stage("send"):
                send.store(self.pacs, dcmread(job.result_path), self.outbound)
        except (SendError, OSError, InvalidDicomError) as exc:
            if self.stopping.is_set():
                # aborted by the shutdown, not refused by the PACS: no attempt counted; the
                # lease is given back and the result sent again at the next start
                logger.info("sending result of %s interrupted by the shutdown",
                            job.sop_instance_uid)
                return True
            self.metrics.delivery_failures.labels(destination).inc()
            status = queue.mark_attempt_failed(self.engine, job, self.owner, "send", str(exc),
                                               policy=self.retry)
            logger.warning("sending result of %s failed (%s): %s", job.sop_instance_uid,
                           status, exc)
        else:
            self.metrics.deliveries.labels(destination).inc()
            queue.mark_sent(self.engine, job, self.owner)
            logger.info("sent result %s for %s", job.result_sop_instance_uid,
                        job.sop_instance_uid)
        return True

    def abort_sends(self) -> int:
        """Abort the association of the send in progress, if any, and start no other (at
        shutdown, from another thread); returns how many associations were aborted."""
        return self.outbound.abort_all(refuse_new=True)

    def process_pending(self, max_jobs: int = 100) -> int:
        """Score until nothing is due (or ``max_jobs``, or shutdown); returns jobs done."""
        done = 0
        while done < max_jobs and not self.stopping.is_set() and self.process_next():
            done += 1
        return done

    def send_pending(self, max_jobs: int = 100) -> int:
        """Deliver until nothing is due (or ``max_jobs``, or shutdown); returns jobs done."""
        done = 0
        while done < max_jobs and not self.stopping.is_set() and self.send_next():
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
    return Assessment(scorer.score_grey(decode.display_image(ds)), verdict)
