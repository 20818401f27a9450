"""SQLAlchemy 2.x models. Patient-free: only UIDs, accession number and results are stored."""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import DateTime, Dialect, Float, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from cxr_worker.labels import Label, Population

__all__ = ["Base", "Instance", "Label", "Population", "Status", "utcnow"]

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

        received --process--> scored --send--> sent
            |                   |  \\--no PACS configured: stays scored (result on disk)
            |                   \\--replay --no-send: held (result on disk, never sent)
            |                   \\--send failed max_attempts times--> failed
            +--gate/decode refused--> not_scored (terminal, reason recorded)
            +--processing error max_attempts times--> failed (dead letter, reason recorded)
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

    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    scored_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    __table_args__ = (Index("ix_instances_status_next", "status", "next_attempt_at"),)


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
