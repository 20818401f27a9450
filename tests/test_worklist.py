"""The worklist as queue and as triage list, on SQLite and on the PostgreSQL at 127.0.0.1:5432."""

from __future__ import annotations

import datetime as dt
import json
import threading
import uuid
from pathlib import Path

import pytest
from sqlalchemy import Engine, inspect, text
from sqlalchemy.exc import IntegrityError

from cxr_worker.errors import UIDConflictError
from cxr_worker.worklist import deliveries, queue, schema, studies
from cxr_worker.worklist.models import Label, Population, Status

SLOW_RETRY = queue.RetryPolicy(lease_seconds=60, max_attempts=2, base_seconds=30, max_seconds=60)


@pytest.fixture
def engine(blank_engine) -> Engine:
    schema.upgrade(blank_engine)
    return blank_engine


def _add(engine: Engine, n: int, study: str | None = None, **kw) -> list[str]:
    uids = []
    for _ in range(n):
        sop = f"1.2.3.{uuid.uuid4().int % 10**20}"
        queue.enqueue(engine, sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                      study_instance_uid=study or f"1.2.4.{uuid.uuid4().int % 10**20}",
                      series_instance_uid="1.2.5", accession_number="A1",
                      calling_ae_title="MOD", transfer_syntax_uid="1.2.840.10008.1.2.1",
                      spool_path=f"/nonexistent/{sop}.dcm", **kw)
        uids.append(sop)
    return uids


def test_migrations_up_and_down(engine):
    assert schema.current_revision(engine) == schema.head_revision()
    assert "instances" in inspect(engine).get_table_names()
    schema.downgrade(engine, "base")
    assert "instances" not in inspect(engine).get_table_names()
    schema.upgrade(engine)
    assert schema.current_revision(engine) == schema.head_revision()


def _insert_0001_row(conn, sop: str, outside: bool, status: str = "sent") -> None:
    now = dt.datetime(2026, 11, 1, 8, 0)
    conn.execute(text(
        "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_instance_uid, "
        "series_instance_uid, accession_number, calling_ae_title, transfer_syntax_uid, "
        "spool_path, status, attempts, send_attempts, next_attempt_at, probability, label, "
        "threshold, model_version, outside_population, received_at) VALUES (:sop, '1.2.840."
        "10008.5.1.4.1.1.1', :study, '1.2.5', 'A1', 'MOD', '1.2.840.10008.1.2.1', '/s', "
        ":status, 1, 0, :now, 0.8, 'SUSPECTED PNEUMONIA', 0.5, 'm0', :outside, :now)"),
        {"sop": sop, "study": f"9.{sop}", "status": status, "now": now, "outside": outside})


def test_migration_0002_population_from_0001_rows(engine):
    """Rows written under schema 0001 keep their judgement: outside_population true becomes
    "outside", false "in_population"; the way down restores the boolean."""
    schema.downgrade(engine, "0001")
    assert "population" not in {c["name"] for c in inspect(engine).get_columns("instances")}
    with engine.begin() as c:
        _insert_0001_row(c, "1.1", outside=True)
        _insert_0001_row(c, "1.2", outside=False)
        _insert_0001_row(c, "1.3", outside=False, status="received")
    schema.upgrade(engine, "0002")
    columns = {c["name"]: c for c in inspect(engine).get_columns("instances")}
    assert "outside_population" not in columns
    assert columns["population"]["nullable"] is False
    with engine.connect() as c:
        got = dict(c.execute(text("SELECT sop_instance_uid, population FROM instances")).all())
    assert got == {"1.1": "outside", "1.2": "in_population", "1.3": "in_population"}
    # the unique SOP Instance UID and the indexes survive the table copy (SQLite batch)
    indexes = {i["name"] for i in inspect(engine).get_indexes("instances")}
    assert {"ix_instances_study_instance_uid", "ix_instances_status_next"} <= indexes
    with pytest.raises(IntegrityError), engine.begin() as c:
        _insert_0001_row_0002(c, "1.1")
    with engine.begin() as c:  # the server default fills rows written without it
        _insert_0001_row_0002(c, "1.4")
        assert c.execute(text("SELECT population FROM instances "
                              "WHERE sop_instance_uid = '1.4'")).scalar_one() == "in_population"
    schema.upgrade(engine)
    by_uid = {r.study_instance_uid: r for r in studies.triage_list(engine, limit=None)}
    assert by_uid["9.1.1"].population == "outside" and by_uid["9.1.2"].population == \
        "in_population"

    schema.downgrade(engine, "0001")
    with engine.connect() as c:
        back = dict(c.execute(text("SELECT sop_instance_uid, outside_population "
                                   "FROM instances")).all())
    assert {k: bool(v) for k, v in back.items()} == {
        "1.1": True, "1.2": False, "1.3": False, "1.4": False}
    schema.upgrade(engine)
    assert schema.current_revision(engine) == schema.head_revision()


