"""Issue 10's attacks against ``cxr-worker serve``: what the attacker saw, the worker's peak
memory, and whether an honest modality got through meanwhile; for this checkout and, with
``--baseline``, for another one side by side (before | after).

Prints figures; asserts nothing. Each attack gets a fresh worker (loopback, free ports, its own
data folder), so that its peak resident memory (VmHWM, /proc/<pid>/status) is the attack's; the
worker first scores one honest image (the model and the decoders warm), and the peak at that
point is printed as its idle figure. Then the attack runs while dcmtk's echoscu, as an honest
modality on 127.0.0.1, sends a C-ECHO every 0.5 s (5 s timeouts); the attackers of (1)-(3) and
(9) come from other loopback addresses (127.0.0.2..9: other hosts). dcmtk's storescu sends an
honest image during the attack and another 1 s after it is over. An attack that is not over after
``--cap`` seconds (a connection still held, an image not yet processed) is cut there and shown
as "> CAP s". The attacks are the ones the hostile tests replay (tests/hostile/attacks.py,
tests/hostile/bombs.py):

 1. 10 TCP connections (one host) that each send one byte and go quiet
 2. 10 full A-ASSOCIATE-RQs (one host), then silence
 3. a P-DATA-TF claiming 0xFFFFFFF0 bytes, streaming up to 600 MB
 4. an 8192 x 8192 16-bit RLE Lossless bomb (2 MB, 128 MiB decoded), sent by dcmtk's storescu
 5. a deflated data set inflating to 512 MB, three associations at once
 6. a PACS (dcmtk's storescp) that accepts and then hangs (SIGSTOP), 30 images received
 7. SIGTERM with one idle association open
 8. a SOP Instance UID re-sent for another patient and study
 9. 8 associations storing one SOP Instance UID 3 times each, all at once
10. a 300-character SOP Instance UID in the data set (the command's a valid one), then in the
    command too (pynetdicom itself aborts that association, before and after)

``--baseline PATH`` (and ``--after PATH``, default this checkout as the virtual environment
installs it) runs another checkout with ``PYTHONPATH`` pointing at it; every child process
runs from a scratch folder, so that no ``cxr_worker`` in the current directory shadows it
(``python -m`` puts the current directory first). Its settings must know the keys
``worker_env`` sets (a328c45 and later do); it runs with this checkout's virtual environment.

    git -C /work/main archive 2b1cf3e | tar -x -C /tmp/before
    python tests/benchmarks/bench_hostile.py [--baseline /tmp/before] [--after PATH]
        [--only 1,4] [--cap 60] [--keep DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "hostile"))
sys.path.insert(0, str(HERE))

import attacks  # noqa: E402
import bombs  # noqa: E402
from bench_latency import _make_images  # noqa: E402
from conftest import (  # noqa: E402
    DCMTK_ENV,
    Worker,
    free_port,
    need,
    storescu,
    worker_env,
)

ATTACKER = "127.0.0.2"  # another host than the honest modality (127.0.0.1)
FINISHED = ("scored", "sent", "not_scored", "failed", "held")


@dataclass(frozen=True)
class Target:
    """A checkout to attack: ``src`` None is this one (as installed in the venv)."""

    name: str
    src: Path | None

    def env(self, data_dir: Path, port: int, **extra: str) -> dict[str, str]:
        env = worker_env(data_dir, port, None, **extra)
        if self.src is not None:
            env["PYTHONPATH"] = os.pathsep.join(
                [str(self.src), *filter(None, [os.environ.get("PYTHONPATH")])])
        return env


@dataclass
class Row:
    """One attack against one checkout."""

    attacker: str = ""
    idle_mb: float = 0.0
    peak_mb: float = 0.0
    echo: str = ""
    store: str = ""
    error: str = ""


@dataclass
class Honest:
    """The honest modality on 127.0.0.1: C-ECHOs every ``interval`` s while the attack runs
    (at least ``minimum`` of them), one C-STORE during it and one after."""

    port: int
    image: Callable[[], Path]
    interval: float = 0.5
    minimum: int = 2
    echoes: list[tuple[float, bool, float, str]] = field(default_factory=list)
    during: tuple[bool, float] | None = None
    after: tuple[bool, float] | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def _echo_loop(self, t0: float) -> None:
        while not self._stop.is_set() or len(self.echoes) < self.minimum:
            ok, took, out = attacks.echoscu(self.port, timeout=5)
            self.echoes.append((time.monotonic() - t0, ok, took, out))
            self._stop.wait(self.interval)

    def _store_once(self, delay: float) -> None:
        time.sleep(delay)
        self.during = self.store()

    def store_after(self, settle: float = 1.0) -> None:
        """The C-STORE once the attack is over: ``settle`` s after the attacker has gone."""
        time.sleep(settle)
        self.after = self.store()

    def store(self) -> tuple[bool, float]:
        t0 = time.monotonic()
        res = storescu(self.port, self.image(), check=False)
        return res.returncode == 0 and "Failed" not in res.stderr, time.monotonic() - t0

    @contextlib.contextmanager
    def meanwhile(self, store_after: float = 1.0, store: bool = True) -> Iterator[None]:
        t0 = time.monotonic()
        threads = [threading.Thread(target=self._echo_loop, args=(t0,), daemon=True)]
        if store:
            threads.append(threading.Thread(target=self._store_once, args=(store_after,),
                                            daemon=True))
        for t in threads:
            t.start()
        try:
            yield
        finally:
            self._stop.set()
            for t in threads:
                t.join(30)

    def echo_text(self) -> str:
        if not self.echoes:
            return "-"
        oks = [took for _, ok, took, _ in self.echoes if ok]
        n = len(self.echoes)
        if len(oks) == n:
            return f"ok, max {max(oks):.2f} s ({n}/{n})"
        first_fail = next(out for _, ok, _, out in self.echoes if not ok)
        why = _why(first_fail)
        if not oks:
            return f"failed ({why}), 0/{n} ok over {self.echoes[-1][0]:.0f} s"
        first_ok = next(at for at, ok, _, _ in self.echoes if ok)
        return f"{n - len(oks)}/{n} failed ({why}); first ok at {first_ok:.1f} s"

    def store_text(self) -> str:
        def one(r: tuple[bool, float] | None) -> str:
            return "-" if r is None else f"{'ok' if r[0] else 'FAILED'} {r[1]:.1f} s"

        return f"{one(self.during)} / {one(self.after)}"


def _why(out: str) -> str:
    for needle, why in (("Local Limit Exceeded", "rejected: local limit"),
                        ("Timeout", "timed out"), ("timeout", "timed out"),
                        ("Peer aborted", "aborted"), ("Connection refused", "conn. refused")):
        if needle in out:
            return why
    return "failed"


class Bench:
    def __init__(self, tmp: Path, cap: float) -> None:
        self.tmp = tmp
        self.cap = cap
        self._n = 0
        self._pool: list[Path] = []

    def images(self, n: int) -> list[Path]:
        """``n`` new honest 512 x 512 CRs (new UIDs)."""
        self._n += 1
        out = self.tmp / f"honest-{self._n}"
        out.mkdir()
        return _make_images(out, n, 512, 512)

    def image(self) -> Path:
        if not self._pool:
            self._pool = self.images(8)
        return self._pool.pop()

    @contextlib.contextmanager
    def worker(self, target: Target, row: Row, name: str, **extra: str) -> Iterator[Worker]:
        """A fresh ``serve`` of ``target``, one honest image scored (warm); its VmHWM then
        is the row's idle figure; killed afterwards."""
        port = free_port()
        data = self.tmp / f"{target.name}-{name}"
        data.mkdir()
        w = Worker(data, port, target.env(data, port, **extra))
        w.start()
        try:
            storescu(port, self.image())
            self.wait_processed(w, 120)
            assert w.proc is not None
            row.idle_mb = attacks.vm_hwm_mb(w.proc.pid)
            yield w
        finally:
            w.stop(signal.SIGKILL, 10)

    def wait_processed(self, w: Worker, timeout: float, sent: bool = False) -> float | None:
        """Seconds until every row is finished (and sent, if ``sent``); None: not in time."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            rows = instances(w)
            done = ("sent",) if sent else FINISHED
            if rows and all(r[1] in done for r in rows):
                return time.monotonic() - t0
            time.sleep(0.2)
        return None

    def peak(self, w: Worker, row: Row) -> None:
        assert w.proc is not None
        row.peak_mb = attacks.peak_mb(w.proc.pid)


def instances(w: Worker) -> list[tuple[str, str, str | None, str, str | None]]:
    """(sop, status, label, study, reason) of every row of the worker's SQLite worklist."""
    db = w.data_dir / "worklist.db"
    if not db.exists():
        return []
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as c:
        return c.execute("select sop_instance_uid, status, label, study_instance_uid, "
                         "reason from instances order by id").fetchall()


