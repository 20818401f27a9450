"""The processes a measurement talks to, each started and stopped here: dcmtk's storescp (as
the worker's PACS or as a receiver), Orthanc (tests/conftest.py's), the minimal pynetdicom SCP
(bench/minimal_scp.py) and ``cxr-worker serve`` (conftest's ``Worker``); a watcher that
timestamps each file storescp finishes writing; dcmtk's storescu."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from common import BENCH, DCMTK_ENV, Worker, free_port, log, need, wait_until, worker_env

WORKER_AET = "CXR_WORKER"
MODALITY_AET = "MODALITY"


def _stop_group(proc: subprocess.Popen[bytes] | None, timeout: float = 15) -> None:
    """SIGTERM the process group ``proc`` leads (started with ``start_new_session``: it and
    the children it forked, nothing else), then SIGKILL what is left."""
    if proc is None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue


def echo_ok(aet: str, port: int) -> bool:
    res = subprocess.run([need("echoscu"), "-to", "5", "-aec", aet, "127.0.0.1", str(port)],
                         env=DCMTK_ENV, capture_output=True, timeout=20, check=False)
    return res.returncode == 0


# -- dcmtk storescp ------------------------------------------------------------------------
class _FileReceiver:
    """A receiver subprocess that keeps what it receives as files in ``out``."""

    proc: subprocess.Popen[bytes] | None
    out: Path

    def stop(self) -> None:
        _stop_group(self.proc)
        self.proc = None

    def clear(self) -> None:
        for f in self.out.iterdir():
            f.unlink(missing_ok=True)


@dataclass
class Storescp(_FileReceiver):
    """``storescp [--fork] -aet AET -od DIR PORT`` (files named ``<modality>.<SOP UID>``,
    written without fsync). ``--fork`` (a child per association) is how storescp serves more
    than one association at a time; without it, a second association waits for the first."""

    root: Path
    aet: str = "PACS"
    fork: bool = False
    accept_all: bool = False  # +xa: every transfer syntax storescp knows (JPEG 2000, JPEG-LS)
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    out: Path = field(init=False)
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        self.out = self.root / "received"
        self.log = self.root / "storescp.log"

    @property
    def label(self) -> str:
        return "dcmtk storescp" + (" --fork" if self.fork else "")

    def start(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as lg:
            self.proc = subprocess.Popen(
                [need("storescp"), *(["--fork"] if self.fork else []),
                 *(["+xa"] if self.accept_all else []), "-aet", self.aet,
                 "-od", str(self.out), str(self.port)],
                env=DCMTK_ENV, stdout=lg, stderr=lg, start_new_session=True)
        wait_until(lambda: self._alive() and echo_ok(self.aet, self.port), 20, "storescp")

    def _alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"storescp exited: {self.log.read_text()[-2000:]}")
        return True



# -- the minimal pynetdicom SCP ---------------------------------------------------------------
@dataclass
class MinimalScp(_FileReceiver):
    root: Path
    aet: str = "MINSCP"
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    label: str = "minimal pynetdicom SCP (fsync)"

    def __post_init__(self) -> None:
        self.port = self.port or free_port()

    @property
    def out(self) -> Path:
        return self.root / "received"

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        logf = self.root / "minimal_scp.log"
        with open(logf, "ab") as lg:
            self.proc = subprocess.Popen(
                [sys.executable, str(BENCH / "minimal_scp.py"), "--port", str(self.port),
                 "--dir", str(self.out), "--aet", self.aet],
                stdout=lg, stderr=lg, start_new_session=True)

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"minimal SCP exited: {logf.read_text()[-2000:]}")
            return "minimal-scp ready" in logf.read_text() and echo_ok(self.aet, self.port)

        wait_until(up, 60, "the minimal SCP")



# -- the worker --------------------------------------------------------------------------------
def start_worker(root: Path, pacs: Storescp) -> Worker:
    """``cxr-worker serve`` with ``pacs`` as its PACS (the ``[pacs]`` timeouts and the kept
    association's idle release at their defaults); conftest's ``worker_env`` otherwise (its own
    data folder, listener and HTTP ports on 127.0.0.1, 0.1 s job poll)."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = worker_env(data, port, None, **{
        "CXR_WORKER__PACS__AE_TITLE": pacs.aet,
        "CXR_WORKER__PACS__HOST": "127.0.0.1",
        "CXR_WORKER__PACS__PORT": str(pacs.port),
    })
    worker = Worker(data, port, env)
    t0 = time.perf_counter()
    try:
        worker.start(timeout=180)
    except BaseException:  # not ready in time, or interrupted: never left running
        worker.stop(signal.SIGKILL, 10)
        raise
    log(f"worker ready on port {port} in {time.perf_counter() - t0:.1f} s")
    return worker


