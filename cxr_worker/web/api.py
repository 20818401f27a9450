"""The REST API under ``/api/v1/`` (the routes; ``openapi.py`` describes them).

JSON field names are those of ``cxr-worker worklist --json`` (a study row) plus ``band``,
``read_by``, ``read_at`` and ``key_sop_instance_uid``. Errors are ``{"error": message}``
with 400 (a parameter; the message names it), 401, 403, 404, 409 (not in a state that
allows it), 415, 503 (starting). Times are ISO 8601 in UTC.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from typing import Any
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from cxr_worker import __version__
from cxr_worker.web import events, images
from cxr_worker.web.auth import (
    COOKIE,
    ApiError,
    WebContext,
    authenticate,
    clear_session_cookie,
    guarded,
    json_body,
    open_endpoint,
    set_session_cookie,
    unauthorized,
)
from cxr_worker.worklist import control, deliveries, studies, tokens
from cxr_worker.worklist.models import Delivery, Instance, Status
from cxr_worker.worklist.tokens import Principal

logger = logging.getLogger(__name__)

PREFIX = "/api/v1"
DEFAULT_LIMIT, MAX_LIMIT = 50, 500
LIST_PARAMS = ("status", "band", "since", "accession", "read", "limit", "cursor")


def _iso(t: dt.datetime | None) -> str | None:
    return t.isoformat() if t else None


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def instance_urls(sop: str) -> dict[str, str]:
    base = f"{PREFIX}/instances/{quote(sop, safe='')}"
    return {"thumbnail": f"{base}/thumbnail.png", "heatmap": f"{base}/heatmap.png"}


def study_json(row: studies.StudyRow) -> dict[str, Any]:
    d = row.as_json()
    d["urls"] = {"self": f"{PREFIX}/studies/{quote(row.study_instance_uid, safe='')}",
                 **(instance_urls(row.key_sop_instance_uid) if row.key_sop_instance_uid
                    else {})}
    return d


def instance_json(r: Instance, outputs: list[Delivery] | None = None) -> dict[str, Any]:
    """An image with its deliveries: ``deliveries`` the current ones (one per output kind,
    plus any rejection notes), ``superseded`` those a later decision replaced (with
    ``superseded_by`` and ``rejected_by``)."""
    outputs = outputs or []
    current = [d for d in outputs if d.superseded_at is None]
    return {
        "sop_instance_uid": r.sop_instance_uid,
        "series_instance_uid": r.series_instance_uid,
        "status": control.instance_status(r.status, r.delivery),
        "delivery": r.delivery if r.status in _WITH_RESULT else None,
        "label": r.label, "probability": r.probability, "threshold": r.threshold,
        "model_version": r.model_version, "population": r.population, "reason": r.reason,
        "attempts": r.attempts,
        "send_attempts": max((d.attempts for d in current), default=0),
        "received_at": _iso(r.received_at), "scored_at": _iso(r.scored_at),
        "sent_at": _iso(r.sent_at), "result_sop_instance_uid": r.result_sop_instance_uid,
        "deliveries": [deliveries.as_json(d) for d in current],
        "superseded": [deliveries.as_json(d) for d in outputs if d.superseded_at is not None],
        "heatmap_available": images.has_heatmap(r.result_path),
        "urls": instance_urls(r.sop_instance_uid),
    }


_WITH_RESULT = (Status.SCORED, Status.SENT, Status.HELD)


def instances_json(engine: Any, rows: list[Instance]) -> list[dict[str, Any]]:
    outputs = deliveries.of_instances(engine, [r.id for r in rows])
    return [instance_json(r, outputs[r.id]) for r in rows]


def _one(request: Request, name: str) -> str | None:
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise ApiError(400, f"{name}: given more than once")
    return values[0] if values else None


def _limit(request: Request) -> int:
    raw = _one(request, "limit")
    if raw is None:
        return DEFAULT_LIMIT
    try:
        limit = int(raw)
    except ValueError:
        raise ApiError(400, f"limit: not an integer: {raw!r}") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise ApiError(400, f"limit: {limit} is not in 1-{MAX_LIMIT} (follow 'next' for more)")
    return limit


def _since(raw: str | None) -> dt.datetime | None:
    if raw is None:
        return None
    try:
        since = dt.datetime.fromisoformat(raw)
    except ValueError:
        raise ApiError(400, f"since: not an ISO 8601 date or time: {raw!r}") from None
    return since if since.tzinfo else since.replace(tzinfo=dt.UTC)


def _unknown_params(request: Request, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(request.query_params.keys()) - set(allowed))
    if unknown:
        raise ApiError(400, f"unknown parameter {unknown[0]!r} (known: {', '.join(allowed)})")


def _etag(version: int, request: Request) -> str:
    query = sorted(request.query_params.multi_items())
    digest = hashlib.sha256(repr(query).encode()).hexdigest()[:16]
    return f'W/"{version}-{digest}"'


def _not_modified(request: Request, etag: str) -> bool:
    wanted = request.headers.get("if-none-match", "")
    return etag in [t.strip() for t in wanted.split(",")]


class Api:
    """The handlers; :meth:`routes` puts them under :data:`PREFIX`."""

    def __init__(self, ctx: WebContext) -> None:
        self.ctx = ctx
        self.watcher = events.VersionWatcher(lambda: ctx.readiness.engine, ctx.stopping)

    async def db(self, fn: Any, *args: Any) -> Any:
        """``fn(engine, *args)`` on a worker thread."""
        return await run_in_threadpool(fn, self.ctx.engine, *args)

    def routes(self) -> list[BaseRoute]:
        ctx, p = self.ctx, PREFIX

        def r(path: str, method: str, handler: Any, role: str | None = "reader") -> Route:
            endpoint = open_endpoint(handler) if role is None else guarded(ctx, role, handler)
            return Route(p + path, endpoint, methods=[method])

        return [
            r("/health", "GET", self.health, None),
            r("/openapi.json", "GET", self.openapi, None),
            r("/session", "POST", self.sign_in, None),
            r("/session", "GET", self.whoami),
            r("/session", "DELETE", self.sign_out),
            r("/studies", "GET", self.list_studies),
            r("/studies/{uid}", "GET", self.get_study),
            r("/studies/{uid}/read", "POST", self.mark_read),
            r("/studies/{uid}/read", "DELETE", self.unmark_read),
            r("/studies/{uid}/replay", "POST", self.replay, "admin"),
            r("/instances/{sop}/thumbnail.png", "GET", self.thumbnail),
            r("/instances/{sop}/heatmap.png", "GET", self.heatmap),
            r("/instances/{sop}/retry", "POST", self.retry, "admin"),
            r("/sending/pause", "POST", self.pause, "admin"),
            r("/sending/resume", "POST", self.resume, "admin"),
            r("/admin/summary", "GET", self.admin_summary, "admin"),
            r("/admin/dead-letters", "GET", self.dead_letters, "admin"),
            r("/events", "GET", self.events),
        ]

    # -- open ---------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        ctx = self.ctx
        ok, body = await run_in_threadpool(ctx.readiness.check)
        body.update(status="ok" if ok else "unready", mode=ctx.mode, version=__version__,
                    auth=ctx.auth)
        return JSONResponse(body, 200 if ok else 503)

    async def openapi(self, request: Request) -> Response:
        from cxr_worker.web.openapi import spec

        return JSONResponse(spec())

    async def sign_in(self, request: Request) -> Response:
        ctx = self.ctx
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise ApiError(415, 'send the token as JSON: {"token": "..."}')
        body = json_body(await request.body())
        if ctx.auth == "none":
            principal, secret = await authenticate(ctx, request)
            return JSONResponse({"name": principal.name, "role": principal.role,
                                 "via": "none", "csrf_token": tokens.csrf_token(secret or ""),
                                 "expires_at": None})
        token = body.get("token")
        if not isinstance(token, str) or not token:
            raise ApiError(400, "token: required (a string)")
        principal = await self.db(tokens.verify, token, "session")
        if principal is None:
            raise unauthorized("the token is not valid or was revoked")
        hours = ctx.settings.http.session_hours
        value, expires = await self.db(tokens.open_session, principal, hours)
        logger.info("web sign-in: token %s (%s)", principal.name, principal.role)
        response = JSONResponse({"name": principal.name, "role": principal.role,
                                 "via": "session", "csrf_token": tokens.csrf_token(value),
                                 "expires_at": expires.isoformat()})
        set_session_cookie(ctx, request, response, value, int(hours * 3600))
        return response

    # -- session ------------------------------------------------------------------------
    async def whoami(self, request: Request, who: Principal) -> Response:
        secret = request.cookies.get(COOKIE) if who.via == "session" else (
            self.ctx.none_secret if who.via == "none" else None)
        return JSONResponse({"name": who.name, "role": who.role, "via": who.via,
                             "csrf_token": tokens.csrf_token(secret) if secret else None,
                             "expires_at": None})

    async def sign_out(self, request: Request, who: Principal) -> Response:
        cookie = request.cookies.get(COOKIE)
        if who.via == "session" and cookie:
            await self.db(tokens.close_session, cookie)
            logger.info("web sign-out: token %s", who.name)
        response = JSONResponse({"signed_out": who.via == "session"})
        clear_session_cookie(self.ctx, request, response)
        return response

    # -- studies ------------------------------------------------------------------------
    async def list_studies(self, request: Request, who: Principal) -> Response:
        _unknown_params(request, LIST_PARAMS)
        try:
            filters = studies.Filters(
                status=_one(request, "status"), band=_one(request, "band"),
                since=_since(_one(request, "since")), accession=_one(request, "accession"),
                read=_one(request, "read") or "unread")
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        limit = _limit(request)
        version = await self.db(events.read_version)  # before the rows: never newer
        etag = _etag(version, request)
        if _not_modified(request, etag):
            return Response(status_code=304, headers={"ETag": etag})
        try:
            page = await self.db(studies.list_studies, filters, limit, _one(request, "cursor"))
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        return JSONResponse({"studies": [study_json(r) for r in page.rows], "next": page.next,
                             "limit": limit, "version": version, "now": _now()},
                            headers={"ETag": etag})

    async def get_study(self, request: Request, who: Principal) -> Response:
        _unknown_params(request, ())
        uid = request.path_params["uid"]
        version = await self.db(events.read_version)
        etag = _etag(version, request)
        if _not_modified(request, etag):
            return Response(status_code=304, headers={"ETag": etag})
        page = await self.db(studies.list_studies,
                             studies.Filters(read="all", study_instance_uid=uid), 1, None)
        if not page.rows:
            raise ApiError(404, "no such study in the worklist")
        rows = await self.db(control.instances_of, uid)
        instances = await self.db(instances_json, rows)
        paused = await self.db(control.sending_paused)
        return JSONResponse({"study": study_json(page.rows[0]),
                             "instances": instances,
                             "sending_paused": paused, "version": version, "now": _now()},
                            headers={"ETag": etag})

    async def mark_read(self, request: Request, who: Principal) -> Response:
        uid = request.path_params["uid"]
        mark = await self.db(control.mark_read, uid, who.name)
        if mark is None:
            raise ApiError(404, "no such study in the worklist")
        logger.info("study %s marked read by %s", uid, who.name)
        return JSONResponse(mark.as_json())

    async def unmark_read(self, request: Request, who: Principal) -> Response:
        uid = request.path_params["uid"]
        if not await self.db(control.unmark_read, uid):
            raise ApiError(404, "this study is not marked read")
        logger.info("study %s put back on the list by %s", uid, who.name)
        return JSONResponse({"study_instance_uid": uid, "read_by": None, "read_at": None})

    async def replay(self, request: Request, who: Principal) -> Response:
        uid = request.path_params["uid"]
        if not await self.db(control.study_exists, uid):
            raise ApiError(404, "no such study in the worklist")
        n = await self.db(control.replay_study, uid)
        if n == 0:
            raise ApiError(409, "no image of this study is kept any more (retention)")
        logger.info("replay of study %s (%d images) requested by %s", uid, n, who.name)
        self.ctx.readiness.wake("process")
        return JSONResponse({"study_instance_uid": uid, "requeued": n}, 202)

    # -- instances ----------------------------------------------------------------------
    async def _instance(self, request: Request) -> Instance:
        row = await self.db(control.instance, request.path_params["sop"])
        if row is None:
            raise ApiError(404, "no such image in the worklist")
        assert isinstance(row, Instance)
        return row

    async def thumbnail(self, request: Request, who: Principal) -> Response:
        size = _size(request)
        row = await self._instance(request)
        try:
            png = await run_in_threadpool(images.thumbnail_png, row.spool_path, size)
        except images.UnavailableError as exc:
            raise ApiError(404, str(exc)) from None
        return Response(png, media_type="image/png")

    async def heatmap(self, request: Request, who: Principal) -> Response:
        size = _size(request)
        row = await self._instance(request)
        try:
            png = await run_in_threadpool(images.heatmap_png, row.spool_path, row.result_path,
                                          size)
        except images.UnavailableError as exc:
            raise ApiError(404, str(exc)) from None
        return Response(png, media_type="image/png")

    async def retry(self, request: Request, who: Principal) -> Response:
        sop = request.path_params["sop"]
        try:
            what = await self.db(control.retry_dead_letter, sop)
        except ValueError as exc:
            raise ApiError(409, str(exc)) from None
        if what is None:
            raise ApiError(404, "no such image in the worklist")
        logger.info("dead letter %s retried (%s) by %s", sop, what, who.name)
        for kind in ("process", "send"):
            self.ctx.readiness.wake(kind)
        return JSONResponse({"sop_instance_uid": sop, "retry": what}, 202)

    # -- sending, admin -----------------------------------------------------------------
    async def pause(self, request: Request, who: Principal) -> Response:
        return await self._sending(who, True)

    async def resume(self, request: Request, who: Principal) -> Response:
        return await self._sending(who, False)

    async def _sending(self, who: Principal, paused: bool) -> Response:
        await self.db(control.set_sending_paused, paused, who.name)
        logger.info("sending %s by %s", "paused" if paused else "resumed", who.name)
        self.ctx.readiness.wake("send")
        return JSONResponse(await self.db(_sending_state))

    async def admin_summary(self, request: Request, who: Principal) -> Response:
        s, readiness = self.ctx.settings, self.ctx.readiness
        queue_state = await self.db(control.queue_summary, s.pacs_configured)
        echo = readiness.pacs.as_json() if readiness.pacs is not None else None
        return JSONResponse({
            **queue_state, "sending": await self.db(_sending_state),
            "pacs": {"configured": s.pacs_configured, "ae_title": s.pacs.ae_title or None,
                     "host": s.pacs.host if s.pacs_configured else None,
                     "port": s.pacs.port if s.pacs_configured else None,
                     # the periodic C-ECHO runs in `serve`; `web` has none to report
                     "last_echo": echo},
            "mode": self.ctx.mode, "version": await self.db(events.read_version),
            "now": _now()})

    async def dead_letters(self, request: Request, who: Principal) -> Response:
        _unknown_params(request, ("limit", "cursor"))
        limit = _limit(request)
        raw = _one(request, "cursor")
        try:
            after = int(raw) if raw is not None else None
        except ValueError:
            raise ApiError(400, "cursor: not a cursor of this list") from None
        rows = await self.db(control.dead_letters, limit + 1, after)
        more = len(rows) > limit
        rows = rows[:limit]
        listed = await self.db(instances_json, rows)
        return JSONResponse({
            "instances": [{**js, "study_instance_uid": r.study_instance_uid,
                           "accession_number": r.accession_number}
                          for r, js in zip(rows, listed, strict=True)],
            "next": str(rows[-1].id) if more else None, "limit": limit})

    async def events(self, request: Request, who: Principal) -> Response:
        cookie = request.cookies.get(COOKIE)
        bearer = request.headers.get("authorization", "").partition(" ")[2].strip()

        async def still_allowed() -> bool:
            if who.via == "none":
                return True
            try:
                if who.via == "session" and cookie:
                    return await self.db(tokens.session_principal, cookie) is not None
                return await self.db(tokens.verify, bearer) is not None
            except ApiError:
                return True  # the database is away for now: no reason to drop the page

        return StreamingResponse(
            events.stream(self.watcher, self.ctx.stopping, still_allowed),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def _size(request: Request) -> int:
    _unknown_params(request, ("size",))
    raw = _one(request, "size")
    try:
        size = int(raw) if raw is not None else images.DEFAULT_SIZE
    except ValueError:
        raise ApiError(400, f"size: not an integer: {raw!r}") from None
    if not images.MIN_SIZE <= size <= images.MAX_SIZE:
        raise ApiError(400, f"size: {size} is not in {images.MIN_SIZE}-{images.MAX_SIZE}")
    return size


def _sending_state(engine: Any) -> dict[str, Any]:
    st = control.state(engine, control.SENDING_PAUSED) or {}
    return {"sending_paused": st.get("value") == "true", "updated_by": st.get("updated_by"),
            "updated_at": st.get("updated_at")}
