"""The service's background work: scoring, delivery, retention, the orphan sweep, C-ECHO.

Scoring and delivery each run on a thread of their own (:class:`Loop`), so that a PACS that
hangs (it accepts the TCP connection, then answers nothing) delays only delivery: scoring goes
on at full speed. Delivery has one thread per destination: the PACS (Secondary Captures,
SRs, rejection notes) and the RIS (HL7), so one that hangs never holds the other's. Decision:
threads rather than APScheduler jobs, because a shutdown must not wait for them (a hung send,
a long decode) and APScheduler's pool threads are joined when the interpreter exits; one
association at a time to the PACS, as before. An HL7 send in progress at shutdown is bounded
by ``hl7.timeout_seconds``, not aborted: past the grace period the process exits anyway and
its lease is given back (the message, same MSH-10, is sent again at the next start).

Each loop runs when woken and every ``jobs.poll_seconds``. Retries are rows whose
``next_attempt_at`` lies in the future; a loop picks them up when due, so exponential backoff
needs no timer of its own. The C-STORE handler calls :meth:`Jobs.wake` so a new image is scored
at once; each scored result wakes the sender the same way. Retention, the orphan sweep and the
PACS C-ECHO are APScheduler interval jobs.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import Engine, or_, select
from sqlalchemy.orm import Session

from cxr_worker.pipeline import Pipeline
from cxr_worker.settings import ROLES
from cxr_worker.spool import Spool, heatmap_path_for
from cxr_worker.worklist import deliveries, queue
from cxr_worker.worklist.deliveries import DICOM_KINDS
from cxr_worker.worklist.models import Delivery, DeliveryStatus, Instance, Status, utcnow

logger = logging.getLogger(__name__)

PROCESS = "process"
SEND = "send"  # deliveries to the PACS (sc, sr, kos)
HL7 = "hl7"  # deliveries to the RIS
RETENTION = "retention"
SWEEP = "sweep"
PACS_ECHO = "pacs_echo"
PACS_ECHO_SECONDS = 60.0
# PostgreSQL notifies the loops of new work (Notifications): they look by themselves only
# this often, in case a notification was lost (a reconnection)
NOTIFIED_POLL_SECONDS = 30.0


def apply_retention(engine: Engine, retention_days: float, pacs_configured: bool,
                    live_kinds: Collection[str] | None = None) -> int:
    """Delete spooled images and results of finished instances older than the retention.

    The result's heatmap (``<sop>.heatmap.png`` beside it) and the files of its deliveries
    (SR, rejection notes, HL7 messages) go with the result. Finished: sent, not scored, or
    scored when no PACS is configured and no delivery of a kind still delivered
    (``live_kinds``, default the PACS's kinds when one is configured) waits to go. Instances
    with an undelivered result or a failed processing (dead letters) are kept for the
    operator. Rows stay (the worklist keeps its history); their file paths are cleared.
    Returns the number of instances cleaned.
    """
    cutoff = utcnow() - dt.timedelta(days=retention_days)
    finished = [Status.SENT, Status.NOT_SCORED] + ([] if pacs_configured else [Status.SCORED])
    live = list(live_kinds if live_kinds is not None else
                (DICOM_KINDS if pacs_configured else ()))
    cleaned = 0
    with Session(engine) as s, s.begin():
        rows = s.scalars(select(Instance).where(
            Instance.status.in_(finished), Instance.received_at < cutoff,
            Instance.spool_path != "")).all()
        waiting = set(s.scalars(select(Delivery.instance_id).where(
            Delivery.instance_id.in_([r.id for r in rows]), Delivery.kind.in_(live),
            Delivery.superseded_at.is_(None),
            Delivery.status.not_in((DeliveryStatus.SENT, DeliveryStatus.CANCELLED)))))
        for row in rows:
            if row.id in waiting:
                continue
            heatmap = heatmap_path_for(row.result_path) if row.result_path else None
            outputs = s.scalars(select(Delivery).where(Delivery.instance_id == row.id,
                                                       Delivery.path.is_not(None))).all()
            for p in (row.spool_path, row.result_path, heatmap, *(d.path for d in outputs)):
                if p:
                    Path(p).unlink(missing_ok=True)
            row.spool_path = ""
            row.result_path = None
            for d in outputs:
                d.path = None
            cleaned += 1
    if cleaned:
        logger.info("retention: removed the files of %d finished instances", cleaned)
    return cleaned


def _row_key(path: str) -> str:
    """A worklist path's ``<study>/<file>`` (see :meth:`Spool.stored_files`)."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}"


def _columns(column: str) -> list[Any]:
    """The path columns that refer to files of a folder: a result's file is the instance's
    ``result_path`` or a delivery's ``path`` (SR, rejection note, HL7 message)."""
    return [getattr(Instance, column), *([Delivery.path] if column == "result_path" else [])]


def _referenced(engine: Engine, column: str) -> set[str]:
    """The ``<study>/<file>`` keys of every non-empty ``spool_path``, or of every result
    file (``result_path`` and the deliveries' paths)."""
    with Session(engine) as s:
        return {_row_key(p) for col in _columns(column)
                for p in s.scalars(select(col).where(col.is_not(None), col != ""))}


def _is_referenced(engine: Engine, column: str, key: str) -> bool:
    pattern = "%/" + key.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    with Session(engine) as s:
        return any(s.scalars(select(col).where(
            or_(col.like(pattern, escape="\\"), col == key)).limit(1)).first() is not None
            for col in _columns(column))


def _unreferenced(engine: Engine, column: str, key: str) -> Callable[[], bool]:
    return lambda: not _is_referenced(engine, column, key)


def sweep_orphans(engine: Engine, spool: Spool, grace_seconds: float,
                  now: float | None = None) -> dict[str, int]:
    """Remove what no crash recovery or retention ever will, once older than ``grace_seconds``:
    temporary files (a write that died with its process, ``kill -9``), and spooled images and
    results no worklist row refers to (a store the database refused after the file was
    written). Returns the counts: ``{"temporary", "spool", "results"}``.

    A row refers to a file by its path; the comparison uses the path's ``<study>/<file>``
    part, so moving ``data_dir`` never makes every file look unreferenced. Never removed: a
    file a row refers to, one younger than the grace period (a store or a write in progress),
    anything in the quarantine but temporary files (the operator's), files not laid out by the
    spool. Logged with the counts.
    """
    cutoff = (time.time() if now is None else now) - grace_seconds
    counts = {"temporary": spool.remove_old_temp_files(cutoff), "spool": 0, "results": 0}
    for kind, folder, column, suffixes in (
            ("spool", spool.spool_dir, "spool_path", (".dcm",)),
            ("results", spool.results_dir, "result_path", (".dcm", ".hl7"))):
        old = list(spool.stored_files(folder, cutoff, suffixes))
        if not old:
            continue
        referenced = _referenced(engine, column)
        for key, path in old:
            if key in referenced:
                continue
            if spool.remove_if_orphan(path, cutoff, _unreferenced(engine, column, key)):
                counts[kind] += 1
    if any(counts.values()):
        logger.info("orphan sweep: removed %d temporary files, %d spooled images and %d "
                    "results no worklist row refers to (older than %.0f s)",
                    counts["temporary"], counts["spool"], counts["results"], grace_seconds)
    else:
        logger.debug("orphan sweep: nothing to remove")
    return counts


class Loop:
    """A daemon thread that runs ``work`` when woken, at once again while ``work`` reports
    work done (a truthy result), and otherwise sleeps until ``next_due()`` (the next retry or
    lease end it knows of) or at most ``poll_seconds``: an idle worker sends no query a
    second. Arrivals wake it (:meth:`wake`: the C-STORE handler, the scoring, PostgreSQL
    notifications).

    Daemon: the interpreter's exit never waits for it; :meth:`Jobs.stop` waits for it, as
    long as the shutdown allows.
    """

    def __init__(self, name: str, work: Callable[[], object], poll_seconds: float,
                 next_due: Callable[[], dt.datetime | None] | None = None) -> None:
        self.name = name
        self._work = work
        self._poll = poll_seconds
        self._next_due = next_due
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.idle = False  # waiting for work (read by Jobs.wake, without a lock: a hint)
        self.thread = threading.Thread(target=self._run, name=f"cxr-{name}", daemon=True)

    def start(self) -> None:
        self._wake.set()  # a first round at once: what the last run left due
        self.thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def join(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds; True when the thread has ended (or never ran)."""
        if self.thread.ident is not None:
            self.thread.join(max(timeout, 0.0))
        return not self.thread.is_alive()

    def _idle_seconds(self) -> float:
        """How long to sleep with nothing to do: until the next due time, at most
        ``poll_seconds`` (which also bounds how late another SQLite process's work is seen)."""
        if self._next_due is None:
            return self._poll
        due = self._next_due()
        if due is None:
            return self._poll
        return min(max((due - utcnow()).total_seconds(), 0.0) + 0.005, self._poll)

    def _run(self) -> None:
        timeout = 0.0
        while not self._stop.is_set():
            self.idle = True
            self._wake.wait(timeout)
            self.idle = False
            self._wake.clear()  # before the work: a wake-up during it means another round
            if self._stop.is_set():
                break
            try:
                timeout = 0.0 if self._work() else self._idle_seconds()
            except Exception:  # e.g. the database unreachable: logged, tried again later
                logger.exception("%s: unexpected error", self.name)
                timeout = self._poll


class Notifications:
    """PostgreSQL: LISTEN on the worklist's channel (migration 0008) and wake the loops the
    notifications name (``process``, ``send``): work another process, the CLI or the web
    page made available is seen at once. A thread of its own on a connection of its own,
    reconnecting after an outage; stopped with :meth:`stop`."""

    def __init__(self, engine: Engine, wake: Callable[[str], None]) -> None:
        self._url = engine.url.set(drivername="postgresql").render_as_string(
            hide_password=False)
        self._wake = wake
        self._stop = threading.Event()
        self.listening = threading.Event()
        self.thread = threading.Thread(target=self._run, name="cxr-notify", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        import psycopg

        while not self._stop.is_set():
            try:
                with psycopg.connect(self._url, autocommit=True, connect_timeout=10) as conn:
                    schema = conn.execute("SELECT current_schema()").fetchone()
                    channel = f"cxr_worker_{schema[0] if schema else 'public'}"
                    conn.execute(psycopg.sql.SQL("LISTEN {}").format(
                        psycopg.sql.Identifier(channel)))
                    self.listening.set()
                    self._wake("process")  # what arrived while not listening
                    self._wake("send")
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.5):
                            self._wake(note.payload)
            except Exception as exc:  # the server restarted, the network: listen again
                self.listening.clear()
                logger.warning("worklist notifications: %s; listening again in 5 s",
                               type(exc).__name__)
                self._stop.wait(5.0)


class Jobs:
    """The service's loops for its ``roles`` (:func:`parse_roles`): ``process``: one scoring
    loop per worker process (``[jobs] workers``); ``send``: one delivery loop per destination
    and the PACS C-ECHO; ``receive``: retention and the orphan sweep (the spool's owner; the
    listener itself is the service's)."""

    def __init__(self, pipeline: Pipeline, poll_seconds: float, retention_days: float,
                 retention_interval_seconds: float, *,
                 pacs_echo: Callable[[], object] | None = None,
                 pacs_echo_seconds: float = PACS_ECHO_SECONDS,
                 orphan_grace_seconds: float = 3600.0,
                 roles: frozenset[str] = frozenset(ROLES),
                 notified_poll_seconds: float = NOTIFIED_POLL_SECONDS) -> None:
        self.pipeline = pipeline
        self.roles = roles
        engine, only = pipeline.engine, pipeline.only_ids
        notified = engine.dialect.name == "postgresql"
        if notified:
            poll_seconds = max(poll_seconds, notified_poll_seconds)
        n = pipeline.workers.n if pipeline.workers is not None else 1
        self.processors = [
            Loop(PROCESS if n == 1 else f"{PROCESS}-{i + 1}", pipeline.process_pending,
                 poll_seconds, lambda: queue.next_due(engine, only))
            for i in range(n if "process" in roles else 0)]
        # one delivery loop per destination: a PACS that hangs never holds the RIS's ORU
        self.send: Loop | None = None
        self.hl7: Loop | None = None
        outputs = pipeline.outputs
        sending = "send" in roles and not pipeline.hold_results
        if outputs.pacs_kinds and sending:
            kinds = outputs.pacs_kinds
            self.send = Loop(SEND, lambda: pipeline.send_pending(kinds=kinds), poll_seconds,
                             lambda: deliveries.next_due(engine, kinds))
            if self.processors:  # results scored here are handed to this sender in memory
                pipeline.sends_here = kinds
        if "hl7" in outputs.delivered and sending:
            self.hl7 = Loop(HL7, lambda: pipeline.send_pending(kinds=("hl7",)), poll_seconds,
                            lambda: deliveries.next_due(engine, ("hl7",)))
        senders = [loop for loop in (self.send, self.hl7) if loop is not None]
        if senders:
            def wake_senders() -> None:
                for loop in senders:
                    loop.wake()

            pipeline.on_scored = wake_senders
        self.notifications = (Notifications(engine, self.wake_role)
                              if notified and self.loops else None)
        live = (*outputs.pacs_kinds, *(("hl7",) if "hl7" in outputs.delivered else ()))
        self.scheduler = BackgroundScheduler(timezone="UTC")
        if "receive" in roles:
            self.scheduler.add_job(
                apply_retention, "interval", seconds=retention_interval_seconds, id=RETENTION,
                args=[engine, retention_days, pipeline.pacs is not None, live],
                max_instances=1, coalesce=True, next_run_time=dt.datetime.now(dt.UTC))
            self.scheduler.add_job(
                sweep_orphans, "interval", seconds=retention_interval_seconds, id=SWEEP,
                args=[engine, pipeline.spool, orphan_grace_seconds],
                max_instances=1, coalesce=True, next_run_time=dt.datetime.now(dt.UTC))
        if pacs_echo is not None and "send" in roles:  # reported by /readyz and /metrics
            self.scheduler.add_job(
                pacs_echo, "interval", seconds=pacs_echo_seconds, id=PACS_ECHO, max_instances=1,
                coalesce=True, next_run_time=dt.datetime.now(dt.UTC))

    @property
    def process(self) -> Loop | None:
        """The first scoring loop (None without the process role)."""
        return self.processors[0] if self.processors else None

    @property
    def loops(self) -> list[Loop]:
        return [*self.processors, *(loop for loop in (self.send, self.hl7) if loop is not None)]

    def start(self) -> None:
        self.scheduler.start()
        for loop in self.loops:
            loop.start()
        if self.notifications is not None:
            self.notifications.start()

    def wake(self) -> None:
        """Score now (called from the C-STORE handler's thread): wake one idle scoring loop;
        when none is idle, every loop goes round once more after its job."""
        for loop in self.processors:
            if loop.idle:
                loop.wake()
                return
        for loop in self.processors:
            loop.wake()

    def wake_role(self, payload: str) -> None:
        """A notification: ``process`` wakes a scoring loop, ``send`` the senders."""
        if payload == "process":
            self.wake()
        elif payload == "send":
            for loop in (self.send, self.hl7):
                if loop is not None:
                    loop.wake()

    def stop(self, deadline: float, send_grace: float = 1.0) -> bool:
        """Stop by ``deadline`` (a ``time.monotonic()``): no job starts any more; the send in
        progress gets ``send_grace`` seconds, then its association is aborted; the scoring in
        progress gets until ``deadline``. True when every loop has ended; False when one is
        still busy (its lease is given back by the caller, and the job done again at the next
        start).

        The pipeline's ``stopping`` must be set first, so that an aborted send is not counted
        as a failed attempt.
        """
        for loop in self.loops:
            loop.stop()
        if self.notifications is not None:
            self.notifications.stop()
        # not waited for: retention and the sweep are short; a C-ECHO to a PACS that hangs is
        # the caller's to abort (send.OUTBOUND)
        self.scheduler.shutdown(wait=False)
        if self.send is not None and not self.send.join(
                min(send_grace, deadline - time.monotonic())):
            aborted = self.pipeline.abort_sends()
            logger.info("shutdown: aborted %d association(s) of the send in progress", aborted)
        # the association kept open to the PACS: released (aborted if it does not answer)
        self.pipeline.close_sends(min(1.0, max(deadline - time.monotonic(), 0.0)))
        ended = [loop.join(deadline - time.monotonic()) for loop in self.loops]
        if self.pipeline.workers is not None:  # the worker processes end after their job
            self.pipeline.workers.shutdown()
        for loop, done in zip(self.loops, ended, strict=True):
            if not done:
                logger.warning("shutdown: the %s job did not finish in time; its lease is given "
                               "back and it is done again at the next start", loop.name)
        return all(ended)
