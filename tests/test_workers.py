"""Issue 12: worker processes, loops that sleep instead of polling, one-statement claims,
the lease kept from the claim to the send. In process, with the real model and a real
SQLite or PostgreSQL worklist."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import spool_and_enqueue, wait_until
from hostile import attacks
from sqlalchemy import Engine, event, select, update
from sqlalchemy.orm import Session

from cxr_worker import compose
from cxr_worker.errors import ConfigError
from cxr_worker.jobs import Jobs, Loop
from cxr_worker.score import Scorer
from cxr_worker.settings import Jobs as JobSettings
from cxr_worker.settings import Settings, Storage, job_roles, load_settings
from cxr_worker.spool import Spool
from cxr_worker.worklist import queue
from cxr_worker.worklist.models import Instance, utcnow

pytestmark = pytest.mark.slow


@pytest.fixture
def engine(sqlite_worklist: Engine) -> Engine:
    return sqlite_worklist


def receive(engine: Engine, spool: Spool, seed: str) -> str:
    """What the C-STORE handler does with an image: the file, then the row."""
    return spool_and_enqueue(engine, spool, seed, "PNEUMONIA", (320, 256))


def _row(engine: Engine, sop: str) -> Instance:
    with Session(engine) as s:
        return s.scalars(select(Instance).where(Instance.sop_instance_uid == sop)).one()


class Statements:
    """Counts the SQL statements an engine runs."""

    def __init__(self, engine: Engine) -> None:
        self.seen: list[str] = []
        self._lock = threading.Lock()
        event.listen(engine, "before_cursor_execute", self._count)

    def _count(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        with self._lock:
            self.seen.append(statement.split(None, 1)[0].upper())

    def since(self, n: int) -> list[str]:
        with self._lock:
            return self.seen[n:]


def test_idle_loops_send_no_query_and_wake_on_arrival_and_when_a_retry_is_due(
        engine: Engine, tmp_path: Path) -> None:
    settings = Settings(storage=Storage(data_dir=str(tmp_path / "data")))
    pipeline = compose.build_pipeline(settings, Scorer(), engine)
    jobs = Jobs(pipeline, 3.0, 30.0, 3600.0)
    counted = Statements(engine)
    jobs.start()
    try:
        wait_until(lambda: jobs.process is not None and jobs.process.idle, 10, "idle")
        time.sleep(0.3)  # the first round, retention and the sweep (at start) are over
        start = len(counted.seen)
        time.sleep(2.0)
        assert counted.since(start) == [], "an idle worker queried the database"

        # an arrival wakes it (the C-STORE handler calls wake): scored long before the poll
        sop = receive(engine, pipeline.spool, "wake-on-arrival")
        t = time.monotonic()
        jobs.wake()
        wait_until(lambda: _row(engine, sop).status == "scored", 10, "scored", interval=0.01)
        assert time.monotonic() - t < 2.0

        # a retry due in 0.5 s is picked up then, without a wake-up, not at the next poll
        sop2 = receive(engine, pipeline.spool, "retry-due")
        with Session(engine) as s, s.begin():
            s.execute(update(Instance).where(Instance.sop_instance_uid == sop2).values(
                next_attempt_at=utcnow() + dt.timedelta(seconds=0.5)))
        jobs.wake()  # the loop looks, finds it not due, and sleeps until it is
        t = time.monotonic()
        wait_until(lambda: _row(engine, sop2).status == "scored", 10, "retry", interval=0.01)
        assert 0.3 < time.monotonic() - t < 2.0
    finally:
        pipeline.stopping.set()
        jobs.stop(time.monotonic() + 5)


def test_a_loop_runs_again_at_once_while_it_finds_work() -> None:
    rounds: list[float] = []
    todo = [3]

    def work() -> int:
        rounds.append(time.monotonic())
        todo[0] -= 1
        return max(todo[0], 0)  # truthy while work was done

    loop = Loop("t", work, poll_seconds=60.0)
    loop.start()
    try:
        wait_until(lambda: len(rounds) >= 3, 5, "three rounds")
        assert rounds[2] - rounds[0] < 1.0  # not a poll apart
        time.sleep(0.2)
        assert len(rounds) == 3  # then idle until woken
        loop.wake()
        wait_until(lambda: len(rounds) == 4, 5, "woken")
    finally:
        loop.stop()
        loop.join(5)


def test_claim_is_one_statement_and_next_due_sees_retries_and_leases(migrated_engine):
    eng = migrated_engine
    rows = []
    for i in range(3):
        rows.append(queue.enqueue(
            eng, sop_instance_uid=f"1.2.3.{i}", sop_class_uid="1.2", study_instance_uid="1.2.9",
            series_instance_uid="1.2.8", accession_number="", calling_ae_title="M",
            spool_path=f"/x/{i}.dcm", transfer_syntax_uid="1.2.840.10008.1.2.1")[0])
    assert queue.next_due(eng) is None  # all due now
    counted = Statements(eng)
    start = len(counted.seen)
    job = queue.claim(eng, "process", "me", 30.0)
    assert job is not None and job.id == rows[0] and job.sop_instance_uid == "1.2.3.0"
    assert [s for s in counted.since(start) if s not in ("BEGIN", "COMMIT")] == ["UPDATE"]
    # the lease's end is when it becomes due again (a worker that died)
    due = queue.next_due(eng)
    assert due is not None and 29 < (due - utcnow()).total_seconds() <= 30
    later = utcnow() + dt.timedelta(seconds=5)
    with Session(eng) as s, s.begin():
        s.execute(update(Instance).where(Instance.id.in_(rows[1:])).values(
            next_attempt_at=later))
    due = queue.next_due(eng)
    assert due is not None and abs((due - later).total_seconds()) < 0.01
    assert queue.claim(eng, "process", "other", 30.0) is None  # leased, or not due yet


def test_jobs_roles_and_workers_settings_are_checked() -> None:
    assert job_roles(Settings()) == {"receive", "process", "send"}
    assert job_roles(Settings(jobs=JobSettings(role="process, send"))) == {"process", "send"}
    for bad in (",", "score", "all,send", "receive,,bogus"):
        with pytest.raises(ConfigError, match=r"jobs\.role"):
            load_settings(None, environ={"CXR_WORKER__JOBS__ROLE": bad})
    with pytest.raises(ConfigError, match=r"jobs\.workers"):
        load_settings(None, environ={"CXR_WORKER__JOBS__WORKERS": "-1"})
    assert load_settings(None, environ={"CXR_WORKER__JOBS__WORKERS": "3"}).jobs.workers == 3


def test_worker_processes_score_and_one_killed_while_idle_costs_no_attempt(
        engine: Engine, tmp_path: Path) -> None:
    settings = Settings(storage=Storage(data_dir=str(tmp_path / "data")))
    scorer = Scorer()
    pipeline = compose.build_pipeline(settings, scorer, engine, workers=2)
    here = compose.build_pipeline(settings, scorer, engine)  # the same, in this process
    assert pipeline.workers is not None and here.workers is None
    try:
        pipeline.workers.start()
        children = multiprocessing.active_children()
        assert len(children) >= 2
        # the same image: the same score in a worker process as in this one
        a = receive(engine, pipeline.spool, "in-a-worker")
        assert pipeline.process_next()
        b = receive(engine, here.spool, "here")
        assert here.process_next()
        ra, rb = _row(engine, a), _row(engine, b)
        assert ra.status == rb.status == "scored"
        assert ra.probability == pytest.approx(rb.probability, abs=1e-6)
        assert Path(ra.result_path).is_file()

        os.kill(children[0].pid, signal.SIGKILL)  # a worker process dies while idle
        children[0].join(10)
        c = receive(engine, pipeline.spool, "after-a-death")
        assert pipeline.process_next()
        rc = _row(engine, c)
        assert (rc.status, rc.attempts) == ("scored", 0)
    finally:
        pipeline.workers.shutdown()


def _alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def test_the_worker_processes_end_with_the_service_even_after_kill_9(make_worker) -> None:
    worker = make_worker(None, **{"CXR_WORKER__JOBS__WORKERS": "2"})
    assert worker.proc is not None
    assert "2 worker process(es)" in worker.text()
    children = attacks.children(worker.proc.pid)
    assert len(children) >= 2  # the worker processes (and multiprocessing's tracker)
    os.kill(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait(10)
    wait_until(lambda: not any(_alive(p) for p in children), 5,
               "the worker processes to end with the service")
