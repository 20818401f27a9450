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

Every outbound socket has TCP_NODELAY (:func:`set_nodelay`, on EVT_CONN_OPEN, before the
A-ASSOCIATE-RQ): pynetdicom leaves Nagle's algorithm on, and a result's last PDU then waits for
the PACS's delayed ACK (a send took 64 ms, 24 ms with TCP_NODELAY: ../shared/PERF-NOTES.md).
The service's results go through a :class:`Sender`: one association to the PACS kept open
between C-STOREs and released after ``pacs.idle_release_seconds`` without one, or at shutdown.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
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
# an earlier result); the kept association (Sender) proposes all three, a one-shot store()
# only the class of the object it carries
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
    # a Sender's kept association is released after this long without a C-STORE
    # (pacs.idle_release_seconds; 0: not kept)
    idle_release_seconds: float = 10.0


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


def set_nodelay(sock: Any) -> bool:
    """TCP_NODELAY on a connected socket (plain or TLS-wrapped): each PDU leaves at once
    instead of waiting for the peer's delayed ACK of the previous one. False when it cannot
    be set (not a TCP socket, or closed already)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        return False
    return True


def _on_conn_open(event: Any) -> None:
    """EVT_CONN_OPEN of an outbound association: the TCP connection (and TLS handshake) is
    done and no PDU has been sent yet."""
    set_nodelay(getattr(event.assoc.dul.socket, "socket", None))


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
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args,
                             evt_handlers=[(evt.EVT_CONN_OPEN, _on_conn_open)])
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


def _store_contexts(ds: Dataset) -> list[tuple[str, list[str]]]:
    contexts = [c for c in STORE_CONTEXTS if c[0] == ds.SOPClassUID]
    if not contexts:
        raise SendError(f"no presentation context for SOP class {ds.SOPClassUID}")
    return contexts


# A result sent from its file (:meth:`Sender.store` with ``path``) goes out as the file's
# bytes, read in chunks: not decoded and encoded again (pynetdicom's setting, process-wide;
# a Dataset is sent as before)
_config.STORE_SEND_CHUNKED_DATASET = True


def _c_store(assoc: Any, peer: Peer, ds: Dataset, path: Path | None = None) -> Dataset:
    """The C-STORE response (an empty data set: none, the association ended meanwhile).
    With ``path`` (the file ``ds``, its header, was read from), the file's bytes are sent as
    they are when the PACS accepted the file's transfer syntax; else ``ds`` re-encoded."""
    try:
        if path is not None and _accepts(assoc, ds, path):
            sent: Dataset = assoc.send_c_store(path)
            return sent
        if path is not None and "PixelData" not in ds:  # only the header was read
            ds = dcmread(path)
        status: Dataset = assoc.send_c_store(ds)
        return status
    except ValueError as exc:  # pynetdicom: no accepted context for the class
        raise SendError(f"C-STORE {ds.SOPInstanceUID} to {peer.ae_title}: the PACS accepted "
                        f"no presentation context for {ds.SOPClassUID}") from exc
    except RuntimeError:  # pynetdicom: the association ended before the request was sent
        return Dataset()


def _accepts(assoc: Any, ds: Dataset, path: Path) -> bool:
    """Whether an accepted context carries ``ds``'s class in its file's transfer syntax."""
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    return syntax is not None and any(
        c.abstract_syntax == ds.SOPClassUID and c.transfer_syntax[0] == syntax
        for c in assoc.accepted_contexts)


def _check_stored(peer: Peer, ds: Dataset, status: Dataset | None) -> None:
    code = int(status.Status) if status and "Status" in status else None
    if code not in STORE_DELIVERED:
        raise SendError(f"C-STORE {ds.SOPInstanceUID} to {peer.ae_title} answered "
                        f"{_hex(code)}", code)


def store(peer: Peer, ds: Dataset, outbound: Outbound = OUTBOUND) -> None:
    """C-STORE one result object (Secondary Capture, Comprehensive 3D SR, Key Object
    Selection) over an association of its own, proposing its SOP class only; raise SendError
    unless the PACS answers success (a PACS that does not take the class rejects the context:
    a SendError too). The service sends through a :class:`Sender` instead."""
    assoc = _associate(peer, _store_contexts(ds), outbound)
    try:
        status = _c_store(assoc, peer, ds)
    finally:
        assoc.release()
        _forget(outbound, assoc)
    _check_stored(peer, ds, status)


