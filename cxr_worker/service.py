"""``cxr-worker serve``: the composition root of the running service.

Start-up order: settings (already read) -> database (migrations) -> model (hash check,
warm-up) -> scheduler -> listener. Only when the model is ready does the listener accept
associations. SIGTERM/SIGINT (:func:`shut_down`): stop accepting, abort the associations,
give the running job ``jobs.shutdown_grace_seconds`` to finish, give back any lease, exit 0
within about 4 s whatever the peers do.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from cxr_worker import gate, health, receive, report, send, sizes, tls
from cxr_worker.errors import StartupError
from cxr_worker.http import HttpServer
from cxr_worker.jobs import Jobs
from cxr_worker.lifecycle import wait_for_stop_signal
from cxr_worker.metrics import Metrics
from cxr_worker.model import card as model_card
from cxr_worker.pipeline import Outputs, Pipeline
from cxr_worker.score import SHIPPED_MODEL_DIR, Scorer, ThresholdChoice
from cxr_worker.settings import Settings, hl7_config
from cxr_worker.spool import Spool
from cxr_worker.worklist import deliveries, queue, schema, site

logger = logging.getLogger(__name__)


def listener_config(s: Settings) -> receive.ListenerConfig:
    li = s.listener
    return receive.ListenerConfig(
        li.ae_title, tuple(li.allowed_calling_ae_titles), li.accept_dx_for_processing,
        max_pdu_bytes=li.max_pdu_bytes, max_associations=li.max_associations,
        max_associations_per_host=li.max_associations_per_host,
        network_timeout_seconds=li.network_timeout_seconds,
        acse_timeout_seconds=li.acse_timeout_seconds,
        dimse_timeout_seconds=li.dimse_timeout_seconds,
        check_called_ae_title=li.check_called_ae_title)


def gate_config(s: Settings) -> gate.GateConfig:
    return gate.GateConfig(
        accept_dx_for_processing=s.listener.accept_dx_for_processing,
        require_body_part_chest=s.gate.require_body_part_chest,
        allow_missing_body_part=s.gate.allow_missing_body_part,
        view_positions=tuple(v.upper() for v in s.gate.view_positions),
        allow_missing_view_position=s.gate.allow_missing_view_position,
        min_age_years=s.gate.min_age_years,
        max_age_years=s.gate.max_age_years,
        refuse_outside_age_range=s.gate.refuse_outside_age_range,
        refuse_unknown_age=s.gate.refuse_unknown_age,
        uid_prefix=s.report.uid_prefix,
        manufacturer=s.report.manufacturer,
        series_number=s.report.series_number,
    )


def report_config(s: Settings) -> report.ReportConfig:
    return report.ReportConfig(s.report.uid_prefix, s.report.series_number,
                               s.report.manufacturer, heatmap=s.report.heatmap)


def pacs_peer(s: Settings) -> send.Peer | None:
    """The PACS (over TLS with ``pacs.tls``); None when none is configured."""
    return tls.pacs_peer(s)


def model_dir(s: Settings) -> Path:
    """The model folder (``model.path``, else the bundled model), checked to be one: a folder
    holding ``model_card.json``. Raises :class:`StartupError` naming ``model.path``."""
    if not s.model.path:
        return SHIPPED_MODEL_DIR
    path = Path(s.model.path).expanduser()
    fix = f"set model.path to the folder that holds {model_card.CARD_FILE} and the .tflite file(s)"
    if path.is_file():
        raise StartupError(f"model.path {path}: is a file, not the model folder: {fix} "
                           f"(here perhaps {path.parent})")
    if not path.is_dir():
        raise StartupError(f"model.path {path}: no such folder: {fix}")
    if not (path / model_card.CARD_FILE).is_file():
        raise StartupError(f"model.path {path}: no {model_card.CARD_FILE} in this folder: {fix}")
    return path


def _unloadable_member(folder: Path, card: dict[str, Any]) -> str:
    """The first member file LiteRT cannot load (the error path of :func:`load_scorer`)."""
    from cxr_worker.model.runtime import TFLiteScorer

    for m in model_card.members(card):
        try:
            TFLiteScorer(folder / str(m["tflite"]), num_threads=1)
        except (ValueError, RuntimeError):
            return str(m["tflite"])
    return "the model"


def load_scorer(s: Settings, engine: Engine | None = None) -> Scorer:
    """The model, with the threshold in force: ``[model] threshold`` if set, else the site
    threshold recorded by ``calibrate --apply`` for this model version (looked up in
    ``engine``'s worklist), else the model card's.

    A model folder that is not one, or whose files LiteRT cannot load although their sha256
    matches the card, raises :class:`StartupError` naming ``model.path`` and the file; a file
    whose sha256 differs stays a :class:`~cxr_worker.errors.ModelIntegrityError`."""
    folder = model_dir(s)
    try:
        scorer = Scorer(folder, s.model.threshold, s.model.num_threads)
    except (ValueError, RuntimeError) as exc:  # LiteRT: "not a valid Flatbuffer buffer", ...
        key = f"model.path {folder}" if s.model.path else f"the bundled model {folder}"
        bad = _unloadable_member(folder, model_card.load_card(folder))
        fix = ("point model.path at a model folder written by 'cxr-worker train'"
               if s.model.path else "reinstall cxr-worker")
        raise StartupError(f"{key}: {bad} cannot be loaded although its sha256 matches the "
                           f"card ({exc}): {fix}") from exc
    if s.model.threshold is None and engine is not None:
        row = site.latest(engine, scorer.model_version)
        if row is not None:
            scorer.use_threshold(ThresholdChoice(row.threshold, site.describe(row)))
    return scorer


def prepare_data_dir(s: Settings) -> Path:
    """Create ``storage.data_dir`` and check that this user can write it; raises
    :class:`StartupError` naming the key otherwise."""
    path = s.data_dir
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise StartupError(
            f"storage.data_dir {path}: cannot create or write it ({exc.strerror}): create it "
            "writable for the worker's user, or set storage.data_dir "
            "(CXR_WORKER__STORAGE__DATA_DIR) to a folder it can write") from exc
    return path


def open_worklist(s: Settings, migrate: bool = False) -> Engine:
    """The worklist database (created under ``storage.data_dir`` unless ``database.url``)."""
    if not s.database.url:
        prepare_data_dir(s)
    return schema.open_database(s.database_url, migrate=migrate)


def existing_worklist(s: Settings) -> Engine | None:
    """The worklist's engine if it exists already (one-shot commands never create one)."""
    with schema.named_errors(s.database_url):  # "not a URL" named like start-up does
        missing = schema.not_created(s.database_url)
    return None if missing else open_worklist(s)


def size_limits(s: Settings) -> sizes.Limits:
    """``[limits]``: the sizes the listener and the decoder refuse (issue 10)."""
    li = s.limits
    return sizes.Limits(max_dataset_bytes=li.max_dataset_bytes,
                         max_decoded_bytes=li.max_decoded_bytes,
                         max_inflated_bytes=li.max_inflated_bytes)


def build_pipeline(s: Settings, scorer: Scorer, engine: Engine, *,
                   hold_results: bool = False, only_ids: set[int] | None = None,
                   metrics: Metrics | None = None) -> Pipeline:
    """The pipeline; also sets this process's decode limits (``[limits]``, process-wide:
    the pipeline calls :mod:`cxr_worker.decode` without them; :mod:`cxr_worker.sizes`)."""
    sizes.set_limits(size_limits(s))
    retry = queue.RetryPolicy(s.jobs.lease_seconds, s.jobs.max_attempts,
                              s.jobs.retry_base_seconds, s.jobs.retry_max_seconds)
    return Pipeline(engine=engine, spool=Spool(s.data_dir), scorer=scorer,
                    gate_cfg=gate_config(s), report_cfg=report_config(s), retry=retry,
                    pacs=pacs_peer(s), hold_results=hold_results, only_ids=only_ids,
                    metrics=metrics, outputs=outputs_config(s))


def outputs_config(s: Settings) -> Outputs:
    """``[outputs]`` and ``[hl7]``: what is built and where each goes."""
    return Outputs(delivered=s.delivered_kinds,
                   hl7=hl7_config(s) if "hl7" in s.delivered_kinds else None)


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def raise_mmap_threshold(nbytes: int = 256 * 2**20) -> bool:
    """Let glibc serve 10 MB receive buffers from the heap instead of a fresh mmap each.

    Measured on this kind of machine (PERF-NOTES): every 10 MB image otherwise costs ~2,500
    page faults; raising the threshold lifted pynetdicom's writing receive from 18 to 24
    images/s. Same effect as ``MALLOC_MMAP_THRESHOLD_``, set from inside the process.
    """
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, nbytes))
    except (OSError, AttributeError):  # not glibc
        return False


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
    t0 = time.monotonic()
    raise_mmap_threshold()
    prepare_data_dir(s)
    listener_tls = tls.server_context(s.listener)  # TLS files checked before anything starts
    pacs_peer(s)  # likewise the PACS's
    readiness, metrics = health.Readiness(), Metrics()
    web = start_http(s, readiness, metrics)
    engine = readiness.engine = open_worklist(s, migrate=migrate)
    scorer = readiness.scorer = load_scorer(s, engine)
    warm = scorer.warm_up()
    metrics.set_model(scorer.model_version, scorer.threshold)
    pipeline = build_pipeline(s, scorer, engine, metrics=metrics)
    readiness.spool_dir = pipeline.spool.spool_dir
    peer = pacs_peer(s)
    readiness.pacs = health.PacsEcho(peer) if peer is not None else None
    metrics.watch_worklist(engine, s.pacs_configured, readiness.pacs)
    jobs = Jobs(pipeline, s.jobs.poll_seconds, s.storage.retention_days,
                s.jobs.retention_interval_seconds,
                pacs_echo=readiness.pacs.run if readiness.pacs is not None else None,
                orphan_grace_seconds=s.jobs.orphan_grace_seconds)
    jobs.start()
    listener_cfg = listener_config(s)
    ae = receive.make_ae(listener_cfg)
    try:
        server = ae.start_server(
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
    host, port = server.server_address[:2]
    logger.info(
        "listening as %s on %s:%d; model %s (threshold %s, warm-up %.0f ms); PACS %s; "
        "outputs %s; ready in %.1f s", s.listener.ae_title, host, port, scorer.model_version,
        scorer.describe_threshold(), warm * 1000,
        f"{s.pacs.ae_title}@{s.pacs.host}:{s.pacs.port}" if s.pacs_configured else
        "not configured (results stay in the worklist)",
        ", ".join(f"{k} to {f'{s.hl7.host}:{s.hl7.port}' if k == 'hl7' else 'the PACS'}"
                  for k in s.delivered_kinds) or "none delivered", time.monotonic() - t0)
    print(f"cxr-worker ready: {s.listener.ae_title}@{host}:{port}", flush=True)

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
    server.block_on_close = False  # its association threads are aborted below, not awaited
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