def wait_for(cond: Callable[[], bool], timeout: float, interval: float = 0.1) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(interval)
    return None


def answers(s: socket.socket) -> bytes:
    """What the worker sent on ``s`` so far (without waiting)."""
    s.setblocking(False)
    got = b""
    with contextlib.suppress(BlockingIOError, OSError):
        while chunk := s.recv(65536):
            got += chunk
    return got


# -- the attacks: each fills ``row`` --------------------------------------------------------
def quiet_connections(b: Bench, target: Target, row: Row, data: bytes, what: str) -> None:
    with b.worker(target, row, what) as w:
        honest = Honest(w.port, b.image)
        socks = [attacks.connect(w.port, data, source=ATTACKER) for _ in range(10)]
        first = {id(s): b"" for s in socks}
        t0 = time.monotonic()
        closed_at: dict[int, float] = {}
        try:
            with honest.meanwhile():
                while time.monotonic() - t0 < b.cap and len(closed_at) < len(socks):
                    for s in socks:
                        if id(s) in closed_at:
                            continue
                        if data[:1] == b"\x01" and len(data) > 1:  # an A-ASSOCIATE-RQ
                            first[id(s)] = first[id(s)] or answers(s)[:1]
                        if attacks.closed_by_peer(s):
                            closed_at[id(s)] = time.monotonic() - t0
                    time.sleep(0.05)
        finally:
            for s in socks:
                s.close()
        honest.store_after()
        b.peak(w, row)
    parts = []
    if len(data) > 1:
        kinds = {b"\x02": "accepted", b"\x03": "rejected", b"\x07": "aborted", b"": "no answer"}
        counts: dict[str, int] = {}
        for v in first.values():
            counts[kinds.get(v, "?")] = counts.get(kinds.get(v, "?"), 0) + 1
        parts.append(", ".join(f"{n} {k}" for k, n in counts.items()))
    at_once = sum(1 for t in closed_at.values() if t < 0.5)
    if len(closed_at) == len(socks):
        parts.append(f"all closed by the worker within {max(closed_at.values()):.1f} s"
                     + (f" ({at_once} at once)" if at_once else ""))
    else:
        parts.append(f"{len(socks) - len(closed_at)}/10 still held at {b.cap:.0f} s "
                     f"(> {b.cap:.0f} s)")
    row.attacker, row.echo, row.store = "; ".join(parts), honest.echo_text(), honest.store_text()


