"""What people do to the worklist from the web API: mark a study read, replay a study,
retry a dead letter, pause and resume sending; and what the admin page reads.

``sending_paused(engine)`` is the switch the send path checks before each delivery: a row in
``worker_state`` (so it outlives a restart and reaches every process sharing the database).
While paused, results are still built and listed; they wait as ``scored`` and go out once
sending resumes.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, case, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cxr_worker.worklist import queue
from cxr_worker.worklist.models import Instance, Status, StudyRead, WorkerState, utcnow

SENDING_PAUSED = "sending_paused"


# -- switches -------------------------------------------------------------------------------
def sending_paused(engine: Engine) -> bool:
    """Whether an admin paused sending results to the PACS (``POST /api/v1/sending/pause``)."""
    with Session(engine) as s:
        value = s.scalar(select(WorkerState.value).where(WorkerState.key == SENDING_PAUSED))
    return value == "true"


def set_sending_paused(engine: Engine, paused: bool, by: str) -> None:
    _set_state(engine, SENDING_PAUSED, "true" if paused else "false", by)


def _set_state(engine: Engine, key: str, value: str, by: str) -> None:
    for attempt in (1, 2):
        try:
            with Session(engine) as s, s.begin():
                row = s.get(WorkerState, key)
                if row is None:
                    s.add(WorkerState(key=key, value=value, updated_by=by, updated_at=utcnow()))
                else:
                    row.value, row.updated_by, row.updated_at = value, by, utcnow()
            return
        except IntegrityError:  # inserted at the same moment by another request
            if attempt == 2:
                raise


def state(engine: Engine, key: str) -> dict[str, Any] | None:
    with Session(engine) as s:
        row = s.get(WorkerState, key)
        if row is None:
            return None
        return {"value": row.value, "updated_by": row.updated_by,
                "updated_at": row.updated_at.isoformat()}


# -- reading ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReadMark:
    study_instance_uid: str
    read_by: str
    read_at: dt.datetime

    def as_json(self) -> dict[str, str]:
        return {"study_instance_uid": self.study_instance_uid, "read_by": self.read_by,
                "read_at": self.read_at.isoformat()}


def study_exists(engine: Engine, study_uid: str) -> bool:
    with Session(engine) as s:
        return s.scalar(select(Instance.id).where(Instance.study_instance_uid == study_uid)
                        .limit(1)) is not None


def mark_read(engine: Engine, study_uid: str, by: str) -> ReadMark | None:
    """Record that ``by`` read the study now (a later mark replaces an earlier one); None
    when the worklist has no such study."""
    if not study_exists(engine, study_uid):
        return None
    now = utcnow()
    for attempt in (1, 2):
        try:
            with Session(engine) as s, s.begin():
                row = s.get(StudyRead, study_uid)
                if row is None:
                    s.add(StudyRead(study_instance_uid=study_uid, read_by=by, read_at=now))
                else:
                    row.read_by, row.read_at = by, now
            break
        except IntegrityError:  # marked at the same moment by another request
            if attempt == 2:
                raise
    return ReadMark(study_uid, by, now)


def unmark_read(engine: Engine, study_uid: str) -> bool:
    """Put a study back on the active list; False when it was not marked read."""
    with Session(engine) as s, s.begin():
        row = s.get(StudyRead, study_uid)
        if row is None:
            return False
        s.delete(row)
        return True


# -- admin actions ----------------------------------------------------------------------------
def replay_study(engine: Engine, study_uid: str) -> int:
    """Re-queue every stored image of the study (as ``cxr-worker replay --study``, but left to
    the running service); the number re-queued (0: no such study, or no image kept)."""
    with Session(engine) as s:
        ids = list(s.scalars(select(Instance.id).where(
            Instance.study_instance_uid == study_uid, Instance.spool_path != "")))
    return queue.requeue(engine, ids) if ids else 0


def retry_dead_letter(engine: Engine, sop_uid: str) -> str | None:
    """Give a dead letter (status ``failed``) another round: ``send`` when its result was
    built and only its delivery failed (the result is sent again, not rebuilt), ``process``
    otherwise (it goes through the pipeline again). None when there is no such image;
    ``ValueError`` when it is not a dead letter."""
    now = utcnow()
    with Session(engine) as s, s.begin():
        row = s.scalars(select(Instance).where(Instance.sop_instance_uid == sop_uid)
                        .with_for_update()).one_or_none()
        if row is None:
            return None
        if row.status != Status.FAILED:
            raise ValueError(f"image is {row.status}, not a dead letter (failed)")
        if row.result_path and (row.reason or "").startswith("sending"):
            row.status, row.reason, row.send_attempts = Status.SCORED, None, 0
            row.next_attempt_at, row.lease_owner, row.lease_expires_at = now, None, None
            return "send"
        row_id = row.id
    queue.requeue(engine, [row_id])
    return "process"


# -- reading for people -----------------------------------------------------------------------
def delivery(status: str, send_attempts: int, reason: str | None) -> str | None:
    """An image's delivery to the PACS: sent, retrying, failed, held, waiting (built, not sent:
    queued, paused, or no PACS), or None (no result)."""
    if status == Status.SENT:
        return "sent"
    if status == Status.HELD:
        return "held"
    if status == Status.SCORED:
        return "retrying" if send_attempts > 0 else "waiting"
    if status == Status.FAILED and (reason or "").startswith("sending"):
        return "failed"
    return None


def instance_status(status: str, send_attempts: int) -> str:
    """As ``replay --json``: ``retrying`` for a built result whose delivery failed so far."""
    return "retrying" if status == Status.SCORED and send_attempts > 0 else str(status)


def instances_of(engine: Engine, study_uid: str) -> list[Instance]:
    with Session(engine, expire_on_commit=False) as s:
        return list(s.scalars(select(Instance).where(Instance.study_instance_uid == study_uid)
                              .order_by(Instance.received_at, Instance.id)))


def instance(engine: Engine, sop_uid: str) -> Instance | None:
    with Session(engine, expire_on_commit=False) as s:
        return s.scalars(select(Instance).where(Instance.sop_instance_uid == sop_uid)
                         ).one_or_none()


def dead_letters(engine: Engine, limit: int, after_id: int | None = None) -> list[Instance]:
    """Failed images, oldest first (``id`` is the keyset)."""
    q = select(Instance).where(Instance.status == Status.FAILED)
    if after_id is not None:
        q = q.where(Instance.id > after_id)
    with Session(engine, expire_on_commit=False) as s:
        return list(s.scalars(q.order_by(Instance.id).limit(limit)))


def queue_summary(engine: Engine, pacs_configured: bool) -> dict[str, Any]:
    """Images per status (``retrying``: waiting for a retry after a failed attempt), the queue
    depth (rows due to process / to send now) and the dead letters; one GROUP BY."""
    now = utcnow()
    due = case((Instance.next_attempt_at <= now, 1), else_=0)
    retrying = case((Instance.reason.startswith("retrying", autoescape=True), 1), else_=0)
    q = (select(Instance.status, func.count(), func.sum(due), func.sum(retrying))
         .group_by(Instance.status))
    with Session(engine) as s:
        rows = s.execute(q).all()
    images = {str(st): 0 for st in Status}
    depth = {"process": 0, "send": 0}
    n_retrying = 0
    for status, n, n_due, n_retry in rows:
        images[str(status)] = int(n)
        n_retrying += int(n_retry or 0)
        if status == Status.RECEIVED:
            depth["process"] = int(n_due or 0)
        elif status == Status.SCORED and pacs_configured:
            depth["send"] = int(n_due or 0)
    return {"images": images, "retrying": n_retrying, "queue_depth": depth,
            "dead_letters": images[str(Status.FAILED)]}

