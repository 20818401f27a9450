"""SQLAlchemy 2.x models. Patient-free: only UIDs, accession number and results are stored."""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import BigInteger, DateTime, Dialect, Float, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from cxr_worker.labels import Label, Population

__all__ = ["Base", "Delivery", "DeliveryStatus", "Instance", "Label", "Population", "Status",
           "utcnow"]

UID = String(64)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps naive text)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(dt.UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    pass


class Status(enum.StrEnum):
    """Where an instance stands. Transitions::

        received --process--> scored --deliveries sent--> sent
            |                   |  \\--no PACS configured: stays scored (result on disk)
            |                   \\--replay --no-send: held (result on disk, never sent)
            +--gate/decode refused--> not_scored (terminal, reason recorded)
            +--processing error max_attempts times--> failed (dead letter, reason recorded)

    ``scored -> sent`` once every current delivery (``deliveries``, migration 0006) is sent;
    a delivery that fails max_attempts times leaves the instance ``scored`` with its score
    and label, its ``delivery`` column ``undelivered``.
    """

    RECEIVED = "received"
    SCORED = "scored"
    HELD = "held"  # scored by ``replay --no-send``: result kept, not sent until replayed
    SENT = "sent"
    NOT_SCORED = "not_scored"
    FAILED = "failed"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    accession_number: Mapped[str] = mapped_column(String(16), default="")
    calling_ae_title: Mapped[str] = mapped_column(String(16), default="")
    transfer_syntax_uid: Mapped[str] = mapped_column(UID, default="")
    spool_path: Mapped[str] = mapped_column(Text)
    # a salted hash of the Patient ID the image came with (``queue.patient_key``), never the
    # ID: a re-sent SOP Instance UID of another patient is refused (migration 0004); null on
    # rows received before it
    patient_key: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Study Date + Study Time as the modality wrote them, ISO text without a zone (its local
    # time; migration 0007); null without a usable Study Date
    study_datetime: Mapped[str | None] = mapped_column(String(19), nullable=True)

    status: Mapped[str] = mapped_column(String(16), default=Status.RECEIVED)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    send_attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(
        UTCDateTime(), nullable=True
    )

    probability: Mapped[float | None] = mapped_column(Float, nullable=True)
    label: Mapped[str | None] = mapped_column(String(32), nullable=True)
    threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    model_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # in_population | outside | unknown (labels.Population); set by the gate, "unknown" until
    # the gate has seen the image; shown beside the label (migration 0002)
    population: Mapped[str] = mapped_column(
        String(16), default=Population.IN, server_default=Population.IN.value)
    result_sop_instance_uid: Mapped[str | None] = mapped_column(UID, nullable=True)
    result_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    # the state of its current deliveries (``deliveries``), kept by the application in the
    # transaction that changes them (cxr_worker.worklist.deliveries.refresh_instance), so the
    # triage list's triggers see it: waiting | retrying | sent | undelivered | held, or null
    # (no delivery: no output has a destination, or no result) (migration 0006)
    delivery: Mapped[str | None] = mapped_column(String(16), nullable=True)

    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    scored_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    __table_args__ = (
        Index("ix_instances_status_next", "status", "next_attempt_at"),
        Index("ix_instances_received_at", "received_at"),  # replay --since (migration 0005)
    )


class DeliveryStatus(enum.StrEnum):
    r"""Where one delivery (one result object to one destination) stands::

        pending --sent--> sent
           \--attempt failed--> retrying --...--> failed (dead letter: "undelivered")
        held: built by ``replay --no-send``, never sent until replayed
        cancelled: replaced by another result before any attempt reached its destination
    """

    PENDING = "pending"
    RETRYING = "retrying"
    SENT = "sent"
    FAILED = "failed"
    HELD = "held"
    CANCELLED = "cancelled"


class Delivery(Base):
    """One result object of one instance for one destination (migration 0006): the Secondary
    Capture (``sc``), the Structured Report (``sr``), a rejection note (``kos``: a Key Object
    Selection that withdraws earlier results) to the PACS, or the ORU (``hl7``) to the RIS.

    Each is claimed, sent, retried and dead-lettered on its own. ``result_uid`` is the
    object's SOP Instance UID (MSH-10 for ``hl7``); it depends on the decision, so a replay
    that changes the decision makes a new row, and the row it replaces gets ``superseded_at``
    and ``superseded_by`` (the new UID): the worklist keeps both. Current rows are those not
    superseded."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    instance_id: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(8))  # sc | sr | kos | hl7
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    result_uid: Mapped[str] = mapped_column(UID)
    sop_class_uid: Mapped[str | None] = mapped_column(UID, nullable=True)  # DICOM kinds
    series_instance_uid: Mapped[str | None] = mapped_column(UID, nullable=True)
    path: Mapped[str | None] = mapped_column(Text, nullable=True)  # cleared by retention
    # the decision it carries (a kos: the decision that replaced the rejected results)
    label: Mapped[str | None] = mapped_column(String(32), nullable=True)
    threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    model_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    superseded_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    superseded_by: Mapped[str | None] = mapped_column(UID, nullable=True)
    rejected_by: Mapped[str | None] = mapped_column(UID, nullable=True)  # the kos's UID

    __table_args__ = (
        Index("ix_deliveries_instance", "instance_id", "kind"),
        Index("ix_deliveries_due", "status", "next_attempt_at"),
    )


class SiteThreshold(Base):
    """An operating point chosen on a site's own labelled images (``calibrate --apply``)."""

    __tablename__ = "site_thresholds"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_version: Mapped[str] = mapped_column(String(64))
    threshold: Mapped[float] = mapped_column(Float)
    target_sensitivity: Mapped[float] = mapped_column(Float)
    n_normal: Mapped[int] = mapped_column(Integer)
    n_pneumonia: Mapped[int] = mapped_column(Integer)
    n_refused: Mapped[int] = mapped_column(Integer)
    sensitivity: Mapped[float] = mapped_column(Float)
    specificity: Mapped[float] = mapped_column(Float)
    positive_rate: Mapped[float] = mapped_column(Float)
    file_list_sha256: Mapped[str] = mapped_column(String(64))
    data: Mapped[str] = mapped_column(Text)  # the data folder or CSV it was chosen on
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)

    __table_args__ = (Index("ix_site_thresholds_model", "model_version", "id"),)


# -- the web worklist (migration 0005) ------------------------------------------------------
class ApiToken(Base):
    """An API token (``cxr-worker token create``): only the SHA-256 of the token is stored.

    ``name`` is what the worklist records as who did something (``study_reads.read_by``);
    names are never reused, even after a revocation, so that record stays unambiguous.
    """

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # reader | admin
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class ApiSession(Base):
    """A browser session opened with a token (``POST /api/v1/session``): the SHA-256 of the
    cookie's value, the token it was opened with (revoking the token ends its sessions)."""

    __tablename__ = "api_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    session_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    token_id: Mapped[int] = mapped_column(Integer, index=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class StudyRead(Base):
    """A study marked read (``POST /api/v1/studies/{uid}/read``): who (the token's name) and
    when. The study leaves the active list until an image of it arrives after ``read_at``."""

    __tablename__ = "study_reads"

    study_instance_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    read_by: Mapped[str] = mapped_column(String(64))
    read_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class WorkerState(Base):
    """Operator switches that outlive a restart and reach every process of the worker (e.g.
    ``sending_paused``, set from the admin API); one row per key."""

    __tablename__ = "worker_state"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    updated_by: Mapped[str] = mapped_column(String(64), default="")
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class WorklistVersion(Base):
    """One row: a counter that database triggers (migration 0005) raise whenever a change
    visible in the triage list commits (instances, study_reads); the web API's ETag and its
    server-sent ``changed`` event read it, once a second, instead of the list itself."""

    __tablename__ = "worklist_version"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, default=0)


