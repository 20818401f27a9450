"""The triage list: one row per study, in bands, computed by ONE SQL statement.

Bands, in this order (``band`` in each row; the ``band`` filter gives one alone):

1. ``suspected``: suspected pneumonia in the validated population (``in_population``),
   highest probability first;
2. ``outside``: studies scored outside the validated population or of unknown population
   (no usable patient age). Their suspected results come right after band 1, highest
   probability first: the model was not validated on them, so their score must never push
   a study the model was validated on down the list, yet a suspected result is still read
   before the negatives; their negative results come after the in-population negatives;
3. ``routine``: the other scored studies (no pneumonia detected), by arrival;
4. ``not_scored`` (every image refused, with the reasons), 5. ``pending``, 6. ``failed``
   (processing failed: a dead letter, no result), each by arrival.

So the whole list reads: in-population suspected, other suspected, in-population negatives,
other negatives, not scored, pending, failed; ties keep arrival order, then the Study
Instance UID. A study with a result is listed by its result whatever its delivery: a
suspected study whose results the PACS (or the RIS) refused stays at the top with its score
and label (its ``status`` says ``retrying``, or ``undelivered`` once a delivery failed for
good; ``status=undelivered`` / ``retrying`` filters find them; ``cxr-worker retry`` sends
again). Each row carries ``deliveries``: per output kind (``sc``, ``sr``, ``kos``, ``hl7``) the
worst state of its images' current deliveries, with attempts and the last error (one more
query for the page's studies, :func:`cxr_worker.worklist.deliveries.of_studies`).

A study's population is that of its scored images (``outside`` beats ``unknown`` beats
``in_population``); a study without a scored image takes its images' (``unknown`` until
the gate has seen them, or what a ``patient_age`` refusal found). Its probability is its
highest scored image's; its threshold and model version the highest among its scored images
(they differ only for a study scored across a model change; the study's page shows each
image's). A study that was not scored shows that status and its reasons, never a negative.

A study marked read (:mod:`cxr_worker.worklist.control`) leaves the list (``read="unread"``,
the default) until an image of it arrives after the mark.

**One statement, no aggregation per page.** The per-study aggregates (``GROUP BY
study_instance_uid`` with the ordering keys: band rank, probability key, arrival) are kept
in ``study_summary`` by database triggers, recomputed from a study's own rows whenever one
of them changes (migrations 0005 and 0006, which hold the SQL that defines status, label,
band and population). A page is ONE SELECT on it, an index range scan in list order joined to
nothing but the page's reasons (a correlated subquery over the page's rows), then one
indexed lookup of the page's deliveries. Nothing is aggregated in Python but the deliveries
of the page's few studies. Why not aggregate at read time: measured at 100,000 instances on
PostgreSQL it took 160-500 ms a page (goal: 50 ms), growing with every year of history.
Pages follow a keyset cursor (band rank, probability key, arrival, UID): no study is lost
or repeated between pages of an unchanged list, and a page that is not the last says so
(``Page.next``).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from sqlalchemy import (
    Engine,
    Float,
    Integer,
    String,
    Text,
    case,
    func,
    literal,
    select,
    tuple_,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql import expression
from sqlalchemy.sql.compiler import SQLCompiler

from cxr_worker.worklist import deliveries
from cxr_worker.worklist.models import Instance, Population, StudySummary, UTCDateTime


@dataclass(frozen=True)
class StudyRow:
    study_instance_uid: str
    accession_number: str
    status: str  # pending | scored | sent | retrying | undelivered | held | not_scored | failed
    label: str  # SUSPECTED PNEUMONIA | NO PNEUMONIA DETECTED | NOT SCORED | PENDING | FAILED
    probability: float | None
    threshold: float | None
    model_version: str | None
    population: str  # in_population | outside | unknown
    reason: str | None
    images: int
    received_at: dt.datetime  # the study's first image
    scored_at: dt.datetime | None
    sent_at: dt.datetime | None  # when every result was delivered (status "sent")
    # Study Date + Time as the modality wrote them (its local time, no zone; receive.study_
    # datetime), the earliest of the study's images; None when none had a usable Study Date
    study_datetime: str | None = None
    band: str = ""  # suspected | outside | routine | not_scored | pending | failed
    read_by: str | None = None  # the token name that marked it read (if still read)
    read_at: dt.datetime | None = None
    key_sop_instance_uid: str | None = None  # the image its row shows: the most suspicious
    # per output kind: {"kind", "status", "attempts", "last_error"} (deliveries.of_studies)
    deliveries: list[dict[str, Any]] = field(default_factory=list, compare=False)
    # the keyset position of this row (not part of the JSON; see Page.next)
    key: tuple[int, float, dt.datetime, str] | None = field(default=None, compare=False,
                                                             repr=False)

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        del d["key"]
        for k in ("received_at", "scored_at", "sent_at", "read_at"):
            d[k] = d[k].isoformat() if d[k] else None
        return d


STATUS_FILTERS = (
    "pending", "scored", "sent", "retrying", "undelivered", "held", "not_scored", "failed",
    "suspected")
# rank (the ORDER BY key) -> band
# (migration 0005 computes band and rank in SQL; tests/test_api.py checks they agree)
RANK_BANDS = ("suspected", "outside", "routine", "outside", "not_scored", "pending", "failed")
SUSPECTED_RANKS = (0, 1)
SCORED_STATUSES = ("scored", "sent", "held")
BANDS = ("suspected", "outside", "routine", "not_scored", "pending", "failed")
READ_FILTERS = ("unread", "read", "all")
_POPULATIONS = (Population.IN, Population.UNKNOWN, Population.OUTSIDE)  # by rank


@dataclass(frozen=True)
class Filters:
    """What ``GET /api/v1/studies`` and ``cxr-worker worklist`` filter on.

    ``status``: a study status or ``suspected``; ``since``: studies with an image received at
    or after it; ``accession``: the accession number, exactly; ``band``: one band;
    ``read``: ``unread`` (default: the active list), ``read`` or ``all``."""

    status: str | None = None
    since: dt.datetime | None = None
    accession: str | None = None
    band: str | None = None
    read: str = "unread"
    study_instance_uid: str | None = None  # one study (its page)

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in STATUS_FILTERS:
            raise ValueError(f"status: {self.status!r} is not one of {', '.join(STATUS_FILTERS)}")
        if self.band is not None and self.band not in BANDS:
            raise ValueError(f"band: {self.band!r} is not one of {', '.join(BANDS)}")
        if self.read not in READ_FILTERS:
            raise ValueError(f"read: {self.read!r} is not one of {', '.join(READ_FILTERS)}")
        if self.since is not None and self.since.tzinfo is None:
            raise ValueError("since: a time zone is needed")


@dataclass(frozen=True)
class Page:
    rows: list[StudyRow]
    next: str | None  # the cursor of the next page; None on the last page


def encode_cursor(key: tuple[int, float, dt.datetime, str]) -> str:
    rank, kprob, received_at, uid = key
    raw = json.dumps([rank, kprob, received_at.isoformat(), uid], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, float, dt.datetime, str]:
    """The key a cursor holds; ``ValueError`` for anything that is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        rank, kprob, received_at, uid = json.loads(raw)
        when = dt.datetime.fromisoformat(received_at)
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise ValueError("cursor: not a cursor of this list (use the 'next' value as given)"
                         ) from exc
    if (type(rank) is not int or not isinstance(kprob, int | float) or isinstance(kprob, bool)
            or not math.isfinite(kprob) or not isinstance(uid, str) or when.tzinfo is None):
        raise ValueError("cursor: not a cursor of this list (use the 'next' value as given)")
    return rank, float(kprob), when, uid


