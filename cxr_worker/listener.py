"""The listener's transport: pynetdicom's association server with bounded resources (issue 10).

pynetdicom 3.0.4 on its own reads a PDU of whatever length its header claims (one P-DATA-TF
claiming 0xFFFFFFF0 bytes took the worker from 166 to 1,395 MB), reads from accepted sockets
that have no timeout (a connection that sends one byte of a PDU header holds its thread and
association slot until the peer closes) and counts every connection, quiet or not, against
one global limit (ten quiet connections from one host shut every modality out). This module
replaces those three behaviours and logs every association the worker refuses or ends.

Decisions:

- **Admission when the connection is accepted**, on the accepting thread, so that the counts
  never race: a connection takes one of ``listener.max_associations`` slots if its host holds
  fewer than ``listener.max_associations_per_host`` and a slot is free. Otherwise it is still
  read, to answer its A-ASSOCIATE-RQ with A-ASSOCIATE-RJ (rejected-transient, service
  provider (presentation), local-limit-exceeded: the modality sees why and retries), but it
  holds no slot. At most ``max_associations_per_host`` such refusals are in progress per
  host and ``max_associations`` in all; a connection beyond that is closed at once without
  a read (logged at most once a second per host; the host's next such line counts those not
  logged). So one host, however many connections it opens, holds at most its per-host share
  of the slots and of the threads; an honest host still finds a slot.
  A connection holds its slot until its socket is closed, not until its thread ends; the
  TLS handshake (:mod:`cxr_worker.tls`, on ``EVT_CONN_OPEN``) still runs on the connection's
  own thread, within the slot.
- **Every PDU is bounded before it is read**: a P-DATA-TF whose length field is over the
  advertised maximum (``listener.max_pdu_bytes``; PS3.8 9.3.5: the maximum length of the
  variable field) and any other PDU over :data:`CONTROL_PDU_MAX_BYTES` (256 KiB, where
  an A-ASSOCIATE-RQ of 128 presentation contexts with four transfer syntaxes each is about
  20 KB, and release and abort PDUs are 10 bytes) is answered with A-ABORT (service
  provider, invalid PDU parameter value) and the connection closed at once, without reading
  what follows the header (a peer still sending may get the reset before the A-ABORT: the
  kernel resets a connection closed with data unread; either way the association is over).
- **A partial PDU is a timeout**: each read of a PDU waits at most
  ``listener.network_timeout_seconds`` for more bytes (a header that stops after one byte is
  dropped then), and a whole PDU must arrive within that timeout plus one second per
  :data:`MIN_PDU_BYTES_PER_SECOND` of its length (16 KiB/s: 74 s for a 1 MiB PDU), so that
  a peer trickling one byte at a time is dropped too. Between PDUs pynetdicom's own timers
  apply: ARTIM (``listener.acse_timeout_seconds``) until the A-ASSOCIATE-RQ, the idle timer
  (``listener.network_timeout_seconds``) on an established association. A PDU is read
  with ``recv_into`` into one buffer of its announced length rather than pynetdicom's
  4 KiB ``recv`` calls: measured in-process with dcmtk's storescu, 40 images of 3.9 MB went
  from 30-38 to 47-54 images/s (two shared cores).
- **The called AE title is checked** (``listener.check_called_ae_title``, by pynetdicom's
  ``require_called_aet``) and the calling AE title when ``listener.allowed_calling_ae_titles``
  is set; pynetdicom rejects those, this module logs them.
- **Every refusal or abort the worker decides is one WARNING line** naming the peer's
  ``host:port``, and its calling and called AE titles once its A-ASSOCIATE-RQ arrived (taken
  from the PDU's bytes, so that even an A-ASSOCIATE-RQ pynetdicom cannot decode is named),
  escaped with :func:`cxr_worker.text.quote_value`. What the peer decides (its A-ABORT, its
  close) is logged at INFO.

This hooks into pynetdicom 3.0.4 internals (``pyproject.toml`` allows 3.0.x from 3.0.4), which
``tests/hostile/test_limits.py::test_the_pynetdicom_internals_the_listener_relies_on_are_unchanged``
pins (it fails when their source changes; re-check this module, then update it):

- ``AE.make_server(server_class=..., **kwargs)``: :class:`ListenerAE` makes every server a
  :class:`BoundedServer` (``ae.start_server`` works unchanged);
- ``RequestHandler._create_association`` wraps the accepted socket in an
  ``AssociationSocket``, whose class :class:`BoundedRequestHandler` then changes to
  :class:`BoundedSocket` (same state, bounded ``recv``) before the association starts;
- ``DULServiceProvider._read_pdu_data`` reads a PDU as ``recv(6)`` then ``recv(length)``,
  and a short read is a closed connection (Evt17), silently for the header; the socket
  wrapper's ``close()`` (``socket`` None) makes ``ready`` false, so nothing more is read;
  ``_shutdown_socket`` is replaced because pynetdicom's skips ``close()`` when
  ``shutdown()`` fails (a peer that reset the connection), leaving the descriptor to the
  garbage collector;
- ``Association.run_reactor`` waits up to the ACSE timeout for the A-ASSOCIATE-RQ on
  ``dul.to_user_queue`` and treats ``None`` as that timeout: put there when the connection
  ends first, it lets the thread end at once instead of holding on for the timeout;
- ``EVT_REQUESTED`` handlers may reject (the acceptor skips negotiation when ``is_rejected``),
  as ``ACSE._negotiate_as_acceptor`` does: ``send_reject``, ``EVT_REJECTED``, ``kill()``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, cast

from pynetdicom import AE, evt
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from cxr_worker.text import quote_value

logger = logging.getLogger(__name__)

PDU_HEADER_BYTES = 6
PDU_A_ASSOCIATE_RQ = 0x01
PDU_P_DATA_TF = 0x04
PDU_NAMES = {0x01: "A-ASSOCIATE-RQ", 0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ",
             0x04: "P-DATA-TF", 0x05: "A-RELEASE-RQ", 0x06: "A-RELEASE-RP", 0x07: "A-ABORT"}
# the largest PDU other than P-DATA-TF that is read (see the module's docstring)
CONTROL_PDU_MAX_BYTES = 256 * 1024
# the slowest a PDU may arrive once its first byte has (see the module's docstring)
MIN_PDU_BYTES_PER_SECOND = 16 * 1024
# A-ABORT source "service provider", reason "invalid PDU parameter value" (PS3.8 9.3.8)
ABORT_SOURCE_PROVIDER = 0x02
ABORT_INVALID_PARAMETER_VALUE = 0x06
# A-ASSOCIATE-RJ rejected-transient, service provider (presentation), local-limit-exceeded
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)
# pynetdicom's own association count (threads, a connection already closed included) must
# never decide: admission is :meth:`BoundedServer.admit`'s
PYNETDICOM_MAX_ASSOCIATIONS = 1_000_000
# a host's connections closed at once are logged at most this often (seconds)
CLOSED_AT_ONCE_LOG_INTERVAL = 1.0

SLOT, REFUSE_HOST, REFUSE_ALL = "slot", "refuse-host", "refuse-all"


@dataclass(frozen=True)
class Limits:
    """The ``[listener]`` limits the transport enforces."""

    max_pdu_bytes: int
    max_associations: int
    max_associations_per_host: int
    network_timeout: float


@dataclass(eq=False)
class Connection:
    """One accepted connection: its peer, its lane (:data:`SLOT` or a refusal) and what its
    A-ASSOCIATE-RQ named. ``logged`` is set once a WARNING said why the worker ended it."""

    host: str
    port: int
    lane: str
    refusal: str = ""  # why it has no slot
    assoc: Any = None  # pynetdicom's Association, a thread
    sock: BoundedSocket | None = None
    handled: bool = False  # the thread that starts the association has finished
    calling_ae: str | None = None
    called_ae: str | None = None
    logged: bool = False

    def live(self) -> bool:
        """Whether it still counts: being set up, or its association running on an open
        socket."""
        if not self.handled:
            return True
        if self.assoc is None or not self.assoc.is_alive():
            return False
        return self.sock is not None and not self.sock.is_closed

    def who(self) -> str:
        peer = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        if self.calling_ae is None:
            return f"connection from {peer}"
        return (f"association from {peer} (calling AE '{quote_value(self.calling_ae)}', "
                f"called AE '{quote_value(self.called_ae or '')}')")

    def warn(self, what: str, *args: Any) -> None:
        self.logged = True
        logger.warning("%s " + what, self.who(), *args)


def _ae_field(raw: bytes) -> str:
    return raw.decode("latin-1").strip(" \x00")


class BoundedSocket(AssociationSocket):
    """pynetdicom's socket wrapper with a bounded ``recv``: every PDU's length checked against
    the limits before its body is read, every read under the network timeout, every PDU
    under a deadline. Never raises to the DUL: a PDU it will not read is a short read, which
    pynetdicom takes for a closed connection."""

    conn: Connection
    limits: Limits
    _pending: tuple[int, int, float] | None

    def attach(self, conn: Connection, limits: Limits) -> None:
        self.conn, self.limits, self._pending = conn, limits, None
        conn.sock = self
        raw = self.socket
        if raw is not None and raw.gettimeout() is None:  # TLS sets its own for the handshake
            raw.settimeout(limits.network_timeout)  # sends too: a peer that stops reading

    @property
    def is_closed(self) -> bool:
        raw = self.socket
        return raw is None or raw.fileno() < 0

    def _shutdown_socket(self) -> None:
        # pynetdicom's skips close() when shutdown() fails (a peer that reset the
        # connection), leaving the descriptor to the garbage collector
        raw = self.socket
        if raw is None:
            return
        with contextlib.suppress(OSError):
            raw.shutdown(socket.SHUT_RDWR)
        raw.close()

    def recv(self, nr_bytes: int) -> bytearray:
        if self._pending is None:  # a PDU header
            start = time.monotonic()
            data = self._read(nr_bytes, start + self.limits.network_timeout, "of a PDU header")
            if len(data) == PDU_HEADER_BYTES == nr_bytes:
                pdu_type, _, length = struct.unpack(">BBL", data)
                limit = (self.limits.max_pdu_bytes if pdu_type == PDU_P_DATA_TF
                         else CONTROL_PDU_MAX_BYTES)
                if length > limit:
                    self._refuse_oversize(pdu_type, length, limit)
                    return bytearray()
                self._pending = (pdu_type, length, start)
            return data
        pdu_type, length, start = self._pending
        self._pending = None
        name = PDU_NAMES.get(pdu_type, f"0x{pdu_type:02X}")
        deadline = (start + self.limits.network_timeout + length / MIN_PDU_BYTES_PER_SECOND)
        data = self._read(nr_bytes, deadline, f"of a {name} PDU")
        if pdu_type == PDU_A_ASSOCIATE_RQ and len(data) >= 36:
            self.conn.called_ae = _ae_field(bytes(data[4:20]))
            self.conn.calling_ae = _ae_field(bytes(data[20:36]))
        return data

    def _read(self, n: int, deadline: float, what: str) -> bytearray:
        """``n`` bytes, or fewer when the peer closes or the connection is dropped."""
        raw = self.socket
        if raw is None:
            return bytearray()
        buf = bytearray(n)
        got = 0
        t0 = time.monotonic()
        with memoryview(buf) as view:
            try:
                while got < n:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        self._drop(what, got, n, time.monotonic() - t0)
                        break
                    raw.settimeout(min(remaining, self.limits.network_timeout))
                    k = raw.recv_into(view[got:])
                    if not k:
                        break  # the peer closed
                    got += k
            except TimeoutError:
                self._drop(what, got, n, time.monotonic() - t0)
            except OSError:
                pass  # reset by the peer
            finally:
                if self.socket is not None and raw.fileno() >= 0:
                    raw.settimeout(self.limits.network_timeout)
        return buf if got == n else buf[:got]

    def _drop(self, what: str, got: int, n: int, took: float) -> None:
        self.conn.warn("dropped: %d of %d bytes %s after %.1f s (listener."
                       "network_timeout_seconds %g between reads, and a PDU may take that "
                       "plus 1 s per %d KiB); connection closed", got, n, what, took,
                       self.limits.network_timeout, MIN_PDU_BYTES_PER_SECOND // 1024)
        self.close()

    def _refuse_oversize(self, pdu_type: int, length: int, limit: int) -> None:
        abort = A_ABORT_RQ()
        abort.source, abort.reason_diagnostic = ABORT_SOURCE_PROVIDER, ABORT_INVALID_PARAMETER_VALUE
        raw = self.socket
        with contextlib.suppress(OSError):
            if raw is not None:
                raw.sendall(abort.encode())
        key = ("listener.max_pdu_bytes" if pdu_type == PDU_P_DATA_TF else
               "the worker's limit for PDUs other than P-DATA-TF")
        self.conn.warn("aborted: a %s PDU of %d bytes announced, over %d (%s); A-ABORT sent "
                       "and the connection closed without reading it",
                       PDU_NAMES.get(pdu_type, f"0x{pdu_type:02X}"), length, limit, key)
        self.close()


def _conn(assoc: Any) -> Connection | None:
    sock = getattr(assoc.dul, "socket", None)
    return sock.conn if isinstance(sock, BoundedSocket) else None


class BoundedRequestHandler(RequestHandler):
    """pynetdicom's request handler (the connection's own thread), with the association's
    socket made a :class:`BoundedSocket` before anything is read from it."""

    server: BoundedServer

    def handle(self) -> None:
        conn = self.server.pending(self.request)
        # C-STORE responses leave at once, not after the modality's delayed ACK
        with contextlib.suppress(OSError):
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assoc = self._create_association()
        sock = assoc.dul.socket
        sock.__class__ = BoundedSocket
        cast(BoundedSocket, sock).attach(conn, self.server.limits)
        conn.assoc = assoc
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()


class BoundedServer(ThreadedAssociationServer):
    """The association server: admission per host (:meth:`admit`) and the logging of every
    refusal and abort (its ``EVT_*`` handlers, bound to every association)."""

    # the listen backlog (socketserver's default is 5): with 5, a burst of 40 connections
    # waited 1 s for a SYN retransmit every 6 or 7 connections (measured on loopback), an
    # honest modality among them too; the kernel caps it at net.core.somaxconn
    request_queue_size = 128

    def __init__(self, ae: Any, address: Any, ae_title: str, contexts: Any,
                 ssl_context: Any = None, *, evt_handlers: Any = None,
                 request_handler: Any = None, limits: Limits) -> None:
        self.limits = limits
        self._conns: list[Connection] = []  # the accepting thread's only
        self._pending: dict[Any, Connection] = {}
        self._lock = threading.Lock()
        self._closed_log: dict[str, tuple[float, int]] = {}
        super().__init__(ae, address, ae_title, contexts, ssl_context,
                         evt_handlers=evt_handlers,
                         request_handler=request_handler or BoundedRequestHandler)
        self.bind(evt.EVT_REQUESTED, self._on_requested)
        self.bind(evt.EVT_REJECTED, self._on_rejected)
        self.bind(evt.EVT_FSM_TRANSITION, self._on_transition)

    # -- admission (the accepting thread) ------------------------------------------------
    def admit(self, host: str) -> tuple[str | None, str]:
        """The lane of a new connection from ``host`` (:data:`SLOT`, a refusal, or None to
        close it at once) and, unless a slot, why."""
        lim = self.limits
        self._conns = [c for c in self._conns if c.live()]
        slots = [c for c in self._conns if c.lane == SLOT]
        refusing = [c for c in self._conns if c.lane != SLOT]
        host_slots = sum(c.host == host for c in slots)
        if host_slots < lim.max_associations_per_host and len(slots) < lim.max_associations:
            return SLOT, ""
        if host_slots >= lim.max_associations_per_host:
            lane, why = REFUSE_HOST, (f"{host} holds {host_slots} associations "
                                      f"(listener.max_associations_per_host "
                                      f"{lim.max_associations_per_host})")
        else:
            lane, why = REFUSE_ALL, (f"all {len(slots)} association slots are in use "
                                     f"(listener.max_associations {lim.max_associations})")
        host_refusing = sum(c.host == host for c in refusing)
        if host_refusing < lim.max_associations_per_host and len(refusing) < lim.max_associations:
            return lane, why
        return None, (f"{why}, and {host_refusing} refusals for {host} ({len(refusing)} in "
                      "all) are in progress")

    def process_request(self, request: Any, client_address: Any) -> None:
        host, port = str(client_address[0]), int(client_address[1])
        lane, why = self.admit(host)
        if lane is None:
            self._log_closed_at_once(host, port, why)
            self.shutdown_request(request)
            return
        conn = Connection(host, port, lane, refusal=why)
        self._conns.append(conn)
        with self._lock:
            self._pending[request] = conn
        super().process_request(request, client_address)  # its own thread

    def pending(self, request: Any) -> Connection:
        with self._lock:
            return self._pending[request]

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                conn = self._pending.pop(request, None)
            if conn is not None:
                conn.handled = True

    def _log_closed_at_once(self, host: str, port: int, why: str) -> None:
        now = time.monotonic()
        last, suppressed = self._closed_log.get(host, (0.0, 0))
        if now - last < CLOSED_AT_ONCE_LOG_INTERVAL:
            self._closed_log[host] = (last, suppressed + 1)
            return
        if len(self._closed_log) > 1024:
            self._closed_log = {h: v for h, v in self._closed_log.items()
                                if now - v[0] < CLOSED_AT_ONCE_LOG_INTERVAL}
        self._closed_log[host] = (now, 0)
        logger.warning("connection from %s:%d closed at once, unread: %s%s", host, port, why,
                       f"; {suppressed} more from {host} closed since the last such line"
                       if suppressed else "")

    # -- event handlers (the associations' threads) ---------------------------------------
    def _on_requested(self, event: Any) -> None:
        """An A-ASSOCIATE-RQ on a connection admitted without a slot: A-ASSOCIATE-RJ."""
        assoc = event.assoc
        conn = _conn(assoc)
        if conn is None or conn.lane == SLOT:
            return
        if not isinstance(assoc.requestor.primitive, A_ASSOCIATE):
            return  # woken by something else (send.hard_abort at shutdown)
        assoc.acse.send_reject(*REJECT_LOCAL_LIMIT)
        assoc.is_rejected = True
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()  # once the RJ is sent and the peer closed (or ARTIM expired)

    def _on_rejected(self, event: Any) -> None:
        assoc = event.assoc
        conn = _conn(assoc)
        if conn is None:
            return
        rj = assoc.acceptor.primitive
        code = (rj.result, rj.result_source, rj.diagnostic) if rj is not None else None
        if code == REJECT_LOCAL_LIMIT and conn.lane != SLOT:
            why = f"local limit exceeded: {conn.refusal}"
        elif code == REJECT_LOCAL_LIMIT:
            why = "local limit exceeded (pynetdicom's association count)"
        elif code == (0x01, 0x01, 0x03):
            why = "calling AE title not recognised: not in listener.allowed_calling_ae_titles"
        elif code == (0x01, 0x01, 0x07):
            why = (f"called AE title not recognised: this worker is "
                   f"'{quote_value(self.ae_title)}' (listener.ae_title)")
        else:
            why = "result, source, reason " + (
                "/".join(f"0x{c:02X}" for c in code) if code else "unknown")
        conn.warn("rejected (A-ASSOCIATE-RJ): %s", why)

    def _on_transition(self, event: Any) -> None:
        """The ends of associations that pynetdicom's state machine decides: logged, and a
        connection that ends before its A-ASSOCIATE-RQ lets its thread go at once."""
        assoc = event.assoc
        conn = _conn(assoc)
        if conn is None:
            return
        action, state, fsm_event = event.action, event.current_state, event.fsm_event
        if state == "Sta2" and event.next_state != "Sta3":
            # no A-ASSOCIATE-RQ will come: run_reactor takes None for its ACSE timeout
            assoc.dul.to_user_queue.put(None)
        if conn.logged:
            return
        if action == "AA-2" and state == "Sta2" and fsm_event == "Evt18":  # ARTIM
            conn.warn("closed: no A-ASSOCIATE-RQ within %g s (listener.acse_timeout_seconds)",
                      assoc.acse_timeout)
        elif action == "AE-6" and event.next_state == "Sta13":
            conn.warn("rejected (A-ASSOCIATE-RJ): protocol version not supported")
        elif action == "AA-1" and state == "Sta2":
            conn.warn("aborted: its first PDU is %s, not a valid A-ASSOCIATE-RQ; A-ABORT sent",
                      "not one the worker can decode" if fsm_event == "Evt19" else "another")
        elif action == "AA-8":
            conn.warn("aborted: an invalid or unexpected PDU (%s); A-ABORT sent", fsm_event)
        elif action == "AA-1" and fsm_event == "Evt15":
            if assoc.dul.idle_timer_expired():
                conn.warn("aborted: idle for %g s (listener.network_timeout_seconds)",
                          assoc.network_timeout)
            else:
                conn.warn("aborted by the worker")
        elif action == "AA-3":
            logger.info("%s aborted by the peer (A-ABORT)", conn.who())
        elif action in ("AA-4", "AA-5") and conn.calling_ae is not None:
            logger.info("%s: connection closed without a release", conn.who())


class ListenerAE(AE):
    """An AE whose servers are :class:`BoundedServer` with these limits."""

    def __init__(self, ae_title: str, limits: Limits) -> None:
        super().__init__(ae_title=ae_title)
        self.limits = limits
        self.maximum_associations = PYNETDICOM_MAX_ASSOCIATIONS
        self.maximum_pdu_size = limits.max_pdu_bytes
        self.network_timeout = limits.network_timeout

    def make_server(self, address: Any, *args: Any, **kwargs: Any) -> BoundedServer:
        # start_server asks for a ThreadedAssociationServer: BoundedServer is one
        kwargs.update(server_class=BoundedServer, limits=self.limits)
        return cast(BoundedServer, super().make_server(address, *args, **kwargs))
