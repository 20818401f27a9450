"""The four measurements. Each starts its own processes (fresh worker, fresh peers), stops
them in ``finally``, and returns plain figures (seconds, counts) for bench/report.py."""

from __future__ import annotations

import contextlib
import logging
import re
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import DCMTK_ENV, Orthanc, Worker, log, median, summarize
from images import STORESCU_PROPOSE, SYNTAXES, Image, ImageFactory, remove
from peers import (
    WORKER_AET,
    MinimalScp,
    ResultWatcher,
    Storescp,
    stage_means,
    start_worker,
    stop_worker,
    storescu,
    storescu_cmd,
    timestamped_log_config,
    worker_metrics,
)
from pydicom.uid import ExplicitVRLittleEndian

EVLE = str(ExplicitVRLittleEndian)
RESULT_TIMEOUT = 60.0  # one image's result at the PACS, the worker otherwise idle


@dataclass
class Ctx:
    root: Path
    factory: ImageFactory
    quick: bool


@contextlib.contextmanager
def worker_with_pacs(ctx: Ctx, name: str) -> Iterator[tuple[Worker, Storescp, ResultWatcher]]:
    """A fresh ``cxr-worker serve`` whose PACS is ``storescp --fork +xa`` (fork: the worker's
    kept association and its periodic C-ECHO never wait for each other), and a watcher on
    the PACS's folder."""
    root = ctx.root / name
    pacs = Storescp(root / "pacs", fork=True, accept_all=True)
    watcher: ResultWatcher | None = None
    worker: Worker | None = None
    try:
        pacs.start()
        watcher = ResultWatcher(pacs.out).start()
        worker = start_worker(root / "worker", pacs)
        yield worker, pacs, watcher
    finally:
        stop_worker(worker)
        if watcher is not None:
            watcher.stop()
        pacs.stop()


# -- 1. time to flag -------------------------------------------------------------------------
def time_to_flag(ctx: Ctx, n: int) -> dict[str, Any]:
    out: dict[str, Any] = {"n": n, "syntaxes": {}}
    with worker_with_pacs(ctx, "ttf") as (worker, pacs, watcher):
        out["watcher"] = watcher.mode
        out["worker_line"] = worker_line(worker)
        # one warm-up image per worker process (each has its own decoders, model, report)
        m = re.search(r"(\d+) worker process", out["worker_line"])
        warm = out["warm"] = int(m[1]) if m else 1
        log_cfg = timestamped_log_config(ctx.root)
        for name, syntax in SYNTAXES.items():
            why = ctx.factory.available(syntax)
            if why is not None:
                out["syntaxes"][name] = {"skipped": why}
                log(f"time_to_flag {name}: skipped ({why})")
                continue
            files = ctx.factory.write(ctx.root / "ttf-files" / name, n + warm, syntax,
                                      tag=f"ttf-{name}-")
            try:
                out["syntaxes"][name] = _ttf_one_syntax(worker, pacs, watcher, files,
                                                        warm=warm, log_cfg=log_cfg)
            finally:
                remove(files)
            s = out["syntaxes"][name]["latency"]
            log(f"time_to_flag {name}: p50 {_ms(s['p50'])} ms, p95 {_ms(s['p95'])} ms, "
                f"missing {s['missing']}")
    return out


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


def worker_line(worker: Worker) -> str:
    """The worker's own start-up line (roles, processes, model, PACS)."""
    for line in worker.text().splitlines():
        if "listening as" in line:
            return str(line.split(": ", 1)[-1]).strip()
    return "?"