class StudySummary(Base):
    """One row per study: the triage list's aggregates, kept in step with ``instances`` and
    ``study_reads`` by database triggers (migration 0005), so that a page of the list is an
    index range scan instead of a GROUP BY over every image of every year. Never written by
    the application; see :mod:`cxr_worker.worklist.studies` for what each column means."""

    __tablename__ = "study_summary"

    study_instance_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    accession_number: Mapped[str] = mapped_column(String(16))
    images: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())  # first image
    last_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    status: Mapped[str] = mapped_column(String(16))
    label: Mapped[str] = mapped_column(String(32))
    band: Mapped[str] = mapped_column(String(16))  # studies.BANDS
    band_rank: Mapped[int] = mapped_column(Integer)  # the order: studies.RANK_BANDS
    probability_key: Mapped[float] = mapped_column(Float)  # -probability when suspected, else 0
    probability: Mapped[float | None] = mapped_column(Float, nullable=True)
    threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    model_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    population_rank: Mapped[int] = mapped_column(Integer)  # 0 in, 1 unknown, 2 outside
    scored_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    is_read: Mapped[int] = mapped_column(Integer)  # 1: marked read after its last image
    read_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    read_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    __table_args__ = (
        Index("ix_study_summary_order", "is_read", "band_rank", "probability_key",
              "received_at", "study_instance_uid"),
        Index("ix_study_summary_band", "is_read", "band", "band_rank", "probability_key",
              "received_at", "study_instance_uid"),
        Index("ix_study_summary_status", "status", "is_read", "band_rank", "probability_key",
              "received_at", "study_instance_uid"),
        Index("ix_study_summary_last_received_at", "last_received_at"),
        Index("ix_study_summary_accession_number", "accession_number"),
    )
