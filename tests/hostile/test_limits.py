"""Bounded resources (issue 10): peers that connect and go quiet hold an association slot only
until a timeout, one calling host holds at most its share of the slots, a PDU longer than
the advertised maximum is aborted unread, and every refusal and abort is logged with the
peer's address and (escaped) AE titles; meanwhile an honest modality's C-ECHO gets through.
Against a real ``cxr-worker serve`` on 127.0.0.1; other hosts are other loopback addresses
(127.0.0.2, 127.0.0.3: Linux routes all of 127/8 to the loopback interface)."""

from __future__ import annotations

import hashlib
import inspect
import re
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from attacks import (
    associate_rq,
    closed_by_peer,
    connect,
    echoscu,
    quiet_ae,
    stream_p_data,
    vm_hwm_mb,
)
from conftest import Worker, wait_until
from pynetdicom import AE, acse, association, dul, evt, fsm, transport
from pynetdicom import ae as ae_module

pytestmark = pytest.mark.slow

TIMEOUT = 2  # network and ACSE timeouts the worker runs with here, seconds
SLOTS = 4
PER_HOST = 3  # below SLOTS, so that the per-host cap is what refuses
MAX_PDU = 65536
LIMITS = {
    "CXR_WORKER__LISTENER__NETWORK_TIMEOUT_SECONDS": str(TIMEOUT),
    "CXR_WORKER__LISTENER__ACSE_TIMEOUT_SECONDS": str(TIMEOUT),
    "CXR_WORKER__LISTENER__MAX_ASSOCIATIONS": str(SLOTS),
    "CXR_WORKER__LISTENER__MAX_ASSOCIATIONS_PER_HOST": str(PER_HOST),
    "CXR_WORKER__LISTENER__MAX_PDU_BYTES": str(MAX_PDU),
}
# the A-ABORT the worker answers an oversize PDU with: service provider, invalid PDU
# parameter value (PS3.8 9.3.8)
A_ABORT_INVALID_PARAMETER = bytes.fromhex("07000000000400000206")
PEER = r"127\.0\.0\.1:\d+"


@pytest.fixture
def worker(make_worker: Callable[..., Worker]) -> Worker:
    w: Worker = make_worker(**LIMITS)
    return w


@pytest.fixture
def scu() -> Iterator[AE]:
    ae = quiet_ae()  # the client never gives up
    yield ae
    ae.shutdown()


def test_quiet_associations_are_released_and_a_modality_gets_through(worker: Worker,
                                                                      scu: AE) -> None:
    """Associations established from two other hosts and then idle fill every slot (a
    C-ECHO is refused: all slots in use, logged); within the network timeout plus a margin
    the worker aborts them (logged as idle), and dcmtk's echoscu then succeeds in under 2 s."""
    sources = ["127.0.0.2"] * PER_HOST + ["127.0.0.3"] * (SLOTS - PER_HOST)
    held = [scu.associate("127.0.0.1", worker.port, ae_title="CXR_WORKER",
                          bind_address=(src, 0)) for src in sources]
    try:
        assert all(a.is_established for a in held)
        t0 = time.monotonic()
        ok, _, out = echoscu(worker.port)
        assert not ok, "the slots were not all held: the test proves nothing"
        assert "Local Limit Exceeded" in out, out
        assert re.search(rf"WARNING cxr_worker\.listener: association from {PEER} \(calling AE "
                         rf"'MODALITY', called AE 'CXR_WORKER'\) rejected \(A-ASSOCIATE-RJ\): "
                         rf"local limit exceeded: all {SLOTS} association slots are in use "
                         rf"\(listener\.max_associations {SLOTS}\)", worker.text())

        def echo_gets_through() -> float | None:
            ok, took, _ = echoscu(worker.port)
            return took if ok else None

        took = wait_until(echo_gets_through, TIMEOUT + 5, "a C-ECHO to get through")
        assert took < 2
        assert time.monotonic() - t0 < TIMEOUT + 5
        wait_until(lambda: not any(a.is_alive() for a in held), 5,
                   "the quiet associations to be aborted")
        assert all(a.is_aborted for a in held)
        idle = re.findall(r"association from 127\.0\.0\.[23]:\d+ \(calling AE 'QUIET', called "
                          rf"AE 'CXR_WORKER'\) aborted: idle for {TIMEOUT} s", worker.text())
        assert len(idle) == SLOTS
    finally:
        for a in held:
            if a.is_established:
                a.abort()