def stop_worker(worker: Worker | None) -> None:
    """SIGTERM (its own shutdown), then whatever of its process group is left (its worker
    processes) SIGKILLed."""
    if worker is None or worker.proc is None:
        return
    pid = worker.proc.pid
    worker.stop(signal.SIGTERM, 30)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def worker_metrics(worker: Worker) -> dict[str, float]:
    """The worker's stage histograms' sums and counts from ``GET /metrics`` (empty when the
    endpoint does not answer), keyed ``stage:<name>:sum`` etc. and ``ttf:sum``/``ttf:count``."""
    url = f"http://127.0.0.1:{worker.env['CXR_WORKER__HTTP__PORT']}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    pat = re.compile(r'^(cxr_worker_stage_seconds|cxr_worker_time_to_flag_seconds)_(sum|count)'
                     r'(?:\{stage="(\w+)"\})? ([0-9.eE+-]+)$')
    for line in text.splitlines():
        m = pat.match(line)
        if m:
            name = f"stage:{m[3]}" if m[1] == "cxr_worker_stage_seconds" else "ttf"
            out[f"{name}:{m[2]}"] = float(m[4])
    return out


def stage_means(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean seconds per image of each stage between two scrapes."""
    out: dict[str, float] = {}
    for key, count in after.items():
        if not key.endswith(":count"):
            continue
        name = key[: -len(":count")]
        n = count - before.get(key, 0.0)
        if n > 0:
            out[name.removeprefix("stage:")] = (after[f"{name}:sum"]
                                                - before.get(f"{name}:sum", 0.0)) / n
            out[f"n:{name.removeprefix('stage:')}"] = n
    return out


# -- files storescp has finished writing ----------------------------------------------------
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
_EVENT = struct.Struct("iIII")


class ResultWatcher:
    """Timestamps (``time.perf_counter()``) each Secondary Capture storescp finishes writing
    in ``directory`` (files ``SC.<SOP Instance UID>``), keyed by the SOP Instance UID of the
    source image it names (its Source Image Sequence, else Referenced Image Sequence): the
    worker derives the result's own UID from the decision too, so it is not known before the
    image is scored. Uses inotify (IN_CLOSE_WRITE: the file is complete; the header is read
    after the time is taken); without it, polls every 2 ms and takes a file whose size has
    stayed the same for one poll."""

    def __init__(self, directory: Path, prefix: str = "SC.") -> None:
        self.directory = directory
        self.prefix = prefix
        self.seen: dict[str, float] = {}
        self.seen_wall: dict[str, float] = {}  # the same moments, time.time()
        self.unreadable = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.mode = "inotify IN_CLOSE_WRITE"
        self._fd = -1

    def start(self) -> ResultWatcher:
        libc_name = ctypes.util.find_library("c") or "libc.so.6"
        try:
            libc = ctypes.CDLL(libc_name, use_errno=True)
            fd = libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
            if fd < 0:
                raise OSError(ctypes.get_errno(), "inotify_init1")
            if libc.inotify_add_watch(fd, str(self.directory).encode(),
                                      IN_CLOSE_WRITE | IN_MOVED_TO) < 0:
                os.close(fd)
                raise OSError(ctypes.get_errno(), "inotify_add_watch")
            self._fd = fd
            target = self._inotify_loop
        except (OSError, AttributeError) as exc:
            log(f"inotify unavailable ({exc}); polling every 2 ms")
            self.mode = "poll 2 ms"
            target = self._poll_loop
        self._thread = threading.Thread(target=target, name="result-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _record(self, name: str, t: float) -> None:
        if not name.startswith(self.prefix):
            return
        wall = time.time() - (time.perf_counter() - t)
        source = source_of(self.directory / name)
        with self._cond:
            if source is None:
                self.unreadable += 1
            elif source not in self.seen:
                self.seen[source] = t
                self.seen_wall[source] = wall
            self._cond.notify_all()

    def _inotify_loop(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(200):
                continue
            t = time.perf_counter()
            try:
                buf = os.read(self._fd, 65536)
            except BlockingIOError:
                continue
            pos = 0
            while pos + _EVENT.size <= len(buf):
                _wd, _mask, _cookie, length = _EVENT.unpack_from(buf, pos)
                raw = buf[pos + _EVENT.size : pos + _EVENT.size + length]
                pos += _EVENT.size + length
                self._record(raw.split(b"\0", 1)[0].decode(errors="replace"), t)

    def _poll_loop(self) -> None:
        sizes: dict[str, tuple[int, float]] = {}
        done: set[str] = set()
        while not self._stop.is_set():
            t = time.perf_counter()
            with contextlib.suppress(OSError):
                for entry in os.scandir(self.directory):
                    if entry.name in done:
                        continue
                    size = entry.stat().st_size
                    prev = sizes.get(entry.name)
                    if prev is not None and prev[0] == size and size > 0:
                        done.add(entry.name)
                        self._record(entry.name, prev[1])
                    elif prev is None or prev[0] != size:
                        sizes[entry.name] = (size, t)
            time.sleep(0.002)

    def wait_for(self, uid: str, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while uid not in self.seen:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self.seen[uid]

    def wait_all(self, uids: Iterable[str], timeout: float) -> dict[str, float]:
        """Arrival times of those of ``uids`` that arrive within ``timeout``."""
        wanted = set(uids)
        deadline = time.monotonic() + timeout
        with self._cond:
            while not wanted <= self.seen.keys():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return {u: self.seen[u] for u in wanted if u in self.seen}


def source_of(path: Path) -> str | None:
    """The SOP Instance UID of the image a result was made from."""
    from pydicom import dcmread

    try:
        ds = dcmread(path, stop_before_pixels=True)
    except Exception:
        return None
    for seq in ("SourceImageSequence", "ReferencedImageSequence"):
        items = ds.get(seq) or []
        if items and "ReferencedSOPInstanceUID" in items[0]:
            return str(items[0].ReferencedSOPInstanceUID)
    return None


# -- dcmtk storescu --------------------------------------------------------------------------
# dcmtk's log configuration (log4cplus) that stamps every line with the Unix time in ms
LOG_CONFIG = """log4cplus.rootLogger = INFO, console
log4cplus.appender.console = log4cplus::ConsoleAppender
log4cplus.appender.console.layout = log4cplus::PatternLayout
log4cplus.appender.console.layout.ConversionPattern = %D{%s.%q} %m%n
"""
_RSP = re.compile(r"^(\d+\.\d+) Received Store Response", re.MULTILINE)


def timestamped_log_config(directory: Path) -> Path:
    path = directory / "dcmtk-log.cfg"
    path.write_text(LOG_CONFIG)
    return path


def storescu_cmd(port: int, files: Iterable[Path], aet: str, propose: str = "-x=",
                 log_config: Path | None = None) -> list[str]:
    """dcmtk's storescu as a modality runs it: one association, the files' SOP classes only
    (``-R``), ``propose`` naming the transfer syntax proposed (``-x=`` uncompressed,
    ``-xv`` JPEG 2000 lossless, ``-xt`` JPEG-LS lossless); with ``log_config``
    (:func:`timestamped_log_config`) its log lines carry the time."""
    return [need("storescu"), *(["-lc", str(log_config)] if log_config else []), "-R",
            propose, "-aet", MODALITY_AET, "-aec", aet, "-to", "30", "-ta", "30", "-td", "60",
            "127.0.0.1", str(port), *[str(f) for f in files]]


@dataclass(frozen=True)
class Sent:
    """One storescu run: when it started and returned (``time.perf_counter()``), whether it
    exited 0, the end of its output."""

    start: float
    end: float
    ok: bool
    output: str
    response_wall: float | None = None  # time.time() of the last C-STORE response, if logged

    @property
    def seconds(self) -> float:
        return self.end - self.start


def storescu(port: int, files: list[Path], aet: str, propose: str = "-x=", *,
             timeout: float = 300, log_config: Path | None = None) -> Sent:
    """Runs storescu to the end."""
    t0 = time.perf_counter()
    try:
        res = subprocess.run(storescu_cmd(port, files, aet, propose, log_config),
                             env=DCMTK_ENV, capture_output=True, text=True, timeout=timeout,
                             check=False)
    except subprocess.TimeoutExpired:
        return Sent(t0, time.perf_counter(), False, f"timed out after {timeout:.0f} s")
    t1 = time.perf_counter()
    out = res.stdout + res.stderr
    rsp = _RSP.findall(out)
    return Sent(t0, t1, res.returncode == 0, out[-600:], float(rsp[-1]) if rsp else None)
