"""Health and metrics over HTTP: the server module, readiness, the worklist gauges, and a real
``cxr-worker serve`` answering /healthz, /readyz and /metrics after a dcmtk C-STORE."""

from __future__ import annotations

import datetime as dt
import json
import math
import socket
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import SAMPLES, Orthanc, free_port, storescu, wait_until
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread
from sqlalchemy import Engine, update

from cxr_worker import health, send
from cxr_worker.errors import ConfigError, StartupError
from cxr_worker.http import HttpServer, Response
from cxr_worker.metrics import Metrics
from cxr_worker.service import start_http
from cxr_worker.settings import load_settings
from cxr_worker.worklist import queue
from cxr_worker.worklist.models import Instance, Label, Status, utcnow

SAMPLE = SAMPLES / "cr_pa_normal_12bit.dcm"


def get(url: str) -> tuple[int, bytes]:
    return get_request(urllib.request.Request(url))


def samples(families: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for fam in families:
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def value(found: dict[str, list[Any]], name: str, **labels: str) -> float:
    matches = [s.value for s in found.get(name, [])
               if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matches) == 1, f"{name}{labels}: {matches}"
    return float(matches[0])


# -- the server module --------------------------------------------------------------------
def test_routes_404_405_500_and_head():
    server = HttpServer("127.0.0.1", 0)

    def boom(_req: Any) -> Response:
        raise RuntimeError("secret detail")

    server.route("/hello", lambda req: Response.text(200, f"hi {req.query.get('n', ['?'])[0]}"))
    server.route("/boom", boom)
    server.start()
    try:
        base = f"http://127.0.0.1:{server.address[1]}"
        assert get(base + "/hello?n=1") == (200, b"hi 1")
        assert get(base + "/nope")[0] == 404
        status, body = get(base + "/boom")
        assert status == 500 and b"secret" not in body
        req = urllib.request.Request(base + "/hello", data=b"x", method="POST")
        assert get_request(req)[0] == 405
        req = urllib.request.Request(base + "/hello", method="HEAD")
        assert get_request(req) == (200, b"")
    finally:
        server.stop()


def get_request(req: urllib.request.Request) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def test_port_in_use_is_a_start_up_error_naming_http_port(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        s = load_settings(environ={"CXR_WORKER__HTTP__PORT": str(port)})
        with pytest.raises(StartupError, match=rf"^http\.port {port} on 127\.0\.0\.1 is in use"):
            start_http(s, health.Readiness(), Metrics())


def test_http_settings():
    s = load_settings(environ={})
    assert (s.http.enabled, s.http.host, s.http.port) == (True, "127.0.0.1", 8080)
    s = load_settings(environ={"CXR_WORKER__HTTP__ENABLED": "false",
                               "CXR_WORKER__HTTP__PORT": "9100"})
    assert (s.http.enabled, s.http.port) == (False, 9100)
    assert start_http(s, health.Readiness(), Metrics()) is None
    for env, key in (({"CXR_WORKER__HTTP__PORT": "70000"}, "http.port"),
                     ({"CXR_WORKER__HTTP__PORT": "x"}, "http.port"),
                     ({"CXR_WORKER__HTTP__ENABLED": "maybe"}, "http.enabled"),
                     ({"CXR_WORKER__HTTP__HOST": ""}, "http.host"),
                     ({"CXR_WORKER__HTTP__TOKEN": "t"}, "http.token")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_settings(environ=env)


def test_deploy_example_documents_http():
    path = Path(__file__).resolve().parent.parent / "deploy" / "cxr-worker.toml"
    assert "\n[http]\n" in path.read_text()
    s = load_settings(path, environ={})
    assert (s.http.enabled, s.http.host, s.http.port) == (True, "127.0.0.1", 8080)


# -- readiness ------------------------------------------------------------------------------
def test_readiness_names_each_failed_check(tmp_path):
    engine = queue.make_engine(f"sqlite:///{tmp_path / 'w.db'}")
    spool = tmp_path / "spool"
    spool.mkdir()
    ready = health.Readiness(scorer=SimpleNamespace(ready=True, model_version="m1"),
                             engine=engine, spool_dir=spool)
    ok, body = ready.check()
    assert ok and body["failed"] == [] and body["checks"]["model"]["model_version"] == "m1"
    assert "pacs_echo" not in body  # no PACS configured
    assert list(spool.iterdir()) == []  # the probe file leaves nothing behind

    spool.rmdir()
    spool.write_bytes(b"not a folder")  # what root cannot write through either
    ready.scorer = SimpleNamespace(ready=False, model_version="m1")
    ready.engine = queue.make_engine(f"sqlite:///{tmp_path / 'missing' / 'w.db'}")
    ok, body = ready.check()
    assert not ok and body["failed"] == ["model", "database", "spool"]
    assert "NotADirectoryError" in body["checks"]["spool"]["error"]
    json.dumps(body)
    engine.dispose()
    ready.engine.dispose()


# pynetdicom leaves the socket of a refused connection to the garbage collector
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_pacs_echo_is_reported_never_unready(tmp_path):
    echo = health.PacsEcho(send.Peer("PACS", "127.0.0.1", free_port(), "CXR_WORKER", 2.0))
    spool = tmp_path / "spool"
    spool.mkdir()
    ready = health.Readiness(SimpleNamespace(ready=True, model_version="m1"),
                             queue.make_engine(f"sqlite:///{tmp_path / 'w.db'}"), spool, echo)
    ok, body = ready.check()
    assert ok and body["pacs_echo"]["ok"] is None  # not run yet
    assert not echo.run().ok
    ok, body = ready.check()
    assert ok and body["pacs_echo"]["ok"] is False and body["pacs_echo"]["at"]
    assert "association" in body["pacs_echo"]["error"]
    ready.engine.dispose()


# -- the worklist gauges, SQLite and PostgreSQL ----------------------------------------------
@pytest.fixture
def engine(migrated_engine: Engine) -> Engine:
    return migrated_engine


def _row(engine: Engine, **values: Any) -> str:
    sop = f"1.2.3.{uuid.uuid4().int % 10**20}"
    row_id, _ = queue.enqueue(engine, sop_instance_uid=sop, sop_class_uid="1.2.840.1",
                              study_instance_uid="1.2.4.5", series_instance_uid="1.2.5",
                              accession_number="ACC77", spool_path="/x")
    if values:
        with engine.begin() as c:
            c.execute(update(Instance).where(Instance.id == row_id).values(**values))
    return sop


def test_worklist_gauges_bucket_reasons_and_count_the_queue(engine):
    now = utcnow()
    later = now + dt.timedelta(hours=1)
    uids = [
        _row(engine),  # due to process
        _row(engine, reason="retrying (1/10): boom", attempts=1, next_attempt_at=later),
        _row(engine, status=Status.NOT_SCORED,
             reason="out of scope (view_position): View Position LL (lateral) 1.2.3.4"),
        _row(engine, status=Status.NOT_SCORED,
             reason="out of scope (patient_age): age 81 years"),
        _row(engine, status=Status.NOT_SCORED,
             reason="unreadable file (file kept in quarantine as 1.2.3.9.dcm)"),
        _row(engine, status=Status.NOT_SCORED, reason="something new"),
        _row(engine, status=Status.FAILED, reason="processing failed 10 times: boom"),
        _row(engine, status=Status.SCORED, probability=0.9, label=Label.SUSPECTED,
             scored_at=now),  # due to send (sc), and an ORU to retry later
        _row(engine, status=Status.SCORED, probability=0.8, label=Label.SUSPECTED,
             scored_at=now - dt.timedelta(days=3), reason="sending failed 10 times (sc): x"),
        _row(engine, status=Status.SENT, probability=0.1, label=Label.NEGATIVE, scored_at=now),
        _row(engine, status=Status.SENT, probability=0.2, label=Label.NEGATIVE, scored_at=now),
        _row(engine, status=Status.SENT, probability=0.9, label=Label.SUSPECTED,
             scored_at=now - dt.timedelta(days=3)),  # not recent
    ]
    _deliver(engine, uids[7], "sc", "pending", now)
    _deliver(engine, uids[7], "hl7", "retrying", later, last_error="HL7 answered AE")
    _deliver(engine, uids[8], "sc", "failed", now, last_error="refused")
    m = Metrics()
    m.watch_worklist(engine, pacs_configured=True)
    exposition = m.exposition().decode()
    found = samples(text_string_to_metric_families(exposition))
    images = {(s.labels["status"], s.labels["reason"]): s.value
              for s in found["cxr_worker_images"]}
    assert images == {
        ("received", ""): 1, ("received", "retrying"): 1, ("held", ""): 0,
        ("not_scored", "view_position"): 1, ("not_scored", "patient_age"): 1,
        ("not_scored", "quarantined"): 1, ("not_scored", "other"): 1,
        ("failed", "process"): 1, ("scored", ""): 2, ("sent", ""): 3}
    assert {(s.labels["kind"], s.labels["status"]): s.value
            for s in found["cxr_worker_deliveries"]} == {
        ("sc", "pending"): 1, ("hl7", "retrying"): 1, ("sc", "failed"): 1}
    assert value(found, "cxr_worker_queue_depth", queue="process") == 1
    assert value(found, "cxr_worker_queue_depth", queue="send") == 1  # the ORU is not due
    assert value(found, "cxr_worker_positive_rate") == pytest.approx(1 / 3)
    assert value(found, "cxr_worker_recent_scored_images") == 3
    assert value(found, "cxr_worker_worklist_query_ok") == 1
    for uid in [*uids, "1.2.4.5", "ACC77", "lateral", "boom", "refused"]:
        assert uid not in exposition



def _deliver(engine: Engine, sop: str, kind: str, status: str, due: dt.datetime,
             **values: Any) -> None:
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from cxr_worker.worklist.deliveries import refresh_instance
    from cxr_worker.worklist.models import Delivery

    with Session(engine) as s, s.begin():
        row_id = s.scalar(select(Instance.id).where(Instance.sop_instance_uid == sop))
        s.add(Delivery(instance_id=row_id, kind=kind, status=status, result_uid="9.9",
                       attempts=1, next_attempt_at=due, **values))
        s.flush()
        refresh_instance(s, row_id)


def test_empty_worklist_positive_rate_is_nan(engine):
    m = Metrics()
    m.watch_worklist(engine, pacs_configured=False)
    found = samples(text_string_to_metric_families(m.exposition().decode()))
    assert math.isnan(value(found, "cxr_worker_positive_rate"))


# -- a real worker ------------------------------------------------------------------------
@pytest.mark.slow
def test_running_worker_health_readiness_and_metrics(make_worker, tmp_path):
    pacs = Orthanc(tmp_path / "pacs")  # configured, never started: the PACS is down
    http_port = free_port()
    worker = make_worker(pacs=pacs, CXR_WORKER__HTTP__PORT=str(http_port))
    base = f"http://127.0.0.1:{http_port}"
    assert get(base + "/healthz") == (200, b"ok\n")

    storescu(worker.port, SAMPLE)
    wait_until(lambda: [r["status"] for r in worker.worklist()] == ["retrying"], 60,
               "the image scored, its result waiting for the PACS")

    status, body = get(base + "/readyz")
    ready = json.loads(body)
    assert status == 200 and ready["ready"] is True and ready["failed"] == []
    assert {k: v["ok"] for k, v in ready["checks"].items()} == {
        "model": True, "database": True, "spool": True}
    # the PACS is down: the C-ECHO job's result is reported, the worker stays ready
    wait_until(lambda: json.loads(get(base + "/readyz")[1])["pacs_echo"]["at"], 30,
               "the first C-ECHO")
    echo = json.loads(get(base + "/readyz")[1])["pacs_echo"]
    assert echo["ae_title"] == pacs.aet and echo["ok"] is False

    status, body = get(base + "/metrics")
    assert status == 200
    exposition = body.decode()
    found = samples(text_string_to_metric_families(exposition))
    # the image is scored; its Secondary Capture's delivery is retried on its own
    assert value(found, "cxr_worker_images", status="scored", reason="") == 1
    assert value(found, "cxr_worker_deliveries", kind="sc", status="retrying") == 1
    assert value(found, "cxr_worker_time_to_flag_seconds_count") == 1
    assert 0 < value(found, "cxr_worker_time_to_flag_seconds_sum") < 60
    for stage in ("decode", "score", "report"):
        assert value(found, "cxr_worker_stage_seconds_count", stage=stage) >= 1
    assert value(found, "cxr_worker_stage_seconds_count", stage="send") >= 1
    assert value(found, "cxr_worker_delivery_failures_total", destination=pacs.aet) >= 1
    assert value(found, "cxr_worker_deliveries_total", destination=pacs.aet) == 0
    assert value(found, "cxr_worker_recent_scored_images") == 1
    assert value(found, "cxr_worker_pacs_echo_ok", destination=pacs.aet) == 0
    [info] = found["cxr_worker_model_info"]
    rows = worker.worklist()
    assert info.labels["model_version"] == rows[0]["model_version"]
    assert float(info.labels["threshold"]) > 0
    ds = dcmread(SAMPLE, stop_before_pixels=True)
    for secret in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.AccessionNumber,
                   str(ds.PatientName), ds.PatientID):
        assert str(secret) not in exposition

    # the spool folder cannot take files (replaced by a file: root cannot write through it)
    spool = worker.data_dir / "spool"
    spool.rename(worker.data_dir / "spool.moved")
    spool.write_bytes(b"")
    status, body = get(base + "/readyz")
    assert status == 503
    assert json.loads(body)["failed"] == ["spool"]
    assert get(base + "/healthz")[0] == 200  # alive, not ready
    spool.unlink()
    (worker.data_dir / "spool.moved").rename(spool)
    assert get(base + "/readyz")[0] == 200
    assert worker.stop() == 0


@pytest.mark.slow
def test_http_disabled_serves_nothing(make_worker):
    http_port = free_port()
    make_worker(CXR_WORKER__HTTP__ENABLED="false", CXR_WORKER__HTTP__PORT=str(http_port))
    with pytest.raises(urllib.error.URLError):
        get(f"http://127.0.0.1:{http_port}/healthz")


@pytest.mark.slow
def test_serve_with_http_port_in_use_exits_2_naming_it(make_worker):
    worker = make_worker(start=False)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        worker.env["CXR_WORKER__HTTP__PORT"] = str(busy.getsockname()[1])
        res = worker.cli("serve", check=False)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if "http.port" in line]
    assert len(lines) == 1 and "in use" in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert "cxr-worker ready" not in res.stdout
