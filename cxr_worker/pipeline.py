"""The pipeline: claim a job, then gate -> decode -> score -> report, or send.

Composes the stage modules (the only module besides the composition root that sees them all).
A job's outcome is always written to the worklist:

- gate refusal: ``not_scored`` with the rule and reason; the file stays in the spool;
- unreadable or undecodable file: ``not_scored`` with the reason, the file moved to quarantine;
- unexpected error: retried with exponential backoff, then ``failed`` (dead letter);
- scored: the Secondary Capture is written under ``results/`` before the row says ``scored``,
  then sent (when a PACS is configured) until the PACS accepts it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import Engine

from cxr_worker import decode, gate, report, send
from cxr_worker.errors import DecodeError, NotScoredError, QuarantinedError, SendError
from cxr_worker.model.preprocess import to_model_input
from cxr_worker.score import Scorer
from cxr_worker.spool import Spool, atomic_write
from cxr_worker.worklist import queue

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
            moved = {"spool_path": str(exc.path)} if isinstance(exc, QuarantinedError) else {}
            queue.mark_not_scored(self.engine, job, self.owner, exc.reason, **moved)
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
        try:
            ds = decode.read_file(job.spool_path)
        except FileNotFoundError:
            raise NotScoredError("spooled file is missing (removed by retention?)") from None
        except DecodeError as exc:
            raise self._quarantine(job, exc.reason) from exc
        gate_result = gate.check(ds, self.gate_cfg)
        try:
            display = decode.display_image(ds)
            x = to_model_input(display)
        except DecodeError as exc:
            raise self._quarantine(job, exc.reason) from exc
        score = self.scorer.score(x)
        sc = report.build_secondary_capture(
            ds, display, probability=score.probability, label=score.label,
            threshold=score.threshold, model_version=score.model_version, cfg=self.report_cfg,
            note=gate_result.note)
        result_path = self.spool.result_path(job.study_instance_uid, job.sop_instance_uid)
        atomic_write(result_path, lambda f: sc.save_as(f, enforce_file_format=True))
        queue.mark_scored(
            self.engine, job, self.owner, hold=self.hold_results,
            probability=score.probability, label=score.label, threshold=score.threshold,
            model_version=score.model_version, outside_population=gate_result.outside_population,
            result_path=str(result_path), result_sop_instance_uid=str(sc.SOPInstanceUID))
        logger.info("scored %s: %s p=%.3f", job.sop_instance_uid, score.label, score.probability)

    # -- sending ------------------------------------------------------------------------
    def send_next(self) -> bool:
        """Deliver one due result to the PACS; False when there was none (or no PACS)."""
        if self.pacs is None or self.hold_results:
            return False
        job = queue.claim(self.engine, "send", self.owner, self.retry.lease_seconds,
                          self.only_ids)
        if job is None:
            return False
        try:
            if not job.result_path:
                raise SendError("no result file recorded")
            send.store(self.pacs, dcmread(job.result_path))
        except (SendError, OSError, InvalidDicomError) as exc:
            status = queue.mark_attempt_failed(self.engine, job, self.owner, "send", str(exc),
                                               policy=self.retry)
            logger.warning("sending result of %s failed (%s): %s", job.sop_instance_uid,
                           status, exc)
        else:
            queue.mark_sent(self.engine, job, self.owner)
            logger.info("sent result %s for %s", job.result_sop_instance_uid,
                        job.sop_instance_uid)
        return True

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
