"""Timed work, driven by APScheduler: draining the queue (process, send, retries) and retention.

Retries are rows whose ``next_attempt_at`` lies in the future; the drain job picks them up when
due, so exponential backoff needs no timer of its own. The C-STORE handler calls
:meth:`Jobs.wake` so a new image is processed at once rather than at the next tick.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from cxr_worker.pipeline import Pipeline
from cxr_worker.worklist.models import Instance, Status, utcnow

logger = logging.getLogger(__name__)

DRAIN = "drain"
RETENTION = "retention"
PACS_ECHO = "pacs_echo"
PACS_ECHO_SECONDS = 60.0


def apply_retention(engine: Engine, retention_days: float, pacs_configured: bool) -> int:
    """Delete spooled images and results of finished instances older than the retention.

    Finished: sent, not scored, or scored when no PACS is configured. Failed (dead-letter)
    instances are kept for the operator. Rows stay (the worklist keeps its history);
    their file paths are cleared. Returns the number of instances cleaned.
    """
    cutoff = utcnow() - dt.timedelta(days=retention_days)
    finished = [Status.SENT, Status.NOT_SCORED] + ([] if pacs_configured else [Status.SCORED])
    cleaned = 0
    with Session(engine) as s, s.begin():
        rows = s.scalars(select(Instance).where(
            Instance.status.in_(finished), Instance.received_at < cutoff,
            Instance.spool_path != "")).all()
        for row in rows:
            for p in (row.spool_path, row.result_path):
                if p:
                    Path(p).unlink(missing_ok=True)
            row.spool_path = ""
            row.result_path = None
            cleaned += 1
    if cleaned:
        logger.info("retention: removed the files of %d finished instances", cleaned)
    return cleaned


class Jobs:
    def __init__(self, pipeline: Pipeline, poll_seconds: float, retention_days: float,
                 retention_interval_seconds: float, *,
                 pacs_echo: Callable[[], object] | None = None,
                 pacs_echo_seconds: float = PACS_ECHO_SECONDS) -> None:
        self.pipeline = pipeline
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.scheduler.add_job(
            pipeline.drain, "interval", seconds=poll_seconds, id=DRAIN, max_instances=1,
            coalesce=True, misfire_grace_time=None)
        self.scheduler.add_job(
            apply_retention, "interval", seconds=retention_interval_seconds, id=RETENTION,
            args=[pipeline.engine, retention_days, pipeline.pacs is not None],
            max_instances=1, coalesce=True, next_run_time=dt.datetime.now(dt.UTC))
        if pacs_echo is not None:  # reported by /readyz and /metrics; never stops the worker
            self.scheduler.add_job(
                pacs_echo, "interval", seconds=pacs_echo_seconds, id=PACS_ECHO, max_instances=1,
                coalesce=True, next_run_time=dt.datetime.now(dt.UTC))

    def start(self) -> None:
        self.scheduler.start()

    def wake(self) -> None:
        """Run the drain job now (called from the C-STORE handler's thread)."""
        try:
            self.scheduler.modify_job(DRAIN, next_run_time=dt.datetime.now(dt.UTC))
        except Exception:  # the scheduler is shutting down; the next start drains
            logger.debug("wake ignored: scheduler not running", exc_info=True)

    def stop(self) -> None:
        """Stop scheduling and wait for the running drain to finish its current jobs."""
        self.scheduler.shutdown(wait=True)
