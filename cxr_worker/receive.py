"""The DICOM listener: C-ECHO and C-STORE SCP (pynetdicom).

Runs on pynetdicom's per-association threads while the modality waits, so the C-STORE handler
does only durable work: write the Part 10 file to the spool (temp, fsync, rename), insert the
job row, then answer 0x0000. It never decodes pixels or scores. Failures are DICOM statuses,
never exceptions (PS3.4 Annex B.2.3 / GG.4):

- 0xA700 Refused: Out of Resources, when the file or the row cannot be written (disk full);
- 0xA900 Error: Data Set does not match SOP Class, when it has no Pixel Data, or a SOP Class,
  SOP Instance, Study or Series Instance UID is missing or not a valid UID (PS3.5 9.1: at most
  64 characters, digits and dots, no empty component, no leading zero); checked before
  anything is written, so that no such value reaches a file name, the worklist (PostgreSQL
  holds 64 characters) or a result. A900 rather than a Cxxx code: the value breaks the IOD's
  Type 1 rule as a missing UID does, and the sender should not retry it;
- 0xC210 Error: Cannot understand, when the data set cannot be parsed at all;
- 0xC211 Error: Cannot understand (this worker's code in the C000-CFFF range), when the SOP
  Instance UID is already held for another study or another patient: the existing row and
  file are kept and the conflict is logged (UIDs only; the Patient ID is compared as a hash).
  A re-send for the same study and patient is a success and is processed again.
"""

from __future__ import annotations

import logging
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydicom.dataset import Dataset
from pydicom.filebase import DicomFileLike
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    Verification,
)
from sqlalchemy import Engine

from cxr_worker.errors import SpoolError, UIDConflictError
from cxr_worker.spool import Spool, atomic_write, is_valid_uid
from cxr_worker.worklist import queue

logger = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_UID_CONFLICT = 0xC211

# every status the handlers return, with its meaning for the sender (the conformance
# statement, ``cxr-worker conformance``, is generated from this table)
STORE_STATUSES: dict[int, str] = {
    STATUS_SUCCESS: "Success: the file is fsynced in the spool and its job row committed; "
                    "the worker now owns the image",
    STATUS_OUT_OF_RESOURCES: "Refused: Out of Resources: the file or the job row cannot be "
                             "written (disk full, database down); the sender keeps the image "
                             "and should retry later",
    STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS: "Error: Data Set does not match SOP Class: no "
                                             "Pixel Data, or a SOP Class, SOP Instance, Study "
                                             "Instance or Series Instance UID missing or not a "
                                             "valid UID (PS3.5 9.1: at most 64 characters, "
                                             "digits and dots, no empty component, no leading "
                                             "zero); nothing is written",
    STATUS_CANNOT_UNDERSTAND: "Error: Cannot understand: the data set cannot be parsed",
    STATUS_UID_CONFLICT: "Error: Cannot understand: the SOP Instance UID is already held for "
                         "another study or patient; the image held is kept, nothing is "
                         "written (a re-send for the same study and patient succeeds)",
}

ACCEPTED_STORAGE = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    SecondaryCaptureImageStorage,
)
# accepted only when the setting named here is true: raw detector data
OPTIONAL_STORAGE: dict[str, str] = {
    DigitalXRayImageStorageForProcessing: "listener.accept_dx_for_processing",
}
# the default advertised maximum PDU length (``listener.max_pdu_bytes``): bounded, so that a
# peer cannot make the listener buffer an arbitrarily large PDU, yet large enough that a
# 10 MB image is ten P-DATA PDUs
MAX_PDU_SIZE = 1048576


@dataclass(frozen=True)
class ListenerConfig:
    ae_title: str
    allowed_calling_ae_titles: tuple[str, ...]
    accept_dx_for_processing: bool
    # association limits (``[listener]`` settings; defaults equal the settings' defaults)
    max_pdu_bytes: int = MAX_PDU_SIZE
    max_associations: int = 32
    network_timeout_seconds: float = 10.0
    acse_timeout_seconds: float = 10.0
    dimse_timeout_seconds: float = 30.0


def storage_classes(cfg: ListenerConfig) -> tuple[str, ...]:
    enabled = {"listener.accept_dx_for_processing": cfg.accept_dx_for_processing}
    extra = tuple(c for c, setting in OPTIONAL_STORAGE.items() if enabled[setting])
    return tuple(str(c) for c in ACCEPTED_STORAGE + extra)


def transfer_syntaxes() -> list[str]:
    """Every transfer syntax pydicom can read and, for encapsulated ones, decode here."""
    from pydicom.pixels.decoders.base import get_decoder

    out = []
    for ts in ALL_TRANSFER_SYNTAXES:
        uid = UID(ts)
        if not uid.is_compressed:
            out.append(ts)
            continue
        try:
            if get_decoder(uid).is_available:
                out.append(ts)
        except NotImplementedError:
            continue
    return out