@pytest.mark.parametrize("data", [b"\x01", b""])
def test_a_connection_that_sends_one_byte_is_dropped(worker: Worker, data: bytes) -> None:
    """A TCP connection that sends one byte of a PDU header (or nothing) and goes quiet is
    closed by the worker once the network (ACSE) timeout has passed (pynetdicom alone waits
    for the rest of the header for ever), and the drop is logged with the peer's address."""
    with connect(worker.port, data) as s:
        t0 = time.monotonic()
        wait_until(lambda: closed_by_peer(s), TIMEOUT + 5, "the worker to close it")
        took = time.monotonic() - t0
        host, port = s.getsockname()[:2]
    assert took < TIMEOUT + 1
    why = (f"dropped: 1 of 6 bytes of a PDU header after {TIMEOUT}\\.\\d s" if data else
           f"closed: no A-ASSOCIATE-RQ within {TIMEOUT} s \\(listener\\.acse_timeout_seconds\\)")
    assert re.search(rf"WARNING cxr_worker\.listener: connection from {host}:{port} {why}",
                     worker.text())


def test_ten_half_headers_from_one_host_hold_at_most_its_share(worker: Worker) -> None:
    """Ten connections from one host that each send half a PDU header and go quiet: the host
    holds at most its PER_HOST slots (plus as many connections waiting for an answer), the
    rest are closed at once, an honest modality on another host gets a slot meanwhile, all
    are dropped within the network timeout, and a C-ECHO from that same host then succeeds
    in under 2 s."""
    quiet = [connect(worker.port, b"\x01\x00\x00", source="127.0.0.2") for _ in range(10)]
    try:
        t0 = time.monotonic()
        time.sleep(0.5)
        closed_at_once = sum(closed_by_peer(s) for s in quiet)
        assert closed_at_once == 10 - 2 * PER_HOST
        ok, took, out = echoscu(worker.port)  # from 127.0.0.1
        assert ok and took < 2, out
        wait_until(lambda: all(closed_by_peer(s) for s in quiet), TIMEOUT + 5,
                   "the worker to drop them all")
        assert time.monotonic() - t0 < TIMEOUT + 1.5
    finally:
        for s in quiet:
            s.close()
    log = worker.text()
    assert len(re.findall(r"connection from 127\.0\.0\.2:\d+ dropped: 3 of 6 bytes", log)) \
        == 2 * PER_HOST
    assert re.search(rf"connection from 127\.0\.0\.2:\d+ closed at once, unread: 127\.0\.0\.2 "
                     rf"holds {PER_HOST} associations \(listener\.max_associations_per_host "
                     rf"{PER_HOST}\)", log)

    # the same from the modality's own host: refused while they are held, through once
    # they are dropped
    quiet = [connect(worker.port, b"\x01") for _ in range(10)]
    try:
        assert not echoscu(worker.port)[0], "the host's slots were not held"
        wait_until(lambda: all(closed_by_peer(s) for s in quiet), TIMEOUT + 5,
                   "the worker to drop them all")
        ok, took, out = echoscu(worker.port)
        assert ok and took < 2, out
    finally:
        for s in quiet:
            s.close()


def test_one_host_holds_at_most_its_share_of_the_slots(worker: Worker, scu: AE) -> None:
    """PER_HOST (< SLOTS) associations from 127.0.0.1: dcmtk's echoscu from there is rejected
    (local limit exceeded), logged with its address and calling AE, while another host still
    associates."""
    held = [scu.associate("127.0.0.1", worker.port, ae_title="CXR_WORKER")
            for _ in range(PER_HOST)]
    try:
        assert all(a.is_established for a in held)
        ok, _, out = echoscu(worker.port)
        assert not ok
        assert "Rejected Transient" in out and "Local Limit Exceeded" in out, out
        other = scu.associate("127.0.0.1", worker.port, ae_title="CXR_WORKER",
                              bind_address=("127.0.0.2", 0))
        assert other.is_established, "a slot was free for another host"
        other.release()
    finally:
        for a in held:
            a.release()
    assert re.search(rf"WARNING cxr_worker\.listener: association from {PEER} \(calling AE "
                     rf"'MODALITY', called AE 'CXR_WORKER'\) rejected \(A-ASSOCIATE-RJ\): local "
                     rf"limit exceeded: 127\.0\.0\.1 holds {PER_HOST} associations "
                     rf"\(listener\.max_associations_per_host {PER_HOST}\)", worker.text())
    ok, took, out = echoscu(worker.port)
    assert ok and took < 2, out