class Sender:
    """C-STOREs to one PACS over one association kept open between them.

    Opening an association costs a TCP handshake, an A-ASSOCIATE exchange (and a TLS
    handshake); a burst of results pays it once. The association proposes every class of
    :data:`STORE_CONTEXTS` and is registered with ``outbound`` for as long as it is open, so
    :meth:`Outbound.abort_all` ends it at shutdown like any other. Released (A-RELEASE) after
    ``idle_release_seconds`` (default the peer's) without a C-STORE, by a timer thread, and
    by :meth:`close`.

    A PACS may end a kept association on its own (Orthanc after its idle timeout, a restart):
    an association found ended before a C-STORE is replaced by a new one; one that ends during
    a C-STORE on a reused association, faster than ``timeout_seconds`` (the peer closed it,
    not a PACS that hangs), is retried once on a new association before the attempt counts as
    failed. A PACS that hangs costs the same timeouts as with :func:`store`.

    One C-STORE at a time (a lock): the service has one send thread per destination.
    """

    def __init__(self, peer: Peer, outbound: Outbound = OUTBOUND,
                 idle_release_seconds: float | None = None) -> None:
        self.peer = peer
        self.outbound = outbound
        self.idle_release_seconds = peer.idle_release_seconds \
            if idle_release_seconds is None else idle_release_seconds
        self.opened = 0  # associations opened so far
        self._lock = threading.Lock()
        self._assoc: Any = None
        self._last_used = 0.0
        self._timer: threading.Timer | None = None

    @property
    def association(self) -> Any:
        """The association kept open, or None (ended associations included until the next
        C-STORE replaces them)."""
        return self._assoc

    def store(self, ds: Dataset, path: Path | None = None) -> None:
        """As :func:`store`, over the kept association; with ``path``, ``ds`` may be only
        the header of the file at ``path``, which is sent as it is (see :func:`_c_store`)."""
        _store_contexts(ds)
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            try:
                status = self._store(ds, path)
            finally:
                self._last_used = time.monotonic()
                if self._assoc is not None and self.idle_release_seconds > 0:
                    self._timer = threading.Timer(self.idle_release_seconds,
                                                  self._release_if_idle)
                    self._timer.daemon = True
                    self._timer.start()
                elif self._assoc is not None:
                    self._end(release=True)  # idle_release_seconds = 0: not kept
        _check_stored(self.peer, ds, status)

    def _open(self) -> Any:
        self._assoc = _associate(self.peer, STORE_CONTEXTS, self.outbound)
        self.opened += 1
        return self._assoc

    def _store(self, ds: Dataset, path: Path | None = None) -> Dataset:
        if self.outbound.refusing:  # the kept association may not have ended yet
            raise SendError("not sending: the worker is shutting down")
        assoc = self._assoc
        reused = assoc is not None and assoc.is_established
        if not reused:
            if assoc is not None:  # ended while idle (the PACS closed it)
                logger.debug("the association to %s ended while idle: opening a new one",
                             self.peer.ae_title)
                self._end(release=False)
            assoc = self._open()
        started = time.monotonic()
        status = _c_store(assoc, self.peer, ds, path)
        if "Status" not in status:  # no answer: the association is not to be used again
            self._end(release=False, abort=True)
            if (reused and not self.outbound.refusing
                    and time.monotonic() - started < self.peer.timeout_seconds):
                logger.info("the PACS %s ended the kept association during a C-STORE: "
                            "sending %s again on a new one", self.peer.ae_title,
                            ds.SOPInstanceUID)
                assoc = self._open()
                status = _c_store(assoc, self.peer, ds, path)
                if "Status" not in status:
                    self._end(release=False, abort=True)
        elif not assoc.is_established:
            self._end(release=False)
        return status

    def _end(self, release: bool, timeout: float | None = None, abort: bool = False) -> None:
        """Release (when ``release`` and still established) or abort (``abort``) the
        association, and forget it."""
        assoc, self._assoc = self._assoc, None
        if assoc is None:
            return
        if abort:
            hard_abort(assoc)
        if release and assoc.is_established:
            if timeout is not None:
                assoc.acse_timeout = timeout
            with contextlib.suppress(Exception):  # an ended connection: nothing to release
                assoc.release()
            if assoc.is_established:
                hard_abort(assoc)
        _forget(self.outbound, assoc)

    def _release_if_idle(self) -> None:
        if not self._lock.acquire(blocking=False):
            return  # a C-STORE in progress: it arms the timer again
        try:
            if self._assoc is not None and \
                    time.monotonic() - self._last_used >= self.idle_release_seconds * 0.99:
                logger.debug("releasing the idle association to %s", self.peer.ae_title)
                self._end(release=True)
        finally:
            self._lock.release()

    def close(self, timeout: float = 1.0) -> None:
        """Release the kept association (its A-RELEASE-RP waited for ``timeout`` seconds at
        most, then aborted); abort it at once if a C-STORE or a release is in progress."""
        if self._timer is not None:
            self._timer.cancel()
        if self._lock.acquire(timeout=max(timeout, 0.0)):
            try:
                self._end(release=True, timeout=max(timeout, 0.01))
            finally:
                self._lock.release()
        elif (assoc := self._assoc) is not None:
            hard_abort(assoc)


def _hex(code: int | None) -> str:
    return "no response" if code is None else f"0x{code:04X}"