def _ttf_one_syntax(worker: Worker, pacs: Storescp, watcher: ResultWatcher,
                    files: list[Image], *, warm: int, log_cfg: Path) -> dict[str, Any]:
    propose = STORESCU_PROPOSE[files[0].syntax]
    warm_ms: list[float | None] = []
    for im in files[:warm]:
        sent = storescu(worker.port, [im.path], WORKER_AET, propose)
        arrived = watcher.wait_for(im.sop_uid, 120) if sent.ok else None
        warm_ms.append(None if arrived is None else round((arrived - sent.end) * 1000, 1))
    before = worker_metrics(worker)
    latencies: list[float] = []
    from_rsp: list[float] = []  # from the C-STORE response storescu logged (ms resolution)
    store: list[float] = []
    direct: list[float] = []
    missing = failed = 0
    errors: list[str] = []
    for im in files[warm:]:
        sent = storescu(worker.port, [im.path], WORKER_AET, propose, log_config=log_cfg)
        if not sent.ok:
            failed += 1
            errors.append(sent.output[-300:])
            continue
        store.append(sent.seconds)
        arrived = watcher.wait_for(im.sop_uid, RESULT_TIMEOUT)
        if arrived is None:
            missing += 1
        else:
            latencies.append(arrived - sent.end)
            if sent.response_wall is not None:
                from_rsp.append(watcher.seen_wall[im.sop_uid] - sent.response_wall)
        # the peer figure: the same file stored straight into the PACS (storescp)
        peer = storescu(pacs.port, [im.path], pacs.aet, propose, log_config=log_cfg)
        if peer.ok:
            direct.append(peer.seconds)
    after = worker_metrics(worker)
    return {
        "latency": summarize(latencies, missing + failed).as_json(),
        "latencies_ms": [round(x * 1000, 1) for x in latencies],
        "from_response": summarize(from_rsp, missing + failed).as_json(),
        "missing": missing, "send_failed": failed, "errors": errors[:3],
        "warm_up_ms": warm_ms,
        "store_to_worker": summarize(store).as_json(),
        "store_to_storescp": summarize(direct).as_json(),
        "stages": stage_means(before, after),
    }


# -- 2. durable receive ---------------------------------------------------------------------
@dataclass
class Receiver:
    name: str
    port: int
    aet: str
    clear: Callable[[], None]


def receive(ctx: Ctx, m: int, repeats: int) -> dict[str, Any]:
    root = ctx.root / "receive"
    rates: dict[str, list[float]] = {}
    failures: dict[str, list[str]] = {}
    drains: list[float] = []
    drain_missing = 0
    orthanc = Orthanc(root / "orthanc")
    minimal = MinimalScp(root / "minimal")
    plain = Storescp(root / "storescp", aet="STORESCP")
    with contextlib.ExitStack() as stack:
        worker, _pacs, watcher = stack.enter_context(worker_with_pacs(ctx, "receive-worker"))
        for peer in (orthanc, minimal, plain):
            stack.callback(peer.stop)  # first: a start that fails half-way is stopped too
            peer.start()
        receivers = [
            Receiver("cxr-worker", worker.port, WORKER_AET, lambda: None),
            Receiver("Orthanc", orthanc.dicom_port, orthanc.aet, lambda: None),
            Receiver(minimal.label, minimal.port, minimal.aet, minimal.clear),
            Receiver("dcmtk storescp (no fsync)", plain.port, plain.aet, plain.clear),
        ]
        for r in range(repeats):
            batch = ctx.factory.write(root / "files", m, EVLE, tag=f"recv{r}-")
            try:
                order = receivers[r % len(receivers):] + receivers[: r % len(receivers)]
                for rc in order:
                    sent = storescu(rc.port, [im.path for im in batch], rc.aet, "-x=",
                                    timeout=900)
                    if sent.ok:
                        rates.setdefault(rc.name, []).append(m / sent.seconds)
                    else:
                        failures.setdefault(rc.name, []).append(sent.output[-300:])
                    log(f"receive {rc.name} #{r + 1}: {m / sent.seconds:.1f} images/s"
                        f"{'' if sent.ok else ' (storescu FAILED)'}")
                    if rc.name == "cxr-worker":  # let its processing finish before the next
                        got = watcher.wait_all([im.sop_uid for im in batch], 900)
                        drain_missing += m - len(got)
                        if got:
                            drains.append(max(got.values()) - sent.start)
                    rc.clear()
            finally:
                remove(batch)
    return {"m": m, "repeats": repeats, "rates": rates, "failures": failures,
            "worker_all_results_s": drains, "worker_results_missing": drain_missing,
            "receivers": [rc.name for rc in receivers]}