@pytest.mark.parametrize(("pdu_type", "length"), [(0x04, 0xFFFFFFF0), (0x04, MAX_PDU + 1),
                                                  (0x01, 100_000_000)])
def test_a_pdu_longer_than_the_maximum_is_aborted_unread(worker: Worker, pdu_type: int,
                                                         length: int) -> None:
    """A PDU header announcing more than the maximum (a P-DATA-TF over max_pdu_bytes, an
    A-ASSOCIATE-RQ over 256 KiB) is answered with A-ABORT and the connection closed."""
    with connect(worker.port, struct.pack(">BBL", pdu_type, 0, length)) as s:
        s.settimeout(5)
        answer = b""
        while chunk := s.recv(100):
            answer += chunk
    assert answer == A_ABORT_INVALID_PARAMETER
    assert re.search(rf"connection from {PEER} aborted: a "
                     rf"{'P-DATA-TF' if pdu_type == 4 else 'A-ASSOCIATE-RQ'} PDU of {length} bytes "
                     r"announced, over \d+ \(.*\); A-ABORT sent and the connection closed "
                     "without reading it", worker.text())


def test_p_data_pdus_of_exactly_the_maximum_length_are_received(worker: Worker,
                                                                tmp_path: Path) -> None:
    """The limit is the standard's (PS3.8 9.3.5: the PDU length field, the variable field, at
    most the maximum), not stricter: pynetdicom fills P-DATA-TF PDUs to exactly MAX_PDU
    (dcmtk stops 6 bytes short); a 3.9 MB image in such PDUs is stored (0x0000)."""
    from pydicom import dcmread

    ds = dcmread(Path(__file__).resolve().parents[2] / "sample_dicom" /
                 "cr_pa_normal_12bit.dcm")
    scu = AE(ae_title="MODALITY")
    scu.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    lengths: list[int] = []
    assoc = scu.associate("127.0.0.1", worker.port, ae_title="CXR_WORKER", evt_handlers=[
        (evt.EVT_PDU_SENT, lambda e: lengths.append(len(e.pdu)))])
    try:
        assert assoc.is_established
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
        scu.shutdown()
    assert max(lengths) == MAX_PDU + 6  # len() of a PDU counts its 6-byte header


def test_a_600_mb_p_data_pdu_is_aborted_and_memory_stays_bounded(worker: Worker,
                                                                 scu: AE) -> None:
    """On an established association, a P-DATA-TF claiming 0xFFFFFFF0 bytes and streaming
    600 MB (the attack that took the worker from 166 to 1,395 MB): the association is
    aborted after the header, the sender cannot push more than socket buffers hold, the
    worker's peak memory stays below 600 MB (and grows by less than 64 MB), and an honest
    C-ECHO right after succeeds in under 2 s."""
    assert worker.proc is not None
    before = vm_hwm_mb(worker.proc.pid)
    assoc = scu.associate("127.0.0.1", worker.port, ae_title="CXR_WORKER")
    assert assoc.is_established
    raw = assoc.dul.socket.socket
    t0 = time.monotonic()
    sent = stream_p_data(raw, 0xFFFFFFF0, 600 * 2**20)
    try:
        assert sent < 64 * 2**20, f"the worker read {sent / 2**20:.0f} MB of the PDU"
        assert time.monotonic() - t0 < 10
        wait_until(lambda: assoc.is_aborted, 5, "the association to be aborted")
    finally:
        raw.close()  # pynetdicom leaves it open when shutdown() fails on a reset socket
    ok, took, out = echoscu(worker.port)
    assert ok and took < 2, out
    after = vm_hwm_mb(worker.proc.pid)
    assert after < 600 and after - before < 64, (before, after)
    assert re.search(rf"association from {PEER} \(calling AE 'QUIET', called AE "
                     rf"'CXR_WORKER'\) aborted: a P-DATA-TF PDU of {0xFFFFFFF0} bytes announced, "
                     rf"over {MAX_PDU} \(listener\.max_pdu_bytes\)", worker.text())


