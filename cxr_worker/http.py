"""The service's HTTP server: Starlette routes served by uvicorn on a daemon thread.

Decision: Starlette + uvicorn rather than the standard library's ``http.server``. The web
worklist needs routing with path parameters, cookies, a streamed response for server-sent
events, static files and templates; Starlette gives them in a small, well-kept library, and
uvicorn serves it. Both stay inside the process: uvicorn runs its event loop on a daemon
thread (no signal handlers there: ``serve`` keeps its own), on a socket bound synchronously
by :meth:`HttpServer.bind`, so a port in use is an ``OSError`` at start-up, before the
database and the model, and probes are answered while they load.

Two kinds of routes:

- :meth:`HttpServer.route`: a plain function taking a :class:`Request` and returning a
  :class:`Response` (health and metrics), run on a worker thread;
- :meth:`HttpServer.add_routes`: Starlette routes (the web worklist, ``cxr_worker.web``).

Every response carries ``Cache-Control: no-store`` (unless the route set its own) and the
security headers of :data:`SECURITY_HEADERS`. An exception in a handler answers 500 and is
logged (its type; the traceback at DEBUG, as the CLI does: an error's text may quote a
value), never shown to the client. uvicorn's access log is off: request lines carry UIDs and
accession numbers in query strings. Request bodies are capped at :data:`MAX_BODY_BYTES`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.responses import Response as StarletteResponse
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"
MAX_BODY_BYTES = 64 * 1024
# what every response says to the browser; the page (cxr_worker/web/static) loads its own
# scripts and styles only, from this server
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": ("default-src 'self'; img-src 'self' data:; object-src 'none'; "
                                "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
}


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]
    body: bytes = b""


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = TEXT
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def text(cls, status: int, body: str) -> Response:
        return cls(status, body.encode("utf-8"), TEXT)

    @classmethod
    def json(cls, status: int, obj: Any) -> Response:
        return cls(status, json.dumps(obj).encode("utf-8"), JSON)


Handler = Callable[[Request], Response]


def _endpoint(handler: Handler) -> Callable[[StarletteRequest], Awaitable[StarletteResponse]]:
    async def endpoint(request: StarletteRequest) -> StarletteResponse:
        req = Request(request.method, request.url.path, parse_qs(request.url.query),
                      dict(request.headers.items()), await request.body())
        resp = await run_in_threadpool(handler, req)
        return StarletteResponse(resp.body, resp.status, headers=dict(resp.headers),
                                 media_type=resp.content_type)

    return endpoint


def _wants_json(path: str) -> bool:
    return path.startswith("/api/")


async def _http_error(request: StarletteRequest, exc: Exception) -> StarletteResponse:
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    if _wants_json(request.url.path):
        return JSONResponse({"error": exc.detail}, exc.status_code, headers=headers)
    return PlainTextResponse(f"{exc.detail.lower()}\n", exc.status_code, headers=headers)


class _Guard:
    """Outermost middleware: the headers every response gets, and a 500 (logged, never the
    error's text) for anything a route raised."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                extra = dict(SECURITY_HEADERS)
                extra.setdefault("Cache-Control", "no-store")
                for k, v in extra.items():
                    if k.lower().encode() not in names:
                        headers.append((k.lower().encode(), v.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception as exc:
            logger.error("HTTP %s %s failed: %s", scope.get("method"), scope.get("path"),
                         type(exc).__name__)
            logger.debug("traceback of the HTTP error above", exc_info=True)
            if not started:
                body = (JSONResponse({"error": "internal error"}, 500)
                        if _wants_json(str(scope.get("path", "")))
                        else PlainTextResponse("internal error\n", 500))
                await body(scope, receive, send_with_headers)


class HttpServer:
    """Bind with :meth:`bind` (raises ``OSError``, e.g. port in use), serve with :meth:`start`
    on a daemon thread, :meth:`stop` at shutdown. Routes may be added at any time."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.app = Starlette(
            exception_handlers={HTTPException: _http_error}, max_body_size=MAX_BODY_BYTES)
        self.stopping = threading.Event()  # set first at stop: long responses (SSE) end
        self._on_stop: list[Callable[[], None]] = []
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def route(self, path: str, handler: Handler, methods: tuple[str, ...] = ("GET",)) -> None:
        self.add_routes([Route(path, _endpoint(handler), methods=list(methods))])

    def add_routes(self, routes: Sequence[BaseRoute]) -> None:
        self.app.router.routes.extend(routes)

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` at :meth:`stop`, before the server waits for open requests."""
        self._on_stop.append(callback)

    @property
    def address(self) -> tuple[str, int]:
        """The bound host and port (the real port when 0 was asked for)."""
        if self._socket is None:
            return self.host, self.port
        host, port = self._socket.getsockname()[:2]
        return str(host), int(port)

    def bind(self) -> None:
        family = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]
        self._socket = socket.create_server((self.host, self.port), family=family, backlog=128)

    def start(self) -> None:
        if self._socket is None:
            self.bind()
        assert self._socket is not None
        config = uvicorn.Config(
            _Guard(self.app), log_config=None, access_log=False, lifespan="off",
            timeout_graceful_shutdown=1, server_header=False, date_header=True,
            proxy_headers=True)  # X-Forwarded-Proto from a local TLS proxy: Secure cookies
        self._server = uvicorn.Server(config)
        sockets = [self._socket]
        server = self._server
        self._thread = threading.Thread(target=lambda: server.run(sockets=sockets),
                                        name="http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._socket is None:
            return
        self.stopping.set()
        for callback in self._on_stop:
            try:
                callback()
            except Exception:
                logger.warning("HTTP stop hook failed", exc_info=True)
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(5)
        self._socket.close()
        self._socket = self._server = self._thread = None


async def sleep_or_stop(stopping: threading.Event, seconds: float) -> bool:
    """Sleep ``seconds`` in small steps; True as soon as the server is stopping."""
    end = asyncio.get_running_loop().time() + seconds
    while not stopping.is_set():
        left = end - asyncio.get_running_loop().time()
        if left <= 0:
            return False
        await asyncio.sleep(min(left, 0.25))
    return True
