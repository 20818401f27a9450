"""Deliveries in the worklist (migration 0006), on SQLite and on the PostgreSQL at 127.0.0.1:5432:
the plan of a new result (the same decision resends the same objects, another decision
supersedes them and the worklist keeps both), claims that wait for an image being processed
again, sending paused, result UIDs that never come back once withdrawn, and rows written
before the revision."""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from cxr_worker import report, send
from cxr_worker.labels import Label
from cxr_worker.pipeline import Outputs, Pipeline, result_uids
from cxr_worker.score import Score
from cxr_worker.spool import Spool
from cxr_worker.worklist import control, deliveries, queue, schema, studies
from cxr_worker.worklist.deliveries import Planned
from cxr_worker.worklist.models import Delivery, Instance, Status

POLICY = queue.RetryPolicy(lease_seconds=60, max_attempts=3, base_seconds=0.01,
                           max_seconds=0.01)


@pytest.fixture
def engine(migrated_engine: Engine) -> Engine:
    return migrated_engine


def _received(engine: Engine, study: str = "7.1") -> int:
    sop = f"1.2.3.{uuid.uuid4().int % 10**20}"
    row_id, _ = queue.enqueue(engine, sop_instance_uid=sop, sop_class_uid="1.2.840.1",
                              study_instance_uid=study, series_instance_uid="1.2.5",
                              accession_number="A7", spool_path=f"/nonexistent/{sop}.dcm")
    return row_id


def _score(engine: Engine, row_id: int, planned: list[Planned], *, label: str = Label.SUSPECTED,
           threshold: float = 0.5, hold: bool = False) -> None:
    """Process the image (claimed from the queue) into a result with ``planned`` deliveries."""
    job = queue.claim(engine, "process", "w", 60, only_ids={row_id})
    assert job is not None
    assert queue.mark_scored(
        engine, job, "w", hold=hold, probability=0.9 if label == Label.SUSPECTED else 0.1,
        label=label, threshold=threshold, model_version="m1", result_path="/r.dcm",
        result_sop_instance_uid=planned[0].result_uid if planned else None,
        deliveries=lambda s: deliveries.apply_plan(s, row_id, planned, hold=hold, label=label,
                                                   threshold=threshold, model_version="m1"))


def _rows(engine: Engine, row_id: int) -> list[Delivery]:
    return deliveries.of_instances(engine, [row_id])[row_id]


def _send_all(engine: Engine, kinds: tuple[str, ...] = ("sc", "sr", "kos", "hl7")) -> int:
    n = 0
    while (job := deliveries.claim(engine, "w", 60, kinds)) is not None:
        assert deliveries.mark_sent(engine, job, "w")
        n += 1
    return n


def _image(engine: Engine, row_id: int) -> Instance:
    with Session(engine) as s:
        row = s.get(Instance, row_id)
        assert row is not None
        return row


def test_the_same_decision_resends_the_same_objects(engine):
    row_id = _received(engine)
    plan = [Planned("sc", "9.1", "/r.dcm"), Planned("hl7", "abc", "/r.hl7")]
    _score(engine, row_id, plan)
    assert _send_all(engine) == 2
    assert (_image(engine, row_id).status, _image(engine, row_id).delivery) == ("sent", "sent")
    queue.requeue(engine, [row_id])  # a duplicate C-STORE, a replay
    _score(engine, row_id, plan)
    rows = _rows(engine, row_id)
    assert [(r.kind, r.result_uid, r.status, r.superseded_at) for r in rows] == [
        ("sc", "9.1", "pending", None), ("hl7", "abc", "pending", None)]
    assert _send_all(engine) == 2 and _image(engine, row_id).status == Status.SENT