def test_rejections_and_aborts_are_logged_with_escaped_ae_titles(
        make_worker: Callable[..., Worker]) -> None:
    """A wrong called AE title and a calling AE title not allowed are rejected (dcmtk sees
    why) and logged with the peer's address and both titles; an A-ASSOCIATE-RQ whose calling
    AE title holds an escape and a newline is aborted and logged with them escaped: no raw
    control character reaches the log."""
    worker = make_worker(**LIMITS, CXR_WORKER__LISTENER__ALLOWED_CALLING_AE_TITLES="MODALITY")
    ok, _, out = echoscu(worker.port, called="WRONG")
    assert not ok and "Called AE Title Not Recognized" in out, out
    ok, _, out = echoscu(worker.port, calling="STRANGER")
    assert not ok and "Calling AE Title Not Recognized" in out, out
    with connect(worker.port, associate_rq(b"BAD\x1bX\nY")) as s:
        s.settimeout(5)
        answer = b""
        while chunk := s.recv(100):
            answer += chunk
    assert answer[:1] == b"\x07", "not answered with A-ABORT"
    assert echoscu(worker.port)[0]

    log = worker.text()
    assert re.search(rf"WARNING cxr_worker\.listener: association from {PEER} \(calling AE "
                     r"'MODALITY', called AE 'WRONG'\) rejected \(A-ASSOCIATE-RJ\): called AE "
                     r"title not recognised: this worker is 'CXR_WORKER' \(listener\.ae_title\)",
                     log)
    assert re.search(rf"WARNING cxr_worker\.listener: association from {PEER} \(calling AE "
                     r"'STRANGER', called AE 'CXR_WORKER'\) rejected \(A-ASSOCIATE-RJ\): "
                     r"calling AE title not recognised: not in "
                     r"listener\.allowed_calling_ae_titles", log)
    assert re.search(rf"WARNING cxr_worker\.listener: association from {PEER} \(calling AE "
                     r"'BAD\\x1bX\\x0aY', called AE 'CXR_WORKER'\) aborted: its first PDU is "
                     r"not one the worker can decode", log)
    assert "\x1b" not in log


def test_the_association_accept_advertises_the_configured_maximum_pdu_length(
        worker: Worker, scu: AE) -> None:
    assoc = scu.associate("127.0.0.1", worker.port, ae_title="CXR_WORKER")
    try:
        assert assoc.is_established
        assert assoc.acceptor.maximum_length == MAX_PDU
    finally:
        assoc.release()


# what cxr_worker.listener relies on in pynetdicom, by the sha256 of its source (first 16
# hex digits): a change means re-checking the hooks its docstring lists, then updating these
PYNETDICOM_HOOKED = {
    dul.DULServiceProvider._read_pdu_data: "19f2d4e38c13c835",
    transport.AssociationSocket.recv: "6bc20a33b1b7cfe7",
    transport.AssociationSocket.close: "c726c8db53813d55",
    transport.AssociationSocket._shutdown_socket: "e2b2628faa81a578",
    transport.AssociationSocket.ready.fget: "3eb58e3d39dc076d",
    transport.RequestHandler.handle: "034823fb4df3a874",
    transport.RequestHandler._create_association: "05c8d12b79863cdb",
    transport.ThreadedAssociationServer.process_request_thread: "9e76e9b9c8a3d8b1",
    transport.AssociationServer.__init__: "edacb98bdfb7b974",
    association.Association.run_reactor: "ed8bbbe3b3d6ddae",
    acse.ACSE._negotiate_as_acceptor: "fffd360957c42a8e",
    acse.ACSE.send_reject: "700998293bbcb6c9",
    ae_module.ApplicationEntity.make_server: "6569298ac5cf837c",
    ae_module.ApplicationEntity.start_server: "d3868a2df83d3cc0",
    fsm.StateMachine.do_action: "9a883f44c7f31641",
}


def test_the_pynetdicom_internals_the_listener_relies_on_are_unchanged() -> None:
    changed = [f.__qualname__ for f, digest in PYNETDICOM_HOOKED.items()
               if hashlib.sha256(inspect.getsource(f).encode()).hexdigest()[:16] != digest]
    assert not changed, (f"pynetdicom changed {changed}: re-check the hooks listed in "
                         "cxr_worker/listener.py's docstring, then update PYNETDICOM_HOOKED")
