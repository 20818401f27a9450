"""The only outbound DICOM code: C-ECHO and C-STORE SCU to the PACS.

Non-success answers become :class:`~cxr_worker.errors.SendError` with the DICOM status;
the caller retries later (never drops a result).

With a TLS context on the :class:`Peer` (built by :mod:`cxr_worker.tls`), every association
is DICOM TLS. pynetdicom reports a failed handshake only as "no association", so when a TLS
association fails this module opens one bare TLS connection to say why (the certificate
not accepted, the host name not in it, the PACS refusing the worker's certificate): that
reason is in the :class:`SendError`, which the worklist and ``echo`` show.

Every association is bounded: ``pacs.connect_timeout_seconds`` to open the TCP connection,
``pacs.timeout_seconds`` for each ACSE/DIMSE answer and for an idle network, and every one is
registered with an :class:`Outbound` from before its request is sent, so that a shutdown can
abort it whatever it waits for (:func:`hard_abort`): the A-ASSOCIATE-AC of a PACS that accepted
the TCP connection and hangs, a C-STORE response, or a send blocked on a full socket.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import A_P_ABORT
from pynetdicom.sop_class import (  # type: ignore
    Comprehensive3DSRStorage,
    KeyObjectSelectionDocumentStorage,
    SecondaryCaptureImageStorage,
    Verification,
)

from cxr_worker.errors import SendError

logger = logging.getLogger(__name__)

# the presentation contexts proposed to the PACS (SCU role), per operation
ECHO_CONTEXTS: list[tuple[str, list[str]]] = [(Verification, [ImplicitVRLittleEndian])]
# C-STORE: the result objects (outputs.kinds "sc", "sr"; the rejection note that withdraws
# an earlier result); each association proposes only the class of the object it carries
STORE_CONTEXTS: list[tuple[str, list[str]]] = [
    (SecondaryCaptureImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
    (Comprehensive3DSRStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
    (KeyObjectSelectionDocumentStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]),
]
# C-STORE answers that count as delivered: success, and the warnings 0xB000-0xB007 (stored,
# with coercion); any other answer, or none, is a SendError and the result is retried
STORE_DELIVERED = (0x0000, *range(0xB000, 0xB008))
# how long the TLS diagnosis waits for the peer's alert after its handshake (TLS 1.3
# refuses a client certificate only after the client's side of the handshake is done)
TLS_ALERT_WAIT = 1.0


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int
    calling_ae_title: str
    timeout_seconds: float = 30.0
    ssl_context: ssl.SSLContext | None = None  # DICOM TLS; the host name is ``host``
    connect_timeout_seconds: float = 5.0  # TCP connect (pacs.connect_timeout_seconds)


class Outbound:
    """The outbound associations in progress, so that a shutdown can abort them at once.

    Tracked by their AE (:func:`_associate` makes one per association) from before the
    A-ASSOCIATE-RQ is sent: pynetdicom hands the association back only once negotiated, and
    the wait for a hung PACS's A-ASSOCIATE-AC is what a shutdown must cut short. After
    :meth:`abort_all` with ``refuse_new`` no association starts (:class:`SendError`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._aes: set[AE] = set()
        self._refusing = False

    def add(self, ae: AE) -> None:
        with self._lock:
            if self._refusing:
                raise SendError("not sending: the worker is shutting down")
            self._aes.add(ae)

    @property
    def refusing(self) -> bool:
        """True once :meth:`abort_all` refused new associations (a shutdown)."""
        return self._refusing

    def discard(self, ae: AE) -> None:
        with self._lock:
            self._aes.discard(ae)

    def abort_all(self, refuse_new: bool = True) -> int:
        """Abort every association in progress (:func:`hard_abort`); returns how many."""
        with self._lock:
            self._refusing = self._refusing or refuse_new
            aes = set(self._aes)
        assocs = [t.assoc for t in threading.enumerate()
                  if isinstance(t, DULServiceProvider) and t.assoc.ae in aes]
        for assoc in assocs:
            hard_abort(assoc)
        return len(assocs)


# associations opened without an Outbound of their own (C-ECHO: /readyz, echo, doctor)
OUTBOUND = Outbound()


def hard_abort(assoc: Any) -> None:
    """End a pynetdicom association (either role) now, whatever its thread waits for.

    ``Association.abort()`` is not enough: it waits until the peer closes the connection, and
    the thread that waits for an A-ASSOCIATE-AC or a DIMSE answer is only woken by its own
    timeout. Decision: wake both waits as a provider abort would (an A-P-ABORT for the ACSE
    wait, an empty DIMSE message), then shut the TCP connection down, which also frees a DUL
    blocked sending to a peer that stopped reading. The peer sees the connection closed (an
    A-P-ABORT in DICOM terms) rather than an A-ABORT PDU: writing one while the DUL thread may
    be writing a P-DATA PDU could interleave the two.
    """
    if assoc.is_acceptor and not assoc.is_established and assoc.requestor.primitive is None:
        # still waiting for the A-ASSOCIATE-RQ: pynetdicom would take any primitive for the
        # request and negotiate it; None is its "ACSE timeout" and ends the thread cleanly
        assoc.dul.to_user_queue.put(None)
    else:
        primitive = A_P_ABORT()
        primitive.provider_reason = 0x00
        assoc.dul.to_user_queue.put(primitive)
    assoc.dimse.msg_queue.put((None, None))
    raw = getattr(assoc.dul.socket, "socket", None)
    if raw is not None:
        with contextlib.suppress(OSError):  # not connected (yet), or closed already
            raw.shutdown(socket.SHUT_RDWR)


def _associate(peer: Peer, contexts: list[tuple[str, list[str]]],
               outbound: Outbound = OUTBOUND) -> Any:
    """An established association (registered with ``outbound``: the caller discards its AE
    after the release), or :class:`SendError`."""
    ae = AE(ae_title=peer.calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = peer.timeout_seconds
    ae.connection_timeout = peer.connect_timeout_seconds
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)
    tls_args = (peer.ssl_context, peer.host) if peer.ssl_context is not None else None
    outbound.add(ae)
    started = time.monotonic()
    try:
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args)
    except BaseException:
        outbound.discard(ae)
        raise
    if not assoc.is_established:
        _forget(outbound, assoc)
        where = f"{peer.ae_title}@{peer.host}:{peer.port}"
        if outbound.refusing:
            raise SendError(f"association with {where} aborted: the worker is shutting down")
        timed_out = time.monotonic() - started >= peer.timeout_seconds
        reason = "rejected" if assoc.is_rejected else \
            f"not answered within {peer.timeout_seconds:g} s" if timed_out else \
            "aborted" if assoc.is_aborted else "no answer"
        tls_failure = _tls_failure(peer) if tls_args and not assoc.is_rejected else None
        if tls_failure:
            reason = f"failed: {tls_failure}"
        raise SendError(f"association with {peer.ae_title}@{peer.host}:{peer.port} {reason}")
    return assoc


