"""The service's job loops (cxr_worker.jobs): scoring and delivery apart, and a stop that
never waits longer than it is given, losing nothing. In process, with the real model, a real
SQLite worklist and spool."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import spool_and_enqueue
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from cxr_worker import compose, decode
from cxr_worker.jobs import Jobs
from cxr_worker.score import Scorer
from cxr_worker.settings import Settings, Storage
from cxr_worker.spool import Spool
from cxr_worker.worklist import queue
from cxr_worker.worklist.models import Instance

pytestmark = pytest.mark.slow


@pytest.fixture
def engine(sqlite_worklist: Engine) -> Engine:
    return sqlite_worklist


def receive(engine: Engine, spool: Spool, seed: str) -> str:
    """What the C-STORE handler does with an image: the file, then the row."""
    return spool_and_enqueue(engine, spool, seed)


def test_stop_does_not_wait_for_a_long_decode_and_the_image_is_scored_at_the_next_start(
        engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    settings = Settings(storage=Storage(data_dir=str(data)))
    scorer = Scorer()
    first = compose.build_pipeline(settings, scorer, engine)
    sop = receive(engine, first.spool, "long-decode")

    # a decode that takes long (a huge image): the real one, after a wait the test controls
    decoding, finish = threading.Event(), threading.Event()
    real = decode.display_image

    def long_decode(ds: Any, **kwargs: Any) -> Any:
        decoding.set()
        finish.wait(30)
        return real(ds, **kwargs)

    monkeypatch.setattr(decode, "display_image", long_decode)
    jobs = Jobs(first, 0.05, 30.0, 3600.0)
    assert jobs.send is None  # no PACS: no delivery loop
    jobs.start()
    assert decoding.wait(30), "the scoring loop did not start the job"

    t0 = time.monotonic()
    first.stopping.set()
    assert jobs.stop(time.monotonic() + 0.5) is False  # still decoding: not waited for
    assert time.monotonic() - t0 < 1.0
    assert queue.release_leases(engine, first.owner) == 1

    finish.set()  # the decode ends after the shutdown: its result must not count
    jobs.process.thread.join(30)
    with Session(engine) as s:
        row = s.scalars(select(Instance).where(Instance.sop_instance_uid == sop)).one()
        assert (row.status, row.lease_owner) == ("received", None)

    monkeypatch.setattr(decode, "display_image", real)
    second = compose.build_pipeline(settings, scorer, engine)
    assert second.drain() == 1
    with Session(engine) as s:
        row = s.scalars(select(Instance).where(Instance.sop_instance_uid == sop)).one()
        assert row.status == "scored" and row.attempts == 0
    assert len(list((data / "results").rglob("*.dcm"))) == 1