def test_another_decision_supersedes_and_the_worklist_keeps_both(engine):
    row_id = _received(engine)
    _score(engine, row_id, [Planned("sc", "9.1", "/a.dcm"), Planned("sr", "9.2", "/a.sr"),
                            Planned("hl7", "aaa", "/a.hl7")])
    assert _send_all(engine, ("sc", "hl7")) == 2  # the SR never went out
    queue.requeue(engine, [row_id])
    _score(engine, row_id, [Planned("sc", "9.3", "/b.dcm"), Planned("sr", "9.4", "/b.sr"),
                            Planned("hl7", "bbb", "/b.hl7"),
                            Planned("kos", "9.5", "/b.kos", rejects=("9.1",))],
           label=Label.NEGATIVE, threshold=0.95)
    rows = {r.result_uid: r for r in _rows(engine, row_id)}
    old_sc, old_sr, old_hl7 = rows["9.1"], rows["9.2"], rows["aaa"]
    assert (old_sc.status, old_sc.superseded_by, old_sc.rejected_by) == ("sent", "9.3", "9.5")
    assert (old_sr.status, old_sr.superseded_by, old_sr.rejected_by) == (
        "cancelled", "9.4", None)  # never left: nothing to withdraw
    assert (old_hl7.status, old_hl7.superseded_by) == ("sent", "bbb")
    assert all(rows[u].superseded_at is not None for u in ("9.1", "9.2", "aaa"))
    assert {(r.kind, r.status, r.label, r.threshold) for r in rows.values()
            if r.superseded_at is None} == {
        ("sc", "pending", Label.NEGATIVE, 0.95), ("sr", "pending", Label.NEGATIVE, 0.95),
        ("hl7", "pending", Label.NEGATIVE, 0.95), ("kos", "pending", Label.NEGATIVE, 0.95)}
    assert _image(engine, row_id).delivery == "waiting"
    assert _send_all(engine) == 4
    [study] = studies.triage_list(engine)
    assert (study.status, study.label) == ("sent", Label.NEGATIVE)
    assert [d["kind"] for d in study.deliveries] == ["sc", "sr", "kos", "hl7"]
    # an output no longer produced (the SR turned off): cancelled, the others resent
    queue.requeue(engine, [row_id])
    _score(engine, row_id, [Planned("sc", "9.3", "/b.dcm")], label=Label.NEGATIVE,
           threshold=0.95)
    now = {r.kind: r for r in _rows(engine, row_id) if r.superseded_at is None}
    assert set(now) == {"sc", "sr", "hl7", "kos"}  # sent ones stay current (history)
    assert now["sc"].status == "pending" and now["sr"].status == "sent"


def test_a_held_rejection_note_goes_out_with_its_results(engine):
    row_id = _received(engine)
    _score(engine, row_id, [Planned("sc", "9.1", "/a.dcm")])
    _send_all(engine)
    queue.requeue(engine, [row_id])
    plan = [Planned("sc", "9.3", "/b.dcm"), Planned("kos", "9.5", "/k", rejects=("9.1",))]
    _score(engine, row_id, plan, label=Label.NEGATIVE, hold=True)  # replay --no-send
    assert {r.kind: r.status for r in _rows(engine, row_id) if r.superseded_at is None} == {
        "sc": "held", "kos": "held"}
    assert deliveries.claim(engine, "w", 60, ("sc", "kos")) is None
    assert studies.triage_list(engine)[0].status == "held"
    queue.requeue(engine, [row_id])  # replayed again, sent this time: the same decision
    _score(engine, row_id, [Planned("sc", "9.3", "/b.dcm")], label=Label.NEGATIVE)
    assert {r.kind: r.status for r in _rows(engine, row_id) if r.superseded_at is None} == {
        "sc": "pending", "kos": "pending"}
    assert _send_all(engine) == 2


def test_nothing_is_sent_while_its_image_is_processed_again(engine):
    row_id = _received(engine)
    _score(engine, row_id, [Planned("sc", "9.1", "/a.dcm")])
    queue.requeue(engine, [row_id])
    assert deliveries.claim(engine, "w", 60, ("sc",)) is None  # its next plan decides
    _score(engine, row_id, [Planned("sc", "9.1", "/a.dcm")])
    assert deliveries.claim(engine, "w", 60, ("sc",)) is not None


