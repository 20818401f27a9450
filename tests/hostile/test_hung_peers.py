"""Peers that hang (issue 10): a PACS that accepts the TCP connection and then answers nothing
(dcmtk's storescp stopped with SIGSTOP), a PACS that accepts the association and never answers
the C-STORE, and a modality that holds an association open and idle.

Delivery never blocks triage: scoring goes on while a send hangs. SIGTERM ends ``serve``
within 5 s whatever the associations are doing, and what was acknowledged is delivered exactly
once after the restart.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from attacks import StoreSCP, quiet_ae
from conftest import Worker, free_port, secondary_capture, storescu, wait_until
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import SecondaryCaptureImageStorage, Verification  # type: ignore

from cxr_worker import send
from cxr_worker.errors import SendError

SIGTERM_LIMIT = 5.0  # seconds from SIGTERM to the exit of serve


# -- a PACS that hangs: dcmtk's storescp (attacks.StoreSCP), stopped ---------------------------
@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(tmp_path / "pacs-received")
    scp.start()
    yield scp
    scp.stop()



def association_threads() -> list[DULServiceProvider]:
    """Live DUL threads: non-daemon, each would hold the interpreter's exit."""
    return [t for t in threading.enumerate()
            if isinstance(t, DULServiceProvider) and t.is_alive()]


def store_in_thread(peer: send.Peer, outbound: send.Outbound
                    ) -> tuple[threading.Thread, dict[str, object]]:
    outcome: dict[str, object] = {}

    def run() -> None:
        t0 = time.monotonic()
        try:
            send.store(peer, secondary_capture(), outbound)
            outcome["result"] = "stored"
        except SendError as exc:
            outcome["result"] = exc
        outcome["seconds"] = time.monotonic() - t0

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, outcome


# -- send: bounded, and abortable whatever it waits for -------------------------------------
def test_a_send_to_a_pacs_that_hangs_is_bounded_by_its_timeout(storescp: StoreSCP) -> None:
    storescp.hang()
    peer = send.Peer(storescp.aet, "127.0.0.1", storescp.port, "CXR_WORKER",
                     timeout_seconds=1.0)
    t0 = time.monotonic()
    with pytest.raises(SendError, match=r"STORESCP@127\.0\.0\.1:\d+ not answered within 1 s"):
        send.store(peer, secondary_capture(), send.Outbound())
    assert time.monotonic() - t0 < 3.0


def abort_hung_send(t: threading.Thread, outbound: send.Outbound,
                    outcome: dict[str, object]) -> str:
    """Abort the one send ``t`` hangs in; it must end within 1.5 s with a SendError, whose
    text is returned."""
    assert t.is_alive(), f"the send did not hang: {outcome}"
    t_abort = time.monotonic()
    assert outbound.abort_all() == 1
    t.join(5)
    assert not t.is_alive() and isinstance(outcome["result"], SendError), outcome
    assert time.monotonic() - t_abort < 1.5
    return str(outcome["result"])


def test_abort_ends_a_send_waiting_for_the_association_accept(storescp: StoreSCP) -> None:
    storescp.hang()  # the TCP connection is accepted (by the kernel); no A-ASSOCIATE-AC comes
    peer = send.Peer(storescp.aet, "127.0.0.1", storescp.port, "CXR_WORKER",
                     timeout_seconds=30.0)
    outbound = send.Outbound()
    t, outcome = store_in_thread(peer, outbound)
    wait_until(association_threads, 5, "the association request")
    time.sleep(0.5)
    assert "shutting down" in abort_hung_send(t, outbound, outcome)
    wait_until(lambda: not association_threads(), 2, "the association's thread to end")
    # after abort_all, no association starts: a shutdown is under way
    with pytest.raises(SendError, match="shutting down"):
        send.store(peer, secondary_capture(), outbound)


@pytest.fixture
def pacs_that_never_answers_a_store() -> Iterator[tuple[int, threading.Event]]:
    """A pynetdicom SCP that accepts associations, takes the C-STORE and never answers it
    (until the test ends)."""
    release = threading.Event()

    def hang(event: evt.Event) -> int:
        release.wait(60)
        return 0x0000

    ae = AE(ae_title="HUNG_PACS")
    ae.add_supported_context(SecondaryCaptureImageStorage, [ExplicitVRLittleEndian])
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, hang)])
    yield port, release
    release.set()
    server.shutdown()


