"""A row's reason as a bounded label: the gate rule, or what befell the image.

Reasons are free text (they quote escaped values); counting them as they are would make one
label per sender-supplied string. Metrics (``cxr_worker_images{reason}``) and ``cxr-worker
stats`` both count by this SQL expression, so the two agree and the database does the work.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import case

from cxr_worker.gate import RULES
from cxr_worker.worklist.models import Instance, Status

__all__ = ["reason_bucket"]


def reason_bucket() -> Any:
    """The SQL expression that buckets a row's reason into a bounded label value."""
    reason = Instance.reason
    refused = case(
        *((reason.startswith(f"out of scope ({rule})", autoescape=True), rule) for rule in RULES),
        (reason.contains("kept in quarantine", autoescape=True), "quarantined"),
        (reason.startswith("spooled file is missing", autoescape=True), "file_missing"),
        else_="other")
    return case(
        (Instance.status == Status.NOT_SCORED, refused),
        (Instance.status == Status.FAILED,
         case((reason.startswith("sending", autoescape=True), "send"), else_="process")),
        (reason.startswith("retrying", autoescape=True), "retrying"),
        else_="")