def test_a_delivery_superseded_while_it_was_sent_is_recorded_as_sent(engine):
    """A send in progress when a new plan replaced its result: it did arrive, so it stays
    'sent' (and the plan, seeing it leased, rejected it); a failed one is not retried."""
    row_id = _received(engine)
    _score(engine, row_id, [Planned("sc", "9.1", "/a.dcm"), Planned("sr", "9.2", "/a.sr")])
    sc = deliveries.claim(engine, "w", 60, ("sc",))
    sr = deliveries.claim(engine, "w", 60, ("sr",))
    assert sc is not None and sr is not None
    previous = deliveries.history(engine, row_id)[0]
    assert previous["sc"].may_be_delivered and previous["sr"].may_be_delivered
    queue.requeue(engine, [row_id])
    _score(engine, row_id, [Planned("sc", "9.3", "/b.dcm"), Planned("sr", "9.4", "/b.sr"),
                            Planned("kos", "9.5", "/k", rejects=("9.1", "9.2"))],
           label=Label.NEGATIVE)
    assert deliveries.mark_sent(engine, sc, "w")
    assert deliveries.mark_failed(engine, sr, "w", "refused", policy=POLICY) == "cancelled"
    rows = {r.result_uid: r for r in _rows(engine, row_id)}
    assert (rows["9.1"].status, rows["9.1"].rejected_by) == ("sent", "9.5")
    assert (rows["9.2"].status, rows["9.2"].rejected_by) == ("cancelled", "9.5")


def test_result_uids_follow_the_decision_and_never_come_back():
    def score(label: str, threshold: float) -> Score:
        return Score(0.9, label, threshold, "m1")

    prefix, source = "1.2.826.0.1.3680043.10.1187.", "1.2.3.4"
    a = result_uids(prefix, source, score(Label.SUSPECTED, 0.5), {}, set())
    assert a == result_uids(prefix, source, score(Label.SUSPECTED, 0.5), {}, set())
    b = result_uids(prefix, source, score(Label.NEGATIVE, 0.95), {}, set(a.values()))
    assert not set(a.values()) & set(b.values())
    used = set(a.values()) | set(b.values())

    def prev(uids: dict[str, str]) -> dict[str, Any]:
        return {k: deliveries.Previous(0, k, "sent", u, None, None, None, 0, False, None, None,
                                       None) for k, u in uids.items()}

    # the first decision again after the second: fresh UIDs (the first were withdrawn)
    a2 = result_uids(prefix, source, score(Label.SUSPECTED, 0.5), prev(b), used)
    assert not set(a2.values()) & used
    assert len(a2["hl7"]) == 20 and a2["sc"].startswith(prefix)
    # and again: the same fresh UIDs (the same objects, an idempotent resend)
    assert result_uids(prefix, source, score(Label.SUSPECTED, 0.5), prev(a2),
                       used | set(a2.values())) == a2


def test_sending_paused_holds_every_delivery(engine, tmp_path: Path):
    """While an admin paused sending nothing is attempted; once resumed the delivery is
    tried (here against a closed port: a failed attempt, retried later)."""
    row_id = _received(engine)
    _score(engine, row_id, [Planned("sc", "9.1", str(tmp_path / "missing.dcm"))])
    pipeline = Pipeline(
        engine=engine, spool=Spool(tmp_path / "data"), scorer=None,  # type: ignore[arg-type]
        gate_cfg=None,  # type: ignore[arg-type]
        report_cfg=report.ReportConfig("1.2.826.0.1.3680043.10.1187.", 9901, "cxr-worker"),
        retry=POLICY, pacs=send.Peer("PACS", "127.0.0.1", free_port(), "CXR_WORKER", 2.0, None,
                                     1.0),
        outputs=Outputs(delivered=("sc",)))
    control.set_sending_paused(engine, True, "dr-admin")
    assert pipeline.send_next() is False
    assert _rows(engine, row_id)[0].attempts == 0
    control.set_sending_paused(engine, False, "dr-admin")
    assert pipeline.send_next() is True
    [row] = _rows(engine, row_id)
    assert (row.status, row.attempts) == ("retrying", 1) and row.last_error
    assert studies.triage_list(engine)[0].status == "retrying"