def one_byte(b: Bench, target: Target, row: Row) -> None:
    quiet_connections(b, target, row, b"\x01", "one-byte")


def associate_then_silence(b: Bench, target: Target, row: Row) -> None:
    quiet_connections(b, target, row, attacks.associate_rq(b"QUIET"), "assoc-rq")


def huge_p_data(b: Bench, target: Target, row: Row) -> None:
    with b.worker(target, row, "p-data") as w:
        honest = Honest(w.port, b.image)
        ae = attacks.quiet_ae()
        assoc = ae.associate("127.0.0.1", w.port, ae_title="CXR_WORKER",
                             bind_address=(ATTACKER, 0))
        result: dict[str, float] = {}
        raw = assoc.dul.socket.socket

        def stream() -> None:
            t0 = time.monotonic()
            result["sent"] = attacks.stream_p_data(raw, seconds=b.cap)
            result["took"] = time.monotonic() - t0

        sender = threading.Thread(target=stream, daemon=True)
        try:
            with honest.meanwhile():
                sender.start()
                sender.join(b.cap + 15)
            sent_mb = result.get("sent", 0) / 2**20
            time.sleep(1.0)
            b.peak(w, row)
        finally:
            raw.close()
            with contextlib.suppress(Exception):
                ae.shutdown()
        honest.store_after()
    if sent_mb >= 600:
        row.attacker = f"all 600 MB taken in {result['took']:.1f} s, association not aborted"
    elif "took" in result and result["took"] < b.cap:
        row.attacker = (f"aborted after {sent_mb:.0f} MB had been sent "
                        f"({result['took']:.1f} s)")
    else:
        row.attacker = f"{sent_mb:.0f} MB taken in {b.cap:.0f} s (> {b.cap:.0f} s)"
    row.echo, row.store = honest.echo_text(), honest.store_text()