# -- 3. burst --------------------------------------------------------------------------------
def _parallel_storescu(port: int, aet: str, chunks: list[list[Image]],
                       timeout: float) -> tuple[float, float, int]:
    """Starts one storescu per chunk at once; (start, when the last exited, how many
    failed)."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(storescu_cmd(port, [im.path for im in chunk], aet, "-x="),
                              env=DCMTK_ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for chunk in chunks]
    failed = 0
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            rc = p.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait(5)
        failed += rc != 0
    return t0, time.perf_counter(), failed


def burst(ctx: Ctx, total: int, procs: int = 4) -> dict[str, Any]:
    root = ctx.root / "burst"
    files = ctx.factory.write(root / "files", total, EVLE, tag="burst-")
    per = -(-total // procs)
    chunks = [files[i : i + per] for i in range(0, total, per)]
    out: dict[str, Any] = {"total": total, "procs": len(chunks), "per_proc": per}
    try:
        with worker_with_pacs(ctx, "burst-worker") as (worker, _pacs, watcher):
            t0, t_recv, failed = _parallel_storescu(worker.port, WORKER_AET, chunks, 900)
            log(f"burst: received in {t_recv - t0:.1f} s; waiting for the results")
            got = watcher.wait_all([im.sop_uid for im in files],
                                   max(300.0, total * 3.0))
            t_last = max(got.values()) if got else float("nan")
            out["worker"] = {
                "receive_s": t_recv - t0, "end_to_end_s": t_last - t0, "results": len(got),
                "missing": total - len(got), "storescu_failed": failed,
                "receive_rate": total / (t_recv - t0),
                "end_to_end_rate": (len(got) / (t_last - t0)) if got else 0.0,
                "first_result_s": (min(got.values()) - t0) if got else None,
            }
        out["peers"] = _burst_peers(root, chunks, total)
    finally:
        remove(files)
    return out


def _burst_peers(root: Path, chunks: list[list[Image]], total: int) -> dict[str, Any]:
    peers: dict[str, Any] = {}
    orthanc = Orthanc(root / "orthanc")
    forked = Storescp(root / "storescp", aet="STORESCP", fork=True)
    for label, peer in (("Orthanc", orthanc), (forked.label + " (no fsync)", forked)):
        try:
            peer.start()
            port = forked.port if isinstance(peer, Storescp) else orthanc.dicom_port
            t0, t1, failed = _parallel_storescu(port, peer.aet, chunks, 900)
            peers[label] = {"receive_s": t1 - t0, "receive_rate": total / (t1 - t0),
                            "storescu_failed": failed}
            log(f"burst {label}: {total / (t1 - t0):.1f} images/s")
        finally:
            peer.stop()
    return peers


# -- 4. concurrent associations ------------------------------------------------------------
@dataclass
class Outcome:
    answer: str = "no answer"  # accepted / rejected / aborted / no answer / error: ...
    held: bool = False  # still established once all had their answer
    stored: list[str] = field(default_factory=list)  # SOP Instance UIDs answered 0x0000
    seconds: float = 0.0


def run_concurrent(port: int, aet: str, files: list[Image], sources: list[str],
                   per: int = 2) -> dict[str, Any]:
    """``len(sources)`` threads started together, each associating from its source address
    and, once every one has its answer (accepted ones held open meanwhile), storing
    ``per`` files; counts the answers."""
    from pynetdicom import AE
    from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore[attr-defined]

    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    n = len(sources)
    start, answered = threading.Barrier(n), threading.Barrier(n)
    outcomes = [Outcome() for _ in range(n)]

    def client(i: int) -> None:
        ae = AE(ae_title=f"MODALITY{i:02d}")
        ae.add_requested_context(ComputedRadiographyImageStorage, [EVLE])
        ae.acse_timeout, ae.network_timeout, ae.dimse_timeout = 20, 60, 60
        ae.connection_timeout = 10
        o = outcomes[i]
        assoc = None
        with contextlib.suppress(threading.BrokenBarrierError):
            start.wait(30)
        t0 = time.perf_counter()
        try:
            assoc = ae.associate("127.0.0.1", port, ae_title=aet, bind_address=(sources[i], 0))
            o.answer = ("accepted" if assoc.is_established else "rejected" if assoc.is_rejected
                        else "aborted" if assoc.is_aborted else "no answer")
        except Exception as exc:
            o.answer = f"error: {type(exc).__name__}"
        o.seconds = time.perf_counter() - t0
        with contextlib.suppress(threading.BrokenBarrierError):
            answered.wait(60)
        if assoc is None or not assoc.is_established:
            return
        o.held = True
        try:
            for im in files[i * per : (i + 1) * per]:
                status = assoc.send_c_store(im.path)
                if status and int(getattr(status, "Status", -1)) == 0:
                    o.stored.append(im.sop_uid)
        finally:
            assoc.release()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.answer] = counts.get(o.answer, 0) + 1
    accepted = counts.get("accepted", 0)
    return {"n": n, "answers": counts, "accepted": accepted, "refused": n - accepted,
            "held_together": sum(o.held for o in outcomes),
            "stored": sum(len(o.stored) for o in outcomes), "sent": n * per,
            "stored_uids": [u for o in outcomes for u in o.stored],
            "answer_s_median": statistics.median(o.seconds for o in outcomes)}


def concurrent(ctx: Ctx, n: int = 20, per: int = 2) -> dict[str, Any]:
    root = ctx.root / "concurrent"
    distinct = [f"127.0.0.{10 + i}" for i in range(n)]
    out: dict[str, Any] = {"n": n, "per": per, "receivers": {}}

    def files(tag: str) -> list[Image]:
        return ctx.factory.write(root / "files" / tag, n * per, EVLE, tag=f"conc-{tag}-")

    with worker_with_pacs(ctx, "concurrent-worker") as (worker, _pacs, watcher):
        runs = (("cxr-worker", distinct), ("cxr-worker, one source", ["127.0.0.1"] * n))
        for label, sources in runs:
            batch = files(label.replace(" ", "").replace(",", "-"))
            try:
                res = run_concurrent(worker.port, WORKER_AET, batch, sources, per)
                got = watcher.wait_all(res.pop("stored_uids"), max(120.0, res["stored"] * 3.0))
                res["results_at_pacs"] = len(got)
                out["receivers"][label] = res
                log(f"concurrent {label}: {res['answers']}")
            finally:
                remove(batch)
    orthanc = Orthanc(root / "orthanc")
    forked = Storescp(root / "storescp", aet="STORESCP", fork=True)
    for label, peer in (("Orthanc", orthanc), (forked.label, forked)):
        batch = files(label.split()[0])
        try:
            peer.start()
            port = forked.port if isinstance(peer, Storescp) else orthanc.dicom_port
            res = run_concurrent(port, peer.aet, batch, distinct, per)
            res.pop("stored_uids")
            out["receivers"][label] = res
            log(f"concurrent {label}: {out['receivers'][label]['answers']}")
        finally:
            peer.stop()
            remove(batch)
    return out


def rate_summary(xs: list[float]) -> dict[str, float]:
    return {"median": median(xs), "min": min(xs) if xs else float("nan"),
            "max": max(xs) if xs else float("nan")}
