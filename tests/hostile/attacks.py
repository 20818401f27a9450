"""The attacks of issue 10 against a ``cxr-worker serve``, and the probes that judge them;
shared by the hostile tests and ``tests/benchmarks/bench_hostile.py`` (which replays them
against this checkout and an older one), so that both replay the same bytes.

- raw TCP connections that send a few bytes and go quiet (:func:`connect`,
  :func:`closed_by_peer`); an A-ASSOCIATE-RQ with raw AE title fields (:func:`associate_rq`);
- a P-DATA-TF PDU that claims more than any maximum and streams (:func:`stream_p_data`);
- a data set sent as its bytes are, never decoded (:func:`send_raw`); one C-STORE of a data
  set with values pynetdicom would refuse to send (:func:`c_store`); parallel C-STOREs of
  one instance from several associations (:func:`parallel_stores`);
- dcmtk's storescp as a PACS that can be made to hang (:class:`StoreSCP`);
- the probes: dcmtk's echoscu as an honest modality (:func:`echoscu`), the peak resident
  memory of a process (:func:`vm_hwm_mb`).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from conftest import DCMTK_ENV, free_port, need, wait_until
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

MiB = 2**20


# -- probes ---------------------------------------------------------------------------------
def echoscu(port: int, called: str = "CXR_WORKER", calling: str = "MODALITY",
            timeout: int = 2) -> tuple[bool, float, str]:
    """dcmtk's C-ECHO, as a modality sends it, with ``timeout`` seconds for the connection,
    the association and the response: (succeeded, seconds it took, its output)."""
    t0 = time.monotonic()
    res = subprocess.run(
        [need("echoscu"), "-to", str(timeout), "-ta", str(timeout), "-td", str(timeout),
         "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
        env=DCMTK_ENV, capture_output=True, text=True, timeout=5 * timeout, check=False)
    return res.returncode == 0, time.monotonic() - t0, res.stdout + res.stderr


def vm_hwm_mb(pid: int) -> float:
    """The peak resident memory of process ``pid`` (VmHWM), MB."""
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (a service's worker processes)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text(encoding="ascii", errors="replace")
            except OSError:
                continue
            if f"\nPPid:\t{pid}\n" in status:
                out.append(int(entry.name))
    return out


def peak_mb(pid: int) -> float:
    """The largest peak resident memory (VmHWM) of process ``pid`` and of each of its child
    processes, MB: the service's decoding runs in its worker processes."""
    peaks = [vm_hwm_mb(pid)]
    for child in children(pid):
        try:
            peaks.append(vm_hwm_mb(child))
        except (OSError, AssertionError):  # ended meanwhile
            continue
    return max(peaks)


# -- raw connections --------------------------------------------------------------------------
def connect(port: int, data: bytes, source: str = "127.0.0.1") -> socket.socket:
    """A raw TCP connection from ``source`` that sends ``data`` and then nothing."""
    s = socket.socket()
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    s.sendall(data)
    return s


def closed_by_peer(s: socket.socket) -> bool:
    """Whether the worker has closed ``s`` (EOF or reset; anything it sent first is read)."""
    while select.select([s], [], [], 0)[0]:
        try:
            if not s.recv(65536):
                return True
        except OSError:
            return True
    return False


def associate_rq(calling: bytes, called: bytes = b"CXR_WORKER") -> bytes:
    """An A-ASSOCIATE-RQ PDU for Verification with these raw AE title fields (16 bytes each,
    whatever they hold: pynetdicom itself refuses to send a control character in one)."""
    rq = A_ASSOCIATE()
    rq.application_context_name = "1.2.840.10008.3.1.1.1"
    rq.calling_ae_title, rq.called_ae_title = "CALLINGPLACEHLD", "CALLEDPLACEHOLD"
    cx = build_context(Verification)
    cx.context_id = 1
    rq.presentation_context_definition_list = [cx]
    ml = MaximumLengthNotification()
    ml.maximum_length_received = 16384
    rq.user_information = [ml]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(rq)
    raw = pdu.encode()
    raw = raw.replace(b"CALLINGPLACEHLD ", calling.ljust(16)[:16])
    return raw.replace(b"CALLEDPLACEHOLD ", called.ljust(16)[:16])


def quiet_ae(ae_title: str = "QUIET", timeout: float = 30) -> AE:
    """An SCU proposing Verification whose timeouts are ``timeout`` s: a client that holds
    its associations open and idle, and does not give up first."""
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    return ae