def _status_text(status: int) -> str:
    return "no response (A-ABORT)" if status < 0 else f"0x{status:04X}"


def _processed(b: Bench, w: Worker, sop: str, t0: float) -> str:
    """How the row of ``sop`` ended (waited for until the cap)."""
    left = max(1.0, b.cap - (time.monotonic() - t0))
    wait_for(lambda: any(r[0] == sop and r[1] in FINISHED for r in instances(w)), left, 0.2)
    rows = [r for r in instances(w) if r[0] == sop]
    if not rows:
        return "no row"
    status = rows[0][1]
    took = time.monotonic() - t0
    if status in FINISHED:
        label = f" {rows[0][2]}" if rows[0][2] else ""
        return f"then {status}{label} ({took:.0f} s)"
    return f"still {status} at {b.cap:.0f} s (> {b.cap:.0f} s)"


def rle_bomb(b: Bench, target: Target, row: Row) -> None:
    bomb = b.tmp / "rle-bomb.dcm"
    if not bomb.exists():
        bombs.write_rle_bomb(bomb)
    sop = str(bombs.radiograph_header(1, 1, "", "rle").SOPInstanceUID)
    with b.worker(target, row, "rle") as w:
        honest = Honest(w.port, b.image)
        t0 = time.monotonic()
        with honest.meanwhile():
            res = subprocess.run(
                [need("storescu"), "-d", "-xr", "-aet", "MODALITY", "-aec", "CXR_WORKER",
                 "127.0.0.1", str(w.port), str(bomb)],
                env=DCMTK_ENV, capture_output=True, text=True, timeout=b.cap + 30,
                check=False)
            found = re.findall(r"DIMSE Status\s*:\s*(0x[0-9a-fA-F]{4})", res.stdout + res.stderr)
            status = found[-1].upper().replace("0X", "0x") if found else "no response"
            then = _processed(b, w, sop, t0) if status == "0x0000" else ""
        b.peak(w, row)
        honest.store_after()
    row.attacker = f"{status} ({bomb.stat().st_size / 1e6:.1f} MB file)" + (
        f", {then}" if then else "")
    row.echo, row.store = honest.echo_text(), honest.store_text()


