"""The triage list: one row per study, suspected pneumonia first.

Ordering (what a reading queue needs), in three groups:

1. suspected pneumonia in the validated population (``in_population``), highest probability
   first;
2. suspected pneumonia outside the validated population or of unknown population (no usable
   patient age), highest probability first: the model was not validated on them, so their
   score must never push a study the model was validated on down the list, yet a suspected
   result is still read before the negatives;
3. every other study by arrival, oldest first.

Ties keep arrival order. A study's population is that of its scored images (``outside``
beats ``unknown`` beats ``in_population``); a study without a scored image takes its
images' (``unknown`` until the gate has seen them, or what a ``patient_age`` refusal found).
A study that was not scored (all images refused, failed, or still pending) shows that
status and its reason, never a negative label.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from cxr_worker.worklist.models import Instance, Label, Population, Status


@dataclass(frozen=True)
class StudyRow:
    study_instance_uid: str
    accession_number: str
    status: str  # pending | scored | sent | retrying | held | not_scored | failed
    label: str  # SUSPECTED PNEUMONIA | NO PNEUMONIA DETECTED | NOT SCORED | PENDING | FAILED
    probability: float | None
    threshold: float | None
    model_version: str | None
    population: str  # in_population | outside | unknown
    reason: str | None
    images: int
    received_at: dt.datetime
    scored_at: dt.datetime | None
    sent_at: dt.datetime | None

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("received_at", "scored_at", "sent_at"):
            d[k] = d[k].isoformat() if d[k] else None
        return d


STATUS_FILTERS = (
    "pending", "scored", "sent", "retrying", "held", "not_scored", "failed", "suspected")


def _study_row(rows: list[Instance]) -> StudyRow:
    scored = [r for r in rows if r.status in (Status.SCORED, Status.SENT, Status.HELD)]
    pending = [r for r in rows if r.status == Status.RECEIVED]
    failed = [r for r in rows if r.status == Status.FAILED]
    first = min(rows, key=lambda r: r.received_at)
    reasons = sorted({r.reason for r in rows if r.reason})
    base: dict[str, Any] = {
        "study_instance_uid": first.study_instance_uid,
        "accession_number": first.accession_number,
        "images": len(rows),
        "received_at": first.received_at,
        "reason": "; ".join(reasons) or None,
    }
    if scored:
        top = max(scored, key=lambda r: r.probability or 0.0)
        suspected = any(r.label == Label.SUSPECTED for r in scored)
        if failed:
            status = "failed"
        elif any(r.status == Status.SCORED and r.send_attempts > 0 for r in scored):
            status = "retrying"
        elif all(r.status == Status.SENT for r in scored):
            status = "sent"
        elif any(r.status == Status.HELD for r in scored):
            status = "held"
        else:
            status = "scored"
        sent_times = [r.sent_at for r in scored if r.sent_at]
        return StudyRow(
            **base,
            status=status,
            label=Label.SUSPECTED if suspected else Label.NEGATIVE,
            probability=top.probability,
            threshold=top.threshold,
            model_version=top.model_version,
            population=str(Population.worst([r.population for r in scored])),
            scored_at=max((r.scored_at for r in scored if r.scored_at), default=None),
            sent_at=max(sent_times) if sent_times and status == "sent" else None,
        )
    if pending:
        status, label = "pending", "PENDING"
    elif failed:
        status, label = "failed", "FAILED"
    else:
        status, label = "not_scored", "NOT SCORED"
    return StudyRow(**base, status=status, label=label, probability=None, threshold=None,
                    model_version=None,
                    population=str(Population.worst([r.population for r in rows])),
                    scored_at=None, sent_at=None)


def triage_list(
    engine: Engine, status: str | None = None, limit: int | None = 50,
    since: dt.datetime | None = None,
) -> list[StudyRow]:
    """Studies in triage order, optionally filtered by study status (or ``suspected``) and
    to studies with an image received at or after ``since``."""
    query = select(Instance)
    if since is not None:
        recent = select(Instance.study_instance_uid).where(Instance.received_at >= since)
        query = query.where(Instance.study_instance_uid.in_(recent))
    with Session(engine) as s:
        instances = s.scalars(query).all()
        by_study: dict[str, list[Instance]] = defaultdict(list)
        for r in instances:
            by_study[r.study_instance_uid].append(r)
        studies = [_study_row(rows) for rows in by_study.values()]
    if status == "suspected":
        studies = [r for r in studies if r.label == Label.SUSPECTED]
    elif status:
        studies = [r for r in studies if r.status == status]
    studies.sort(key=_triage_key)
    return studies[:limit] if limit else studies


def _triage_key(r: StudyRow) -> tuple[int, float, float]:
    """See the module docstring: validated suspected, then other suspected, then arrival."""
    if r.label == Label.SUSPECTED:
        group = 0 if r.population == Population.IN else 1
        return (group, -(r.probability or 0.0), r.received_at.timestamp())
    return (2, 0.0, r.received_at.timestamp())
