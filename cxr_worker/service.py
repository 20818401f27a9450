"""``cxr-worker serve``: the running service (what it runs is built by :mod:`cxr_worker.compose`).

Start-up order: settings (already read) -> database (migrations) -> model (hash check,
warm-up) -> scheduler -> listener. Only when the model is ready does the listener accept
associations. SIGTERM/SIGINT (:func:`shut_down`): stop accepting, abort the associations,
give the running job ``jobs.shutdown_grace_seconds`` to finish, give back any lease, exit 0
within about 4 s whatever the peers do.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import threading
import time
from typing import Any

from cxr_worker import health, receive, send, tls
from cxr_worker.compose import (
    build_pipeline,
    listener_config,
    load_scorer,
    open_worklist,
    pacs_peer,
    prepare_data_dir,
    size_limits,
)
from cxr_worker.errors import StartupError
from cxr_worker.heap import keep_freed_heap
from cxr_worker.http import HttpServer
from cxr_worker.jobs import Jobs
from cxr_worker.lifecycle import wait_for_stop_signal
from cxr_worker.metrics import Metrics
from cxr_worker.pipeline import Pipeline
from cxr_worker.processing import synthetic_source
from cxr_worker.settings import Settings, job_roles, worker_count
from cxr_worker.worklist import deliveries, queue

logger = logging.getLogger(__name__)


def _listener_error(s: Settings, exc: OSError) -> StartupError:
    where = f"listener.port {s.listener.port} on {s.listener.host}"
    if exc.errno == errno.EADDRINUSE:
        return StartupError(f"{where} is in use (another cxr-worker or program listens there): "
                            "stop it, or set listener.port (CXR_WORKER__LISTENER__PORT)")
    if exc.errno == errno.EACCES:
        return StartupError(f"{where}: permission denied (ports below 1024 need privileges): "
                            "set listener.port to 1024 or above")
    if exc.errno == errno.EADDRNOTAVAIL:
        return StartupError(f"{where}: listener.host {s.listener.host} is not an address of "
                            "this machine: set listener.host (0.0.0.0 for all)")
    return StartupError(f"{where}: cannot listen ({exc.strerror or exc}): check listener.host "
                        "and listener.port")


def _http_error(s: Settings, exc: OSError) -> StartupError:
    where = f"http.port {s.http.port} on {s.http.host}"
    if exc.errno == errno.EADDRINUSE:
        return StartupError(f"{where} is in use: stop what listens there, or set http.port "
                            "(CXR_WORKER__HTTP__PORT), or http.enabled = false")
    return StartupError(f"{where}: cannot listen ({exc.strerror or exc}): check http.host "
                        "and http.port")


def start_http(s: Settings, readiness: health.Readiness, metrics: Metrics) -> HttpServer | None:
    """Bind and serve ``/healthz``, ``/readyz``, ``/metrics`` and the web worklist (its page
    and ``/api/v1/``, :mod:`cxr_worker.web`) on ``[http]``, before the database and the model
    so probes are answered during start-up (the API answers 503 until ``readiness.engine``
    is set); None when disabled."""
    if not s.http.enabled:
        return None
    from cxr_worker.web.app import add_web_routes

    web = HttpServer(s.http.host, s.http.port)
    health.add_routes(web, readiness, metrics)
    add_web_routes(web, s, readiness)
    try:
        web.start()
    except OSError as exc:
        raise _http_error(s, exc) from exc
    logger.info("health, metrics and the web worklist on http://%s:%d (auth %s)",
                *web.address, s.http.auth)
    return web


def serve(s: Settings, migrate: bool = True) -> int:
    """Run the worker until SIGTERM/SIGINT, in the roles of ``jobs.role``: ``receive`` (the
    DICOM listener, retention and the orphan sweep), ``process`` (``jobs.workers`` worker
    processes scoring), ``send`` (the deliveries, the PACS C-ECHO); ``all`` by default.
    Processes with other roles share the worklist (PostgreSQL) and ``storage.data_dir``."""
    t0 = time.monotonic()
    roles = job_roles(s)
    keep_freed_heap()  # receive buffers reused, not faulted in again for every image
    prepare_data_dir(s)
    listener_tls = tls.server_context(s.listener)  # TLS files checked before anything starts
    pacs_peer(s)  # likewise the PACS's
    readiness, metrics = health.Readiness(), Metrics()
    web = start_http(s, readiness, metrics)
    engine = readiness.engine = open_worklist(s, migrate=migrate)
    scorer = readiness.scorer = load_scorer(s, engine)
    warm = scorer.warm_up()
    metrics.set_model(scorer.model_version, scorer.threshold)
    workers = worker_count(s) if "process" in roles else 1
    pipeline = build_pipeline(s, scorer, engine, metrics=metrics, workers=workers)
    if "process" in roles:  # the worker processes started, the first result's costs paid
        warm += pipeline.warm_up(synthetic_source())
    readiness.spool_dir = pipeline.spool.spool_dir
    peer = pacs_peer(s)
    readiness.pacs = health.PacsEcho(peer) if peer is not None else None
    metrics.watch_worklist(engine, s.pacs_configured, readiness.pacs)
    jobs = Jobs(pipeline, s.jobs.poll_seconds, s.storage.retention_days,
                s.jobs.retention_interval_seconds,
                pacs_echo=readiness.pacs.run if readiness.pacs is not None else None,
                orphan_grace_seconds=s.jobs.orphan_grace_seconds, roles=roles)
    readiness.wake = jobs.wake_role
    jobs.start()
    server = None
    if "receive" in roles:
        try:
            server = receive.make_ae(listener_config(s)).start_server(
                (s.listener.host, s.listener.port), block=False, ssl_context=listener_tls,
                evt_handlers=[*receive.handlers(pipeline.engine, pipeline.spool, jobs.wake,
                                                size_limits(s)),
                              *tls.listener_handlers(listener_tls)])
        except OSError as exc:
            pipeline.stopping.set()
            jobs.stop(time.monotonic() + s.jobs.shutdown_grace_seconds)
            queue.release_leases(pipeline.engine, pipeline.owner)
            deliveries.release_leases(pipeline.engine, pipeline.owner)
            pipeline.engine.dispose()
            if web is not None:
                web.stop()
            raise _listener_error(s, exc) from exc
        assert server is not None  # block=False returns the running server
    where = (f"listening as {s.listener.ae_title} on %s:%d" % server.server_address[:2]
             if server is not None else "not listening (no receive role)")
    logger.info(
        "%s; roles %s; %d worker process(es); model %s (threshold %s, warm-up %.0f ms); "
        "PACS %s; outputs %s; ready in %.1f s", where, ",".join(sorted(roles)),
        workers if pipeline.workers is not None else 0, scorer.model_version,
        scorer.describe_threshold(), warm * 1000,
        f"{s.pacs.ae_title}@{s.pacs.host}:{s.pacs.port}" if s.pacs_configured else
        "not configured (results stay in the worklist)",
        ", ".join(f"{k} to {f'{s.hl7.host}:{s.hl7.port}' if k == 'hl7' else 'the PACS'}"
                  for k in s.delivered_kinds) or "none delivered", time.monotonic() - t0)
    if server is not None:
        host, port = server.server_address[:2]
        print(f"cxr-worker ready: {s.listener.ae_title}@{host}:{port}", flush=True)
    else:
        print(f"cxr-worker ready: roles {','.join(sorted(roles))}", flush=True)

    wait_for_stop_signal()
    return shut_down(server, jobs, pipeline, web, s.jobs.shutdown_grace_seconds)


SHUTDOWN_SLACK_SECONDS = 0.5  # after the grace: for aborted associations' threads to end


def shut_down(server: Any, jobs: Jobs, pipeline: Pipeline, web: HttpServer | None,
              grace_seconds: float) -> int:
    """SIGTERM/SIGINT: be gone within ``jobs.shutdown_grace_seconds`` (3 s) plus about a
    second, whatever the associations are doing; nothing acknowledged is lost. Returns 0.

    1. Stop accepting, then abort every inbound association at once (:func:`send.hard_abort`):
       an idle one held open by a modality would otherwise keep the process until its
       network timeout. A C-STORE it carried but not yet answered was not acknowledged: the
       modality sends it again; one already answered is in the worklist.
    2. Scoring and delivery start no new job; a send in progress gets a second, then its
       association is aborted (a PACS that hangs would hold it for ``pacs.timeout_seconds``),
       not counted as a failed attempt; a C-ECHO in progress is aborted; the scoring in
       progress gets until the grace period ends.
    3. Every lease this worker holds is given back: what did not finish is scored or sent
       again at the next start (the result keeps its SOP Instance UID, so a PACS that did
       receive it holds it once).
    4. Decision: if a thread is still busy after the grace period (a decode in native code, an
       association thread that does not end), the process ends with ``os._exit(0)`` after
       the logs are flushed, rather than wait for it: everything it could still change is
       either given back (step 3) or, like an interrupted write, exactly what a crash leaves
       and the next start recovers (temporary files: the orphan sweep).
    """
    t0 = time.monotonic()
    deadline = t0 + grace_seconds
    pipeline.stopping.set()
    inbound = []
    if server is not None:
        server.block_on_close = False  # its association threads are aborted, not awaited
        server.shutdown()  # stop accepting (the accept loop polls every 0.5 s)
        inbound = server.active_associations
    for assoc in inbound:
        send.hard_abort(assoc)
    echoes = send.OUTBOUND.abort_all(refuse_new=True)
    jobs.stop(deadline)  # a job still running past it is logged there
    released = queue.release_leases(pipeline.engine, pipeline.owner) + \
        deliveries.release_leases(pipeline.engine, pipeline.owner)
    pipeline.engine.dispose()
    if web is not None:
        web.stop()
    busy = _threads_still_busy(jobs, deadline + SHUTDOWN_SLACK_SECONDS)
    logger.info("stopped in %.1f s (%d inbound and %d C-ECHO associations aborted, %d leases "
                "released)", time.monotonic() - t0, len(inbound), echoes, released)
    if busy:
        logger.warning("exiting with threads still busy (%s): their jobs' leases are given "
                       "back, the jobs done again at the next start", ", ".join(busy))
        logging.shutdown()  # flush every handler: os._exit skips it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _threads_still_busy(jobs: Jobs, deadline: float) -> list[str]:
    """Names of the threads that would hold the interpreter's exit (non-daemon threads, e.g. an
    association's) or run on through it (the job loops), after waiting until ``deadline``."""
    def busy() -> list[str]:
        loops = {loop.thread for loop in jobs.loops}
        return [t.name for t in threading.enumerate()
                if t is not threading.current_thread() and t.is_alive()
                and (not t.daemon or t in loops)]

    while (names := busy()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return names
