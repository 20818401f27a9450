"""The only outbound DICOM code: C-ECHO and C-STORE SCU to the PACS.

Non-success answers become :class:`~cxr_worker.errors.SendError` with the DICOM status;
the caller retries later (never drops a result).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import SecondaryCaptureImageStorage, Verification  # type: ignore

from cxr_worker.errors import SendError

logger = logging.getLogger(__name__)

# the presentation contexts proposed to the PACS (SCU role), per operation
ECHO_CONTEXTS: list[tuple[str, list[str]]] = [(Verification, [ImplicitVRLittleEndian])]
STORE_CONTEXTS: list[tuple[str, list[str]]] = [
    (SecondaryCaptureImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]
# C-STORE answers that count as delivered: success, and the warnings 0xB000-0xB007 (stored,
# with coercion); any other answer, or none, is a SendError and the result is retried
STORE_DELIVERED = (0x0000, *range(0xB000, 0xB008))
CONNECTION_TIMEOUT_MAX = 10.0  # seconds; ACSE, DIMSE and network use Peer.timeout_seconds


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int
    calling_ae_title: str
    timeout_seconds: float = 30.0


def _associate(peer: Peer, contexts: list[tuple[str, list[str]]]) -> object:
    ae = AE(ae_title=peer.calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = peer.timeout_seconds
    ae.connection_timeout = min(peer.timeout_seconds, CONNECTION_TIMEOUT_MAX)
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        reason = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else \
            "no answer"
        raise SendError(f"association with {peer.ae_title}@{peer.host}:{peer.port} {reason}")
    return assoc


def echo(peer: Peer) -> None:
    assoc = _associate(peer, ECHO_CONTEXTS)
    try:
        status = assoc.send_c_echo()  # type: ignore[attr-defined]
    finally:
        assoc.release()  # type: ignore[attr-defined]
    code = int(status.Status) if status and "Status" in status else None
    if code != 0x0000:
        raise SendError(f"C-ECHO to {peer.ae_title} answered {_hex(code)}", code)


def store(peer: Peer, ds: Dataset) -> None:
    """C-STORE one Secondary Capture; raise SendError unless the PACS answers success."""
    assoc = _associate(peer, STORE_CONTEXTS)
    try:
        status = assoc.send_c_store(ds)  # type: ignore[attr-defined]
    finally:
        assoc.release()  # type: ignore[attr-defined]
    code = int(status.Status) if status and "Status" in status else None
    if code not in STORE_DELIVERED:
        raise SendError(f"C-STORE {ds.SOPInstanceUID} to {peer.ae_title} answered "
                        f"{_hex(code)}", code)


def _hex(code: int | None) -> str:
    return "no response" if code is None else f"0x{code:04X}"
