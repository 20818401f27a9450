"""The service's small HTTP server: routes to handlers, on a daemon thread.

Stdlib only (:class:`http.server.ThreadingHTTPServer`). ``service.serve`` binds it at start-up
and serves health and metrics from it; other pages (a web worklist) add their own routes with
:meth:`HttpServer.route`. A handler takes a :class:`Request` and returns a :class:`Response`;
an exception in a handler answers 500 and is logged, never shown to the client.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

logger = logging.getLogger(__name__)

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"


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


class HttpServer:
    """Bind with :meth:`bind` (raises ``OSError``, e.g. port in use), serve with :meth:`start`
    on a daemon thread, :meth:`stop` at shutdown. Routes may be added at any time."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._routes: dict[tuple[str, str], Handler] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def route(self, path: str, handler: Handler, methods: tuple[str, ...] = ("GET",)) -> None:
        for method in methods:
            self._routes[(method.upper(), path)] = handler

    @property
    def address(self) -> tuple[str, int]:
        """The bound host and port (the real port when 0 was asked for)."""
        if self._server is None:
            return self.host, self.port
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def bind(self) -> None:
        routes = self._routes

        class _Handler(_RequestHandler):
            pass

        _Handler.routes = routes
        server = ThreadingHTTPServer((self.host, self.port), _Handler)
        server.daemon_threads = True
        self._server = server

    def start(self) -> None:
        if self._server is None:
            self.bind()
        assert self._server is not None
        self._thread = threading.Thread(target=self._server.serve_forever, name="http",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is None:
            return
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(10)
        self._server.server_close()
        self._server = self._thread = None


class _RequestHandler(BaseHTTPRequestHandler):
    routes: dict[tuple[str, str], Handler] = {}  # noqa: RUF012 (set per server by bind)
    server_version = "cxr-worker"
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # http.server's naming
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        lookup = "GET" if method == "HEAD" else method
        handler = self.routes.get((lookup, url.path))
        if handler is None:
            allowed = sorted(m for m, p in self.routes if p == url.path)
            self._body()  # keep the connection in step
            response = (Response(405, b"method not allowed\n", TEXT,
                                 {"Allow": ", ".join(allowed)}) if allowed
                        else Response.text(404, "not found\n"))
        else:
            request = Request(method, url.path, parse_qs(url.query), dict(self.headers.items()),
                              self._body())
            try:
                response = handler(request)
            except Exception:
                logger.exception("HTTP %s %s failed", method, url.path)
                response = Response.text(500, "internal error\n")
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in response.headers.items():
            self.send_header(k, v)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(response.body)

    def _body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        return self.rfile.read(length) if length > 0 else b""

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("HTTP %s: " + format, self.address_string(), *args)