INSTANCE_COLUMNS_0001 = (
    "id, sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid, "
    "accession_number, calling_ae_title, transfer_syntax_uid, spool_path, status, reason, "
    "attempts, send_attempts, next_attempt_at, lease_owner, lease_expires_at, probability, "
    "label, threshold, model_version, result_sop_instance_uid, result_path, received_at, "
    "scored_at, sent_at")  # every column of revision 0001 but outside_population


def test_upgrade_from_a_database_created_at_0001(blank_engine):
    """A worklist created by the first release (schema built at 0001, never at a later
    revision) with the rows that release wrote: upgraded to head, every row keeps every
    value, and outside_population becomes population ("outside" where it was true)."""
    engine = blank_engine
    assert schema.upgrade(engine, "0001") == "0001"
    written = {"1.1": (True, "sent"), "1.2": (False, "sent"), "1.3": (False, "received"),
               "1.4": (True, "failed"), "1.5": (True, "scored")}
    with engine.begin() as c:
        for sop, (outside, status) in written.items():
            _insert_0001_row(c, sop, outside, status)
    select = text(f"SELECT {INSTANCE_COLUMNS_0001} FROM instances ORDER BY id")
    with engine.connect() as c:
        before = [tuple(r) for r in c.execute(select)]
    assert len(before) == len(written)

    assert schema.upgrade(engine) == schema.head_revision()

    with engine.connect() as c:
        after = [tuple(r) for r in c.execute(select)]
        population = dict(c.execute(text(
            "SELECT sop_instance_uid, population FROM instances")).all())
    assert after == before
    assert population == {sop: "outside" if outside else "in_population"
                          for sop, (outside, _) in written.items()}
    assert "site_thresholds" in inspect(engine).get_table_names()
    # the code of this version works on them: the triage list, and the queue picks up the
    # image that was still waiting
    by_study = {r.study_instance_uid: r for r in studies.triage_list(engine, limit=None)}
    assert by_study["9.1.1"].population == "outside" and by_study["9.1.1"].status == "sent"
    assert by_study["9.1.2"].population == "in_population"
    job = queue.claim(engine, "process", "w", 60)
    assert job is not None and job.sop_instance_uid == "1.3"


def _insert_0001_row_0002(conn, sop: str) -> None:
    """A row as 0001 code would write it once the schema is at 0002 (no population)."""
    now = dt.datetime(2026, 11, 2, 8, 0)
    conn.execute(text(
        "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_instance_uid, "
        "series_instance_uid, accession_number, calling_ae_title, transfer_syntax_uid, "
        "spool_path, status, attempts, send_attempts, next_attempt_at, received_at) VALUES "
        "(:sop, '1.2', :study, '1.2.5', '', '', '', '/s', 'received', 0, 0, :now, :now)"),
        {"sop": sop, "study": f"9.{sop}", "now": now})