class ReasonsAgg(expression.FunctionElement[str]):
    """The distinct reasons of a study's images, '; '-joined (``string_agg`` on PostgreSQL,
    ``group_concat`` elsewhere)."""

    type = Text()
    inherit_cache = True
    name = "reasons"


@compiles(ReasonsAgg, "postgresql")
def _reasons_pg(element: ReasonsAgg, compiler: SQLCompiler, **kw: Any) -> str:
    arg = compiler.process(next(iter(element.clauses)), **kw)
    return f"string_agg(DISTINCT {arg}, '; ' ORDER BY {arg})"


@compiles(ReasonsAgg)
def _reasons_default(element: ReasonsAgg, compiler: SQLCompiler, **kw: Any) -> str:
    # SQLite's group_concat takes no separator with DISTINCT: hide the reasons' own commas
    # (as the unit separator), join with ',', then swap
    arg = compiler.process(next(iter(element.clauses)), **kw)
    return (f"replace(replace(group_concat(DISTINCT replace({arg}, ',', char(31))), ',', "
            "'; '), char(31), ',')")


def list_query(filters: Filters = Filters(), limit: int | None = 50,
               after: tuple[int, float, dt.datetime, str] | None = None) -> Any:
    """The statement: one page (``limit`` + 1 rows, to know whether there is a next page)
    of the triage list after the keyset position ``after``."""
    t = StudySummary
    q = select(t.__table__)
    if filters.status == "suspected":  # ranks 0 and 1: a range of the order's index
        q = q.where(t.band_rank <= max(SUSPECTED_RANKS))
    elif filters.status is not None:
        q = q.where(t.status == filters.status)
    if filters.band is not None:
        q = q.where(t.band == filters.band)
    if filters.read != "all":
        q = q.where(t.is_read == (1 if filters.read == "read" else 0))
    if filters.since is not None:
        q = q.where(t.last_received_at >= filters.since)
    if filters.accession is not None:
        q = q.where(t.accession_number == filters.accession)
    if filters.study_instance_uid is not None:
        q = q.where(t.study_instance_uid == filters.study_instance_uid)
    order = (t.band_rank, t.probability_key, t.received_at, t.study_instance_uid)
    if after is not None:
        rank, kprob, received_at, uid = after
        q = q.where(tuple_(*order) > tuple_(
            literal(rank, Integer()), literal(kprob, Float()),
            literal(received_at, UTCDateTime()), literal(uid, String())))
    q = q.order_by(*order)
    if limit is not None:
        q = q.limit(limit + 1)
    page = q.subquery("page")
    of_study = Instance.study_instance_uid == page.c.study_instance_uid
    reasons = select(ReasonsAgg(Instance.reason)).where(of_study).scalar_subquery()
    # the image a row shows (thumbnail, heatmap): the most suspicious scored one, else the
    # first received
    key_image = (select(Instance.sop_instance_uid).where(of_study)
                 .order_by(case((Instance.status.in_(SCORED_STATUSES), 0), else_=1),
                           Instance.probability.desc().nulls_last(), Instance.received_at,
                           Instance.id)
                 .limit(1).scalar_subquery())
    study_when = select(func.min(Instance.study_datetime)).where(of_study).scalar_subquery()
    return select(page, reasons.label("reason"), key_image.label("key_sop_instance_uid"),
                  study_when.label("study_datetime")
                  ).order_by(
        page.c.band_rank, page.c.probability_key, page.c.received_at,
        page.c.study_instance_uid)


