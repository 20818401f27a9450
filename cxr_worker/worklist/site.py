"""Site operating points: the thresholds ``cxr-worker calibrate --apply`` records.

A site threshold belongs to one model version: a threshold chosen on another model's scores
means nothing for this one, so a row applies only while its ``model_version`` is the served
model's. The newest row for the model wins; older rows stay as the history of the site's
choices (value, target, counts, sha256 of the file list, time).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from cxr_worker.worklist.models import SiteThreshold, utcnow

__all__ = ["SiteThreshold", "describe", "latest", "record"]


def record(engine: Engine, row: SiteThreshold) -> SiteThreshold:
    if row.created_at is None:
        row.created_at = utcnow()
    with Session(engine, expire_on_commit=False) as s:
        s.add(row)
        s.commit()
    return row


def latest(engine: Engine, model_version: str) -> SiteThreshold | None:
    with Session(engine, expire_on_commit=False) as s:
        return s.scalars(
            select(SiteThreshold).where(SiteThreshold.model_version == model_version)
            .order_by(SiteThreshold.id.desc()).limit(1)).first()


def describe(row: SiteThreshold) -> str:
    """``"site threshold, calibrated 2026-11-26 on 150 images"``."""
    when: dt.datetime = row.created_at
    return (f"site threshold, calibrated {when:%Y-%m-%d} on "
            f"{row.n_normal + row.n_pneumonia} images")
