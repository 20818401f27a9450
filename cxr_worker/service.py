"""``cxr-worker serve``: the composition root of the running service.

Start-up order: settings (already read) -> database (migrations) -> model (hash check,
warm-up) -> scheduler -> listener. Only when the model is ready does the listener accept
associations. SIGTERM/SIGINT: stop accepting, let the running job finish, give back any
lease, exit 0.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, make_url

from cxr_worker import gate, receive, report, send
from cxr_worker.jobs import Jobs
from cxr_worker.pipeline import Pipeline
from cxr_worker.score import Scorer, ThresholdChoice
from cxr_worker.settings import Settings
from cxr_worker.spool import Spool
from cxr_worker.worklist import queue, schema, site

logger = logging.getLogger(__name__)


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
                               s.report.manufacturer)


def pacs_peer(s: Settings) -> send.Peer | None:
    if not s.pacs_configured:
        return None
    return send.Peer(s.pacs.ae_title, s.pacs.host, s.pacs.port, s.listener.ae_title,
                     s.pacs.timeout_seconds)


def load_scorer(s: Settings, engine: Engine | None = None) -> Scorer:
    """The model, with the threshold in force: ``[model] threshold`` if set, else the site
    threshold recorded by ``calibrate --apply`` for this model version (looked up in
    ``engine``'s worklist), else the model card's."""
    scorer = Scorer(s.model.path or None, s.model.threshold, s.model.num_threads)
    if s.model.threshold is None and engine is not None:
        row = site.latest(engine, scorer.model_version)
        if row is not None:
            scorer.use_threshold(ThresholdChoice(row.threshold, site.describe(row)))
    return scorer


def existing_worklist(s: Settings) -> Engine | None:
    """The worklist's engine if it exists already (one-shot commands never create one)."""
    url = make_url(s.database_url)
    if url.get_backend_name() == "sqlite" and (
            not url.database or url.database == ":memory:" or not Path(url.database).is_file()):
        return None
    return schema.open_database(s.database_url)


def build_pipeline(s: Settings, scorer: Scorer, engine: Engine, *,
                   hold_results: bool = False, only_ids: set[int] | None = None) -> Pipeline:
    retry = queue.RetryPolicy(s.jobs.lease_seconds, s.jobs.max_attempts,
                              s.jobs.retry_base_seconds, s.jobs.retry_max_seconds)
    return Pipeline(engine=engine, spool=Spool(s.data_dir), scorer=scorer,
                    gate_cfg=gate_config(s), report_cfg=report_config(s), retry=retry,
                    pacs=pacs_peer(s), hold_results=hold_results, only_ids=only_ids)


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


def serve(s: Settings, migrate: bool = True) -> int:
    t0 = time.monotonic()
    raise_mmap_threshold()
    s.data_dir.mkdir(parents=True, exist_ok=True)
    engine = schema.open_database(s.database_url, migrate=migrate)
    scorer = load_scorer(s, engine)
    warm = scorer.warm_up()
    pipeline = build_pipeline(s, scorer, engine)
    jobs = Jobs(pipeline, s.jobs.poll_seconds, s.storage.retention_days,
                s.jobs.retention_interval_seconds)
    jobs.start()
    listener_cfg = receive.ListenerConfig(
        s.listener.ae_title, tuple(s.listener.allowed_calling_ae_titles),
        s.listener.accept_dx_for_processing)
    ae = receive.make_ae(listener_cfg)
    server = ae.start_server(
        (s.listener.host, s.listener.port), block=False,
        evt_handlers=receive.handlers(pipeline.engine, pipeline.spool, jobs.wake))
    assert server is not None  # block=False returns the running server
    host, port = server.server_address[:2]
    logger.info(
        "listening as %s on %s:%d; model %s (threshold %s, warm-up %.0f ms); PACS %s; "
        "ready in %.1f s", s.listener.ae_title, host, port, scorer.model_version,
        scorer.describe_threshold(), warm * 1000,
        f"{s.pacs.ae_title}@{s.pacs.host}:{s.pacs.port}" if s.pacs_configured else
        "not configured (results stay in the worklist)", time.monotonic() - t0)
    print(f"cxr-worker ready: {s.listener.ae_title}@{host}:{port}", flush=True)

    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        logger.info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    stop.wait()
    server.shutdown()  # stop accepting; in-flight associations end
    pipeline.stopping.set()
    jobs.stop()  # the running drain finishes its current job
    released = queue.release_leases(pipeline.engine, pipeline.owner)
    pipeline.engine.dispose()
    logger.info("stopped (%d leases released)", released)
    return 0
