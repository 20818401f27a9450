"""Worker processes: ``[jobs] workers`` processors, so that every core decodes and scores.

Decision: processes, not threads. Reading, decoding, scoring and drawing the result are CPU
work, much of it in Python (pydicom, highdicom, Pillow's text): two threads processed 12
images in 0.56 s where one took 0.59 s on this project's 2-core machine. So each worker
process holds its own :class:`~cxr_worker.processing.Processor` (its own model interpreter),
started with ``spawn`` (the service has threads; ``fork`` would copy their locks). The
service keeps everything else: the database, the leases, the listener and the senders; a
worker process only reads the spooled file and writes the result files, and what it found
comes back as a small :data:`~cxr_worker.processing.Outcome`. The C-STORE handler never
shares an interpreter with a decode.

A worker process that dies (killed, a decoder that crashes in native code) breaks the pool:
the jobs in its processes at that moment (its own and the other processes') cost one attempt
each (retried with backoff, then the dead letter: an image that kills its decoder every time
ends there instead of taking the service down); the pool is started again for the next job.
One that died while idle costs nothing. Worker processes ignore SIGINT (a Ctrl-C reaches the
whole process group: the service shuts down in order) and end on SIGTERM (the pool's own way
of stopping them; the systemd unit's ``KillMode=mixed`` sends it to the service only), and
they end when the service does, within half a second even after a ``kill -9`` of it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from cxr_worker import gate, logs, report, sizes
from cxr_worker.heap import keep_freed_heap
from cxr_worker.processing import Crashed, Job, Outcome, Outputs, Processor, synthetic_source
from cxr_worker.score import Scorer, ThresholdChoice
from cxr_worker.spool import Spool
from cxr_worker.worklist.deliveries import Previous

logger = logging.getLogger(__name__)

# how much lower the worker processes' CPU priority is than the service's (nice): receiving
# and answering a C-STORE comes first, scoring uses what is left (both cores when idle)
WORKER_NICE = 10


@dataclass(frozen=True)
class ProcessorSpec:
    """What a worker process needs to build the service's :class:`Processor` (picklable)."""

    data_dir: Path
    model_dir: Path
    threshold: ThresholdChoice
    num_threads: int
    gate_cfg: gate.GateConfig
    report_cfg: report.ReportConfig
    outputs: Outputs
    limits: sizes.Limits
    log_level: int = logging.INFO
    log_json: bool = False
    nice: int = WORKER_NICE

    def build(self) -> Processor:
        sizes.set_limits(self.limits)
        scorer = Scorer(self.model_dir, self.threshold, self.num_threads)
        scorer.warm_up()
        processor = Processor(spool=Spool(self.data_dir), scorer=scorer,
                              gate_cfg=self.gate_cfg, report_cfg=self.report_cfg,
                              outputs=self.outputs)
        processor.warm_up(synthetic_source())  # the first image pays no first-use costs
        return processor


_OWN: dict[str, Processor] = {}  # the worker process's own processor
PARENT_CHECK_SECONDS = 0.5  # how soon a worker process ends after the service died


def _start(spec: ProcessorSpec, parent: int) -> None:
    """A worker process's start: as the service logs (same format, value warnings kept
    out), files private to the user, lower CPU priority than the service (a modality's
    C-STORE is answered before a decode goes on), glibc's heap kept between images."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the service's to handle
    threading.Thread(target=_end_with, args=(parent,), name="cxr-parent", daemon=True).start()
    os.umask(0o077)
    logs.configure(spec.log_level, "json" if spec.log_json else "text")
    for noisy in ("pynetdicom", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.nice(spec.nice)
    keep_freed_heap()
    _OWN["processor"] = spec.build()


def _end_with(parent: int) -> None:
    """End this worker process when the service is gone (``kill -9`` included): the pool's
    pipes do not tell a waiting worker process (it holds both of their ends itself)."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(0)


def _run(job: Job, previous: dict[str, Previous], used: set[str]) -> Outcome:
    return _OWN["processor"].outcome(job, previous, used)


def _hello(pause: float) -> int:
    time.sleep(pause)  # so that each of the pool's processes answers one
    return os.getpid()


class WorkerPool:
    """``n`` worker processes running :meth:`Processor.outcome`; thread-safe."""

    def __init__(self, spec: ProcessorSpec, n: int) -> None:
        if n < 1:
            raise ValueError("a worker pool needs at least one process")
        self.spec = spec
        self.n = n
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._closed = False

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise RuntimeError("the worker pool is shut down")
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    self.n, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_start, initargs=(self.spec, os.getpid()))
            return self._pool

    def start(self, timeout: float = 120.0) -> float:
        """Start every worker process and wait until each has loaded the model (so the first
        image does not wait for it); returns seconds."""
        t = time.monotonic()
        pool = self._executor()
        seen: set[int] = set()
        while len(seen) < self.n and time.monotonic() - t < timeout:
            seen.update(f.result(timeout) for f in
                        [pool.submit(_hello, 0.2) for _ in range(self.n)])
        return time.monotonic() - t

    def run(self, job: Job, previous: dict[str, Previous], used: set[str]) -> Outcome:
        """Process ``job`` in a worker process. A process that died while idle costs nothing
        (a new pool takes the job); one that died while processing it is an attempt failed."""
        for _ in range(2):
            pool = self._executor()
            try:
                future = pool.submit(_run, job, previous, used)
            except BrokenProcessPool:  # broke before this job: start again, no attempt lost
                self._replace(pool, "while idle")
                continue
            try:
                return future.result()
            except BrokenProcessPool:
                self._replace(pool, f"while processing {job.sop_instance_uid} (retried)")
                break
        return Crashed("the worker process processing it died (killed, or a crash in a "
                       "decoder)", "")

    def _replace(self, pool: ProcessPoolExecutor, when: str) -> None:
        with self._lock:
            if self._pool is not pool:  # another thread has started the new one
                return
            self._pool = None
        pool.shutdown(wait=False, cancel_futures=True)
        logger.error("a worker process died %s; the worker processes are started again", when)

    def shutdown(self) -> None:
        """Stop taking jobs; the worker processes end after the job in progress."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