def deflate_bombs(b: Bench, target: Target, row: Row) -> None:
    from pydicom.uid import DeflatedExplicitVRLittleEndian
    from pynetdicom import _config

    bomb = b.tmp / "deflate-bomb.dcm"
    if not bomb.exists():
        bombs.write_deflate_bomb(bomb)
    sop = str(bombs.radiograph_header(1, 1, "", "deflate").SOPInstanceUID)
    _config.STORE_SEND_CHUNKED_DATASET = True  # the sender never holds the file
    with b.worker(target, row, "deflate") as w:
        honest = Honest(w.port, b.image)
        statuses: list[str] = []

        def send() -> None:
            try:
                statuses.append(_status_text(attacks.send_raw(
                    w.port, bomb, DeflatedExplicitVRLittleEndian, timeout=b.cap)))
            except Exception as exc:
                statuses.append(type(exc).__name__)

        t0 = time.monotonic()
        with honest.meanwhile():
            senders = [threading.Thread(target=send, daemon=True) for _ in range(3)]
            for s in senders:
                s.start()
            for s in senders:
                s.join(b.cap + 15)
            then = _processed(b, w, sop, t0) if "0x0000" in statuses else ""
        b.peak(w, row)
        honest.store_after()
    row.attacker = (f"{', '.join(sorted(statuses))} ({bomb.stat().st_size / 1e6:.1f} MB file)"
                    + (f", {then}" if then else ""))
    row.echo, row.store = honest.echo_text(), honest.store_text()


def hung_pacs(b: Bench, target: Target, row: Row) -> None:
    n = 30
    files = b.images(n)
    pacs = attacks.StoreSCP(b.tmp / f"pacs-{target.name}")
    pacs.start()
    try:
        with b.worker(target, row, "hung-pacs", **pacs.env(30.0)) as w:
            b.wait_processed(w, 60, sent=True)  # the warm-up result delivered
            honest = Honest(w.port, b.image)
            pacs.hang()
            t0 = time.monotonic()
            with honest.meanwhile(store=False):
                honest.during = _timed_store(w.port, files)

                def scored() -> int:
                    return sum(1 for r in instances(w) if r[2]) - 1  # less the warm-up

                all_in = wait_for(lambda: scored() >= n, b.cap - (time.monotonic() - t0),
                                  0.2)
                took = None if all_in is None else time.monotonic() - t0
                done = scored()
            b.peak(w, row)
            pacs.resume()
            honest.store_after()
    finally:
        pacs.stop()
    row.attacker = (f"{n}/{n} scored in {took:.1f} s" if took is not None
                    else f"{done}/{n} scored in {b.cap:.0f} s (> {b.cap:.0f} s)")
    row.echo, row.store = honest.echo_text(), honest.store_text()


def _timed_store(port: int, files: list[Path]) -> tuple[bool, float]:
    t0 = time.monotonic()
    res = storescu(port, *files, check=False)
    return res.returncode == 0, time.monotonic() - t0


def sigterm_idle(b: Bench, target: Target, row: Row) -> None:
    with b.worker(target, row, "sigterm") as w:
        honest = Honest(w.port, b.image, minimum=1)
        ae = attacks.quiet_ae("IDLE_MODALITY", 120)
        assoc = ae.associate("127.0.0.1", w.port, ae_title="CXR_WORKER")
        try:
            with honest.meanwhile(store_after=0.0):
                time.sleep(1.0)
            b.peak(w, row)
            assert w.proc is not None
            t0 = time.monotonic()
            w.proc.send_signal(signal.SIGTERM)
            try:
                rc: int | None = w.proc.wait(b.cap)
            except subprocess.TimeoutExpired:
                rc = None
            took = time.monotonic() - t0
        finally:
            with contextlib.suppress(Exception):
                assoc.abort()
            ae.shutdown()
    row.attacker = (f"exit {rc} after {took:.1f} s" if rc is not None
                    else f"still running at {b.cap:.0f} s (> {b.cap:.0f} s), killed")
    row.echo = honest.echo_text() + " (before the SIGTERM)"
    row.store = honest.store_text().split(" / ")[0] + " / - (stopped)"


def _dataset(path: Path):  # type: ignore[no-untyped-def]
    from pydicom import dcmread

    return dcmread(path)


