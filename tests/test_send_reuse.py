"""The association to the PACS kept open and reused, with TCP_NODELAY (issue 12).

A pynetdicom SCP counts the associations and C-STOREs it gets; Orthanc checks that a PACS
closing the kept association after its own idle timeout costs nothing but a reconnect.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import Orthanc, free_port, secondary_capture, wait_until
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore
    Comprehensive3DSRStorage,
    KeyObjectSelectionDocumentStorage,
    SecondaryCaptureImageStorage,
    Verification,
)

from cxr_worker import receive, send


@dataclass
class CountingSCP:
    """A PACS that counts associations, releases and C-STOREs; ``close_on_store`` closes
    the connection of an association at its n-th C-STORE (a PACS ending it under a send)."""

    port: int = field(default_factory=free_port)
    network_timeout: float | None = None  # closes an idle association after this long
    close_on_store: int | None = None
    associations: int = 0
    released: int = 0
    stored: list[tuple[int, str]] = field(default_factory=list)  # (association n°, SOP UID)
    nodelay: list[int] = field(default_factory=list)  # TCP_NODELAY of each accepted socket
    server: Any = None

    def start(self) -> None:
        ae = AE(ae_title="COUNTING")
        for cls in (SecondaryCaptureImageStorage, Comprehensive3DSRStorage,
                    KeyObjectSelectionDocumentStorage):
            ae.add_supported_context(cls, [ExplicitVRLittleEndian])
        ae.add_supported_context(Verification)
        if self.network_timeout is not None:
            ae.network_timeout = self.network_timeout
        lock = threading.Lock()
        numbers: dict[int, int] = {}

        def on_established(event: evt.Event) -> None:
            with lock:
                self.associations += 1
                numbers[id(event.assoc)] = self.associations

        def on_released(event: evt.Event) -> None:
            with lock:
                self.released += 1

        def on_store(event: evt.Event) -> int:
            n = numbers[id(event.assoc)]
            per_assoc = sum(1 for a, _ in self.stored if a == n) + 1
            if self.close_on_store is not None and per_assoc == self.close_on_store:
                self.close_on_store = None
                event.assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)
                return 0x0000
            self.stored.append((n, str(event.request.AffectedSOPInstanceUID)))
            return 0x0000

        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_ESTABLISHED, on_established), (evt.EVT_RELEASED, on_released),
            (evt.EVT_C_STORE, on_store)])

    def stop(self) -> None:
        self.server.shutdown()

    def peer(self, **kw: Any) -> send.Peer:
        return send.Peer("COUNTING", "127.0.0.1", self.port, "CXR_WORKER",
                         timeout_seconds=kw.pop("timeout_seconds", 10.0), **kw)


@pytest.fixture
def scp() -> Iterator[CountingSCP]:
    s = CountingSCP()
    s.start()
    yield s
    s.stop()


def nodelay(sock: Any) -> int:
    return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


def test_results_go_over_one_association_with_tcp_nodelay(scp: CountingSCP) -> None:
    outbound = send.Outbound()
    sender = send.Sender(scp.peer(), outbound, idle_release_seconds=30)
    uids = []
    for _ in range(5):
        ds = secondary_capture()
        sender.store(ds)
        uids.append(str(ds.SOPInstanceUID))
    assert sender.opened == 1
    assert scp.associations == 1 and [u for _, u in scp.stored] == uids
    assoc = sender.association
    assert assoc is not None and assoc.is_established
    assert nodelay(assoc.dul.socket.socket) != 0  # the live socket
    sender.close()
    assert sender.association is None
    wait_until(lambda: scp.released == 1, 5, "the association's release")
    assert outbound.abort_all() == 0


def test_the_one_shot_store_and_echo_set_tcp_nodelay(scp: CountingSCP,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real = send._on_conn_open

    def spy(event: evt.Event) -> None:
        real(event)
        seen.append(nodelay(event.assoc.dul.socket.socket))

    monkeypatch.setattr(send, "_on_conn_open", spy)
    send.store(scp.peer(), secondary_capture(), send.Outbound())
    send.echo(scp.peer(), send.Outbound())
    assert seen and all(seen) and len(seen) == 2


def test_the_listener_sets_tcp_nodelay_on_accepted_sockets() -> None:
    ae = receive.make_ae(receive.ListenerConfig("CXR_WORKER", (), False))
    seen: list[int] = []

    def on_echo(event: evt.Event) -> int:
        seen.append(nodelay(event.assoc.dul.socket.socket))
        return 0x0000

    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_ECHO, on_echo)])
    try:
        send.echo(send.Peer("CXR_WORKER", "127.0.0.1", port, "MODALITY", timeout_seconds=5),
                  send.Outbound())
    finally:
        server.shutdown()
    assert len(seen) == 1 and seen[0] != 0


def test_the_kept_association_is_released_when_idle(scp: CountingSCP) -> None:
    outbound = send.Outbound()
    sender = send.Sender(scp.peer(), outbound, idle_release_seconds=0.3)
    sender.store(secondary_capture())
    assert sender.association is not None and scp.released == 0
    wait_until(lambda: scp.released == 1, 3, "the idle association's release")
    assert sender.association is None
    assert outbound.abort_all(refuse_new=False) == 0  # nothing left registered
    sender.store(secondary_capture())  # a new one for the next result
    assert sender.opened == 2 and scp.associations == 2
    sender.close()


def test_a_kept_association_the_pacs_closed_while_idle_is_replaced() -> None:
    scp = CountingSCP(network_timeout=0.3)  # the PACS ends an association idle for 0.3 s
    scp.start()
    try:
        sender = send.Sender(scp.peer(), send.Outbound(), idle_release_seconds=30)
        sender.store(secondary_capture())
        time.sleep(1.0)
        assoc = sender.association
        assert assoc is not None and not assoc.is_established  # ended by the PACS
        sender.store(secondary_capture())  # no SendError: reconnected
        assert sender.opened == 2 and len(scp.stored) == 2
        sender.close()
    finally:
        scp.stop()


def test_a_pacs_closing_the_kept_association_during_a_store_costs_one_retry() -> None:
    scp = CountingSCP(close_on_store=2)  # the 2nd C-STORE on an association: closed
    scp.start()
    try:
        sender = send.Sender(scp.peer(), send.Outbound(), idle_release_seconds=30)
        first, second = secondary_capture(), secondary_capture()
        sender.store(first)
        sender.store(second)  # sent again on a new association, not a failed attempt
        assert sender.opened == 2
        assert scp.stored == [(1, str(first.SOPInstanceUID)), (2, str(second.SOPInstanceUID))]
        sender.close()
    finally:
        scp.stop()


def test_a_fresh_association_closed_during_a_store_is_not_retried() -> None:
    scp = CountingSCP(close_on_store=1)
    scp.start()
    try:
        sender = send.Sender(scp.peer(), send.Outbound(), idle_release_seconds=30)
        with pytest.raises(send.SendError, match="no response"):
            sender.store(secondary_capture())
        assert sender.opened == 1 and sender.association is None
    finally:
        scp.stop()


def test_shutdown_aborts_the_kept_association(scp: CountingSCP) -> None:
    outbound = send.Outbound()
    sender = send.Sender(scp.peer(), outbound, idle_release_seconds=30)
    sender.store(secondary_capture())
    assert outbound.abort_all() == 1  # registered for as long as it is open
    with pytest.raises(send.SendError, match="shutting down"):
        sender.store(secondary_capture())


def test_orthanc_closing_the_idle_association_is_transparent(tmp_path: Path) -> None:
    pacs = Orthanc(tmp_path / "orthanc", extra={"DicomScpTimeout": 1})
    pacs.start()
    try:
        sender = send.Sender(send.Peer(pacs.aet, "127.0.0.1", pacs.dicom_port, "CXR_WORKER",
                                       timeout_seconds=10), send.Outbound(),
                             idle_release_seconds=30)
        a, b, c = secondary_capture(), secondary_capture(), secondary_capture()
        sender.store(a)
        sender.store(b)
        assert sender.opened == 1
        time.sleep(2.5)  # past Orthanc's DicomScpTimeout: it closed the association
        sender.store(c)
        assert sender.opened == 2
        for ds in (a, b, c):
            assert pacs.find_instance(str(ds.SOPInstanceUID)), ds.SOPInstanceUID
        sender.close()
    finally:
        pacs.stop()
