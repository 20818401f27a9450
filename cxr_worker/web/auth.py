"""Who a request is, and whether it may do what it asks.

- ``Authorization: Bearer <token>`` (scripts, the admins' tools): a token made by
  ``cxr-worker token create``; no CSRF token needed (a browser never adds this header to a
  cross-site request by itself).
- The page: ``POST /api/v1/session`` with ``{"token": ...}`` sets the session cookie
  :data:`COOKIE` (HttpOnly, SameSite=Strict, Path=/, Secure over HTTPS or with
  ``[http] cookie_secure``) and answers the CSRF token; every state-changing request (POST,
  DELETE) made with the cookie must send it back in the :data:`CSRF_HEADER` header. It is
  bound to the session (an HMAC of the cookie's value): a page of another site can neither
  read it nor make a browser send a custom header across sites without a CORS preflight,
  which this server never grants.
- ``[http] auth = "none"`` (loopback only, checked at start-up): everyone is the admin
  ``local``; state-changing requests still need the CSRF token (``GET /api/v1/session`` gives
  it; a per-process secret), and a request whose ``Host`` is not a loopback name is refused
  (a DNS-rebinding page cannot reach the API through the user's browser).

Answers: 401 without valid credentials (with ``WWW-Authenticate: Bearer``), 403 for a role
that may not, or a missing or wrong CSRF token; 503 while ``serve`` opens the database.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from cxr_worker.health import Readiness
from cxr_worker.settings import Settings, is_loopback
from cxr_worker.worklist import tokens
from cxr_worker.worklist.tokens import Principal

logger = logging.getLogger(__name__)

COOKIE = "cxr_session"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
LOCAL = Principal("local", "admin", "none")


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, {"WWW-Authenticate": 'Bearer realm="cxr-worker"'})


@dataclass
class WebContext:
    """What the web routes need: the settings, the database (through ``readiness``, which
    ``serve`` fills in as start-up reaches it), whether the process is ``serve`` or ``web``,
    and the HTTP server's stop flag (long responses end on it)."""

    settings: Settings
    readiness: Readiness
    stopping: threading.Event
    mode: str = "serve"
    none_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    @property
    def auth(self) -> str:
        return self.settings.http.auth

    @property
    def engine(self) -> Engine:
        engine = self.readiness.engine
        if engine is None:
            raise ApiError(503, "starting: the worklist database is not open yet",
                           {"Retry-After": "2"})
        return engine


def _host_is_loopback(request: Request) -> bool:
    host = request.headers.get("host", "")
    if host.startswith("["):
        name = host[1:].split("]", 1)[0]
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return bool(name) and is_loopback(name)


async def authenticate(ctx: WebContext, request: Request) -> tuple[Principal, str | None]:
    """The principal, and the secret its CSRF token derives from (None for Bearer)."""
    if ctx.auth == "none":
        if not _host_is_loopback(request):
            raise ApiError(403, "http.auth is \"none\": only requests to a loopback host name "
                           "(127.0.0.1, ::1, localhost) are served")
        return LOCAL, ctx.none_secret
    engine = ctx.engine
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthorized("Authorization: expected 'Bearer <token>'")
        principal = await run_in_threadpool(tokens.verify, engine, token.strip())
        if principal is None:
            raise unauthorized("the token is not valid or was revoked")
        return principal, None
    cookie = request.cookies.get(COOKIE)
    if cookie:
        principal = await run_in_threadpool(tokens.session_principal, engine, cookie)
        if principal is None:
            raise unauthorized("the session ended (expired, signed out, or its token was "
                               "revoked): sign in again")
        return principal, cookie
    raise unauthorized("sign in: send 'Authorization: Bearer <token>' (cxr-worker token "
                       "create), or POST /api/v1/session with the token to get a cookie")


def check_csrf(request: Request, secret: str | None) -> None:
    """State-changing requests with the cookie (or without auth) need the CSRF header."""
    if request.method in SAFE_METHODS or secret is None:
        return
    if not tokens.csrf_ok(secret, request.headers.get(CSRF_HEADER)):
        raise ApiError(403, f"missing or wrong {CSRF_HEADER} header (the csrf_token given at "
                       "sign-in, or by GET /api/v1/session)")


Handler = Callable[[Request, Principal], Awaitable[Response]]


def guarded(ctx: WebContext, role: str, handler: Handler) -> Callable[[Request],
                                                                      Awaitable[Response]]:
    """``handler`` behind authentication, the ``role`` check and CSRF; :class:`ApiError` as
    JSON ``{"error": message}``."""

    async def endpoint(request: Request) -> Response:
        try:
            principal, secret = await authenticate(ctx, request)
            if not principal.has(role):
                raise ApiError(403, f"this needs the {role} role (token {principal.name!r} is "
                               f"{principal.role})")
            check_csrf(request, secret)
            return await handler(request, principal)
        except ApiError as exc:
            return error_response(exc)

    return endpoint


def open_endpoint(handler: Callable[[Request], Awaitable[Response]]
                  ) -> Callable[[Request], Awaitable[Response]]:
    """A route without authentication (health, the schema, sign-in); ApiError as JSON."""

    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return error_response(exc)

    return endpoint


def error_response(exc: ApiError) -> Response:
    return JSONResponse({"error": exc.message}, exc.status, headers=exc.headers)


def set_session_cookie(ctx: WebContext, request: Request, response: Response, value: str,
                       max_age: int) -> None:
    secure = ctx.settings.http.cookie_secure or request.url.scheme == "https"
    response.set_cookie(COOKIE, value, max_age=max_age, path="/", secure=secure,
                        httponly=True, samesite="strict")


def clear_session_cookie(ctx: WebContext, request: Request, response: Response) -> None:
    secure = ctx.settings.http.cookie_secure or request.url.scheme == "https"
    response.delete_cookie(COOKIE, path="/", secure=secure, httponly=True, samesite="strict")


def json_body(raw: bytes) -> dict[str, Any]:
    import json

    try:
        body = json.loads(raw or b"{}")
    except ValueError as exc:
        raise ApiError(400, "the body is not JSON") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body
