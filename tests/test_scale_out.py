"""Scale-out (issue 12): three ``cxr-worker serve`` processes with different roles on one
PostgreSQL worklist and one ``data_dir``, dcmtk's storescp as the PACS, and a ``kill -9`` of the
scoring process in the middle of a burst.

- A: ``--role receive`` (the listener; dcmtk's storescu sends the burst to it);
- B: ``--role process`` (one worker process);
- C: ``--role process,send`` (one worker process, and the deliveries).

B is killed (SIGKILL) the moment it holds a lease on an image. Every image storescu had
acknowledged must reach the PACS exactly once (storescp keeps every object it receives as a
file of its own, ``+uf``, so a result delivered twice shows as two files), the image B held
included: C takes it over when B's lease ends (5 s here), not later.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from conftest import Worker, free_port, postgres_schema, storescu, wait_until, worker_env
from hostile.attacks import StoreSCP
from pydicom import dcmread
from sqlalchemy import create_engine, text

N_IMAGES = 24
LEASE_SECONDS = 5.0


def _worker(tmp_path: Path, data_dir: Path, url: str, role: str, pacs: StoreSCP,
            **extra: str) -> Worker:
    port = free_port()
    env = worker_env(data_dir, port, None, **{
        "CXR_WORKER__DATABASE__URL": url, "CXR_WORKER__JOBS__ROLE": role,
        "CXR_WORKER__JOBS__WORKERS": "1",
        "CXR_WORKER__JOBS__LEASE_SECONDS": str(LEASE_SECONDS), **pacs.env(10.0), **extra})
    w = Worker(data_dir, port, env)
    w.log = tmp_path / f"worker-{role.replace(',', '+')}.log"
    return w


def _rows(url: str) -> list[Any]:
    eng = create_engine(url)
    try:
        with eng.connect() as c:
            return list(c.execute(text(
                "SELECT sop_instance_uid, status, lease_owner, result_sop_instance_uid "
                "FROM instances")))
    finally:
        eng.dispose()


def test_three_roles_on_postgresql_survive_a_kill_9_of_the_scorer(tmp_path, make_images):
    files = make_images(N_IMAGES, shape=(1200, 1000))
    sources = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    pacs = StoreSCP(tmp_path / "pacs")
    pacs.start()
    data_dir = tmp_path / "shared-data"
    data_dir.mkdir()
    with postgres_schema() as url:
        receiver = _worker(tmp_path, data_dir, url, "receive", pacs)
        scorer = _worker(tmp_path, data_dir, url, "process", pacs)
        sender = _worker(tmp_path, data_dir, url, "process,send", pacs)
        started: list[Worker] = []
        try:
            for w in (receiver, scorer, sender):
                w.start()
                started.append(w)
            assert "not listening (no receive role)" in scorer.text()
            assert scorer.proc is not None
            owner = f":{scorer.proc.pid}:"
            rc = storescu(receiver.port, *files, check=False)
            assert rc.returncode == 0, rc.stderr  # every image acknowledged

            def scorer_holds_a_lease() -> bool:
                return any(r.lease_owner and owner in r.lease_owner for r in _rows(url))

            wait_until(scorer_holds_a_lease, 60, "the scoring process to lease an image",
                       interval=0.01)
            os.kill(scorer.proc.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            held = [r.sop_instance_uid for r in _rows(url)
                    if r.lease_owner and owner in r.lease_owner]
            scorer.proc.wait(10)
            assert held, "killed while holding a lease"

            def held_sent() -> bool:
                return all(r.status == "sent" for r in _rows(url) if r.sop_instance_uid in held)

            wait_until(held_sent, 60, "the killed process's image taken over", interval=0.05)
            # taken over when the lease ended (C sleeps until then: the lease's end is in
            # the worklist), not at some later poll
            taken_over = time.monotonic() - killed_at
            assert taken_over < LEASE_SECONDS + 5, taken_over

            def all_sent() -> bool:
                rows = _rows(url)
                return len(rows) == N_IMAGES and all(r.status == "sent" for r in rows)

            wait_until(all_sent, 120, "every image scored and delivered")
            rows = _rows(url)
            assert {r.sop_instance_uid for r in rows} == sources
            assert all(r.lease_owner is None for r in rows)
            expected = {r.result_sop_instance_uid for r in rows}
            time.sleep(1.0)  # a duplicate delivery in flight would land by now
            received = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                        for p in pacs.received()]
            assert sorted(received) == sorted(expected), "each result exactly once"
            for sop in held:  # the image in progress at the kill was delivered once too
                row = next(r for r in rows if r.sop_instance_uid == sop)
                assert received.count(row.result_sop_instance_uid) == 1
            # the roles did what they were given: B and C scored, only C sent, A received
            assert "scored " in sender.text()
            assert "sent sc " in sender.text() and "sent sc " not in receiver.text()
            assert "scored " not in receiver.text()
        finally:
            for w in started:
                w.stop(signal.SIGTERM, 20)
            pacs.stop()