def test_enqueue_is_idempotent_on_sop_instance_uid(engine):
    sop = _add(engine, 1, study="1.2.4.7")[0]
    job = queue.claim(engine, "process", "w1", 60)
    assert job is not None and job.sop_instance_uid == sop
    queue.mark_scored(engine, job, "w1", probability=0.9, label=Label.SUSPECTED, threshold=0.5,
                      model_version="m", result_path="/r", result_sop_instance_uid="9.9")
    # the same instance again: one row, processed again
    again = {"sop_instance_uid": sop, "sop_class_uid": "x", "study_instance_uid": "1.2.4.7",
             "series_instance_uid": "se", "accession_number": "", "calling_ae_title": "",
             "transfer_syntax_uid": "", "spool_path": "/p",
             "patient_key": queue.patient_key(sop, "P1")}
    row_id, new = queue.enqueue(engine, **again)
    assert new is False
    assert row_id == job.id
    rows = studies.triage_list(engine, limit=None)
    assert sum(r.images for r in rows) == 1
    assert queue.claim(engine, "process", "w1", 60) is not None
    # the same SOP Instance UID for another study or patient (issue 10): refused, row kept
    for other in ({"study_instance_uid": "1.2.4.8"}, {"patient_key": queue.patient_key(sop, "P2")}):
        with pytest.raises(UIDConflictError):
            queue.check_conflict(engine, **{**again, **other})
        with pytest.raises(UIDConflictError):
            queue.enqueue(engine, **{**again, **other})
    [row] = studies.triage_list(engine, limit=None)
    assert row.study_instance_uid == "1.2.4.7"


def test_claims_are_exclusive_and_leases_expire(engine):
    _add(engine, 1)
    a = queue.claim(engine, "process", "w1", 0.3)
    assert a is not None
    assert queue.claim(engine, "process", "w2", 60) is None  # leased by w1
    # w1 dies; after the lease expires w2 takes the job over, and w1's late result is refused
    import time

    time.sleep(0.4)
    b = queue.claim(engine, "process", "w2", 60)
    assert b is not None and b.id == a.id
    assert queue.mark_scored(engine, a, "w1", probability=0.1) is False
    assert queue.mark_scored(engine, b, "w2", probability=0.1, label=Label.NEGATIVE) is True


def test_concurrent_claimers_never_share_a_job(engine):
    _add(engine, 30)
    got: list[int] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while (job := queue.claim(engine, "process", name, 60)) is not None:
            with lock:
                got.append(job.id)
            queue.mark_not_scored(engine, job, name, "test")

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 30 and len(set(got)) == 30


def test_retry_backoff_then_dead_letter(engine):
    _add(engine, 1)
    job = queue.claim(engine, "process", "w", 60)
    assert job is not None
    st = queue.mark_attempt_failed(engine, job, "w", "process", "boom", policy=SLOW_RETRY)
    assert st == Status.RECEIVED
    assert queue.claim(engine, "process", "w", 60) is None  # not due for 30 s
    rows = studies.triage_list(engine)
    assert rows[0].status == "pending" and "retrying (1/2): boom" in rows[0].reason
    with engine.begin() as c:  # make it due now
        c.execute(text("UPDATE instances SET next_attempt_at = :t"),
                  {"t": dt.datetime(2000, 1, 1)})
    job = queue.claim(engine, "process", "w", 60)
    assert job is not None and job.attempts == 1
    assert queue.mark_attempt_failed(engine, job, "w", "process", "boom", policy=SLOW_RETRY) == \
        Status.FAILED
    row = studies.triage_list(engine)[0]
    assert row.status == "failed" and row.label == "FAILED" and row.probability is None


def _score(engine, sop, p, label, status="scored", *, population=Population.IN, outputs=()):
    """Score ``sop`` (claimed from the queue) with a delivery planned for each of ``outputs``."""
    job = queue.claim(engine, "process", "w", 60)
    assert job is not None and job.sop_instance_uid == sop
    planned = [deliveries.Planned(k, f"9.{len(k)}.{job.id}", f"/r.{k}") for k in outputs]
    queue.mark_scored(engine, job, "w", probability=p, label=label, threshold=0.5,
                      model_version="m1", result_path="/r", result_sop_instance_uid="1.9",
                      population=population,
                      deliveries=lambda s: deliveries.apply_plan(
                          s, job.id, planned, hold=False, label=label, threshold=0.5,
                          model_version="m1"))