DUL_END_WAIT = 1.0  # seconds an ended association's DUL thread gets before its socket closes


def _forget(outbound: Outbound, assoc: Any) -> None:
    """Unregister an ended association, and close its socket if pynetdicom left it open (it
    does when the association was aborted: its DUL thread stops without closing it)."""
    outbound.discard(assoc.ae)
    dul = assoc.dul
    if dul.is_alive() and dul is not threading.current_thread():
        dul.join(DUL_END_WAIT)
    raw = getattr(dul.socket, "socket", None)
    if raw is not None and not dul.is_alive():
        raw.close()


def _tls_failure(peer: Peer) -> str | None:
    """Why a TLS connection to ``peer`` fails, from one bare TLS connection; None when it
    succeeds (the association failed for another reason)."""
    assert peer.ssl_context is not None
    timeout = peer.connect_timeout_seconds
    try:
        with socket.create_connection((peer.host, peer.port), timeout=timeout) as raw, \
                peer.ssl_context.wrap_socket(raw, server_hostname=peer.host) as tls:
            tls.settimeout(TLS_ALERT_WAIT)
            # an alert if the peer refuses our certificate (TLS 1.3); a timeout if it waits
            # for an A-ASSOCIATE-RQ: TLS is fine
            with contextlib.suppress(TimeoutError):
                tls.recv(1)
    except ssl.SSLCertVerificationError as exc:
        return f"TLS: the peer's certificate is not accepted ({exc.verify_message})"
    except ssl.SSLError as exc:
        return f"TLS handshake refused ({exc.reason or exc})"
    except OSError as exc:
        return f"cannot connect ({exc.strerror or exc})"
    return None


def echo(peer: Peer, outbound: Outbound = OUTBOUND) -> None:
    assoc = _associate(peer, ECHO_CONTEXTS, outbound)
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
        _forget(outbound, assoc)
    code = int(status.Status) if status and "Status" in status else None
    if code != 0x0000:
        raise SendError(f"C-ECHO to {peer.ae_title} answered {_hex(code)}", code)


def store(peer: Peer, ds: Dataset, outbound: Outbound = OUTBOUND) -> None:
    """C-STORE one result object (Secondary Capture, Comprehensive 3D SR, Key Object
    Selection), proposing its SOP class only; raise SendError unless the PACS answers
    success (a PACS that does not take the class rejects the context: a SendError too)."""
    contexts = [c for c in STORE_CONTEXTS if c[0] == ds.SOPClassUID]
    if not contexts:
        raise SendError(f"no presentation context for SOP class {ds.SOPClassUID}")
    assoc = _associate(peer, contexts, outbound)
    try:
        status = assoc.send_c_store(ds)
    except ValueError as exc:  # pynetdicom: no accepted context for the class
        raise SendError(f"C-STORE {ds.SOPInstanceUID} to {peer.ae_title}: the PACS accepted "
                        f"no presentation context for {ds.SOPClassUID}") from exc
    finally:
        assoc.release()
        _forget(outbound, assoc)
    code = int(status.Status) if status and "Status" in status else None
    if code not in STORE_DELIVERED:
        raise SendError(f"C-STORE {ds.SOPInstanceUID} to {peer.ae_title} answered "
                        f"{_hex(code)}", code)


def _hex(code: int | None) -> str:
    return "no response" if code is None else f"0x{code:04X}"
