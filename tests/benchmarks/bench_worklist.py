"""The triage list query at scale: p50/p95 of the first page and of a later cursor page.

Prints figures; asserts nothing (goal: first page p95 <= 50 ms). Fills a throwaway schema on
the PostgreSQL at 127.0.0.1:5432 (``conftest.postgres_schema``; dropped afterwards) with
``--instances`` rows (default 100,000) in about ``--studies`` studies (default 30,000: one to
six images each), as a year of a site might leave them: most sent, some suspected, refused,
outside the validated population, pending, retrying, failed; none marked read (the active
list is then the whole year: the worst case). Then times ``studies.list_studies`` (the
statement ``GET /api/v1/studies`` and ``cxr-worker worklist`` run) from a warm connection
pool, ``--runs`` times each:

- the first page (limit 50, the active list);
- a later page: the page reached after following ``next`` ``--pages`` times (default 200,
  i.e. studies 10,001-10,050);
- for information: the ``outside`` band alone, ``since`` the last 24 hours, and the first
  page computed by aggregating every image at read time (what ``study_summary`` replaces).

    python tests/benchmarks/bench_worklist.py [--instances 100000] [--studies 30000] [--runs 100]
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from conftest import postgres_schema  # noqa: E402


def _rows(n_instances: int, n_studies: int, seed: int = 0) -> list[dict[str, object]]:
    from cxr_worker.labels import Label, Population
    from cxr_worker.worklist.models import Status

    rnd = random.Random(seed)
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=365)
    per_study = max(1, round(n_instances / n_studies))
    rows: list[dict[str, object]] = []
    study = 0
    while len(rows) < n_instances:
        study += 1
        k = min(rnd.randint(1, 2 * per_study - 1), n_instances - len(rows))
        when = start + dt.timedelta(seconds=365 * 86400 * len(rows) / n_instances)
        pop = rnd.choices([Population.IN, Population.OUTSIDE, Population.UNKNOWN],
                          [0.7, 0.2, 0.1])[0]
        for j in range(k):
            r = rnd.random()
            p = rnd.random()
            scored = r < 0.93
            status = (Status.SENT if r < 0.9 else Status.SCORED if r < 0.92 else
                      Status.HELD if r < 0.93 else Status.NOT_SCORED if r < 0.97 else
                      Status.RECEIVED if r < 0.99 else Status.FAILED)
            rows.append({
                "sop_instance_uid": f"1.2.826.0.1.9.{study}.{j}",
                "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1",
                "study_instance_uid": f"1.2.826.0.1.8.{study}",
                "series_instance_uid": f"1.2.826.0.1.7.{study}",
                "accession_number": f"A{study:08d}", "calling_ae_title": "CR1",
                "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                "spool_path": f"/var/lib/cxr-worker/spool/{study}/{j}.dcm",
                "status": str(status),
                "reason": (None if scored and status != Status.SCORED else
                           "out of scope (view_position): View Position LL (lateral)"
                           if status == Status.NOT_SCORED else
                           "retrying (2/10): association rejected" if status == Status.SCORED
                           else "processing failed 10 times: boom"
                           if status == Status.FAILED else None),
                "attempts": 1, "send_attempts": 2 if status == Status.SCORED else 0,
                "next_attempt_at": when, "probability": p if scored else None,
                "label": (Label.SUSPECTED if p >= 0.6 else Label.NEGATIVE) if scored else None,
                "threshold": 0.6 if scored else None,
                "model_version": "mobilenetv2-kermany-v3" if scored else None,
                "population": str(pop if status != Status.RECEIVED else Population.UNKNOWN),
                "received_at": when + dt.timedelta(seconds=j),
                "scored_at": when + dt.timedelta(seconds=j + 2) if scored else None,
                "sent_at": when + dt.timedelta(seconds=j + 3) if status == Status.SENT else None,
            })
    return rows


def _timed(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    fn()  # warm (plan cache, buffers)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return statistics.median(times), times[max(0, round(0.95 * len(times)) - 1)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=100_000)
    ap.add_argument("--studies", type=int, default=30_000)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--pages", type=int, default=200)
    args = ap.parse_args()

    from sqlalchemy import insert, text

    from cxr_worker.worklist import queue, schema, studies
    from cxr_worker.worklist.models import Instance

    with postgres_schema("cxr_bench") as url:
        engine = queue.make_engine(url)
        schema.upgrade(engine)
        rows = _rows(args.instances, args.studies)
        t0 = time.perf_counter()
        for i in range(0, len(rows), 5000):
            with engine.begin() as c:
                c.execute(insert(Instance), rows[i : i + 5000])
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            # what autovacuum does on a live database: the planner's statistics
            c.execute(text("VACUUM ANALYZE instances"))
            c.execute(text("VACUUM ANALYZE study_summary"))
            n_studies = c.execute(text(
                "SELECT count(DISTINCT study_instance_uid) FROM instances")).scalar_one()
            server = c.execute(text("SHOW server_version")).scalar_one()
        print(f"PostgreSQL {server}: {len(rows):,} instances in {n_studies:,} studies "
              f"(inserted in {time.perf_counter() - t0:.0f} s)")

        cursor = None
        for _ in range(args.pages):
            cursor = studies.list_studies(engine, limit=50, cursor=cursor).next
        assert cursor is not None, "fewer studies than --pages pages"
        first = studies.list_studies(engine, limit=50)
        assert len(first.rows) == 50 and first.next
        cases: list[tuple[str, Callable[[], object]]] = [
            ("first page (limit 50)", lambda: studies.list_studies(engine, limit=50)),
            (f"page {args.pages + 1} (cursor)",
             lambda: studies.list_studies(engine, limit=50, cursor=cursor)),
            ("band=outside, first page",
             lambda: studies.list_studies(engine, studies.Filters(band="outside"), 50)),
            ("since the last 24 h", lambda: studies.list_studies(
                engine, studies.Filters(since=dt.datetime.now(dt.UTC) - dt.timedelta(days=1)),
                50)),
        ]
        for name, fn in cases:
            p50, p95 = _timed(fn, args.runs)
            print(f"{name:<28} p50 {p50:6.1f} ms   p95 {p95:6.1f} ms   ({args.runs} runs)")
        # for comparison: the same first page aggregated from every image at read time (the
        # per-study GROUP BY that study_summary keeps instead; migration 0005 says why)
        aggregate = _migration_0005()
        sql = text(f"SELECT * FROM ({aggregate._SELECT}{aggregate._GROUP}) AS s "
                   "ORDER BY 9, 10, 4, 1 LIMIT 51")

        def read_time() -> object:
            with engine.connect() as c:
                return c.execute(sql).all()

        runs = max(5, args.runs // 10)
        p50, p95 = _timed(read_time, runs)
        print(f"{'(GROUP BY at read time)':<28} p50 {p50:6.1f} ms   p95 {p95:6.1f} ms   "
              f"({runs} runs)")
        engine.dispose()


def _migration_0005() -> Any:
    import importlib.util

    from cxr_worker.worklist.schema import MIGRATIONS

    path = MIGRATIONS / "versions" / "0005_web_worklist.py"
    spec = importlib.util.spec_from_file_location("migration_0005", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    main()
