"""Liveness and readiness of the running service, and the periodic C-ECHO of the PACS.

Ready (``GET /readyz`` answers 200) when the model is loaded and warmed up, the database
answers ``SELECT 1`` and the spool folder takes a file. The PACS C-ECHO is reported beside
the checks but never makes the worker unready: received images are kept and their results
sent when the PACS answers again.
"""

from __future__ import annotations

import datetime as dt
import logging
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from cxr_worker import send
from cxr_worker.http import HttpServer, Request, Response
from cxr_worker.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from cxr_worker.metrics import Metrics
from cxr_worker.score import Scorer

logger = logging.getLogger(__name__)


def _error(exc: BaseException) -> str:
    """A short, one-line description of a failure (type and first line, no traceback)."""
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


@dataclass(frozen=True)
class EchoResult:
    ok: bool
    at: dt.datetime
    error: str | None = None


class PacsEcho:
    """C-ECHO the PACS (a scheduled job calls :meth:`run`) and keep the last result."""

    def __init__(self, peer: send.Peer) -> None:
        self.peer = peer
        self._lock = threading.Lock()
        self._last: EchoResult | None = None

    @property
    def destination(self) -> str:
        return self.peer.ae_title

    @property
    def last(self) -> EchoResult | None:
        with self._lock:
            return self._last

    def run(self) -> EchoResult:
        try:
            send.echo(self.peer)
        except Exception as exc:  # a failed echo is a result to report, never a crash
            result = EchoResult(False, dt.datetime.now(dt.UTC), _error(exc))
            logger.warning("C-ECHO %s@%s:%d failed: %s", self.peer.ae_title, self.peer.host,
                           self.peer.port, result.error)
        else:
            result = EchoResult(True, dt.datetime.now(dt.UTC))
        with self._lock:
            self._last = result
        return result

    def as_json(self) -> dict[str, Any]:
        last = self.last
        return {
            "ae_title": self.peer.ae_title, "host": self.peer.host, "port": self.peer.port,
            "ok": None if last is None else last.ok,
            "at": None if last is None else last.at.isoformat(),
            "error": None if last is None else last.error,
        }


def check_model(scorer: Scorer | None) -> dict[str, Any]:
    if scorer is None:
        return {"ok": False, "error": "model not loaded yet"}
    out: dict[str, Any] = {"ok": bool(scorer.ready), "model_version": scorer.model_version}
    if not scorer.ready:
        out["error"] = "model not warmed up yet"
    return out


def check_database(engine: Engine | None) -> dict[str, Any]:
    if engine is None:
        return {"ok": False, "error": "database not opened yet"}
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        return {"ok": False, "error": _error(exc)}
    return {"ok": True}


def check_spool(spool_dir: Path | None) -> dict[str, Any]:
    """Can a file be created and written in the spool folder (never creates the folder)?"""
    if spool_dir is None:
        return {"ok": False, "error": "spool not opened yet"}
    try:
        with tempfile.TemporaryFile(dir=spool_dir, prefix=".readyz-") as f:
            f.write(b"\0")
            f.flush()
    except OSError as exc:
        return {"ok": False, "error": _error(exc)}
    return {"ok": True}


@dataclass
class Readiness:
    """What ``/readyz`` checks; the service fills the parts in as start-up reaches them."""

    scorer: Scorer | None = None
    engine: Engine | None = None
    spool_dir: Path | None = None
    pacs: PacsEcho | None = None
    # what this process needs to be ready: ``cxr-worker web`` (no model, no spool) only the
    # database
    needs: tuple[str, ...] = ("model", "database", "spool")
    # the service's loops (cxr_worker.jobs.Jobs.wake_role): "process" or "send", called by
    # the web API after a replay, a retry or a resumed sending (no-op without a service)
    wake: Callable[[str], None] = field(default=lambda _kind: None)

    def check(self) -> tuple[bool, dict[str, Any]]:
        run = {"model": lambda: check_model(self.scorer),
               "database": lambda: check_database(self.engine),
               "spool": lambda: check_spool(self.spool_dir)}
        checks = {name: run[name]() for name in self.needs}
        failed = [name for name, c in checks.items() if not c["ok"]]
        body: dict[str, Any] = {"ready": not failed, "failed": failed, "checks": checks}
        if self.pacs is not None:  # reported, never a reason to be unready
            body["pacs_echo"] = self.pacs.as_json()
        return not failed, body


def add_routes(server: HttpServer, readiness: Readiness, metrics: Metrics) -> None:
    """``/healthz`` (liveness), ``/readyz`` (readiness, JSON), ``/metrics`` (Prometheus)."""

    def healthz(_req: Request) -> Response:
        return Response.text(200, "ok\n")

    def readyz(_req: Request) -> Response:
        ok, body = readiness.check()
        return Response.json(200 if ok else 503, body)

    def prometheus(_req: Request) -> Response:
        return Response(200, metrics.exposition(), METRICS_CONTENT_TYPE)

    server.route("/healthz", healthz)
    server.route("/readyz", readyz)
    server.route("/metrics", prometheus)
