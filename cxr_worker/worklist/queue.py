"""The database as the job queue: idempotent enqueue, leased claims, retries, dead letters.

A claim sets ``lease_owner`` and ``lease_expires_at``; a worker that dies (``kill -9``) leaves
an expired lease that any worker may take over. Every completion is conditional on the lease
still being ours, so a job re-queued meanwhile (a duplicate C-STORE, a replay) is never
overwritten by a stale result. On PostgreSQL candidates are selected ``FOR UPDATE SKIP
LOCKED``; on SQLite (WAL, busy timeout) the conditional UPDATE alone arbitrates.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, fields
from typing import Any, Literal

from sqlalchemy import Engine, create_engine, event, func, or_, select, true, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cxr_worker.errors import UIDConflictError
from cxr_worker.worklist.models import Instance, Population, Status, utcnow

logger = logging.getLogger(__name__)

# the one queue of instances; results are delivered through their deliveries
# (cxr_worker.worklist.deliveries, migration 0006)
Kind = Literal["process"]


def make_engine(url: str) -> Engine:
    """An engine; SQLite gets WAL, a busy timeout and full fsync on commit."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(conn: Any, _record: Any) -> None:
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")  # an acknowledged row survives power loss
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


@dataclass(frozen=True)
class Job:
    """A detached snapshot of one instance row, safe to pass between threads."""

    id: int
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    accession_number: str
    spool_path: str
    status: str
    attempts: int
    send_attempts: int
    result_path: str | None
    result_sop_instance_uid: str | None
    received_at: dt.datetime
    next_attempt_at: dt.datetime  # when the claimed job became due (time-to-flag metrics)

    @classmethod
    def of(cls, row: Instance) -> Job:
        return cls(**{f.name: getattr(row, f.name) for f in fields(cls)})


# a claim's RETURNING columns, in the order of Job's fields
JOB_COLUMNS = [getattr(Instance, f.name) for f in fields(Job)]


@dataclass(frozen=True)
class RetryPolicy:
    """How long a claim holds, and how failed attempts are retried before the dead letter."""

    lease_seconds: float
    max_attempts: int
    base_seconds: float
    max_seconds: float


def patient_key(sop_instance_uid: str, patient_id: str) -> str:
    """What the worklist keeps of a Patient ID: a hash salted with the SOP Instance UID.

    Only ever compared with the key of a re-sent image of the same SOP Instance UID; salted per
    instance, so two rows of one patient carry unrelated keys. It is not a secret from whoever
    holds the database and guesses IDs: the ID itself is what is never stored or logged.
    """
    text = f"cxr-worker patient key\x00{sop_instance_uid}\x00{patient_id.strip()}"
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _conflict(row: Instance, values: dict[str, Any]) -> str | None:
    """Why ``values`` may not replace ``row`` (UIDs only), or None."""
    if row.study_instance_uid != values["study_instance_uid"]:
        return (f"SOP Instance UID {row.sop_instance_uid} is held for study "
                f"{row.study_instance_uid}; this image names study {values['study_instance_uid']}")
    key = values.get("patient_key")
    if row.patient_key is not None and key is not None and row.patient_key != key:
        return (f"SOP Instance UID {row.sop_instance_uid} (study {row.study_instance_uid}) is "
                "held for another Patient ID")
    return None


def check_conflict(engine: Engine, **values: Any) -> None:
    """Raise :class:`UIDConflictError` if ``enqueue(**values)`` would re-assign a row held for
    another study or patient (checked before the file is written; ``enqueue`` checks again)."""
    with Session(engine) as s:
        row = s.scalars(
            select(Instance).where(Instance.sop_instance_uid == values["sop_instance_uid"])
        ).one_or_none()
        why = _conflict(row, values) if row is not None else None
    if why:
        raise UIDConflictError(why)


def enqueue(engine: Engine, **values: Any) -> tuple[int, bool]:
    """Insert a received instance, or re-queue it if its SOP Instance UID is known.

    Returns the row id and whether the row is new. A duplicate of the same study and patient
    replaces the spooled file (same path) and is processed again; its result keeps the same
    derived SOP Instance UID, so the PACS ends with one result either way. A duplicate of
    another study or patient (``patient_key``) raises :class:`UIDConflictError` and changes
    nothing. Two inserts of one new UID at once: the loser re-queues the winner's row.
    """
    for attempt in (1, 2):
        try:
            return _enqueue(engine, values)
        except IntegrityError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _enqueue(engine: Engine, values: dict[str, Any]) -> tuple[int, bool]:
    now = utcnow()
    with Session(engine) as s, s.begin():
        row = s.scalars(
            select(Instance).where(Instance.sop_instance_uid == values["sop_instance_uid"])
        ).one_or_none()
        if row is None:
            row = Instance(**values, status=Status.RECEIVED, received_at=now, next_attempt_at=now,
                           population=Population.UNKNOWN)  # until the gate has seen it
            s.add(row)
            s.flush()
            return row.id, True
        why = _conflict(row, values)
        if why:
            raise UIDConflictError(why)
        for k, v in values.items():
            if v is not None or k != "patient_key":  # an image without one keeps the row's
                setattr(row, k, v)
        _reset(row, now)
        return row.id, False


def _reset(row: Instance, now: dt.datetime) -> None:
    row.status = Status.RECEIVED
    row.reason = None
    row.population = Population.UNKNOWN
    row.attempts = 0
    row.send_attempts = 0
    row.next_attempt_at = now
    row.lease_owner = None
    row.lease_expires_at = None


