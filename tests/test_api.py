"""The web worklist's REST API (``/api/v1/``) over real HTTP, on SQLite and on the PostgreSQL
at 127.0.0.1:5432: pagination, filters, bands, roles, tokens, sessions and CSRF, read marks,
admin actions, ETag and server-sent events, pictures, the OpenAPI description; the triggers
that keep the list's summary; and a real ``cxr-worker serve`` fed by dcmtk ``storescu``."""

from __future__ import annotations

import datetime as dt
import http.client
import io
import json
import random
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import SAMPLES, free_port, run_cli, storescu, wait_until
from PIL import Image
from sqlalchemy import Engine, text, update

from cxr_worker import health
from cxr_worker.errors import ConfigError
from cxr_worker.http import HttpServer
from cxr_worker.labels import Label, Population
from cxr_worker.settings import load_settings
from cxr_worker.web.app import add_web_routes
from cxr_worker.worklist import control, deliveries, queue, studies, tokens
from cxr_worker.worklist.models import Instance, Status, utcnow

SAMPLE = SAMPLES / "cr_pa_normal_12bit.dcm"


# -- fixtures -------------------------------------------------------------------------------
@pytest.fixture
def engine(migrated_engine: Engine) -> Engine:
    return migrated_engine


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Client:
    base: str
    token: str | None = None
    cookie: str | None = None
    csrf: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def call(self, method: str, path: str, body: Any = None,
             headers: dict[str, str] | None = None) -> Reply:
        h = dict(self.extra)
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        if self.cookie:
            h["Cookie"] = f"cxr_session={self.cookie}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        h.update(headers or {})
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return Reply(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return Reply(exc.code, {k.lower(): v for k, v in exc.headers.items()},
                             exc.read())

    def get(self, path: str, **kw: Any) -> Reply:
        return self.call("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Reply:
        return self.call("POST", path, body, **kw)

    def delete(self, path: str, **kw: Any) -> Reply:
        return self.call("DELETE", path, **kw)


@dataclass
class Api:
    base: str
    engine: Engine
    admin: Client
    reader: Client
    server: HttpServer

    def anonymous(self) -> Client:
        return Client(self.base)

    def sign_in(self, token: str) -> Client:
        r = Client(self.base).post("/api/v1/session", {"token": token})
        assert r.status == 200, r.body
        cookie = r.headers["set-cookie"].split(";")[0].split("=", 1)[1]
        return Client(self.base, cookie=cookie, csrf=r.json()["csrf_token"])


def _serve(engine: Engine, **env: str) -> HttpServer:
    s = load_settings(environ={"CXR_WORKER__HTTP__PORT": "0", **env})
    server = HttpServer(s.http.host, s.http.port)
    add_web_routes(server, s, health.Readiness(engine=engine, needs=("database",)))
    server.start()
    return server


@pytest.fixture
def api(engine) -> Iterator[Api]:
    server = _serve(engine)
    base = f"http://127.0.0.1:{server.address[1]}"
    admin = tokens.create(engine, "dr-admin", "admin")
    reader = tokens.create(engine, "dr-reader", "reader")
    yield Api(base, engine, Client(base, admin), Client(base, reader), server)
    server.stop()


# -- worklist rows ----------------------------------------------------------------------------
def _add(engine: Engine, study: str, *, accession: str = "A1", **values: Any) -> str:
    """One instance of ``study`` (received), then ``values`` written as they are."""
    sop = f"1.2.3.{uuid.uuid4().int % 10**20}"
    row_id, _ = queue.enqueue(engine, sop_instance_uid=sop, sop_class_uid="1.2.840.10008.1",
                              study_instance_uid=study, series_instance_uid="1.2.5",
                              accession_number=accession, calling_ae_title="MOD",
                              transfer_syntax_uid="1.2.840.10008.1.2.1",
                              spool_path=f"/nonexistent/{sop}.dcm")
    if values:
        with engine.begin() as c:
            c.execute(update(Instance).where(Instance.id == row_id).values(**values))
    return sop


# the image's delivery (instances.delivery) that goes with each status, as the application
# writes it with the image's deliveries (tests override it: retrying, undelivered)
_DELIVERY_OF = {Status.SENT: "sent", Status.HELD: "held", Status.SCORED: "waiting"}


def scored(p: float, population: Population = Population.IN, status: str = Status.SENT,
           threshold: float = 0.5, **extra: Any) -> dict[str, Any]:
    return {"status": status, "probability": p, "threshold": threshold, "model_version": "m1",
            "label": Label.SUSPECTED if p >= threshold else Label.NEGATIVE,
            "population": population, "scored_at": utcnow(), "result_path": "/r.dcm",
            "delivery": _DELIVERY_OF.get(status), **extra}


def _at(minutes: float) -> dt.datetime:
    return dt.datetime(2025, 12, 1, 8, 0, tzinfo=dt.UTC) + dt.timedelta(minutes=minutes)


def _bands_fixture(engine: Engine) -> list[str]:
    """A study of every band, arrival order scrambled; returns the expected list order."""
    _add(engine, "9.neg.in.late", received_at=_at(50), **scored(0.2))
    _add(engine, "9.susp.in.low", received_at=_at(40), **scored(0.6))
    _add(engine, "9.pending", received_at=_at(5))
    _add(engine, "9.failed", received_at=_at(1), status=Status.FAILED,
         reason="processing failed 10 times: boom")
    _add(engine, "9.susp.out.high", received_at=_at(10),
         **scored(0.97, Population.OUTSIDE))
    _add(engine, "9.neg.out", received_at=_at(2), **scored(0.1, Population.UNKNOWN))
    _add(engine, "9.refused", received_at=_at(3), status=Status.NOT_SCORED,
         reason="out of scope (view_position): View Position LL (lateral)")
    _add(engine, "9.susp.in.high", received_at=_at(60), **scored(0.9))
    _add(engine, "9.neg.in.early", received_at=_at(20), **scored(0.3, status=Status.SCORED))
    # a suspected study whose delivery failed for good stays in its band
    _add(engine, "9.susp.in.undelivered", received_at=_at(30),
         **scored(0.8, status=Status.SCORED, delivery="undelivered",
                  reason="sending failed 10 times (sc): refused"))
    return ["9.susp.in.high", "9.susp.in.undelivered", "9.susp.in.low", "9.susp.out.high",
            "9.neg.in.early", "9.neg.in.late", "9.neg.out", "9.refused", "9.pending",
            "9.failed"]


def _uids(reply: Reply) -> list[str]:
    assert reply.status == 200, reply.body
    return [s["study_instance_uid"] for s in reply.json()["studies"]]


# -- the list -----------------------------------------------------------------------------------
def test_bands_and_their_order(api):
    expected = _bands_fixture(api.engine)
    body = api.reader.get("/api/v1/studies").json()
    assert [s["study_instance_uid"] for s in body["studies"]] == expected
    assert body["next"] is None and body["limit"] == 50
    by = {s["study_instance_uid"]: s for s in body["studies"]}
    assert [by[u]["band"] for u in expected] == [
        "suspected", "suspected", "suspected", "outside", "routine", "routine", "outside",
        "not_scored", "pending", "failed"]
    assert by["9.susp.in.undelivered"]["status"] == "undelivered"
    assert by["9.susp.in.undelivered"]["label"] == Label.SUSPECTED
    assert by["9.susp.in.undelivered"]["probability"] == pytest.approx(0.8)
    assert "sending failed" in by["9.susp.in.undelivered"]["reason"]
    assert by["9.refused"]["label"] == "NOT SCORED" and "view_position" in by["9.refused"][
        "reason"]
    assert by["9.neg.out"]["population"] == "unknown"
    assert by["9.susp.in.high"]["probability"] == pytest.approx(0.9)
    # the same field names as `worklist --json`, plus the web's
    row = studies.triage_list(api.engine, limit=None)[0].as_json()
    assert set(row) | {"urls"} == set(by["9.susp.in.high"])
    assert by["9.susp.in.high"]["urls"]["thumbnail"] == \
        f"/api/v1/instances/{by['9.susp.in.high']['key_sop_instance_uid']}/thumbnail.png"
    # the order's rank and the band agree (both computed in SQL by migration 0005)
    ranked = studies.list_studies(api.engine, limit=None).rows
    assert [studies.RANK_BANDS[r.key[0]] for r in ranked if r.key] == [r.band for r in ranked]
    assert [r.key[0] for r in ranked if r.key] == [0, 0, 0, 1, 2, 2, 3, 4, 5, 6]
    for band in ("suspected", "outside", "routine", "not_scored", "pending", "failed"):
        got = _uids(api.reader.get(f"/api/v1/studies?band={band}"))
        assert got == [u for u in expected if by[u]["band"] == band], band


def test_pages_lose_and_repeat_nothing(api):
    rnd = random.Random(7)
    engine = api.engine
    expected_n = 0
    for i in range(43):
        kind = rnd.choice(["susp", "neg", "out", "pending", "refused"])
        # many ties: the same arrival time, the same probability
        when = _at(rnd.choice([0, 1, 2]))
        uid = f"7.{i}"
        if kind == "pending":
            _add(engine, uid, received_at=when)
        elif kind == "refused":
            _add(engine, uid, received_at=when, status=Status.NOT_SCORED, reason="x")
        else:
            p = rnd.choice([0.7, 0.9]) if kind != "neg" else 0.2
            pop = Population.OUTSIDE if kind == "out" else Population.IN
            for _ in range(rnd.randint(1, 3)):
                _add(engine, uid, received_at=when, **scored(p, pop))
        expected_n += 1
    whole = _uids(api.reader.get("/api/v1/studies?limit=500"))
    assert len(whole) == len(set(whole)) == expected_n
    for limit in (1, 5, 7):
        pages: list[str] = []
        cursor = None
        while True:
            q = f"/api/v1/studies?limit={limit}" + (f"&cursor={cursor}" if cursor else "")
            body = api.reader.get(q).json()
            assert len(body["studies"]) <= limit
            pages += [s["study_instance_uid"] for s in body["studies"]]
            cursor = body["next"]
            if cursor is None:
                break
            assert len(body["studies"]) == limit  # never a short page before the last
        assert pages == whole, limit
    # exactly a page: no empty page after it
    body = api.reader.get(f"/api/v1/studies?limit={expected_n}").json()
    assert len(body["studies"]) == expected_n and body["next"] is None
    body = api.reader.get(f"/api/v1/studies?limit={expected_n - 1}").json()
    assert body["next"] is not None


@pytest.mark.parametrize("query", [
    "limit=0", "limit=501", "limit=x", "status=bogus", "band=top", "read=maybe",
    "since=monday", "cursor=!!", "cursor=WzEsMF0", "colour=red", "limit=5&limit=6"])
def test_bad_parameters_are_400_naming_them(api, query):
    r = api.reader.get(f"/api/v1/studies?{query}")
    assert r.status == 400, (query, r.body)
    name = query.split("=")[0]
    assert name in r.json()["error"]


def test_filters(api):
    engine = api.engine
    _add(engine, "8.old", accession="ACC-1", received_at=_at(-60 * 24), **scored(0.9))
    _add(engine, "8.new", accession="ACC-2", received_at=_at(0), **scored(0.1))
    _add(engine, "8.held", accession="ACC-3", received_at=_at(1),
         **scored(0.2, status=Status.HELD))
    _add(engine, "8.retry", accession="ACC-3", received_at=_at(2),
         **scored(0.2, status=Status.SCORED, delivery="retrying"))
    _add(engine, "8.undelivered", accession="ACC-4", received_at=_at(-60 * 24 - 1),
         **scored(0.1, status=Status.SCORED, delivery="undelivered"))
    get = api.reader.get
    assert _uids(get("/api/v1/studies?status=undelivered")) == ["8.undelivered"]
    assert _uids(get("/api/v1/studies?status=suspected")) == ["8.old"]
    assert _uids(get("/api/v1/studies?status=held")) == ["8.held"]
    assert _uids(get("/api/v1/studies?status=retrying")) == ["8.retry"]
    assert _uids(get("/api/v1/studies?status=sent")) == ["8.old", "8.new"]
    assert _uids(get("/api/v1/studies?accession=ACC-3")) == ["8.held", "8.retry"]
    assert _uids(get("/api/v1/studies?accession=ACC")) == []  # exact match
    since = _at(-1).isoformat()
    assert _uids(get(f"/api/v1/studies?since={since.replace('+', '%2B')}")) == [
        "8.new", "8.held", "8.retry"]
    # no zone: UTC
    assert _uids(get("/api/v1/studies?since=2025-12-01T08:01:30")) == ["8.retry"]
    # an image of the old study arriving now brings it into `since`
    _add(engine, "8.old", accession="ACC-1", received_at=_at(3), **scored(0.3))
    assert _uids(get(f"/api/v1/studies?since={since.replace('+', '%2B')}")) == [
        "8.old", "8.new", "8.held", "8.retry"]


def test_read_marks_leave_the_active_list_until_a_new_image(api):
    engine = api.engine
    _add(engine, "6.a", received_at=_at(0), **scored(0.9))
    _add(engine, "6.b", received_at=_at(1), **scored(0.1))
    session = api.sign_in(tokens.create(engine, "dr-who", "reader"))
    r = session.post("/api/v1/studies/6.a/read", headers={"X-CSRF-Token": session.csrf})
    assert r.status == 200 and r.json()["read_by"] == "dr-who"
    assert _uids(api.reader.get("/api/v1/studies")) == ["6.b"]
    [read] = api.reader.get("/api/v1/studies?read=read").json()["studies"]
    assert (read["study_instance_uid"], read["read_by"]) == ("6.a", "dr-who")
    assert dt.datetime.fromisoformat(read["read_at"]) <= dt.datetime.now(dt.UTC)
    assert _uids(api.reader.get("/api/v1/studies?read=all")) == ["6.a", "6.b"]
    # the CLI reads the same list
    assert [r.study_instance_uid for r in studies.triage_list(engine)] == ["6.b"]
    # a new image of the study after the mark: back on the list, unread
    _add(engine, "6.a")  # received now, after the mark
    [back] = [s for s in api.reader.get("/api/v1/studies").json()["studies"]
              if s["study_instance_uid"] == "6.a"]
    assert back["read_by"] is None and back["images"] == 2
    # marked again, then put back by hand
    assert api.reader.post("/api/v1/studies/6.a/read").json()["read_by"] == "dr-reader"
    assert _uids(api.reader.get("/api/v1/studies")) == ["6.b"]
    assert api.reader.delete("/api/v1/studies/6.a/read").status == 200
    assert api.reader.delete("/api/v1/studies/6.a/read").status == 404
    assert "6.a" in _uids(api.reader.get("/api/v1/studies"))
    assert api.reader.post("/api/v1/studies/9.9.9/read").status == 404


def test_one_study_with_its_images(api):
    engine = api.engine
    a = _add(engine, "5.1", received_at=_at(0), **scored(0.8, sent_at=_at(2)))
    b = _add(engine, "5.1", received_at=_at(1), status=Status.NOT_SCORED,
             reason="out of scope (view_position): LL")
    c = _add(engine, "5.1", received_at=_at(2),
             **scored(0.2, status=Status.SCORED, delivery="retrying"))
    body = api.reader.get("/api/v1/studies/5.1").json()
    assert body["study"]["study_instance_uid"] == "5.1" and body["study"]["images"] == 3
    assert body["study"]["status"] == "retrying" and body["sending_paused"] is False
    by = {i["sop_instance_uid"]: i for i in body["instances"]}
    assert list(by) == [a, b, c]
    assert (by[a]["status"], by[a]["delivery"], by[a]["threshold"], by[a]["model_version"]) \
        == ("sent", "sent", 0.5, "m1")
    assert by[a]["sent_at"] and by[a]["scored_at"] and by[a]["received_at"]
    assert (by[b]["status"], by[b]["delivery"]) == ("not_scored", None)
    assert "view_position" in by[b]["reason"]
    assert (by[c]["status"], by[c]["delivery"]) == ("retrying", "retrying")
    assert by[a]["heatmap_available"] is False
    assert api.reader.get("/api/v1/studies/1.2.3.4.5").status == 404


# -- authentication, roles, CSRF ---------------------------------------------------------------
ADMIN_ONLY = [("POST", "/api/v1/studies/4.1/replay"), ("POST", "/api/v1/instances/{sop}/retry"),
              ("POST", "/api/v1/sending/pause"), ("POST", "/api/v1/sending/resume"),
              ("GET", "/api/v1/admin/summary"), ("GET", "/api/v1/admin/dead-letters")]


def test_reader_may_not_do_admin_things(api):
    sop = _add(api.engine, "4.1", status=Status.FAILED, reason="processing failed: x")
    for method, path in ADMIN_ONLY:
        r = api.reader.call(method, path.format(sop=sop))
        assert r.status == 403, (method, path, r.body)
        assert "admin" in r.json()["error"]
    # nothing changed
    assert not control.sending_paused(api.engine)
    assert api.admin.get("/api/v1/admin/dead-letters").json()["instances"][0][
        "sop_instance_uid"] == sop
    for method, path in reversed(ADMIN_ONLY):  # the retry before the replay re-queues it
        r = api.admin.call(method, path.format(sop=sop))
        assert r.status in (200, 202), (method, path, r.body)


def test_missing_invalid_and_revoked_tokens_are_401(api):
    _add(api.engine, "3.1")
    paths = ["/api/v1/studies", "/api/v1/studies/3.1", "/api/v1/events", "/api/v1/session",
             "/api/v1/admin/summary", "/api/v1/instances/1.2/thumbnail.png",
             "/api/v1/instances/1.2/heatmap.png"]
    for path in paths:
        r = api.anonymous().get(path)
        assert r.status == 401, path
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert "3.1" not in r.body.decode()
    forged = "cxr_" + "A" * 43
    for header in (f"Bearer {forged}", "Bearer", "Basic dXNlcjpwdw==",
                   f"bearer {api.reader.token}x"):
        r = api.anonymous().get("/api/v1/studies", headers={"Authorization": header})
        assert r.status == 401, header
    assert api.anonymous().post("/api/v1/studies/3.1/read").status == 401

    token = tokens.create(api.engine, "leaver", "admin")
    bearer = Client(api.base, token)
    session = api.sign_in(token)
    assert bearer.get("/api/v1/studies").status == 200
    assert session.get("/api/v1/studies").status == 200
    assert tokens.revoke(api.engine, "leaver") is True
    assert bearer.get("/api/v1/studies").status == 401
    assert session.get("/api/v1/studies").status == 401  # its sessions end with it
    assert Client(api.base).post("/api/v1/session", {"token": token}).status == 401
    assert tokens.revoke(api.engine, "leaver") is False
    with pytest.raises(LookupError):
        tokens.revoke(api.engine, "nobody")


def test_session_cookie_and_csrf(api):
    engine = api.engine
    _add(engine, "2.1", **scored(0.9))
    token = tokens.create(engine, "dr-cookie", "admin")
    r = Client(api.base).post("/api/v1/session", {"token": token})
    assert r.status == 200
    cookie = r.headers["set-cookie"]
    attrs = {a.strip().split("=")[0].lower(): a for a in cookie.split(";")[1:]}
    assert "httponly" in attrs and attrs["samesite"].lower().endswith("strict")
    assert attrs["path"].strip() == "Path=/" and "secure" not in attrs  # plain HTTP
    assert token not in cookie and token not in r.body.decode()
    body = r.json()
    assert (body["name"], body["role"], body["via"]) == ("dr-cookie", "admin", "session")
    session = api.sign_in(token)
    assert session.get("/api/v1/session").json()["csrf_token"] == session.csrf
    # the cookie alone: reads yes, changes no
    assert session.get("/api/v1/studies").status == 200
    for method, path in (("POST", "/api/v1/studies/2.1/read"), ("POST", "/api/v1/sending/pause"),
                         ("DELETE", "/api/v1/session")):
        for headers in ({}, {"X-CSRF-Token": "0" * 64}, {"X-CSRF-Token": ""}):
            r = session.call(method, path, headers=headers)
            assert r.status == 403 and "X-CSRF-Token" in r.json()["error"], (path, headers)
    assert not control.sending_paused(engine)
    assert _uids(api.reader.get("/api/v1/studies")) == ["2.1"]
    # another session's CSRF token does not fit this one
    other = api.sign_in(token)
    assert session.post("/api/v1/sending/pause", headers={"X-CSRF-Token": other.csrf}
                        ).status == 403
    ok = {"X-CSRF-Token": session.csrf}
    assert session.post("/api/v1/sending/pause", headers=ok).status == 200
    assert control.sending_paused(engine)
    # Bearer needs none
    assert api.admin.post("/api/v1/sending/resume").status == 200
    assert not control.sending_paused(engine)
    # sign-in wants JSON (a cross-site form cannot send it without a preflight)
    r = Client(api.base).call("POST", "/api/v1/session", headers={
        "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 415
    assert Client(api.base).post("/api/v1/session", {"token": 5}).status == 400
    # sign out: the session is gone
    assert session.delete("/api/v1/session", headers=ok).json() == {"signed_out": True}
    assert session.get("/api/v1/studies").status == 401
    assert other.get("/api/v1/studies").status == 200


def test_secure_cookie_setting(engine):
    server = _serve(engine, CXR_WORKER__HTTP__COOKIE_SECURE="true")
    try:
        token = tokens.create(engine, "dr-tls", "reader")
        r = Client(f"http://127.0.0.1:{server.address[1]}").post(
            "/api/v1/session", {"token": token})
        assert r.status == 200 and "; secure" in r.headers["set-cookie"].lower()
    finally:
        server.stop()


def test_auth_none_only_on_loopback(engine):
    with pytest.raises(ConfigError, match=r"^http\.auth: .*loopback"):
        load_settings(environ={"CXR_WORKER__HTTP__AUTH": "none",
                               "CXR_WORKER__HTTP__HOST": "0.0.0.0"})
    with pytest.raises(ConfigError, match=r"^http\.auth"):
        load_settings(environ={"CXR_WORKER__HTTP__AUTH": "open"})
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        load_settings(environ={"CXR_WORKER__HTTP__AUTH": "none", "CXR_WORKER__HTTP__HOST": host})
    server = _serve(engine, CXR_WORKER__HTTP__AUTH="none")
    try:
        _add(engine, "1.1", **scored(0.9))
        anyone = Client(f"http://127.0.0.1:{server.address[1]}")
        assert _uids(anyone.get("/api/v1/studies")) == ["1.1"]
        me = anyone.get("/api/v1/session").json()
        assert (me["name"], me["role"], me["via"]) == ("local", "admin", "none")
        # changes still need the CSRF header (a page of another site cannot send it)
        assert anyone.post("/api/v1/studies/1.1/read").status == 403
        r = anyone.post("/api/v1/studies/1.1/read", headers={"X-CSRF-Token": me["csrf_token"]})
        assert r.status == 200 and r.json()["read_by"] == "local"
        # a DNS-rebinding page (another Host name) is refused
        r = anyone.get("/api/v1/studies", headers={"Host": "evil.example:8080"})
        assert r.status == 403
    finally:
        server.stop()


def test_serve_refuses_auth_none_on_a_public_address(env):
    res = run_cli({**env, "CXR_WORKER__HTTP__AUTH": "none", "CXR_WORKER__HTTP__HOST": "0.0.0.0"},
                  "serve", rc=2)
    assert "http.auth" in res.stderr and "loopback" in res.stderr
    assert "cxr-worker ready" not in res.stdout


# -- admin actions ------------------------------------------------------------------------------
def _deliver(engine: Engine, sop: str, kind: str, status: str, **values: Any) -> None:
    """A delivery of image ``sop`` in ``status``, written as the application does (with the
    image's delivery and status refreshed in the same transaction)."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from cxr_worker.worklist.deliveries import refresh_instance
    from cxr_worker.worklist.models import Delivery

    with Session(engine) as s, s.begin():
        row_id = s.scalar(select(Instance.id).where(Instance.sop_instance_uid == sop))
        s.add(Delivery(instance_id=row_id, kind=kind, status=status, result_uid=f"9.{kind}",
                       path="/r.dcm", attempts=values.pop("attempts", 0), **values))
        s.flush()
        refresh_instance(s, row_id)


def test_retry_dead_letters(api):
    engine = api.engine
    process = _add(engine, "4.2", status=Status.FAILED, attempts=10,
                   reason="processing failed 10 times: boom")
    send = _add(engine, "4.2", **scored(0.9, status=Status.SCORED))
    _deliver(engine, send, "sc", "failed", attempts=10, last_error="refused")
    _deliver(engine, send, "hl7", "sent")
    fine = _add(engine, "4.3", **scored(0.2))
    listed = api.admin.get("/api/v1/admin/dead-letters?limit=1").json()
    assert [i["sop_instance_uid"] for i in listed["instances"]] == [process]
    more = api.admin.get(f"/api/v1/admin/dead-letters?limit=1&cursor={listed['next']}").json()
    assert [i["sop_instance_uid"] for i in more["instances"]] == [send]
    [dead] = more["instances"]
    assert more["next"] is None and dead["delivery"] == "undelivered"
    # the result is kept: score, label; the delivery that failed says why
    assert (dead["status"], dead["label"], dead["probability"]) == (
        "undelivered", Label.SUSPECTED, 0.9)
    assert dead["reason"] == "sending failed 10 times (sc): refused"
    assert [(d["kind"], d["status"], d["attempts"], d["last_error"])
            for d in dead["deliveries"]] == [("sc", "failed", 10, "refused"),
                                              ("hl7", "sent", 0, None)]
    [study] = [r for r in api.reader.get("/api/v1/studies").json()["studies"]
               if r["study_instance_uid"] == "4.2"]
    assert study["status"] == "failed"  # an image's processing failed too
    assert study["deliveries"] == [
        {"kind": "sc", "status": "failed", "attempts": 10, "last_error": "refused"},
        {"kind": "hl7", "status": "sent", "attempts": 0, "last_error": None}]
    summary = api.admin.get("/api/v1/admin/summary").json()
    assert summary["dead_letters"] == 2 and summary["undelivered"] == 1
    assert summary["deliveries"]["sc"] == {"failed": 1}

    r = api.admin.post(f"/api/v1/instances/{process}/retry")
    assert r.status == 202 and r.json()["retry"] == "process"
    r = api.admin.post(f"/api/v1/instances/{send}/retry")
    assert r.status == 202 and r.json()["retry"] == "send"
    assert api.admin.post(f"/api/v1/instances/{fine}/retry").status == 409
    assert api.admin.post("/api/v1/instances/9.9/retry").status == 404
    rows = {i.sop_instance_uid: i for i in control.instances_of(engine, "4.2")}
    assert (rows[process].status, rows[process].attempts) == (Status.RECEIVED, 0)
    assert (rows[send].status, rows[send].delivery, rows[send].reason) == (
        Status.SCORED, "waiting", None)
    assert rows[send].result_path == "/r.dcm"  # sent again, not rebuilt
    job = deliveries.claim(engine, "w", 60, ["sc", "hl7"])
    assert job is not None and (job.kind, job.attempts) == ("sc", 0)
    summary = api.admin.get("/api/v1/admin/summary").json()
    assert summary["dead_letters"] == 0 and summary["images"]["received"] == 1
    assert summary["queue_depth"]["process"] == 1


def test_replay_study_requeues_its_images(api):
    engine = api.engine
    a = _add(engine, "4.4", **scored(0.9))
    b = _add(engine, "4.4", **scored(0.1))
    r = api.admin.post("/api/v1/studies/4.4/replay")
    assert r.status == 202 and r.json()["requeued"] == 2
    assert {i.status for i in control.instances_of(engine, "4.4")} == {Status.RECEIVED}
    assert {queue.claim(engine, "process", "w", 60).sop_instance_uid for _ in range(2)} == {a, b}
    assert api.admin.post("/api/v1/studies/7.7.7/replay").status == 404


def test_sending_pause_is_persisted(api):
    assert api.admin.post("/api/v1/sending/pause").json()["sending_paused"] is True
    assert control.sending_paused(api.engine) is True
    state = api.admin.get("/api/v1/admin/summary").json()["sending"]
    assert state["sending_paused"] is True and state["updated_by"] == "dr-admin"
    # another process (a restarted worker) reads the same switch
    other = queue.make_engine(api.engine.url.render_as_string(hide_password=False))
    assert control.sending_paused(other) is True
    other.dispose()
    assert api.admin.post("/api/v1/sending/resume").json()["sending_paused"] is False
    assert control.sending_paused(api.engine) is False


# -- live updates -------------------------------------------------------------------------------
def test_etag_and_version_follow_changes(api):
    engine = api.engine
    _add(engine, "2.2", **scored(0.4))
    first = api.reader.get("/api/v1/studies")
    etag = first.headers["etag"]
    again = api.reader.get("/api/v1/studies", headers={"If-None-Match": etag})
    assert again.status == 304 and again.body == b""
    # another query, another tag
    assert api.reader.get("/api/v1/studies?limit=3").headers["etag"] != etag
    # a lease taken (a claim) shows nothing new: same version
    _add(engine, "2.3")
    v_before = api.reader.get("/api/v1/studies").json()["version"]
    assert queue.claim(engine, "process", "w", 60) is not None
    assert api.reader.get("/api/v1/studies").json()["version"] == v_before
    # a result: a new version, a new tag, the new row
    with engine.begin() as c:
        c.execute(update(Instance).where(Instance.study_instance_uid == "2.3")
                  .values(**scored(0.95)))
    changed = api.reader.get("/api/v1/studies", headers={"If-None-Match": etag})
    assert changed.status == 200 and changed.json()["version"] > v_before
    assert _uids(changed) == ["2.3", "2.2"]
    # a read mark is a change too
    v = changed.json()["version"]
    api.reader.post("/api/v1/studies/2.3/read")
    assert api.reader.get("/api/v1/studies").json()["version"] > v


def _sse_events(base: str, token: str, until: int, timeout: float) -> list[int]:
    """Versions of the 'changed' events read from /api/v1/events until one >= ``until``."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    conn.request("GET", "/api/v1/events", headers={"Authorization": f"Bearer {token}"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
    seen: list[int] = []
    block: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            line = resp.fp.readline().decode()
            if line in ("\n", ""):
                fields = dict(x.split(": ", 1) for x in block if ": " in x and x[0] != ":")
                if fields.get("event") == "changed":
                    version = json.loads(fields["data"])["version"]
                    assert int(fields["id"]) == version
                    seen.append(version)
                    if version >= until:
                        return seen
                block = []
                if line == "":
                    break
            else:
                block.append(line.rstrip("\n"))
    finally:
        conn.close()
    return seen


def test_server_sent_events_announce_a_change(api):
    engine = api.engine
    _add(engine, "2.4")
    start = api.reader.get("/api/v1/studies").json()["version"]
    got: list[int] = []
    reader = threading.Thread(target=lambda: got.extend(
        _sse_events(api.base, api.reader.token, start + 1, 15)))
    reader.start()
    time.sleep(1.5)
    _add(engine, "2.5")  # a C-STORE's row
    reader.join(20)
    assert got and got[0] == start and got[-1] > start, got


# -- pictures -----------------------------------------------------------------------------------
def _png(reply: Reply) -> Image.Image:
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(reply.body))


def test_thumbnail_and_heatmap(api, tmp_path):
    from pydicom import dcmread

    spool = tmp_path / "image.dcm"
    shutil.copy(SAMPLE, spool)
    result = tmp_path / "result.dcm"
    sop = _add(api.engine, "1.7", **scored(0.9, result_path=str(result)))
    with api.engine.begin() as c:
        c.execute(update(Instance).where(Instance.sop_instance_uid == sop)
                  .values(spool_path=str(spool)))
    rows, cols = dcmread(SAMPLE, stop_before_pixels=True)[0x00280010].value, \
        dcmread(SAMPLE, stop_before_pixels=True)[0x00280011].value
    thumb = _png(api.reader.get(f"/api/v1/instances/{sop}/thumbnail.png"))
    assert max(thumb.size) == 256 and thumb.mode == "L"
    assert thumb.size[0] / thumb.size[1] == pytest.approx(cols / rows, rel=0.02)
    assert max(_png(api.reader.get(f"/api/v1/instances/{sop}/thumbnail.png?size=100")).size) \
        == 100
    assert api.reader.get(f"/api/v1/instances/{sop}/thumbnail.png?size=5000").status == 400
    # no heatmap kept (yet): 404, and the study page says so
    r = api.reader.get(f"/api/v1/instances/{sop}/heatmap.png")
    assert r.status == 404 and "heatmap" in r.json()["error"]
    assert api.reader.get("/api/v1/studies/1.7").json()["instances"][0][
        "heatmap_available"] is False
    # the pipeline's heatmap beside the result: the radiograph under it
    heat = Image.new("L", (224, 224), 0)
    heat.paste(255, (0, 0, 112, 224))  # the left half hot
    heat.save(tmp_path / "result.heatmap.png")
    over = _png(api.reader.get(f"/api/v1/instances/{sop}/heatmap.png")).convert("RGB")
    assert over.size == thumb.size
    w, h = over.size
    left, right = over.getpixel((w // 4, h // 2)), over.getpixel((3 * w // 4, h // 2))
    assert left[0] > left[2] + 40  # red where hot
    assert abs(right[0] - right[2]) < 10  # grey where cold
    assert api.reader.get("/api/v1/studies/1.7").json()["instances"][0]["heatmap_available"]
    # gone after retention: 404, not 500
    spool.unlink()
    assert api.reader.get(f"/api/v1/instances/{sop}/thumbnail.png").status == 404
    assert api.reader.get("/api/v1/instances/9.9.9/thumbnail.png").status == 404


# -- the description, the service ------------------------------------------------------------
def test_openapi_describes_every_route_and_only_those(api):
    from starlette.routing import Route

    spec = api.anonymous().get("/api/v1/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    described = {(method.upper(), path) for path, ops in spec["paths"].items()
                 for method in ops}
    served = {(m, r.path) for r in api.server.app.router.routes
              if isinstance(r, Route) and r.path.startswith("/api/v1/")
              for m in (r.methods or set()) if m != "HEAD"}
    assert described == served
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if op.get("security") != []:
                assert "401" in op["responses"], (method, path)
            if method in ("post", "delete") and op.get("security") != []:
                assert any(p["name"] == "X-CSRF-Token" for p in op["parameters"]), path


def test_health_needs_no_token(api):
    body = api.anonymous().get("/api/v1/health").json()
    assert body["ready"] is True and body["auth"] == "token" and body["mode"] == "serve"
    assert list(body["checks"]) == ["database"]


def test_api_answers_503_while_starting():
    from cxr_worker.settings import Settings

    server = HttpServer("127.0.0.1", 0)
    readiness = health.Readiness()  # serve: the database not open yet
    add_web_routes(server, Settings(), readiness)
    server.start()
    try:
        c = Client(f"http://127.0.0.1:{server.address[1]}", "cxr_x")
        r = c.get("/api/v1/studies")
        assert r.status == 503 and r.headers["retry-after"] == "2"
        assert c.get("/api/v1/health").status == 503
    finally:
        server.stop()


# -- the summary the list reads ---------------------------------------------------------------
def _oracle(rows: list[Instance]) -> tuple[str, str, str, float | None]:
    """The study's status, label and population as the first release computed them (in
    Python; a result's delivery from its own column since revision 0006), to check the SQL
    against."""
    scored_ = [r for r in rows if r.status in (Status.SCORED, Status.SENT, Status.HELD)]
    if scored_:
        failed = any(r.status == Status.FAILED for r in rows)
        if failed:
            status = "failed"
        elif any(r.delivery == "undelivered" for r in scored_):
            status = "undelivered"
        elif any(r.delivery == "retrying" for r in scored_):
            status = "retrying"
        elif all(r.status == Status.SENT for r in scored_):
            status = "sent"
        elif any(r.status == Status.HELD for r in scored_):
            status = "held"
        else:
            status = "scored"
        label = Label.SUSPECTED if any(r.label == Label.SUSPECTED for r in scored_) \
            else Label.NEGATIVE
        return (status, label, Population.worst([r.population for r in scored_]),
                max(r.probability or 0.0 for r in scored_))
    if any(r.status == Status.RECEIVED for r in rows):
        return "pending", "PENDING", Population.worst([r.population for r in rows]), None
    if any(r.status == Status.FAILED for r in rows):
        return "failed", "FAILED", Population.worst([r.population for r in rows]), None
    return "not_scored", "NOT SCORED", Population.worst([r.population for r in rows]), None


def test_summary_follows_every_change_like_the_first_release(engine):
    rnd = random.Random(3)
    pops = list(Population)
    for i in range(40):
        for _ in range(rnd.randint(1, 4)):
            st = rnd.choice([Status.RECEIVED, Status.SCORED, Status.SENT, Status.HELD,
                             Status.NOT_SCORED, Status.FAILED])
            values: dict[str, Any] = {"status": st, "population": rnd.choice(pops)}
            if st == Status.FAILED:
                values["reason"] = "processing failed 10 times: boom"
            # a result; sometimes an old one on another row
            if st in (Status.SCORED, Status.SENT, Status.HELD) or rnd.random() < 0.2:
                values.update(scored(rnd.random(), rnd.choice(pops), st))
            if st == Status.SCORED:
                values["delivery"] = rnd.choice(["waiting", "waiting", "retrying",
                                                 "undelivered"])
            _add(engine, f"3.{i}", **values)
    # then changes: updates, deletes, a study moved
    with engine.begin() as c:
        c.execute(text("UPDATE instances SET status = 'sent' WHERE id % 5 = 0 AND "
                       "probability IS NOT NULL"))
        c.execute(text("DELETE FROM instances WHERE id % 7 = 0"))
        c.execute(text("UPDATE instances SET study_instance_uid = '3.moved' WHERE id % 11 = 0"))
    with engine.connect() as c:
        everything = [Instance(**dict(m)) for m in c.execute(
            text("SELECT * FROM instances")).mappings()]
    by_study: dict[str, list[Instance]] = {}
    for r in everything:
        by_study.setdefault(r.study_instance_uid, []).append(r)
    listed = {r.study_instance_uid: r for r in studies.triage_list(engine, limit=None)}
    assert set(listed) == set(by_study)
    for uid, rows_ in by_study.items():
        status, label, population, probability = _oracle(rows_)
        got = listed[uid]
        assert (got.status, got.label, got.population) == (status, label, population), uid
        assert got.images == len(rows_)
        if probability is None:
            assert got.probability is None
        else:
            assert got.probability == pytest.approx(probability)


def test_a_claim_does_not_move_the_version(engine):
    from cxr_worker.web.events import read_version

    v0 = read_version(engine)
    _add(engine, "1.9")
    v1 = read_version(engine)
    assert v1 > v0
    job = queue.claim(engine, "process", "w", 60)
    assert job is not None and read_version(engine) == v1
    queue.mark_not_scored(engine, job, "w", "out of scope (modality): MR")
    assert read_version(engine) > v1


# -- the command line ---------------------------------------------------------------------------
def test_token_commands(env):
    for args in (["web"], ["token"], ["token", "create"], ["token", "list"], ["token", "revoke"]):
        assert "usage: cxr-worker" in run_cli(env, *args, "--help").stdout
    run_cli(env, "db", "upgrade")
    res = run_cli(env, "token", "create", "--name", "dr-a", "--role", "reader")
    token = res.stdout
    assert token.endswith("\n") and token.count("\n") == 1 and token.startswith("cxr_")
    token = token.strip()
    assert len(token) >= 40 and res.stderr == ""
    assert "taken" in run_cli(env, "token", "create", "--name", "dr-a", "--role", "admin",
                              rc=2).stderr
    run_cli(env, "token", "create", "--name", "bad name", "--role", "admin", rc=2)
    run_cli(env, "token", "create", "--name", "x", "--role", "root", rc=2)
    listed = run_cli(env, "token", "list").stdout
    assert "dr-a" in listed and "reader" in listed and token not in listed
    [row] = [json.loads(x) for x in run_cli(env, "token", "list", "--json").stdout.splitlines()]
    assert row["name"] == "dr-a" and row["revoked_at"] is None and row["last_used_at"] is None
    db = Path(env["CXR_WORKER__STORAGE__DATA_DIR"]) / "worklist.db"
    assert token.encode() not in db.read_bytes()  # only its hash is kept
    assert "revoked" in run_cli(env, "token", "revoke", "dr-a").stdout
    [row] = [json.loads(x) for x in run_cli(env, "token", "list", "--json").stdout.splitlines()]
    assert row["revoked_at"] is not None
    assert "no token named" in run_cli(env, "token", "revoke", "dr-b", rc=2).stderr


def test_commands_refuse_to_create_an_empty_worklist(env, tmp_path):
    cfg = tmp_path / "site.toml"
    cfg.write_text(f'[storage]\ndata_dir = "{tmp_path / "elsewhere"}"\n')
    site = {k: v for k, v in env.items() if k != "CXR_WORKER__STORAGE__DATA_DIR"}
    for args in (["worklist"], ["worklist", "--json"], ["token", "list"], ["web"]):
        res = run_cli(site, "--config", str(cfg), *args, rc=2)
        assert str(tmp_path / "elsewhere" / "worklist.db") in res.stderr, res.stderr
        assert str(cfg) in res.stderr
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "elsewhere").exists()
    res = run_cli(env, "worklist", rc=2)
    assert "no settings file read" in res.stderr


def test_worklist_says_when_there_are_more_rows(env):
    run_cli(env, "db", "upgrade")
    data = Path(env["CXR_WORKER__STORAGE__DATA_DIR"])
    engine = queue.make_engine(f"sqlite:///{data / 'worklist.db'}")
    for i in range(5):
        _add(engine, f"1.{i}", received_at=_at(i), **scored(0.1))
    engine.dispose()
    out = run_cli(env, "worklist", "--limit", "2").stdout.splitlines()
    assert len(out) == 4 and out[-1].startswith("more rows: use --cursor ")
    cursor = out[-1].split()[4]
    nxt = run_cli(env, "worklist", "--limit", "2", "--cursor", cursor, "--json")
    assert [json.loads(x)["study_instance_uid"] for x in nxt.stdout.splitlines()] == ["1.2", "1.3"]
    assert "more rows: use --cursor" in nxt.stderr  # stdout stays one study per line
    last = run_cli(env, "worklist", "--limit", "2", "--cursor",
                   nxt.stderr.split()[4], "--json")
    assert [json.loads(x)["study_instance_uid"] for x in last.stdout.splitlines()] == ["1.4"]
    assert "more rows" not in last.stderr
    assert len(run_cli(env, "worklist", "--limit", "0", "--json").stdout.splitlines()) == 5
    assert "more rows" not in run_cli(env, "worklist", "--limit", "5").stdout
    assert "--cursor" in run_cli(env, "worklist", "--cursor", "nonsense", rc=2).stderr


# -- a real worker --------------------------------------------------------------------------
def _wait_http(port: int) -> None:
    def up() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(up, 30, f"HTTP on {port}")


@pytest.mark.slow
def test_running_worker_lists_a_stored_study(make_worker):
    from pydicom import dcmread

    http_port = free_port()
    worker = make_worker(CXR_WORKER__HTTP__PORT=str(http_port))
    token = worker.cli("token", "create", "--name", "radiologist", "--role", "reader"
                       ).stdout.strip()
    base = f"http://127.0.0.1:{http_port}"
    reader = Client(base, token)
    assert reader.get("/api/v1/studies").json()["studies"] == []
    assert Client(base).get("/api/v1/studies").status == 401

    storescu(worker.port, SAMPLE)
    ds = dcmread(SAMPLE, stop_before_pixels=True)
    study = wait_until(lambda: [s for s in reader.get("/api/v1/studies").json()["studies"]
                                if s["status"] != "pending"], 60, "the image scored")[0]
    assert study["study_instance_uid"] == ds.StudyInstanceUID
    assert study["accession_number"] == ds.AccessionNumber
    assert study["label"] in (Label.SUSPECTED, Label.NEGATIVE)
    assert study["band"] in ("suspected", "routine")
    assert study["key_sop_instance_uid"] == ds.SOPInstanceUID
    # the modality's Study Date + Time, as written (no zone)
    assert study["study_datetime"] == (f"{ds.StudyDate[:4]}-{ds.StudyDate[4:6]}-"
                                       f"{ds.StudyDate[6:]}T{ds.StudyTime[:2]}:"
                                       f"{ds.StudyTime[2:4]}:{ds.StudyTime[4:6]}")
    thumb = _png(reader.get(study["urls"]["thumbnail"]))
    assert max(thumb.size) == 256
    detail = reader.get(study["urls"]["self"]).json()
    assert [i["sop_instance_uid"] for i in detail["instances"]] == [ds.SOPInstanceUID]
    assert detail["instances"][0]["model_version"] == study["model_version"]
    # the CLI reads the same list
    [row] = worker.worklist()
    assert {k: row[k] for k in ("study_instance_uid", "status", "label", "band")} == {
        k: study[k] for k in ("study_instance_uid", "status", "label", "band")}
    # a page listening for events does not hold the shutdown
    listening = threading.Thread(target=_sse_events, args=(base, token, 10**9, 60),
                                 daemon=True)
    listening.start()
    time.sleep(1)
    t0 = time.monotonic()
    assert worker.stop() == 0
    assert time.monotonic() - t0 < 10
    listening.join(10)
    assert not listening.is_alive()  # the stream ended with the server
    # no token, patient name or ID in the log
    log = worker.text()
    assert token not in log and str(ds.PatientName) not in log and ds.PatientID not in log


@pytest.mark.slow
def test_web_command_serves_the_same_list_alone(make_worker):
    worker = make_worker(start=False)
    worker.cli("db", "upgrade")
    token = worker.cli("token", "create", "--name", "ops", "--role", "admin").stdout.strip()
    http_port = free_port()
    env = {**worker.env, "CXR_WORKER__HTTP__PORT": str(http_port)}
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "cxr_worker.cli", "web"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_http(http_port)
        c = Client(f"http://127.0.0.1:{http_port}", token)
        health_ = c.get("/api/v1/health").json()
        assert health_["mode"] == "web" and health_["ready"] and list(health_["checks"]) == [
            "database"]
        assert c.get("/api/v1/studies").json()["studies"] == []
        assert c.get("/healthz").status == 200 and c.get("/metrics").status == 200
        assert c.get("/api/v1/admin/summary").json()["pacs"]["last_echo"] is None
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert token not in out


def test_summary_stays_right_under_concurrent_writers(engine):
    """Workers finishing images of one study at the same moment: each transaction recomputes
    the study's summary at commit, the second from the first's committed rows."""
    sops = [_add(engine, "3.race") for _ in range(8)]
    errors: list[BaseException] = []

    def worker(mine: list[str], seed: int) -> None:
        rnd = random.Random(seed)
        try:
            for _ in range(25):
                with engine.begin() as c:
                    for sop in mine:
                        p = rnd.random()
                        c.execute(update(Instance).where(Instance.sop_instance_uid == sop)
                                  .values(**scored(p, status=rnd.choice(
                                      [Status.SENT, Status.SCORED]))))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(sops[i::4], i)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    rows = control.instances_of(engine, "3.race")
    status, label, population, probability = _oracle(rows)
    [got] = studies.triage_list(engine, limit=None)
    assert (got.status, got.label, got.population) == (status, label, population)
    assert got.probability == pytest.approx(probability)
