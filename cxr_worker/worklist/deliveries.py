"""Deliveries: each output of an image, delivered and retried on its own (migration 0006).

A scored image has one delivery per output kind that has a destination (``sc`` and ``sr`` to
the PACS, ``hl7`` to the RIS) and, after a decision changed, a ``kos`` rejection note to the
PACS. Each row is claimed with a lease, sent, retried with backoff and dead-lettered
(``failed``, shown as "undelivered") like the processing queue (:mod:`.queue`), and every
change to a row updates its image's ``delivery`` and ``status`` in the same transaction
(:func:`refresh_instance`), which the triage list's triggers read.

The plan (:func:`apply_plan`), written in the transaction that records the score:

- an output whose result UID is the one already planned (the same decision) is the same
  object: its row is reset and the object sent again (an idempotent resend);
- another UID (another decision) is a new row; the row it replaces is kept, marked
  ``superseded_at``/``superseded_by`` (and ``rejected_by``, the rejection note that withdraws
  it from the PACS); one that never reached its destination and is not being sent becomes
  ``cancelled``;
- an output no longer produced (its kind turned off, or without a destination) is cancelled
  unless it was sent;
- a rejection note held by ``replay --no-send`` is released by the next plan that sends.

A row "may be at its destination" (:attr:`Previous.may_be_delivered`) when it was sent, when
an attempt was made (a timeout after the data went out may still have stored it), or while it
is leased (a send in progress): such a row, once replaced, is rejected rather than forgotten.
Deliveries are claimed only while their image is ``scored`` or ``sent``: an image being
processed again (a replay, a duplicate C-STORE) sends nothing until its new plan is in.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, case, func, or_, select, true, update
from sqlalchemy.orm import Session

from cxr_worker.worklist.models import Delivery, DeliveryStatus, Instance, Status, utcnow
from cxr_worker.worklist.queue import RetryPolicy

logger = logging.getLogger(__name__)

DICOM_KINDS = ("sc", "sr", "kos")  # to the PACS
KINDS = ("sc", "sr", "kos", "hl7")  # the order they are listed in
OPEN = (DeliveryStatus.PENDING, DeliveryStatus.RETRYING)  # waiting to be sent

# an image's delivery (instances.delivery) from its current rows, worst first
UNDELIVERED, HELD, RETRYING, WAITING, SENT = "undelivered", "held", "retrying", "waiting", "sent"
IMAGE_DELIVERY = (UNDELIVERED, HELD, RETRYING, WAITING, SENT)
SENDING_FAILED = "sending failed"  # the start of an undelivered image's reason
_OF_STATUS = {DeliveryStatus.FAILED: UNDELIVERED, DeliveryStatus.HELD: HELD,
              DeliveryStatus.RETRYING: RETRYING, DeliveryStatus.PENDING: WAITING,
              DeliveryStatus.SENT: SENT}


@dataclass(frozen=True)
class Planned:
    """One result object to deliver: its kind, UID (MSH-10 for hl7) and file; for DICOM its
    SOP class and series; for a rejection note the UIDs it rejects."""

    kind: str
    result_uid: str
    path: str
    sop_class_uid: str | None = None
    series_instance_uid: str | None = None
    rejects: tuple[str, ...] = ()


@dataclass(frozen=True)
class Previous:
    """A current delivery as the pipeline sees it before planning the next result."""

    id: int
    kind: str
    status: str
    result_uid: str
    sop_class_uid: str | None
    series_instance_uid: str | None
    path: str | None
    attempts: int
    leased: bool
    label: str | None
    threshold: float | None
    model_version: str | None

    @property
    def may_be_delivered(self) -> bool:
        """Sent, tried, or being sent: the destination may hold it."""
        return self.status == DeliveryStatus.SENT or self.attempts > 0 or self.leased


@dataclass(frozen=True)
class DeliveryJob:
    """A claimed delivery, detached (safe to pass between threads)."""

    id: int
    instance_id: int
    kind: str
    status: str
    attempts: int
    result_uid: str
    path: str | None
    sop_instance_uid: str  # the source image's
    study_instance_uid: str


def _leased(row: Delivery, now: dt.datetime) -> bool:
    return row.lease_owner is not None and row.lease_expires_at is not None \
        and row.lease_expires_at >= now


def history(engine: Engine, instance_id: int) -> tuple[dict[str, Previous], set[str]]:
    """The image's current ``sc``, ``sr`` and ``hl7`` deliveries by kind, and every result UID
    its deliveries ever had (a withdrawn UID is never reused), from one query."""
    now = utcnow()
    with Session(engine) as s:
        rows = s.scalars(select(Delivery).where(Delivery.instance_id == instance_id)
                         .order_by(Delivery.id)).all()
        current = {r.kind: Previous(
            r.id, r.kind, r.status, r.result_uid, r.sop_class_uid, r.series_instance_uid,
            r.path, r.attempts, _leased(r, now), r.label, r.threshold, r.model_version)
            for r in rows if r.superseded_at is None and r.kind != "kos"}
        return current, {r.result_uid for r in rows}


# -- the plan ---------------------------------------------------------------------------------
def _reset(row: Delivery, status: DeliveryStatus, now: dt.datetime) -> None:
    row.status = status
    row.attempts = 0
    row.last_error = None
    row.next_attempt_at = now
    row.sent_at = None
    if not _leased(row, now):
        row.lease_owner = row.lease_expires_at = None


def _supersede(row: Delivery, by: str | None, rejected_by: str | None,
               now: dt.datetime) -> None:
    row.superseded_at = now
    row.superseded_by = by
    row.rejected_by = rejected_by
    if row.status != DeliveryStatus.SENT and not _leased(row, now):
        row.status = DeliveryStatus.CANCELLED


def apply_plan(s: Session, instance_id: int, planned: Iterable[Planned], *, hold: bool,
               label: str, threshold: float, model_version: str) -> None:
    """Record the deliveries of a new result of the image (see the module's docstring), in
    the caller's transaction; then :func:`refresh_instance`."""
    now = utcnow()
    status = DeliveryStatus.HELD if hold else DeliveryStatus.PENDING
    planned = list(planned)
    rejected_by = {uid: p.result_uid for p in planned for uid in p.rejects}
    rows = s.scalars(select(Delivery).where(Delivery.instance_id == instance_id)
                     .order_by(Delivery.id).with_for_update()).all()
    current = {r.kind: r for r in rows if r.superseded_at is None and r.kind != "kos"}
    by_uid = {(r.kind, r.result_uid): r for r in rows}
    for p in planned:
        old = current.pop(p.kind, None) if p.kind != "kos" else None
        if old is not None and old.result_uid != p.result_uid:
            _supersede(old, p.result_uid, rejected_by.get(old.result_uid), now)
        same = by_uid.get((p.kind, p.result_uid))
        if same is not None and (same.superseded_at is None or p.kind == "kos"):
            _reset(same, status, now)  # the same object again (an identical decision)
            same.path = p.path
            continue
        s.add(Delivery(
            instance_id=instance_id, kind=p.kind, status=status, attempts=0,
            next_attempt_at=now, result_uid=p.result_uid, sop_class_uid=p.sop_class_uid,
            series_instance_uid=p.series_instance_uid, path=p.path, label=label,
            threshold=threshold, model_version=model_version, created_at=now))
    for old in current.values():  # an output no longer produced
        if old.status != DeliveryStatus.SENT:
            _supersede(old, None, rejected_by.get(old.result_uid), now)
        elif old.result_uid in rejected_by:
            _supersede(old, None, rejected_by[old.result_uid], now)
    for r in rows:
        if r.superseded_at is not None and r.rejected_by is None \
                and r.result_uid in rejected_by:  # superseded earlier, rejected now
            r.rejected_by = rejected_by[r.result_uid]
        if not hold and r.kind == "kos" and r.superseded_at is None \
                and r.status == DeliveryStatus.HELD:
            # a rejection note built by replay --no-send goes out with the results it was
            # built for (the same decision: not planned again)
            _reset(r, DeliveryStatus.PENDING, now)
    s.flush()
    refresh_instance(s, instance_id)


def image_delivery(statuses: Iterable[str]) -> str | None:
    """An image's delivery from its current rows' statuses (cancelled ones left out): the
    worst of undelivered, held, retrying, waiting, sent; None without any."""
    found = {_OF_STATUS[DeliveryStatus(st)] for st in statuses if st in _OF_STATUS}
    return next((d for d in IMAGE_DELIVERY if d in found), None)


def refresh_instance(s: Session, instance_id: int) -> None:
    """Write the image's ``delivery`` and, for a result, its ``status`` (``sent`` once every
    current delivery is sent) from its current deliveries, in the caller's transaction;
    nothing is written when nothing changed."""
    inst = s.get(Instance, instance_id, with_for_update=True)
    if inst is None:
        return
    rows = s.execute(select(Delivery.status, Delivery.sent_at, Delivery.kind,
                            Delivery.attempts, Delivery.last_error).where(
        Delivery.instance_id == instance_id, Delivery.superseded_at.is_(None))
        .order_by(Delivery.id)).all()
    state = image_delivery(r.status for r in rows)
    if inst.delivery != state:
        inst.delivery = state
    if inst.status in (Status.SCORED, Status.SENT, Status.HELD):
        # the image's reason says why its result is undelivered (as the list shows reasons)
        failed = [r for r in rows if r.status == DeliveryStatus.FAILED]
        reason = (f"{SENDING_FAILED} {failed[0].attempts} times ({failed[0].kind}): "
                  f"{failed[0].last_error or '?'}")[:2000] if failed else None
        if reason is not None and inst.reason != reason:
            inst.reason = reason
        elif reason is None and (inst.reason or "").startswith(SENDING_FAILED):
            inst.reason = None
    if inst.status in (Status.SCORED, Status.SENT):
        if state == SENT and inst.status != Status.SENT:
            inst.status = Status.SENT
            inst.sent_at = max((r.sent_at for r in rows if r.sent_at is not None),
                               default=utcnow())
        elif state not in (SENT, None) and inst.status == Status.SENT:
            inst.status = Status.SCORED
            inst.sent_at = None


# -- claims -----------------------------------------------------------------------------------
def lease_current(s: Session, instance_id: int, *, owner: str, lease_seconds: float,
                  kinds: Collection[str], sop_instance_uid: str, study_instance_uid: str
                  ) -> list[DeliveryJob]:
    """Lease the image's pending current deliveries of ``kinds`` to ``owner``, in the caller's
    transaction (the one that records them, :func:`apply_plan`): the scoring hands them to
    its own sender without a claim. Returns them, oldest first."""
    now = utcnow()
    rows = s.scalars(select(Delivery).where(
        Delivery.instance_id == instance_id, Delivery.superseded_at.is_(None),
        Delivery.status == DeliveryStatus.PENDING, Delivery.kind.in_(list(kinds)),
        Delivery.next_attempt_at <= now).order_by(Delivery.id)).all()
    out = []
    for row in rows:
        if _leased(row, now):  # another owner's send of it in progress
            continue
        row.lease_owner = owner
        row.lease_expires_at = now + dt.timedelta(seconds=lease_seconds)
        out.append(DeliveryJob(row.id, instance_id, row.kind, row.status, row.attempts,
                               row.result_uid, row.path, sop_instance_uid,
                               study_instance_uid))
    return out


def claim(engine: Engine, owner: str, lease_seconds: float, kinds: Collection[str],
          only_instance_ids: Collection[int] | None = None) -> DeliveryJob | None:
    """Lease the next due delivery of ``kinds`` (oldest first; among the deliveries of
    ``only_instance_ids`` if given) whose image is scored or sent."""
    if not kinds:
        return None
    now = utcnow()
    free = or_(Delivery.lease_expires_at.is_(None), Delivery.lease_expires_at < now)
    with Session(engine) as s, s.begin():
        candidates = (
            select(Delivery.id)
            .join(Instance, Instance.id == Delivery.instance_id)
            .where(Delivery.status.in_(OPEN), Delivery.superseded_at.is_(None),
                   Delivery.kind.in_(list(kinds)), Delivery.next_attempt_at <= now, free,
                   Instance.status.in_((Status.SCORED, Status.SENT)))
            .where(Delivery.instance_id.in_(list(only_instance_ids))
                   if only_instance_ids is not None else true())
            .order_by(Delivery.next_attempt_at, Delivery.id)
            .limit(5)
            .with_for_update(of=Delivery, skip_locked=True)
        )
        for delivery_id in s.scalars(candidates).all():
            res = s.execute(
                update(Delivery)
                .where(Delivery.id == delivery_id, Delivery.status.in_(OPEN),
                       Delivery.superseded_at.is_(None), free)
                .values(lease_owner=owner,
                        lease_expires_at=now + dt.timedelta(seconds=lease_seconds)))
            if res.rowcount == 1:  # type: ignore[attr-defined]
                row = s.get(Delivery, delivery_id)
                inst = s.get(Instance, row.instance_id) if row is not None else None
                assert row is not None and inst is not None
                s.refresh(row)
                return DeliveryJob(row.id, row.instance_id, row.kind, row.status, row.attempts,
                                   row.result_uid, row.path, inst.sop_instance_uid,
                                   inst.study_instance_uid)
    return None


def next_due(engine: Engine, kinds: Collection[str]) -> dt.datetime | None:
    """When the next delivery of ``kinds`` becomes due that is not due now (a retry, or the
    end of a lease); None when there is none (see :func:`.queue.next_due`)."""
    now = utcnow()
    with Session(engine) as s:
        retry, lease = s.execute(
            select(func.min(Delivery.next_attempt_at).filter(Delivery.next_attempt_at > now),
                   func.min(Delivery.lease_expires_at).filter(Delivery.lease_expires_at >= now))
            .where(Delivery.status.in_(OPEN), Delivery.superseded_at.is_(None),
                   Delivery.kind.in_(list(kinds)))
        ).one()
    return min((t for t in (retry, lease) if t is not None), default=None)


def _finish(engine: Engine, job: DeliveryJob, owner: str,
            values: dict[str, Any] | None = None) -> bool:
    """Apply ``values`` and drop the lease, only if we still hold it; then refresh the image.
    The image row is locked first, as everywhere (no lock-order deadlock with a plan)."""
    with Session(engine) as s, s.begin():
        s.get(Instance, job.instance_id, with_for_update=True)
        row = s.get(Delivery, job.id, with_for_update=True)
        if row is None or row.lease_owner != owner:
            done = False
        else:
            for k, v in (values or {}).items():
                setattr(row, k, v)
            row.lease_owner = row.lease_expires_at = None
            s.flush()
            refresh_instance(s, row.instance_id)
            done = True
    if not done:
        logger.warning("lost the lease on the %s delivery of %s; it was taken over",
                       job.kind, job.sop_instance_uid)
    return done


def mark_sent(engine: Engine, job: DeliveryJob, owner: str) -> bool:
    """Delivered (also when a later decision superseded it meanwhile: it did arrive)."""
    return _finish(engine, job, owner, {"status": DeliveryStatus.SENT, "last_error": None,
                                        "sent_at": utcnow()})


def mark_failed(engine: Engine, job: DeliveryJob, owner: str, error: str, *,
                policy: RetryPolicy) -> str:
    """Count a failed attempt: retry later with exponential backoff, or the dead letter
    (``failed``) after ``policy.max_attempts``; a superseded delivery is not retried
    (``cancelled``). Returns the new status."""
    attempts = job.attempts + 1
    with Session(engine) as s:
        superseded = s.scalar(select(Delivery.superseded_at).where(Delivery.id == job.id))
    if superseded is not None:
        status, delay = DeliveryStatus.CANCELLED, 0.0
    elif attempts >= policy.max_attempts:
        status, delay = DeliveryStatus.FAILED, 0.0
    else:
        status = DeliveryStatus.RETRYING
        delay = min(policy.base_seconds * 2 ** (attempts - 1), policy.max_seconds)
    _finish(engine, job, owner, {
        "status": status, "attempts": attempts, "last_error": error[:2000],
        "next_attempt_at": utcnow() + dt.timedelta(seconds=delay)})
    return str(status)


def give_back(engine: Engine, job: DeliveryJob, owner: str) -> bool:
    """Drop the lease without counting an attempt (a send interrupted by the shutdown)."""
    return _finish(engine, job, owner)


def release_leases(engine: Engine, owner: str) -> int:
    """Give back every delivery lease ``owner`` holds (graceful shutdown)."""
    with Session(engine) as s, s.begin():
        res = s.execute(update(Delivery).where(Delivery.lease_owner == owner)
                        .values(lease_owner=None, lease_expires_at=None))
        return int(res.rowcount)  # type: ignore[attr-defined]


# -- retry ------------------------------------------------------------------------------------
def retry_failed(engine: Engine, *, instance_ids: Collection[int] | None = None) -> int:
    """Queue the dead-lettered (``failed``) current deliveries again, of ``instance_ids`` or
    all: attempts start over, sent at once. Returns how many."""
    now = utcnow()
    with Session(engine) as s, s.begin():
        q = select(Delivery).where(Delivery.status == DeliveryStatus.FAILED,
                                   Delivery.superseded_at.is_(None))
        if instance_ids is not None:
            q = q.where(Delivery.instance_id.in_(list(instance_ids)))
        ids = set(s.scalars(q.with_only_columns(Delivery.instance_id)))
        if not ids:
            return 0
        s.scalars(select(Instance.id).where(Instance.id.in_(ids)).order_by(Instance.id)
                  .with_for_update()).all()  # the images first, as everywhere
        rows = s.scalars(q.where(Delivery.instance_id.in_(ids)).with_for_update()).all()
        for row in rows:
            row.status = DeliveryStatus.PENDING
            row.attempts = 0
            row.next_attempt_at = now
            row.lease_owner = row.lease_expires_at = None
        s.flush()
        for instance_id in {r.instance_id for r in rows}:
            refresh_instance(s, instance_id)
        return len(rows)


# -- reading ----------------------------------------------------------------------------------
def as_json(row: Delivery) -> dict[str, Any]:
    """One delivery as the API, ``worklist --json`` (per image) and ``replay --json`` give it."""
    return {
        "kind": row.kind, "status": row.status, "attempts": row.attempts,
        "last_error": row.last_error, "result_uid": row.result_uid,
        "label": row.label, "threshold": row.threshold, "model_version": row.model_version,
        "sent_at": row.sent_at.isoformat() if row.sent_at else None,
        "superseded_at": row.superseded_at.isoformat() if row.superseded_at else None,
        "superseded_by": row.superseded_by, "rejected_by": row.rejected_by}


def of_instances(engine: Engine, instance_ids: Collection[int]) -> dict[int, list[Delivery]]:
    """Every delivery of each image (current and superseded), in kind order, oldest first."""
    out: dict[int, list[Delivery]] = {i: [] for i in instance_ids}
    if not instance_ids:
        return out
    with Session(engine, expire_on_commit=False) as s:
        for row in s.scalars(select(Delivery).where(
                Delivery.instance_id.in_(list(instance_ids))).order_by(Delivery.id)):
            out[row.instance_id].append(row)
    for rows in out.values():
        rows.sort(key=lambda r: (KINDS.index(r.kind) if r.kind in KINDS else 9, r.id))
    return out


# worst first: what a study shows for a kind when its images' deliveries differ
_STUDY_ORDER = (DeliveryStatus.FAILED, DeliveryStatus.RETRYING, DeliveryStatus.PENDING,
                DeliveryStatus.HELD, DeliveryStatus.SENT)


def of_studies(engine: Engine, study_uids: Collection[str]) -> dict[str, list[dict[str, Any]]]:
    """Per study, one entry per output kind over its images' current deliveries: the worst
    status (failed, retrying, pending, held, sent), the most attempts, and the last error of
    a delivery in that status: ``[{"kind", "status", "attempts", "last_error"}]``. One
    query for the page's studies."""
    out: dict[str, list[dict[str, Any]]] = {u: [] for u in study_uids}
    if not study_uids:
        return out
    q = (select(Instance.study_instance_uid, Delivery.kind, Delivery.status, Delivery.attempts,
                Delivery.last_error)
         .join(Instance, Instance.id == Delivery.instance_id)
         .where(Instance.study_instance_uid.in_(list(study_uids)),
                Delivery.superseded_at.is_(None),
                Delivery.status != DeliveryStatus.CANCELLED,
                Instance.status.in_((Status.SCORED, Status.SENT, Status.HELD)))
         .order_by(Delivery.id))
    grouped: dict[tuple[str, str], list[tuple[str, int, str | None]]] = {}
    with Session(engine) as s:
        for study, kind, status, attempts, error in s.execute(q):
            grouped.setdefault((study, kind), []).append((status, attempts, error))
    for (study, kind), rows in grouped.items():
        worst = min(rows, key=lambda r: _STUDY_ORDER.index(DeliveryStatus(r[0])))
        out[study].append({"kind": kind, "status": worst[0],
                           "attempts": max(r[1] for r in rows), "last_error": worst[2]})
    for entries in out.values():
        entries.sort(key=lambda e: KINDS.index(e["kind"]) if e["kind"] in KINDS else 9)
    return out


def counts(engine: Engine) -> list[tuple[str, str, bool, int]]:
    """(kind, status, due now, deliveries) of the current deliveries: one GROUP BY."""
    now = utcnow()
    due = case((Delivery.next_attempt_at <= now, 1), else_=0)
    q = (select(Delivery.kind, Delivery.status, due.label("due"), func.count())
         .where(Delivery.superseded_at.is_(None))
         .group_by(Delivery.kind, Delivery.status, "due"))
    with Session(engine) as s:
        return [(str(k), str(st), bool(d), int(n)) for k, st, d, n in s.execute(q)]