def test_abort_ends_a_send_waiting_for_the_store_response(
        pacs_that_never_answers_a_store: tuple[int, threading.Event]) -> None:
    port, _ = pacs_that_never_answers_a_store
    peer = send.Peer("HUNG_PACS", "127.0.0.1", port, "CXR_WORKER", timeout_seconds=30.0)
    outbound = send.Outbound()
    t, outcome = store_in_thread(peer, outbound)
    time.sleep(1.0)
    assert "no response" in abort_hung_send(t, outbound, outcome)


def test_an_outbound_registry_aborts_only_its_own_associations(
        pacs_that_never_answers_a_store: tuple[int, threading.Event]) -> None:
    port, release = pacs_that_never_answers_a_store
    peer = send.Peer("HUNG_PACS", "127.0.0.1", port, "CXR_WORKER", timeout_seconds=30.0)
    mine, theirs = send.Outbound(), send.Outbound()
    t, outcome = store_in_thread(peer, theirs)
    time.sleep(1.0)
    assert mine.abort_all() == 0
    assert t.is_alive(), "another registry's send was aborted"
    release.set()  # the PACS answers: the send completes
    t.join(10)
    assert outcome["result"] == "stored"


# -- serve: triage goes on while the PACS hangs ---------------------------------------------------

def _statuses(worker: Worker) -> list[str]:
    return sorted(r["status"] for r in worker.worklist())


def _scored_labels(worker: Worker) -> int:
    """Studies with a result (a label from the model), whatever their delivery status."""
    return sum(1 for r in worker.worklist()
               if r["label"] in ("SUSPECTED PNEUMONIA", "NO PNEUMONIA DETECTED"))


def _sources_of(received: list[Path]) -> list[str]:
    return sorted(str(dcmread(p).SourceImageSequence[0].ReferencedSOPInstanceUID)
                  for p in received)


@pytest.mark.slow
def test_a_hung_pacs_delays_only_delivery(make_worker: Callable[..., Worker],
                                          make_images: Callable[..., list[Path]],
                                          storescp: StoreSCP) -> None:
    n = 30
    files = make_images(n, prefix="hung", shape=(512, 512))
    sources = sorted(str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files)
    worker = make_worker(**storescp.env(timeout_seconds=30.0))
    storescp.hang()
    t0 = time.monotonic()
    storescu(worker.port, *files)
    # each send waits 30 s for an association accept that never comes; scoring goes on
    wait_until(lambda: _scored_labels(worker) == n, 60, f"all {n} images scored while the "
               "PACS hangs")
    scored_in = time.monotonic() - t0
    assert storescp.received() == []
    assert "sent" not in _statuses(worker)

    storescp.resume()
    wait_until(lambda: _statuses(worker) == ["sent"] * n, 120, "every result delivered once "
               "the PACS answers again")
    time.sleep(1.0)  # a duplicate delivery would land now
    assert _sources_of(storescp.received()) == sources, "not each result exactly once"
    print(f"{n} images scored in {scored_in:.1f} s while the PACS hung")
    assert worker.stop() == 0


# -- serve: SIGTERM within 5 s --------------------------------------------------------------------
def _sigterm(worker: Worker) -> tuple[int | None, float]:
    """SIGTERM; the exit code and how long the process took to exit."""
    assert worker.proc is not None
    t0 = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    try:
        rc = worker.proc.wait(30)
    except subprocess.TimeoutExpired:
        rc = None
    elapsed = time.monotonic() - t0
    worker.stop(signal.SIGKILL, 5)
    return rc, elapsed


@pytest.fixture
def idle_association() -> Iterator[Callable[[int], object]]:
    """An association to the worker, opened and then left idle (a modality that keeps it)."""
    opened: list[object] = []
    ae = quiet_ae("IDLE_MODALITY", 120)

    def open_(port: int) -> object:
        assoc = ae.associate("127.0.0.1", port, ae_title="CXR_WORKER")
        assert assoc.is_established
        opened.append(assoc)
        return assoc

    yield open_
    for assoc in opened:
        assoc.abort()  # type: ignore[attr-defined]