def uid_of_another_patient(b: Bench, target: Target, row: Row) -> None:
    from pydicom.uid import generate_uid

    first = _dataset(b.image())
    first.PatientID = "PID-FIRST-1"
    second = copy.deepcopy(first)
    second.PatientID = "PID-SECOND-2"
    second.StudyInstanceUID = generate_uid("1.2.826.0.1.3680043.8.498.99.")
    with b.worker(target, row, "uid-conflict") as w:
        honest = Honest(w.port, b.image)
        with honest.meanwhile():
            s1 = attacks.c_store(w.port, first)
            b.wait_processed(w, 60)
            s2 = attacks.c_store(w.port, second)
            time.sleep(1.0)
            b.wait_processed(w, 60)
        held = [r for r in instances(w) if r[0] == first.SOPInstanceUID]
        b.peak(w, row)
        honest.store_after()
    where = ("row kept on the first study" if held and held[0][3] == first.StudyInstanceUID
             else "row moved to the second study" if held else "no row")
    row.attacker = f"first {_status_text(s1)}, re-send {_status_text(s2)}; {where}"
    row.echo, row.store = honest.echo_text(), honest.store_text()


def parallel_one_uid(b: Bench, target: Target, row: Row) -> None:
    ds = _dataset(b.image())
    with b.worker(target, row, "parallel") as w:
        honest = Honest(w.port, b.image)
        with honest.meanwhile():
            statuses, errors = attacks.parallel_stores(
                w.port, ds, associations=8, each=3,
                sources=[f"127.0.0.{i}" for i in range(2, 10)], timeout=b.cap)
            b.wait_processed(w, 30)
        b.peak(w, row)
        honest.store_after()
    refused = [s for s in statuses if s != 0]
    codes = ", ".join(sorted({f"0x{s:04X}" for s in refused}))
    row.attacker = (f"{len(refused)}/{len(statuses)} refused" + (f" ({codes})" if codes else "")
                    + (f"; {len(errors)} association(s) failed" if errors else ""))
    row.echo, row.store = honest.echo_text(), honest.store_text()


def long_uid(b: Bench, target: Target, row: Row) -> None:
    """A 300-character SOP Instance UID in the data set, the command's Affected SOP Instance
    UID a valid one (the file meta's: pynetdicom sends the file's bytes as they are); then
    the same UID in the command too (pynetdicom, as the acceptor, checks the command)."""
    from pydicom import config
    from pydicom.dataelem import DataElement
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import _config

    ds = _dataset(b.image())
    uid = "1." * 149 + "12"  # 300 characters
    ds.add(DataElement(0x00080018, "UI", uid, validation_mode=config.IGNORE))
    path = b.tmp / f"long-uid-{target.name}.dcm"
    ds.save_as(path, enforce_file_format=False)  # the file meta keeps the valid UID
    _config.STORE_SEND_CHUNKED_DATASET = True
    with b.worker(target, row, "long-uid") as w:
        honest = Honest(w.port, b.image)
        t0 = time.monotonic()
        with honest.meanwhile():
            try:
                status = attacks.send_raw(w.port, path, ExplicitVRLittleEndian, timeout=b.cap)
            except AssertionError:
                status = -1
            then = _processed(b, w, uid, t0) if status == 0 else ""
            try:
                in_command = attacks.c_store(w.port, ds, timeout=b.cap)
            except AssertionError:
                in_command = -1
            b.wait_processed(w, 10)
        b.peak(w, row)
        honest.store_after()
    row.attacker = (f"{_status_text(status)}" + (f", {then}" if then else "")
                    + f"; in the command too: {_status_text(in_command)}")
    row.echo, row.store = honest.echo_text(), honest.store_text()


