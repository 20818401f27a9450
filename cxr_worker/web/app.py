"""The web worklist on an :class:`~cxr_worker.http.HttpServer`; ``cxr-worker web``.

``serve`` adds these routes to the HTTP server it starts before the database and the model
(the API answers 503 until the database is open). ``cxr-worker web`` (:func:`run_web`) serves
the same routes with health and metrics, alone against the configured database, e.g. on
another host than the worker, against the same PostgreSQL: no listener, no model, no jobs.
It never creates or migrates the database (run ``serve`` or ``db upgrade`` first); its
``/readyz`` needs only the database; it shows no PACS C-ECHO (that runs in ``serve``), and
the pictures only when the image files are on its host (``storage.data_dir`` or a shared
mount), else the API answers 404 for them.

Pages: ``GET /`` renders ``templates/index.html`` (Jinja2), ``/static/...`` serves
``static/``; both are package data of ``cxr_worker.web``. The page shell needs no sign-in;
everything it shows comes from the API, which does.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from cxr_worker import __version__, health
from cxr_worker.http import HttpServer
from cxr_worker.lifecycle import wait_for_stop_signal
from cxr_worker.settings import Settings
from cxr_worker.web.api import Api
from cxr_worker.web.auth import CSRF_HEADER, WebContext

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"


def add_web_routes(server: HttpServer, settings: Settings, readiness: health.Readiness,
                   mode: str = "serve") -> WebContext:
    """The API, the page and its static files on ``server``."""
    ctx = WebContext(settings, readiness, server.stopping, mode)
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape())

    async def index(request: Request) -> Response:
        html = env.get_template("index.html").render(
            version=__version__, auth=settings.http.auth, csrf_header=CSRF_HEADER, mode=mode)
        return HTMLResponse(html)

    server.add_routes([
        *Api(ctx).routes(),
        Route("/", index, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ])
    return ctx


def run_web(s: Settings, engine: Any) -> int:
    """``cxr-worker web``: serve the worklist from ``engine`` (an existing worklist) until
    SIGTERM/SIGINT."""
    from cxr_worker.metrics import Metrics
    from cxr_worker.service import _http_error

    readiness = health.Readiness(engine=engine, needs=("database",))
    metrics = Metrics()
    metrics.watch_worklist(engine, s.pacs_configured)
    server = HttpServer(s.http.host, s.http.port)
    health.add_routes(server, readiness, metrics)
    add_web_routes(server, s, readiness, mode="web")
    try:
        server.start()
    except OSError as exc:
        raise _http_error(s, exc) from exc
    host, port = server.address
    logger.info("web worklist on http://%s:%d (auth %s)", host, port, s.http.auth)
    print(f"cxr-worker web ready: http://{host}:{port}/", flush=True)
    wait_for_stop_signal()
    server.stop()
    engine.dispose()
    return 0