@pytest.mark.slow
def test_sigterm_with_an_idle_association_open_exits_within_5_s(
        make_worker: Callable[..., Worker], idle_association: Callable[[int], object]) -> None:
    worker = make_worker()
    assoc = idle_association(worker.port)
    time.sleep(0.5)
    rc, elapsed = _sigterm(worker)
    assert rc == 0, worker.text()[-3000:]
    assert elapsed < SIGTERM_LIMIT, f"exit took {elapsed:.1f} s"
    wait_until(lambda: not assoc.is_established, 5,  # type: ignore[attr-defined]
               "the idle association to be ended by the worker")
    assert "1 inbound" in worker.text()


@pytest.mark.slow
def test_sigterm_with_a_connection_before_its_association_request_exits_cleanly(
        make_worker: Callable[..., Worker]) -> None:
    """A connection that has sent nothing yet (the worker waits for its A-ASSOCIATE-RQ):
    ended at shutdown without pynetdicom taking the abort for a request (no traceback)."""
    worker = make_worker()
    with socket.create_connection(("127.0.0.1", worker.port), timeout=5):
        time.sleep(0.5)
        rc, elapsed = _sigterm(worker)
    assert rc == 0, worker.text()[-3000:]
    assert elapsed < SIGTERM_LIMIT, f"exit took {elapsed:.1f} s"
    assert "Traceback" not in worker.text(), worker.text()[-3000:]


@pytest.mark.slow
def test_sigterm_mid_send_to_a_hung_pacs_exits_within_5_s_and_loses_nothing(
        make_worker: Callable[..., Worker], make_images: Callable[..., list[Path]],
        storescp: StoreSCP, idle_association: Callable[[int], object]) -> None:
    n = 3
    files = make_images(n, prefix="term", shape=(512, 512))
    sources = sorted(str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files)
    worker = make_worker(**storescp.env(timeout_seconds=30.0))
    storescp.hang()
    storescu(worker.port, *files)  # acknowledged: each must reach the PACS, once
    wait_until(lambda: _scored_labels(worker) == n, 60, "the images scored")
    idle_association(worker.port)
    time.sleep(1.0)  # the first send now waits for the stopped PACS's association accept
    rc, elapsed = _sigterm(worker)
    assert rc == 0, worker.text()[-3000:]
    assert elapsed < SIGTERM_LIMIT, f"exit took {elapsed:.1f} s"
    log = worker.text()
    assert "interrupted by the shutdown" in log, log[-3000:]
    assert "leases released" in log

    storescp.resume()
    worker.start()
    wait_until(lambda: _statuses(worker) == ["sent"] * n, 90,
               "every result delivered after the restart")
    time.sleep(1.0)  # a duplicate delivery would land now
    assert _sources_of(storescp.received()) == sources, "not each result exactly once"
    assert worker.stop() == 0


@pytest.mark.slow
def test_sigterm_while_scoring_exits_within_5_s_and_loses_nothing(
        make_worker: Callable[..., Worker], make_images: Callable[..., list[Path]]) -> None:
    """SIGTERM while large images are being scored, with a grace period shorter than one
    image: the job in progress is left (its lease given back), the process exits 0 at once,
    and the restart scores every acknowledged image exactly once."""
    n = 8
    files = make_images(n, prefix="busy", shape=(2048, 1700))
    sources = sorted(str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files)
    worker = make_worker(CXR_WORKER__JOBS__SHUTDOWN_GRACE_SECONDS="0.1")
    storescu(worker.port, *files)  # every image acknowledged
    wait_until(lambda: "cxr_worker.pipeline: scored" in worker.text(), 60, "scoring under way")
    rc, elapsed = _sigterm(worker)
    assert rc == 0, worker.text()[-3000:]
    assert elapsed < SIGTERM_LIMIT, f"exit took {elapsed:.1f} s"
    scored_before = worker.text().count("cxr_worker.pipeline: scored")
    assert scored_before < n, "the SIGTERM came too late to test anything"

    worker.start()
    wait_until(lambda: _statuses(worker) == ["scored"] * n, 120, "every image scored")
    results = sorted((worker.data_dir / "results").rglob("*.dcm"))
    assert _sources_of(results) == sources
    assert worker.stop() == 0
    print(f"SIGTERM while scoring: exit in {elapsed:.1f} s, {scored_before}/{n} scored before; "
          f"{'a job left unfinished' if 'did not finish in time' in worker.text() else ''}")