def claim(engine: Engine, kind: Kind, owner: str, lease_seconds: float,
          only_ids: Collection[int] | None = None) -> Job | None:
    """Lease the next due job of ``kind`` (oldest first, among ``only_ids`` if given).

    One statement: ``UPDATE ... WHERE id = (SELECT ... LIMIT 1 FOR UPDATE SKIP LOCKED)
    RETURNING ...`` (on SQLite, whose writers take turns, without the row lock)."""
    if kind != "process":
        raise ValueError(f"no {kind!r} queue: results go out through their deliveries")
    status = Status.RECEIVED
    now = utcnow()
    free = or_(Instance.lease_expires_at.is_(None), Instance.lease_expires_at < now)
    due = (
        select(Instance.id)
        .where(Instance.status == status, Instance.next_attempt_at <= now, free)
        .where(Instance.id.in_(list(only_ids)) if only_ids is not None else true())
        .order_by(Instance.next_attempt_at, Instance.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    with Session(engine) as s, s.begin():
        row = s.execute(
            update(Instance)
            .where(Instance.id == due, Instance.status == status, free)
            .values(lease_owner=owner,
                    lease_expires_at=now + dt.timedelta(seconds=lease_seconds))
            .returning(*JOB_COLUMNS)
        ).one_or_none()
    return Job(*row) if row is not None else None


def next_due(engine: Engine, only_ids: Collection[int] | None = None) -> dt.datetime | None:
    """When the next job becomes due that is not due now: the earliest retry, or the end of
    a lease (a worker that died); None when there is none. A loop with nothing to do sleeps
    until then (or until woken), instead of polling."""
    now = utcnow()
    with Session(engine) as s:
        retry, lease = s.execute(
            select(func.min(Instance.next_attempt_at).filter(Instance.next_attempt_at > now),
                   func.min(Instance.lease_expires_at).filter(Instance.lease_expires_at >= now))
            .where(Instance.status == Status.RECEIVED)
            .where(Instance.id.in_(list(only_ids)) if only_ids is not None else true())
        ).one()
    return min((t for t in (retry, lease) if t is not None), default=None)


def _finish(engine: Engine, job: Job, owner: str, *,
            also: Callable[[Session], None] | None = None, **values: Any) -> bool:
    """Apply ``values`` and drop the lease, only if we still hold it; then ``also`` in the
    same transaction (the result's deliveries)."""
    with Session(engine) as s, s.begin():
        res = s.execute(
            update(Instance)
            .where(Instance.id == job.id, Instance.lease_owner == owner,
                   Instance.status == job.status)
            .values(lease_owner=None, lease_expires_at=None, **values)
        )
        done = bool(res.rowcount == 1)  # type: ignore[attr-defined]
        if done and also is not None:
            also(s)
    if not done:
        logger.warning("lost the lease on %s; the job was re-queued or taken over",
                       job.sop_instance_uid)
    return done


def mark_scored(engine: Engine, job: Job, owner: str, hold: bool = False,
                deliveries: Callable[[Session], None] | None = None, **result: Any) -> bool:
    """The result is built: ``scored`` (``held`` with ``hold``), and ``deliveries`` (the plan,
    :func:`cxr_worker.worklist.deliveries.apply_plan`) recorded in the same transaction."""
    return _finish(engine, job, owner, also=deliveries,
                   status=Status.HELD if hold else Status.SCORED, reason=None,
                   scored_at=utcnow(), next_attempt_at=utcnow(), send_attempts=0,
                   sent_at=None, **result)


def mark_not_scored(engine: Engine, job: Job, owner: str, reason: str, **extra: Any) -> bool:
    return _finish(engine, job, owner, status=Status.NOT_SCORED, reason=reason, **extra)


def mark_attempt_failed(
    engine: Engine,
    job: Job,
    owner: str,
    kind: Kind,
    error: str,
    *,
    policy: RetryPolicy,
) -> str:
    """Count a failed processing attempt: retry later with exponential backoff, or
    dead-letter it (a delivery's attempts: :func:`.deliveries.mark_failed`).

    Returns the new status (``received`` when it will be retried, ``failed``).
    """
    attempts = job.attempts + 1
    if attempts >= policy.max_attempts:
        status = Status.FAILED
        reason = f"processing failed {attempts} times: {error}"
        delay = 0.0
    else:
        status = Status(job.status)
        reason = f"retrying ({attempts}/{policy.max_attempts}): {error}"
        delay = min(policy.base_seconds * 2 ** (attempts - 1), policy.max_seconds)
    _finish(engine, job, owner, status=status, reason=reason, attempts=attempts,
            next_attempt_at=utcnow() + dt.timedelta(seconds=delay))
    return str(status)


def release_leases(engine: Engine, owner: str) -> int:
    """Give back every lease ``owner`` holds (graceful shutdown)."""
    with Session(engine) as s, s.begin():
        res = s.execute(
            update(Instance).where(Instance.lease_owner == owner)
            .values(lease_owner=None, lease_expires_at=None)
        )
        return int(res.rowcount)  # type: ignore[attr-defined]


def requeue(engine: Engine, instance_ids: list[int]) -> int:
    """Send instances through the pipeline again (replay)."""
    now = utcnow()
    with Session(engine) as s, s.begin():
        rows = s.scalars(select(Instance).where(Instance.id.in_(instance_ids))).all()
        for row in rows:
            _reset(row, now)
        return len(rows)
