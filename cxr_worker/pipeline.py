"""The pipeline: claim a job, have it processed, record the outcome; or send a result.

The work on the image itself (read -> gate -> decode -> score -> report, the result files
written) is :class:`cxr_worker.processing.Processor`'s, run here (``[jobs] workers = 1``) or
in worker processes (:mod:`cxr_worker.workers`); this module holds the database side: the
claim (one statement), the outcome recorded, the deliveries planned and sent. A job's
outcome is always written to the worklist:

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
**The lease is kept from the claim to the send**: when this process also sends
(:attr:`Pipeline.sends_here`), the deliveries of a scored image are recorded already leased
to it, in the transaction that records the score, and handed to its sender in memory (no
second claim); should it die, the leases end and any sender takes them. A result goes out as
its file's bytes (only its header is read, to check its UID; :func:`cxr_worker.send._c_store`).
:meth:`Pipeline.drain` runs both in turn on the caller's thread, for one-shot use (tests, and
the same order as ``replay``).
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
import traceback
import uuid
from collections.abc import Callable, Collection
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from cxr_worker import gate, hl7v2, logs, report, send, sizes
from cxr_worker.errors import SendError
from cxr_worker.metrics import Metrics
from cxr_worker.processing import (
    Built,
    Crashed,
    Outcome,
    Outputs,
    Processor,
    Refused,
    result_uids,
)
from cxr_worker.processing import Job as Task
from cxr_worker.score import Scorer, ThresholdChoice
from cxr_worker.spool import Spool
from cxr_worker.workers import ProcessorSpec, WorkerPool
from cxr_worker.worklist import control, deliveries, queue
from cxr_worker.worklist.models import utcnow

__all__ = ["Outputs", "Pipeline", "new_owner_id", "result_uids"]

logger = logging.getLogger(__name__)


def new_owner_id() -> str:
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


HL7_DESTINATION = "HL7"  # the metrics' destination label of the RIS (no host, no patient)


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
        workers: int = 1,
        num_threads: int = 2,
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
        # the image's work without the database: here (workers = 1) or in worker processes
        self.processor = Processor(spool=spool, scorer=scorer, gate_cfg=gate_cfg,
                                   report_cfg=report_cfg, outputs=self.outputs)
        self.workers = WorkerPool(ProcessorSpec(
            spool.root, scorer.model_dir, ThresholdChoice(scorer.threshold,
                                                          scorer.threshold_source),
            num_threads, gate_cfg, report_cfg, self.outputs, sizes.current_limits(),
            logging.getLogger().getEffectiveLevel(), logs.json_enabled()),
            workers) if workers > 1 else None
        # the PACS kinds this process sends itself (set by the service when it runs a PACS
        # sender): their deliveries stay leased from the claim of the image to the send
        # and are handed to the sender in memory (no second claim)
        self.sends_here: tuple[str, ...] = ()
        self._handed: collections.deque[deliveries.DeliveryJob] = collections.deque()

    # -- processing ---------------------------------------------------------------------
    def process_next(self) -> bool:
        """Process one due job; False when there was none."""
        job = queue.claim(self.engine, "process", self.owner, self.retry.lease_seconds,
                          self.only_ids)
        if job is None:
            return False
        try:
            previous, used = deliveries.history(self.engine, job.id)
            task = Task(job.sop_instance_uid, job.study_instance_uid, job.spool_path)
            outcome = (self.workers.run(task, previous, used) if self.workers is not None
                       else self.processor.outcome(task, previous, used))
        except Exception as exc:  # the database
            outcome = Crashed(f"{type(exc).__name__}: {exc}", traceback.format_exc())
        self._record(job, outcome)
        return True

    def _record(self, job: queue.Job, outcome: Outcome) -> None:
        for stage, seconds in outcome.stages.items():
            self.metrics.stage_seconds.labels(stage).observe(seconds)
        if isinstance(outcome, Refused):
            if outcome.quarantined:
                logger.warning("quarantined %s: %s", job.sop_instance_uid, outcome.reason)
            logger.info("not scored %s: %s", job.sop_instance_uid, outcome.reason)
            # the row follows a quarantined file, so replay and retention still find it
            queue.mark_not_scored(self.engine, job, self.owner, outcome.reason,
                                  **outcome.extra)
        elif isinstance(outcome, Crashed) and self.stopping.is_set():
            # a worker process stopped by the shutdown: not an attempt; the lease is given
            # back with the others and the image processed at the next start
            logger.info("processing %s interrupted by the shutdown", job.sop_instance_uid)
        elif isinstance(outcome, Crashed):
            logger.error("processing %s failed: %s%s", job.sop_instance_uid, outcome.error,
                         f"\n{outcome.trace.rstrip()}" if outcome.trace else "")
            queue.mark_attempt_failed(self.engine, job, self.owner, "process", outcome.error,
                                      policy=self.retry)
        else:
            self._scored(job, outcome)

    def _scored(self, job: queue.Job, built: Built) -> None:
        score = built.score
        handed: list[deliveries.DeliveryJob] = []
        kinds = () if self.hold_results else self.sends_here

        def plan(s: Session) -> None:
            deliveries.apply_plan(s, job.id, built.planned, hold=self.hold_results,
                                  label=score.label, threshold=score.threshold,
                                  model_version=score.model_version)
            if kinds:  # the lease kept from the claim to the send
                handed.extend(deliveries.lease_current(
                    s, job.id, owner=self.owner, lease_seconds=self.retry.lease_seconds,
                    kinds=kinds, sop_instance_uid=job.sop_instance_uid,
                    study_instance_uid=job.study_instance_uid))

        scored = queue.mark_scored(
            self.engine, job, self.owner, hold=self.hold_results, deliveries=plan,
            probability=score.probability, label=score.label, threshold=score.threshold,
            model_version=score.model_version, population=built.population,
            result_path=built.result_path,
            result_sop_instance_uid=built.result_sop_instance_uid)
        if scored:  # from the row insert, or from the re-queue (replay, duplicate C-STORE)
            since = job.received_at if job.attempts else max(job.received_at,
                                                              job.next_attempt_at)
            self.metrics.time_to_flag.observe(max((utcnow() - since).total_seconds(), 0.0))
            self._handed.extend(handed)
        logger.info("scored %s: %s p=%.3f (%s)", job.sop_instance_uid, score.label,
                    score.probability, built.population)
        if scored and not self.hold_results and built.planned:
            self.on_scored()

    def warm_up(self, source: Dataset) -> float:
        """Start the worker processes (each loads the model and builds one result) or, without
        them, build one result here, so that the first image pays neither; returns seconds."""
        if self.workers is not None:
            return self.workers.start()
        return self.processor.warm_up(source)

    # -- sending ------------------------------------------------------------------------
    def send_next(self, kinds: Collection[str] | None = None) -> bool:
        """Deliver one due output (of ``kinds``; default every delivered kind); False when
        there was none, nothing is delivered, or sending is paused."""
        if self.hold_results:
            return False
        live = (*self.outputs.pacs_kinds, *(("hl7",) if "hl7" in self.outputs.delivered else ()))
        wanted = [k for k in live if kinds is None or k in kinds]
        if not wanted:
            return False
        if control.sending_paused(self.engine):
            self._give_back_handed()
            return False
        job = self._next_handed(wanted) or deliveries.claim(
            self.engine, self.owner, self.retry.lease_seconds, wanted, self.only_ids)
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

    def _next_handed(self, kinds: Collection[str]) -> deliveries.DeliveryJob | None:
        """The next delivery handed over by the scoring (still leased since its image's
        claim), of ``kinds``."""
        for _ in range(len(self._handed)):
            try:
                job = self._handed.popleft()
            except IndexError:
                return None
            if job.kind in kinds:
                return job
            self._handed.append(job)
        return None

    def _give_back_handed(self) -> None:
        """Sending paused: the handed-over deliveries go back to the database queue."""
        while self._handed:
            try:
                job = self._handed.popleft()
            except IndexError:
                return
            deliveries.give_back(self.engine, job, self.owner)

    def _send(self, job: deliveries.DeliveryJob) -> None:
        assert job.path is not None
        if job.kind == "hl7":
            assert self.outputs.hl7 is not None
            # bytes: read_text's universal newlines would turn the segments' CR into LF
            hl7v2.send(self.outputs.hl7, Path(job.path).read_bytes().decode("utf-8"))
            return
        if self.pacs is None or self.sender is None:
            raise SendError("no PACS configured (pacs.ae_title)")
        # the header only: the file's bytes are sent as they are (not decoded, re-encoded)
        ds = dcmread(job.path, stop_before_pixels=True)
        if str(ds.SOPInstanceUID) != job.result_uid:
            # the image was processed again and its file rebuilt meanwhile: that result
            # has deliveries of its own
            raise SendError(f"the result file now holds {ds.SOPInstanceUID}, not "
                            f"{job.result_uid} (rebuilt by a later processing)")
        self.sender.store(ds, Path(job.path))

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
