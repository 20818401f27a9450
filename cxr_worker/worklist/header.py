"""What the worklist keeps of a received image's header: one :class:`InstanceHeader`, taken
from the data set the same way by the listener (:func:`cxr_worker.receive.handle_store`) and
by ``replay`` (:mod:`cxr_worker.replay`).

Only UIDs, the accession number, the study's date and time and a salted hash of the Patient
ID (:func:`cxr_worker.worklist.queue.patient_key`) are taken: the worklist is patient-free.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import asdict, dataclass
from typing import Any

from pydicom.dataset import Dataset

from cxr_worker.spool import is_valid_uid
from cxr_worker.worklist.queue import patient_key

UID_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
ACCESSION_CHARS = 16  # the column's width (and the AccessionNumber VR's, SH)


def invalid_uids(ds: Dataset) -> list[str]:
    """The UID attributes of ``ds`` that are missing or not valid UIDs (keywords only: the
    values came from the peer and may be anything). Checked before
    :meth:`InstanceHeader.from_dataset`, so that no such value reaches a file name, the
    worklist (PostgreSQL holds 64 characters) or a result."""
    bad = []
    for keyword in UID_KEYWORDS:
        value = ds.get(keyword)
        if value is None or not isinstance(value, str) or not is_valid_uid(str(value)):
            bad.append(keyword)
    return bad


_DA = re.compile(r"(\d{4})(\d{2})(\d{2})")
_TM = re.compile(r"(\d{2})(\d{2})?(\d{2})?(?:\.\d{1,6})?")


def _raw_text(ds: Dataset, keyword: str) -> str:
    """An element's text as received, without pydicom converting it (an invalid DA or TM
    would warn, from every association thread, and the warning would quote the value)."""
    elem = ds.get_item(keyword)
    value = elem.value if elem is not None else None
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value or "").strip(" \x00")


def study_datetime(ds: Dataset) -> str | None:
    """Study Date + Study Time as ``YYYY-MM-DDTHH:MM:SS`` (the modality's local time, no
    zone), or None when the Study Date is absent or not a real date. A Study Time that is
    absent or invalid counts as midnight; ``HH`` and ``HHMM`` (PS3.5 TM) are completed
    with zeros. Only digits leave this function: the values came from the sender."""
    date = _DA.fullmatch(_raw_text(ds, "StudyDate"))
    if date is None:
        return None
    try:
        day = dt.date(int(date[1]), int(date[2]), int(date[3]))
    except ValueError:
        return None
    tm = _TM.fullmatch(_raw_text(ds, "StudyTime"))
    hms = (0, 0, 0)
    if tm is not None:
        h, m, sec = (int(x) if x else 0 for x in tm.groups())
        if h < 24 and m < 60 and sec < 60:  # 60: a leap second, shown as :59
            hms = (h, m, sec)
        elif h < 24 and m < 60 and sec == 60:
            hms = (h, m, 59)
    return dt.datetime.combine(day, dt.time(*hms)).isoformat()


@dataclass(frozen=True)
class InstanceHeader:
    """The worklist row's values that come from the image's header (``instances`` columns of
    the same names)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    accession_number: str
    patient_key: str
    study_datetime: str | None

    @classmethod
    def from_dataset(cls, ds: Dataset, sop_class_uid: str | None = None) -> InstanceHeader:
        """The values of ``ds``, whose UIDs are valid (:func:`invalid_uids` is empty);
        ``sop_class_uid``: the C-STORE's Affected SOP Class UID, else the data set's own.
        Raises what pydicom raises on a value it cannot read."""
        sop_uid = str(ds.SOPInstanceUID)
        return cls(
            sop_instance_uid=sop_uid,
            sop_class_uid=sop_class_uid if sop_class_uid is not None else str(ds.SOPClassUID),
            study_instance_uid=str(ds.StudyInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            accession_number=str(ds.get("AccessionNumber", "") or "")[:ACCESSION_CHARS],
            patient_key=patient_key(sop_uid, str(ds.get("PatientID", "") or "")),
            study_datetime=study_datetime(ds))

    def row_values(self, *, calling_ae_title: str, transfer_syntax_uid: str,
                   spool_path: str) -> dict[str, Any]:
        """The keyword arguments of :func:`~cxr_worker.worklist.queue.enqueue` (and
        ``check_conflict``) for this image, spooled at ``spool_path``."""
        return {**asdict(self), "calling_ae_title": calling_ae_title,
                "transfer_syntax_uid": transfer_syntax_uid, "spool_path": spool_path}
