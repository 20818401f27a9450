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
- 0xC212, 0xC213, 0xC214 Error: Cannot understand (this worker's codes), when the data set is
  larger than a ``[limits]`` setting allows (issue 10, decompression amplification): 0xC212
  the data set as received (``limits.max_dataset_bytes``), 0xC213 the decoded size its header
  declares, Rows x Columns x Samples x Frames x Bits Allocated / 8
  (``limits.max_decoded_bytes``), 0xC214 a Deflated Explicit VR Little Endian data set that
  inflates beyond ``limits.max_inflated_bytes``. Nothing is written. Cxxx, not A700: A700
  tells the sender to retry later, and the same image would be refused again on every
  retry; the limits are the site's to raise.

Bounded receive (:class:`BoundedDataSet`): pynetdicom buffers a C-STORE data set in memory
whole before the handler runs, whatever its size. An ``EVT_PDU_RECV`` handler
(:func:`bound_data_set`) gives every DIMSE message a data set buffer that holds at most
``limits.max_dataset_bytes``: past that it drops what it holds and only counts the rest, and
the C-STORE is answered 0xC212 when its last fragment arrives (a DIMSE response cannot come
earlier). A deflated data set is inflated piece by piece and only its header kept
(:func:`cxr_worker.sizes.read_deflated`), never whole as ``event.dataset`` would.
"""

from __future__ import annotations

import io
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
from pynetdicom import ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Verification,
)
from sqlalchemy import Engine

from cxr_worker import listener, sizes, sop_classes
from cxr_worker.errors import LimitExceededError, SpoolError, UIDConflictError
from cxr_worker.spool import Spool, atomic_write
from cxr_worker.worklist import queue
from cxr_worker.worklist.header import InstanceHeader, invalid_uids

logger = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_UID_CONFLICT = 0xC211
STATUS_DATASET_TOO_LARGE = 0xC212
STATUS_DECODED_TOO_LARGE = 0xC213
STATUS_INFLATES_TOO_LARGE = 0xC214

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
    STATUS_DATASET_TOO_LARGE: "Error: Cannot understand: the data set is larger than "
                              "`limits.max_dataset_bytes`; it is dropped as it arrives, "
                              "nothing is written",
    STATUS_DECODED_TOO_LARGE: "Error: Cannot understand: the decoded size the header "
                              "declares (Rows x Columns x Samples per Pixel x Number of "
                              "Frames x Bits Allocated / 8) is larger than "
                              "`limits.max_decoded_bytes`; nothing is written",
    STATUS_INFLATES_TOO_LARGE: "Error: Cannot understand: the Deflated Explicit VR Little "
                               "Endian data set inflates to more than "
                               "`limits.max_inflated_bytes`; nothing is written",
}

# the radiographs accepted (the gate scores the same): :mod:`cxr_worker.sop_classes`
ACCEPTED_STORAGE = sop_classes.ACCEPTED
OPTIONAL_STORAGE = sop_classes.OPTIONAL  # only when the setting named is true: raw data
# the default advertised maximum PDU length (``listener.max_pdu_bytes``): bounded, so that a
# peer cannot make the listener buffer an arbitrarily large PDU, yet large enough that a
# 10 MB image is ten P-DATA PDUs
MAX_PDU_SIZE = 1048576


@dataclass(frozen=True)
class ListenerConfig:
    ae_title: str
    allowed_calling_ae_titles: tuple[str, ...]
    accept_dx_for_processing: bool
    # association limits (``[listener]`` settings; defaults equal the settings' defaults),
    # enforced by :mod:`cxr_worker.listener`
    max_pdu_bytes: int = MAX_PDU_SIZE
    max_associations: int = 32
    max_associations_per_host: int = 8
    network_timeout_seconds: float = 10.0
    acse_timeout_seconds: float = 10.0
    dimse_timeout_seconds: float = 30.0
    check_called_ae_title: bool = True


def storage_classes(cfg: ListenerConfig) -> tuple[str, ...]:
    return sop_classes.accepted(cfg.accept_dx_for_processing)


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


def make_ae(cfg: ListenerConfig) -> listener.ListenerAE:
    """The listener's AE: its servers (``ae.start_server``) admit, bound and log
    associations as :mod:`cxr_worker.listener` describes."""
    ae = listener.ListenerAE(cfg.ae_title, listener.Limits(
        max_pdu_bytes=cfg.max_pdu_bytes, max_associations=cfg.max_associations,
        max_associations_per_host=cfg.max_associations_per_host,
        network_timeout=cfg.network_timeout_seconds))
    ae.acse_timeout = cfg.acse_timeout_seconds
    ae.dimse_timeout = cfg.dimse_timeout_seconds
    ae.require_called_aet = cfg.check_called_ae_title
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
        with event.request.DataSet.getbuffer() as received:  # no 10 MB copy of it
            f.write(received)

    return write


HEADER_DEFER_BYTES = 4096


class BoundedDataSet(io.BytesIO):
    """A DIMSE message's data set as pynetdicom receives it, holding at most ``limit`` bytes.

    pynetdicom writes each P-DATA fragment here (``DIMSEMessage.decode_msg``). Once the
    total passes ``limit`` what is held is dropped (``truncate``: the buffer shrinks) and the
    rest is only counted: ``received``, ``exceeded``.
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.received = 0

    @property
    def exceeded(self) -> bool:
        return self.received > self.limit

    def write(self, data: Any, /) -> int:
        n = memoryview(data).nbytes
        self.received += n
        if self.received > self.limit:
            if self.tell():
                self.seek(0)
                self.truncate()
            return n
        return super().write(data)


def bound_data_set(event: Any, limit: int) -> None:
    """``EVT_PDU_RECV``: a P-DATA-TF that starts a DIMSE message gets its message made here,
    with a :class:`BoundedDataSet`, before pynetdicom adds the PDU's fragments to it.

    pynetdicom 3.0 fires the event on the DUL thread after decoding the PDU and before its
    state machine hands it to ``DIMSEServiceProvider.receive_primitive``, which makes a
    ``DIMSEMessage()`` (a plain, unbounded ``BytesIO``) only when ``dimse.message`` is None.
    ``tests/hostile/test_amplification.py`` sends an oversize data set through a real
    association and checks that it was bounded, so a pynetdicom that changes this fails there.
    """
    if not isinstance(event.pdu, P_DATA_TF):
        return
    dimse = event.assoc.dimse
    if dimse.message is None:
        message = DIMSEMessage()
        message.data_set = BoundedDataSet(limit)
        dimse.message = message


def received_bytes(stream: io.BytesIO) -> int:
    """The data set's size as received (counted past the limit by a BoundedDataSet)."""
    if isinstance(stream, BoundedDataSet):
        return stream.received
    return stream.seek(0, io.SEEK_END)


def read_header(event: Any, limits: sizes.Limits | None = None) -> Dataset:
    """The received data set with large values (Pixel Data) left unread.

    ``event.dataset`` parses the whole stream and copies a 10 MB Pixel Data value only for
    the handler to ask whether it is there: 13 ms per image against 1 ms with deferred values
    (measured on a 2500x2048 16-bit CR). A deflated data set is inflated piece by piece, up to
    ``limits.max_inflated_bytes`` (:class:`LimitExceededError` beyond), keeping only the
    header: ``event.dataset`` would inflate it whole (0.9 MB became 512 MB).
    """
    ts = event.context.transfer_syntax
    stream = event.request.DataSet
    if ts.is_deflated:
        limit = (limits or sizes.current_limits()).max_inflated_bytes
        return sizes.read_deflated(stream.getvalue(), limit, defer_size=HEADER_DEFER_BYTES)
    stream.seek(0)
    return read_dataset(stream, ts.is_implicit_VR, ts.is_little_endian,
                        defer_size=HEADER_DEFER_BYTES)


def _pixel_refusal(ds: Dataset, sop_uid: str, limits: sizes.Limits) -> int | None:
    """A900 without Pixel Data, C213 when the header declares a decoded size over the limit;
    None otherwise, and when the size cannot be read (the pipeline then quarantines the
    image with the reason, as before)."""
    if "PixelData" not in ds:
        logger.warning("C-STORE refused: %s has no Pixel Data", sop_uid)
        return STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS
    try:
        sizes.check_decoded_size(ds, limits)
    except LimitExceededError as exc:
        logger.warning("C-STORE %s refused (0x%04X): %s", sop_uid, STATUS_DECODED_TOO_LARGE,
                       exc.reason)
        return STATUS_DECODED_TOO_LARGE
    except Exception:  # any malformed value: what pydicom raises on it varies
        return None
    return None


def _peer(event: Any) -> str:
    requestor = event.assoc.requestor
    return f"{getattr(requestor, 'address', '?')}:{getattr(requestor, 'port', '?')}"


# Stores of one SOP Instance UID run one at a time (a modality re-sending on several
# associations at once): the conflict check, the file and the row stay together. Striped, so
# the table stays bounded; two UIDs sharing a stripe only wait for each other.
_UID_LOCKS = tuple(threading.Lock() for _ in range(256))


def _uid_lock(sop_uid: str) -> threading.Lock:
    return _UID_LOCKS[zlib.crc32(sop_uid.encode("ascii", "replace")) % len(_UID_LOCKS)]


def handle_store(event: Any, engine: Engine, spool: Spool, on_stored: Callable[[], None],
                 limits: sizes.Limits | None = None) -> int:
    """C-STORE: check the sizes, validate the UIDs, spool durably, insert the row, acknowledge.

    The size refusals log sizes, the limit and the peer's address only (no header value).
    """
    lim = limits or sizes.current_limits()
    size = received_bytes(event.request.DataSet)
    if size > lim.max_dataset_bytes:
        logger.warning("C-STORE from %s refused (0x%04X): the data set is %d bytes, more than "
                       "limits.max_dataset_bytes (%d)", _peer(event), STATUS_DATASET_TOO_LARGE,
                       size, lim.max_dataset_bytes)
        return STATUS_DATASET_TOO_LARGE
    try:
        ds = read_header(event, lim)
        bad = invalid_uids(ds)
        if bad:
            logger.warning("C-STORE refused: %s missing or not a valid UID", ", ".join(bad))
            return STATUS_DATASET_DOES_NOT_MATCH_SOP_CLASS
        header = InstanceHeader.from_dataset(ds, str(event.request.AffectedSOPClassUID))
    except LimitExceededError as exc:  # a deflated data set inflating past the limit
        logger.warning("C-STORE from %s refused (0x%04X): %s", _peer(event),
                       STATUS_INFLATES_TOO_LARGE, exc.reason)
        return STATUS_INFLATES_TOO_LARGE
    except Exception:
        logger.exception("C-STORE refused: cannot parse the data set")
        return STATUS_CANNOT_UNDERSTAND
    refused = _pixel_refusal(ds, header.sop_instance_uid, lim)
    if refused is not None:
        return refused
    path = spool.image_path(header.study_instance_uid, header.sop_instance_uid)
    values = header.row_values(
        calling_ae_title=str(event.assoc.requestor.ae_title).strip(),
        transfer_syntax_uid=str(event.file_meta.TransferSyntaxUID), spool_path=str(path))
    status = _spool_and_record(event, engine, path, values)
    if status == STATUS_SUCCESS:
        on_stored()
    return status


def _spool_and_record(event: Any, engine: Engine, path: Path, values: dict[str, Any]) -> int:
    sop_uid = str(values["sop_instance_uid"])
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


def handlers(engine: Engine, spool: Spool, on_stored: Callable[[], None],
             limits: sizes.Limits | None = None) -> list[Any]:
    """The listener's event handlers; ``limits``: the ``[limits]`` settings (default: those
    :func:`cxr_worker.sizes.set_limits` set, else the defaults)."""
    lim = limits or sizes.current_limits()
    return [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [engine, spool, on_stored, lim]),
        (evt.EVT_PDU_RECV, bound_data_set, [lim.max_dataset_bytes]),
    ]