def test_triage_order_suspected_first_then_arrival(engine):
    a = _add(engine, 1, study="1.1")[0]  # negative, oldest
    b = _add(engine, 1, study="1.2")[0]  # suspected 0.7
    c = _add(engine, 1, study="1.3")[0]  # refused
    d = _add(engine, 1, study="1.4")[0]  # suspected 0.95
    _add(engine, 1, study="1.5")  # still pending
    _score(engine, a, 0.2, Label.NEGATIVE)
    _score(engine, b, 0.7, Label.SUSPECTED)
    job = queue.claim(engine, "process", "w", 60)
    assert job is not None and job.sop_instance_uid == c
    queue.mark_not_scored(engine, job, "w", "out of scope (view_position): LL")
    _score(engine, d, 0.95, Label.SUSPECTED)
    rows = studies.triage_list(engine)
    assert [r.study_instance_uid for r in rows] == ["1.4", "1.2", "1.1", "1.3", "1.5"]
    by_uid = {r.study_instance_uid: r for r in rows}
    assert by_uid["1.3"].label == "NOT SCORED" and by_uid["1.3"].probability is None
    assert "view_position" in (by_uid["1.3"].reason or "")
    assert by_uid["1.5"].label == "PENDING"
    assert by_uid["1.1"].label == Label.NEGATIVE
    assert [r.study_instance_uid for r in studies.triage_list(engine, "suspected")] == \
        ["1.4", "1.2"]
    assert [r.study_instance_uid for r in studies.triage_list(engine, "not_scored")] == ["1.3"]
    assert len(studies.triage_list(engine, limit=2)) == 2
    with engine.begin() as c:  # study 1.4 arrived long ago
        c.execute(text("UPDATE instances SET received_at = :t WHERE study_instance_uid = '1.4'"),
                  {"t": dt.datetime(2000, 1, 1)})
    recent = studies.triage_list(engine, since=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
    assert [r.study_instance_uid for r in recent] == ["1.2", "1.1", "1.3", "1.5"]


def test_outside_and_unknown_population_never_rise_above_in_population_suspected(engine):
    """In-population suspected first (highest probability first), then suspected outside or
    of unknown population (highest first), then the rest by arrival."""
    d = _add(engine, 1, study="5.d")[0]  # negative, in population, oldest
    a = _add(engine, 1, study="5.a")[0]  # suspected 0.95, outside (an adult)
    b = _add(engine, 1, study="5.b")[0]  # suspected 0.60, in population
    c = _add(engine, 1, study="5.c")[0]  # suspected 0.70, unknown (no age)
    e = _add(engine, 1, study="5.e")[0]  # suspected 0.55, in population
    g = _add(engine, 1, study="5.g")[0]  # negative, outside
    r = _add(engine, 1, study="5.r")[0]  # refused for its age (gate.refuse_unknown_age)
    _add(engine, 1, study="5.f")  # pending
    _score(engine, d, 0.1, Label.NEGATIVE)
    _score(engine, a, 0.95, Label.SUSPECTED, population=Population.OUTSIDE)
    _score(engine, b, 0.6, Label.SUSPECTED)
    _score(engine, c, 0.7, Label.SUSPECTED, population=Population.UNKNOWN)
    _score(engine, e, 0.55, Label.SUSPECTED)
    _score(engine, g, 0.3, Label.NEGATIVE, population=Population.OUTSIDE)
    job = queue.claim(engine, "process", "w", 60)
    assert job is not None and job.sop_instance_uid == r
    queue.mark_not_scored(engine, job, "w", "out of scope (patient_age): POPULATION UNKNOWN",
                          population=Population.UNKNOWN)
    rows = studies.triage_list(engine, limit=None)
    assert [x.study_instance_uid for x in rows] == [
        "5.b", "5.e", "5.a", "5.c", "5.d", "5.g", "5.r", "5.f"]
    pop = {x.study_instance_uid: x.population for x in rows}
    assert pop == {"5.b": "in_population", "5.e": "in_population", "5.a": "outside",
                   "5.c": "unknown", "5.d": "in_population", "5.g": "outside",
                   "5.r": "unknown", "5.f": "unknown"}  # pending: not yet assessed
    js = [x.as_json() for x in rows]
    assert [x["population"] for x in js] == [pop[x["study_instance_uid"]] for x in js]
    assert json.loads(json.dumps(js[2]))["population"] == "outside"
    assert [x.study_instance_uid for x in studies.triage_list(engine, "suspected")] == \
        ["5.b", "5.e", "5.a", "5.c"]


def test_study_population_is_its_worst_scored_image(engine):
    a, b, c = _add(engine, 3, study="6.1")
    _score(engine, a, 0.8, Label.SUSPECTED)
    _score(engine, b, 0.2, Label.NEGATIVE, population=Population.UNKNOWN)
    (row,) = studies.triage_list(engine)
    assert row.population == "unknown"  # a pending image does not count
    _score(engine, c, 0.3, Label.NEGATIVE, population=Population.OUTSIDE)
    (row,) = studies.triage_list(engine)
    assert row.population == "outside"
    # re-received (duplicate C-STORE, replay): unknown until the gate has seen it again
    _add_again(engine, a)
    job = queue.claim(engine, "process", "w", 60)
    assert job is not None and job.sop_instance_uid == a
    with engine.connect() as conn:
        assert conn.execute(text("SELECT population FROM instances WHERE sop_instance_uid = "
                                 ":u"), {"u": a}).scalar_one() == "unknown"


def _add_again(engine: Engine, sop: str) -> None:
    queue.enqueue(engine, sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                  study_instance_uid="6.1", series_instance_uid="1.2.5", accession_number="A1",
                  calling_ae_title="MOD", transfer_syntax_uid="1.2.840.10008.1.2.1",
                  spool_path=f"/nonexistent/{sop}.dcm")


def test_study_with_one_suspected_image_is_suspected(engine):
    a, b = _add(engine, 2, study="2.1")
    _score(engine, a, 0.1, Label.NEGATIVE)
    _score(engine, b, 0.8, Label.SUSPECTED)
    (row,) = studies.triage_list(engine)
    assert row.label == Label.SUSPECTED and row.probability == pytest.approx(0.8)
    assert row.images == 2


def test_delivery_states(engine):
    """Each output is retried on its own; one that fails for good leaves the study with its
    score, label and place (status undelivered), until a retry sends it."""
    import time

    (a,) = _add(engine, 1, study="3.1")
    _add(engine, 1, study="3.2")  # pending, arrived later
    _score(engine, a, 0.8, Label.SUSPECTED, outputs=("sc", "hl7"))
    row = studies.triage_list(engine)[0]
    assert (row.study_instance_uid, row.status) == ("3.1", "scored")
    assert [(d["kind"], d["status"]) for d in row.deliveries] == [("sc", "pending"),
                                                                    ("hl7", "pending")]
    policy = queue.RetryPolicy(60, 2, 0.01, 0.01)
    job = deliveries.claim(engine, "w", 60, ["sc"])
    assert job is not None and job.kind == "sc"
    assert deliveries.claim(engine, "w2", 60, ["sc"]) is None  # leased
    assert deliveries.mark_failed(engine, job, "w", "PACS down", policy=policy) == "retrying"
    assert studies.triage_list(engine)[0].status == "retrying"
    time.sleep(0.05)
    job = deliveries.claim(engine, "w", 60, ["sc"])
    assert job is not None and job.attempts == 1
    assert deliveries.mark_failed(engine, job, "w", "PACS down again", policy=policy) == "failed"
    job = deliveries.claim(engine, "w", 60, ["hl7"])
    assert job is not None and deliveries.mark_sent(engine, job, "w")
    for rows in (studies.triage_list(engine), studies.triage_list(engine, "suspected"),
                 studies.triage_list(engine, "undelivered")):
        row = rows[0]
        assert (row.study_instance_uid, row.status, row.label, row.band) == (
            "3.1", "undelivered", Label.SUSPECTED, "suspected")
        assert row.probability == pytest.approx(0.8)
    assert row.deliveries == [
        {"kind": "sc", "status": "failed", "attempts": 2, "last_error": "PACS down again"},
        {"kind": "hl7", "status": "sent", "attempts": 0, "last_error": None}]
    assert deliveries.claim(engine, "w", 60, ["sc", "hl7"]) is None  # a dead letter waits
    assert deliveries.retry_failed(engine) == 1
    assert studies.triage_list(engine)[0].status == "scored"
    job = deliveries.claim(engine, "w", 60, ["sc"])
    assert job is not None and job.attempts == 0
    deliveries.mark_sent(engine, job, "w")
    row = studies.triage_list(engine)[0]
    assert row.status == "sent" and row.sent_at is not None
    assert [d["status"] for d in row.deliveries] == ["sent", "sent"]


def test_retention_removes_files_of_finished_instances_only(engine, tmp_path):
    from cxr_worker.jobs import apply_retention

    def add(status: str, days_old: float) -> tuple[str, str]:
        sop = _add(engine, 1)[0]
        spool, result = tmp_path / f"{sop}.dcm", tmp_path / "results" / f"{sop}.dcm"
        heatmap = result.with_name(f"{sop}.heatmap.png")  # goes with its result
        result.parent.mkdir(exist_ok=True)
        spool.write_bytes(b"x")
        result.write_bytes(b"y")
        heatmap.write_bytes(b"z")
        with engine.begin() as c:
            c.execute(text("UPDATE instances SET status = :s, received_at = :t, spool_path = :p, "
                           "result_path = :r WHERE sop_instance_uid = :u"),
                      {"s": status, "t": dt.datetime.now(dt.UTC).replace(tzinfo=None)
                       - dt.timedelta(days=days_old), "p": str(spool), "r": str(result),
                       "u": sop})
        return str(spool), str(result)

    old_sent = add("sent", 40)
    old_failed = add("failed", 40)  # dead letters stay for the operator
    old_scored = add("scored", 40)  # PACS configured: not delivered yet, must stay
    new_sent = add("sent", 1)
    assert apply_retention(engine, 30, pacs_configured=True) == 1
    assert not any(map(lambda p: Path(p).exists(), old_sent))
    assert not (tmp_path / "results" / f"{Path(old_sent[0]).stem}.heatmap.png").exists()
    assert (tmp_path / "results" / f"{Path(old_failed[0]).stem}.heatmap.png").exists()
    for kept in (old_failed, old_scored, new_sent):
        assert all(Path(p).exists() for p in kept)
    assert sum(r.images for r in studies.triage_list(engine, limit=None)) == 4  # rows stay
    # without a PACS, a scored result is finished
    assert apply_retention(engine, 30, pacs_configured=False) == 1
    assert not Path(old_scored[0]).exists()


# -- the study's date and time (worklist.header.study_datetime) -------------------------------
@pytest.mark.parametrize(("date", "time", "expected"), [
    ("20260101", "120000", "2026-01-01T12:00:00"),
    ("20260101", "1200", "2026-01-01T12:00:00"),  # TM may stop after the minutes or the hour
    ("20260101", "07", "2026-01-01T07:00:00"),
    ("20260101", "235960.123456", "2026-01-01T23:59:59"),  # a leap second
    ("20260101", "", "2026-01-01T00:00:00"),
    ("20260101", "25:00", "2026-01-01T00:00:00"),  # an invalid time: the date alone
    ("20260230", "120000", None),  # not a date
    ("2026-01-01", "120000", None),  # ACR-NEMA style: not DA
    ("", "120000", None),
    ("20260101\x1b[2J", "120000", None),  # sender text never passes
])
def test_study_datetime_takes_valid_values_only(date, time, expected):
    from pydicom.dataelem import RawDataElement
    from pydicom.dataset import Dataset
    from pydicom.tag import Tag

    from cxr_worker.worklist.header import study_datetime

    ds = Dataset()  # as received: raw values, which pydicom has not checked
    for keyword, vr, value in (("StudyDate", "DA", date), ("StudyTime", "TM", time)):
        if value:
            raw = value.encode("latin-1") + b" " * (len(value) % 2)
            ds[Tag(keyword)] = RawDataElement(Tag(keyword), vr, len(raw), raw, 0, False, True)
    assert study_datetime(ds) == expected


def test_list_shows_the_earliest_study_datetime_of_its_images(engine):
    _add(engine, 1, study="1.2.7", study_datetime="2026-01-01T12:05:00")
    _add(engine, 1, study="1.2.7", study_datetime="2026-01-01T12:00:00")
    _add(engine, 1, study="1.2.8")
    rows = {r.study_instance_uid: r for r in studies.triage_list(engine, limit=None)}
    assert rows["1.2.7"].study_datetime == "2026-01-01T12:00:00"
    assert rows["1.2.8"].study_datetime is None
    assert rows["1.2.7"].as_json()["study_datetime"] == "2026-01-01T12:00:00"
