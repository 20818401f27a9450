"""What people do to the worklist from the web API: mark a study read, replay a study,
retry a dead letter, pause and resume sending; and what the admin page reads.

``sending_paused(engine)`` is the switch the send path checks before each delivery: a row in
``worker_state`` (so it outlives a restart and reaches every process sharing the database).
While paused, results are still built and listed; their deliveries (to the PACS and the RIS)
wait as ``pending`` and go out once sending resumes.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, case, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cxr_worker.worklist import deliveries, queue
from cxr_worker.worklist.models import (
    DeliveryStatus,
    Instance,
    Status,
    StudyRead,
    WorkerState,
    utcnow,
)

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
    """Give a dead letter another round: ``send`` when its result was built and deliveries of
    it failed for good (they are queued again, the objects not rebuilt), ``process`` when
    its processing failed (status ``failed``: it goes through the pipeline again). None when
    there is no such image; ``ValueError`` when it is neither."""
    with Session(engine) as s:
        row = s.scalars(select(Instance).where(Instance.sop_instance_uid == sop_uid)
                        ).one_or_none()
        if row is None:
            return None
        row_id, status = row.id, row.status
    if deliveries.retry_failed(engine, instance_ids=[row_id]):
        return "send"
    if status != Status.FAILED:
        raise ValueError(f"image is {instance_status(status, None)}: neither its processing "
                         "nor a delivery of it failed")
    queue.requeue(engine, [row_id])
    return "process"


def retry_study(engine: Engine, study_uid: str) -> int:
    """Queue the failed deliveries of every image of a study again; how many."""
    with Session(engine) as s:
        ids = list(s.scalars(select(Instance.id).where(
            Instance.study_instance_uid == study_uid)))
    return deliveries.retry_failed(engine, instance_ids=ids) if ids else 0


# -- reading for people -----------------------------------------------------------------------
def instance_status(status: str, delivery: str | None) -> str:
    """An image's status as people read it (the API, ``replay --json``): a built result whose
    delivery failed so far is ``retrying``, one that failed for good ``undelivered`` (it keeps
    its score and label)."""
    if status == Status.SCORED and delivery in (deliveries.RETRYING, deliveries.UNDELIVERED):
        return str(delivery)
    return str(status)


def instances_of(engine: Engine, study_uid: str) -> list[Instance]:
    with Session(engine, expire_on_commit=False) as s:
        return list(s.scalars(select(Instance).where(Instance.study_instance_uid == study_uid)
                              .order_by(Instance.received_at, Instance.id)))


def instance(engine: Engine, sop_uid: str) -> Instance | None:
    with Session(engine, expire_on_commit=False) as s:
        return s.scalars(select(Instance).where(Instance.sop_instance_uid == sop_uid)
                         ).one_or_none()


def dead_letters(engine: Engine, limit: int, after_id: int | None = None) -> list[Instance]:
    """Images whose processing failed, or with a result left undelivered, oldest first
    (``id`` is the keyset)."""
    q = select(Instance).where(or_(Instance.status == Status.FAILED,
                                   Instance.delivery == deliveries.UNDELIVERED))
    if after_id is not None:
        q = q.where(Instance.id > after_id)
    with Session(engine, expire_on_commit=False) as s:
        return list(s.scalars(q.order_by(Instance.id).limit(limit)))


def queue_summary(engine: Engine, pacs_configured: bool) -> dict[str, Any]:
    """Images per status (``retrying``: waiting for a retry after a failed attempt, processing
    or delivery), the queue depth (images due to process, deliveries due to send now), the
    deliveries per kind and status, and the dead letters (images whose processing failed or
    with an undelivered result); one GROUP BY each."""
    now = utcnow()
    due = case((Instance.next_attempt_at <= now, 1), else_=0)
    retrying = case((Instance.reason.startswith("retrying", autoescape=True), 1), else_=0)
    undelivered = case((Instance.delivery == deliveries.UNDELIVERED, 1), else_=0)
    q = (select(Instance.status, func.count(), func.sum(due), func.sum(retrying),
                func.sum(undelivered)).group_by(Instance.status))
    with Session(engine) as s:
        rows = s.execute(q).all()
    images = {str(st): 0 for st in Status}
    depth = {"process": 0, "send": 0}
    n_retrying = n_undelivered = 0
    for status, n, n_due, n_retry, n_undelivered_ in rows:
        images[str(status)] = int(n)
        n_retrying += int(n_retry or 0)
        n_undelivered += int(n_undelivered_ or 0)
        if status == Status.RECEIVED:
            depth["process"] = int(n_due or 0)
    by_kind: dict[str, dict[str, int]] = {}
    for kind, status, is_due, n in deliveries.counts(engine):
        by_kind.setdefault(kind, {})[status] = by_kind.get(kind, {}).get(status, 0) + n
        if is_due and status in deliveries.OPEN:
            depth["send"] += n
    n_retrying += sum(v.get(DeliveryStatus.RETRYING, 0) for v in by_kind.values())
    return {"images": images, "retrying": n_retrying, "queue_depth": depth,
            "deliveries": by_kind, "undelivered": n_undelivered,
            "dead_letters": images[str(Status.FAILED)] + n_undelivered}