def make_ae(cfg: ListenerConfig) -> AE:
    ae = AE(ae_title=cfg.ae_title)
    ae.maximum_pdu_size = cfg.max_pdu_bytes
    ae.maximum_associations = cfg.max_associations
    ae.network_timeout = cfg.network_timeout_seconds
    ae.acse_timeout = cfg.acse_timeout_seconds
    ae.dimse_timeout = cfg.dimse_timeout_seconds
    ae.add_supported_context(Verification)
    syntaxes = transfer_syntaxes()
    for sop_class in storage_classes(cfg):
        ae.add_supported_context(sop_class, syntaxes)
    if cfg.allowed_calling_ae_titles:
        ae.require_calling_aet = list(cfg.allowed_calling_ae_titles)
    return ae


def handle_echo(event: Any) -> int:
    return STATUS_SUCCESS


def _write_part10(event: Any) -> Callable[[BinaryIO], None]:
    def write(f: BinaryIO) -> None:
        f.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(DicomFileLike(f), event.file_meta)
        f.write(event.request.DataSet.getvalue())

    return write


HEADER_DEFER_BYTES = 4096


def read_header(event: Any) -> Dataset:
    """The received data set with large values (Pixel Data) left unread.

    ``event.dataset`` parses the whole stream and copies a 10 MB Pixel Data value only for
    the handler to ask whether it is there: 13 ms per image against 1 ms with deferred values
    (measured on a 2500x2048 16-bit CR). Deflated data must be inflated whole either way.
    """
    ts = event.context.transfer_syntax
    if ts.is_deflated:
        return event.dataset  # type: ignore[no-any-return]
    stream = event.request.DataSet
    stream.seek(0)
    return read_dataset(stream, ts.is_implicit_VR, ts.is_little_endian,
                        defer_size=HEADER_DEFER_BYTES)


UID_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")

# Stores of one SOP Instance UID run one at a time (a modality re-sending on several
# associations at once): the conflict check, the file and the row stay together. Striped, so
# the table stays bounded; two UIDs sharing a stripe only wait for each other.
_UID_LOCKS = tuple(threading.Lock() for _ in range(256))


def _uid_lock(sop_uid: str) -> threading.Lock:
    return _UID_LOCKS[zlib.crc32(sop_uid.encode("ascii", "replace")) % len(_UID_LOCKS)]


def invalid_uids(ds: Dataset) -> list[str]:
    """The UID attributes of ``ds`` that are missing or not valid UIDs (keywords only: the
    values came from the peer and may be anything)."""
    bad = []
    for keyword in UID_KEYWORDS:
        value = ds.get(keyword)
        if value is None or not isinstance(value, str) or not is_valid_uid(str(value)):
            bad.append(keyword)
    return bad


def handle_store(event: Any, engine: Engine, spool: Spool, on_stored: Callable[[], None]) -> int:
    """C-STORE: validate the UIDs, spool durably, insert the row, acknowledge."""
    try:
        ds = read_header(event)
        bad = invalid_uids(ds)
        if bad:
            logger.warning("C-STORE refused: %s missing or not a valid UID", ", ".join(bad))
            return STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS
        sop_uid = str(ds.SOPInstanceUID)
        study_uid = str(ds.StudyInstanceUID)
        series_uid = str(ds.SeriesInstanceUID)
        has_pixels = "PixelData" in ds
        accession = str(ds.get("AccessionNumber", "") or "")[:16]
        key = queue.patient_key(sop_uid, str(ds.get("PatientID", "") or ""))
    except Exception:
        logger.exception("C-STORE refused: cannot parse the data set")
        return STATUS_CANNOT_UNDERSTAND
    if not has_pixels:
        logger.warning("C-STORE refused: %s has no Pixel Data", sop_uid)
        return STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS
    path = spool.image_path(study_uid, sop_uid)
    values = {
        "sop_instance_uid": sop_uid,
        "sop_class_uid": str(event.request.AffectedSOPClassUID),
        "study_instance_uid": study_uid,
        "series_instance_uid": series_uid,
        "accession_number": accession,
        "calling_ae_title": str(event.assoc.requestor.ae_title).strip(),
        "transfer_syntax_uid": str(event.file_meta.TransferSyntaxUID),
        "spool_path": str(path),
        "patient_key": key,
    }
    status = _spool_and_record(event, engine, path, values)
    if status == STATUS_SUCCESS:
        on_stored()
    return status


def _spool_and_record(event: Any, engine: Engine, path: Path, values: dict[str, str]) -> int:
    sop_uid = values["sop_instance_uid"]
    try:
        with _uid_lock(sop_uid):
            queue.check_conflict(engine, **values)  # before the file held is replaced
            atomic_write(path, _write_part10(event))
            _, new = queue.enqueue(engine, **values)
    except UIDConflictError as exc:
        logger.warning("C-STORE %s refused: %s", sop_uid, exc)
        return STATUS_UID_CONFLICT
    except SpoolError:
        logger.exception("C-STORE %s refused: out of resources", sop_uid)
        return STATUS_OUT_OF_RESOURCES
    except Exception:
        # the database is down or full: the sender keeps the image and retries
        logger.exception("C-STORE %s refused: cannot record the job", sop_uid)
        return STATUS_OUT_OF_RESOURCES
    logger.info("received %s (study %s)%s", sop_uid, values["study_instance_uid"],
                "" if new else " again")
    return STATUS_SUCCESS


def handlers(engine: Engine, spool: Spool, on_stored: Callable[[], None]) -> list[Any]:
    return [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [engine, spool, on_stored]),
    ]