def _row(m: Any) -> StudyRow:
    status = str(m["status"])  # probability, threshold, model: of scored images only (or None)
    rank = int(m["band_rank"])
    return StudyRow(
        study_instance_uid=m["study_instance_uid"], accession_number=m["accession_number"] or "",
        status=status, label=str(m["label"]),
        probability=m["probability"], threshold=m["threshold"],
        model_version=m["model_version"],
        population=str(_POPULATIONS[int(m["population_rank"])]), reason=m["reason"] or None,
        images=int(m["images"]), received_at=m["received_at"],
        study_datetime=m["study_datetime"], scored_at=m["scored_at"],
        sent_at=m["sent_at"], band=str(m["band"]),
        key_sop_instance_uid=m["key_sop_instance_uid"],
        read_by=m["read_by"] if m["is_read"] else None,
        read_at=m["read_at"] if m["is_read"] else None,
        key=(rank, float(m["probability_key"]), m["received_at"], m["study_instance_uid"]))


def list_studies(engine: Engine, filters: Filters = Filters(), limit: int | None = 50,
                 cursor: str | None = None) -> Page:
    """One page of the triage list (``limit`` None: all of it). ``ValueError`` for a bad
    cursor."""
    after = decode_cursor(cursor) if cursor else None
    with engine.connect() as conn:
        rows = [_row(m) for m in conn.execute(list_query(filters, limit, after)).mappings()]
    more = limit is not None and len(rows) > limit
    rows = rows[:limit] if limit is not None else rows
    outputs = deliveries.of_studies(engine, [r.study_instance_uid for r in rows])
    rows = [replace(r, deliveries=outputs[r.study_instance_uid]) for r in rows]
    return Page(rows, encode_cursor(rows[-1].key) if more and rows[-1].key else None)


def triage_list(
    engine: Engine, status: str | None = None, limit: int | None = 50,
    since: dt.datetime | None = None, read: str = "unread",
) -> list[StudyRow]:
    """The first ``limit`` studies in triage order (all with ``limit`` None), optionally
    filtered by study status (or ``suspected``) and to studies with an image received at
    or after ``since``."""
    return list_studies(engine, Filters(status=status, since=since, read=read), limit).rows