# -- rows written before revision 0006 ---------------------------------------------------------
def test_rows_from_revision_0005_become_deliveries_and_back(blank_engine):
    engine = blank_engine
    schema.upgrade(engine, "0005")
    now = dt.datetime(2026, 12, 1, 8, 0)
    legacy = {  # study: (status, send_attempts, reason)
        "8.sent": ("sent", 1, None),
        "8.held": ("held", 0, None),
        "8.undelivered": ("failed", 10, "sending failed 10 times: refused"),
        "8.retrying": ("scored", 2, "retrying (2/10): refused"),
        "8.waiting": ("scored", 0, None),
        "8.boom": ("failed", 10, "processing failed 10 times: boom"),
    }
    with engine.begin() as c:
        for study, (status, attempts, reason) in legacy.items():
            result = study != "8.boom"
            c.execute(text(
                "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_instance_uid, "
                "series_instance_uid, accession_number, calling_ae_title, transfer_syntax_uid, "
                "spool_path, status, reason, attempts, send_attempts, next_attempt_at, "
                "probability, label, threshold, model_version, population, "
                "result_sop_instance_uid, result_path, received_at, scored_at, sent_at) "
                "VALUES (:sop, '1.2.840.1', :study, '1.2.5', 'A1', 'MOD', '1.2.840.10008.1.2.1', "
                "'/s', :status, :reason, 0, :attempts, :now, :p, :label, 0.5, 'm0', "
                "'in_population', :result, :path, :now, :scored, :sent)"),
                {"sop": f"{study}.1", "study": study, "status": status, "reason": reason,
                 "attempts": attempts, "now": now, "p": 0.9 if result else None,
                 "label": Label.SUSPECTED if result else None,
                 "result": f"{study}.9" if result else None,
                 "path": "/r.dcm" if result else None, "scored": now if result else None,
                 "sent": now if status == "sent" else None})
    schema.upgrade(engine)
    listed = {r.study_instance_uid: r for r in studies.triage_list(engine, limit=None)}
    assert {u: r.status for u, r in listed.items()} == {
        "8.sent": "sent", "8.held": "held", "8.undelivered": "undelivered",
        "8.retrying": "retrying", "8.waiting": "scored", "8.boom": "failed"}
    undelivered = listed["8.undelivered"]
    assert (undelivered.label, undelivered.band, undelivered.probability) == (
        Label.SUSPECTED, "suspected", 0.9)
    assert undelivered.deliveries == [{"kind": "sc", "status": "failed", "attempts": 10,
                                       "last_error": "sending failed 10 times: refused"}]
    assert listed["8.retrying"].deliveries[0]["status"] == "retrying"
    assert listed["8.retrying"].reason is None
    with Session(engine) as s:
        rows = {r.result_uid: r for r in s.scalars(select(Delivery))}
    assert {u: (r.kind, r.status) for u, r in rows.items()} == {
        "8.sent.9": ("sc", "sent"), "8.held.9": ("sc", "held"),
        "8.undelivered.9": ("sc", "failed"), "8.retrying.9": ("sc", "retrying"),
        "8.waiting.9": ("sc", "pending")}
    # a migrated dead letter is retried like any other
    assert control.retry_dead_letter(engine, "8.undelivered.1") == "send"
    assert deliveries.claim(engine, "w", 60, ("sc",)) is not None

    schema.downgrade(engine, "0005")
    with engine.connect() as c:
        back = dict(c.execute(text("SELECT study_instance_uid, status FROM study_summary")).all())
    assert back["8.sent"] == "sent" and back["8.boom"] == "failed"
    schema.upgrade(engine)
    assert schema.current_revision(engine) == schema.head_revision()