ATTACKS: list[tuple[str, Callable[[Bench, Target, Row], None]]] = [
    ("1. 10 TCP connections, 1 byte each, then quiet", one_byte),
    ("2. 10 A-ASSOCIATE-RQ, then silence", associate_then_silence),
    ("3. P-DATA claiming 0xFFFFFFF0 bytes, 600 MB streamed", huge_p_data),
    ("4. RLE bomb 8192x8192 16-bit", rle_bomb),
    ("5. deflate bomb 512 MB inflated, x3 at once", deflate_bombs),
    ("6. PACS accepts then hangs (SIGSTOP), 30 images", hung_pacs),
    ("7. SIGTERM with an idle association open", sigterm_idle),
    ("8. SOP Instance UID re-sent for another patient", uid_of_another_patient),
    ("9. 8 parallel associations x 3 stores of one SOP UID", parallel_one_uid),
    ("10. 300-character SOP Instance UID", long_uid),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", type=Path, help="another checkout (its cxr_worker imported "
                    "with PYTHONPATH): before/after columns")
    ap.add_argument("--after", type=Path, help="the checkout to show as 'after' (default: "
                    "this one, as installed in the virtual environment)")
    ap.add_argument("--only", default="", help="attack numbers, e.g. 1,4,7")
    ap.add_argument("--cap", type=float, default=60.0, help="seconds per attack (default 60)")
    ap.add_argument("--keep", type=Path, help="work in this new folder and keep it (the "
                    "workers' logs and data)")
    args = ap.parse_args()
    wanted = {int(x) for x in args.only.split(",") if x.strip()}
    for p in (args.baseline, args.after):
        if p is not None and not (p / "cxr_worker" / "cli.py").is_file():
            ap.error(f"{p} holds no cxr_worker/cli.py")
    targets = ([Target("before", args.baseline.resolve())] if args.baseline else []) + [
        Target("after", args.after.resolve() if args.after else None)]
    warnings.simplefilter("ignore")  # pydicom warns about the values the attacks send

    results: dict[tuple[int, str], Row] = {}
    with contextlib.ExitStack() as stack:
        if args.keep:
            args.keep.mkdir(parents=True)
            tmp = args.keep.resolve()
        else:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-hostile-")))
        os.chdir(tmp)  # no cxr_worker in the children's current directory
        bench = Bench(tmp, args.cap)
        for i, (name, attack) in enumerate(ATTACKS, 1):
            if wanted and i not in wanted:
                continue
            for target in targets:
                row = Row()
                t0 = time.monotonic()
                try:
                    attack(bench, target, row)
                except Exception as exc:  # a figure missing, not the whole table
                    row.error = f"{type(exc).__name__}: {str(exc)[:200]}"
                results[i, target.name] = row
                print(f"[{time.monotonic() - t0:5.0f} s] {name} / {target.name}: {row}",
                      file=sys.stderr, flush=True)
    _print(results, targets, wanted, args)


def _print(results: dict[tuple[int, str], Row], targets: list[Target], wanted: set[int],
           args: argparse.Namespace) -> None:
    def where(t: Target) -> str:
        return str(t.src) if t.src else "this checkout"

    print("\n" + "; ".join(f"{t.name}: {where(t)}" for t in targets)
          + f"; cap {args.cap:.0f} s per attack; honest modality on 127.0.0.1 "
          "(C-ECHO every 0.5 s during the attack; C-STORE of a 512x512 CR during / after)\n")
    head = ["attack"]
    for t in targets:
        head += [f"{t.name}: attacker saw", f"{t.name}: peak RSS (idle)",
                 f"{t.name}: C-ECHO during", f"{t.name}: C-STORE during / after"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for i, (name, _) in enumerate(ATTACKS, 1):
        if wanted and i not in wanted:
            continue
        cells = [name]
        for t in targets:
            r = results.get((i, t.name), Row(error="not run"))
            if r.error:
                cells += [f"error: {r.error}", "", "", ""]
                continue
            cells += [r.attacker, f"{r.peak_mb:.0f} MB ({r.idle_mb:.0f})", r.echo, r.store]
        print("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")


if __name__ == "__main__":
    main()