def stream_p_data(raw: socket.socket, claimed: int = 0xFFFFFFF0, total: int = 600 * MiB,
                  seconds: float = 60) -> int:
    """On an established association's socket: a P-DATA-TF header claiming ``claimed``
    bytes, then zeros up to ``total`` bytes (or ``seconds``), until the worker stops reading
    (a reset, a broken pipe, a send that times out). The bytes sent after the header."""
    chunk = bytes(MiB)
    sent, deadline = 0, time.monotonic() + seconds
    raw.settimeout(max(1.0, min(10.0, seconds)))
    try:
        raw.sendall(struct.pack(">BBL", 0x04, 0, claimed))
        while sent < total and time.monotonic() < deadline:
            raw.sendall(chunk)
            sent += len(chunk)
    except OSError:
        pass
    return sent


# -- C-STOREs ---------------------------------------------------------------------------------
def send_raw(port: int, path: Path, ts: str, timeout: float = 60) -> int:
    """pynetdicom sends the file's data set bytes as they are (never decoded or re-encoded):
    what a hostile peer puts on the wire. With ``_config.STORE_SEND_CHUNKED_DATASET`` set,
    the sender never holds the file either. The status of the C-STORE response."""
    from pydicom.filereader import read_file_meta_info

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(read_file_meta_info(path).MediaStorageSOPClassUID, ts)
    ae.dimse_timeout = ae.network_timeout = ae.acse_timeout = timeout
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR_WORKER")
    try:
        assert assoc.is_established
        status = assoc.send_c_store(path)
        assert status, "no C-STORE response"
        return int(status.Status)
    finally:
        assoc.release()
        ae.shutdown()


@contextlib.contextmanager
def any_uid_sent() -> Iterator[None]:
    """pynetdicom's SCU puts any UID on the wire (it refuses one over 64 characters)."""
    saved = _config.VALIDATORS["UI"]
    _config.VALIDATORS["UI"] = lambda value: (True, "")
    try:
        yield
    finally:
        _config.VALIDATORS["UI"] = saved


def c_store(port: int, ds: Dataset, *, ts: str = ExplicitVRLittleEndian,
            source: str | None = None, timeout: float = 60) -> int:
    """One association, one C-STORE of ``ds`` in ``ts`` (its UIDs sent whatever they are);
    the response's status (-1: no response)."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ts)
    ae.dimse_timeout = ae.network_timeout = ae.acse_timeout = timeout
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR_WORKER",
                         bind_address=(source or "", 0))
    try:
        assert assoc.is_established, "association refused"
        with any_uid_sent():
            status = assoc.send_c_store(ds)
        return int(status.Status) if status else -1
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def parallel_stores(port: int, ds: Dataset, *, associations: int = 8, each: int = 3,
                    sources: list[str] | None = None, timeout: float = 120
                    ) -> tuple[list[int], list[BaseException]]:
    """``associations`` associations (from ``sources``, one each, if given) send ``ds``
    ``each`` times, all starting at once: the statuses answered, and what went wrong."""
    statuses: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(associations)

    def send(source: str) -> None:
        scu = AE(ae_title="MODALITY")
        try:
            scu.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
            assoc = scu.associate("127.0.0.1", port, ae_title="CXR_WORKER",
                                  bind_address=(source, 0))
            assert assoc.is_established
            start.wait(30)
            for _ in range(each):
                statuses.append(int(assoc.send_c_store(ds).Status))
            assoc.release()
        except BaseException as exc:
            errors.append(exc)
            start.abort()
        finally:
            scu.shutdown()

    hosts = sources or [""]
    threads = [threading.Thread(target=send, args=(hosts[i % len(hosts)],))
               for i in range(associations)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return statuses, errors


# -- a PACS that hangs: dcmtk's storescp, stopped ---------------------------------------------
@dataclass
class StoreSCP:
    """dcmtk's storescp as the PACS; every object it receives is a file of its own (``+uf``),
    so a result delivered twice shows as two files."""

    out: Path
    port: int = 0
    aet: str = "STORESCP"
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.port = self.port or free_port()
        self.out.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [need("storescp"), "+uf", "-aet", self.aet, "-od", str(self.out), str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_until(self._listens, 10, "storescp to listen")

    def _listens(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, "storescp exited"
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def hang(self) -> None:
        """SIGSTOP: the kernel still completes TCP connections; nothing answers them."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def received(self) -> list[Path]:
        return sorted(p for p in self.out.iterdir() if p.is_file())

    def env(self, timeout_seconds: float = 30.0) -> dict[str, str]:
        return {"CXR_WORKER__PACS__AE_TITLE": self.aet, "CXR_WORKER__PACS__HOST": "127.0.0.1",
                "CXR_WORKER__PACS__PORT": str(self.port),
                "CXR_WORKER__PACS__TIMEOUT_SECONDS": str(timeout_seconds)}
