"""The orphan sweep (issue 10): temporary files left by a kill -9, and spooled images or results
no worklist row refers to, are removed once older than the grace period; nothing a row refers
to, and nothing younger, ever is. Real files, a real worklist (SQLite and the PostgreSQL at
127.0.0.1:5432), and ``cxr-worker serve`` running the sweep at start-up."""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path
from typing import BinaryIO

import pytest
from conftest import wait_until
from sqlalchemy import Engine

from cxr_worker.jobs import sweep_orphans
from cxr_worker.spool import Spool, atomic_write
from cxr_worker.worklist import queue

GRACE = 3600.0
OLD = 2 * 3600.0  # seconds before now: older than the grace period
YOUNG = 60.0


@pytest.fixture
def engine(migrated_engine: Engine) -> Engine:
    return migrated_engine


def uid() -> str:
    return f"1.2.826.0.1.3680043.10.1187.{uuid.uuid4().int % 10**20}"


def write(path: Path, age: float, data: bytes = b"DICM") -> Path:
    """A file at ``path`` last modified ``age`` seconds ago."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    t = time.time() - age
    os.utime(path, (t, t))
    return path


def add_row(engine: Engine, spool_path: Path, result_path: Path | None = None) -> None:
    sop = spool_path.stem
    queue.enqueue(engine, sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                  study_instance_uid=spool_path.parent.name, series_instance_uid=uid(),
                  accession_number="A1", calling_ae_title="MOD",
                  transfer_syntax_uid="1.2.840.10008.1.2.1", spool_path=str(spool_path))
    if result_path is not None:
        from sqlalchemy import text
        with engine.begin() as c:
            c.execute(text("UPDATE instances SET result_path = :r WHERE sop_instance_uid = :u"),
                      {"r": str(result_path), "u": sop})


def test_sweep_removes_old_orphans_and_nothing_else(engine: Engine, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    spool = Spool(tmp_path / "data")
    study = uid()

    # referenced by a row: kept however old (the image and its result)
    held = write(spool.image_path(study, uid()), OLD)
    held_result = write(spool.result_path(study, held.stem), OLD)
    add_row(engine, held, held_result)
    # a row whose paths name another data_dir (moved): its files are still its files
    moved = write(spool.image_path(study, uid()), OLD)
    moved_result = write(spool.result_path(study, moved.stem), OLD)
    add_row(engine, Path("/elsewhere/spool") / study / moved.name,
            Path("/elsewhere/results") / study / moved_result.name)
    # no row: the database refused the store after the file was written
    orphan = write(spool.image_path(uid(), uid()), OLD)
    orphan_result = write(spool.result_path(study, uid()), OLD)
    # no row yet, but young: a store in progress (the row comes after the file)
    storing = write(spool.image_path(study, uid()), YOUNG)
    # temporary files: old ones are writes that died with their process (kill -9)
    dead_tmps = [write(d / study / f".{uid()}.dcm.4242.1.abcdef.tmp", OLD)
                 for d in (spool.spool_dir, spool.results_dir)]
    dead_tmps.append(write(spool.quarantine_dir / ".x.dcm.4242.1.abcdef.tmp", OLD))
    writing_tmp = write(spool.spool_dir / study / f".{uid()}.dcm.4242.2.abcdef.tmp", YOUNG)
    # the operator's, or not laid out by the spool: never touched
    quarantined = write(spool.quarantine_dir / f"{uid()}.dcm", OLD)
    foreign = [write(spool.spool_dir / "README.txt", OLD),
               write(spool.spool_dir / f"{uid()}.dcm", OLD),
               write(spool.spool_dir / study / "notes.txt", OLD)]

    with caplog.at_level(logging.INFO, logger="cxr_worker.jobs"):
        counts = sweep_orphans(engine, spool, GRACE)

    assert counts == {"temporary": 3, "spool": 1, "results": 1}
    for gone in (orphan, orphan_result, *dead_tmps):
        assert not gone.exists(), gone
    for kept in (held, held_result, moved, moved_result, storing, writing_tmp, quarantined,
                 *foreign):
        assert kept.exists(), kept
    assert [r.getMessage() for r in caplog.records] == [
        "orphan sweep: removed 3 temporary files, 1 spooled images and 1 results no worklist "
        "row refers to (older than 3600 s)"]
    # a second sweep finds nothing
    assert sweep_orphans(engine, spool, GRACE) == {"temporary": 0, "spool": 0, "results": 0}


def test_a_file_replaced_or_claimed_during_the_sweep_is_kept(engine: Engine,
                                                             tmp_path: Path) -> None:
    """The sweep renames an orphan aside before it looks again: a store that lands meanwhile
    (the file replaced, or a row inserted) wins."""
    spool = Spool(tmp_path / "data")
    cutoff = time.time() - GRACE

    # a row appears while the file is aside: put back as it was
    claimed = write(spool.image_path(uid(), uid()), OLD, b"first store")
    assert not spool.remove_if_orphan(claimed, cutoff, lambda: False)
    assert claimed.read_bytes() == b"first store"
    assert os.stat(claimed).st_mtime < cutoff
    assert [p.name for p in claimed.parent.iterdir()] == [claimed.name]

    # a modality re-sends the image while the old file is aside: the new one stays
    resent = write(spool.image_path(uid(), uid()), OLD, b"old orphan")

    def store_lands() -> bool:
        def data(f: BinaryIO) -> None:
            f.write(b"new store")

        atomic_write(resent, data)
        return True

    assert spool.remove_if_orphan(resent, cutoff, store_lands)
    assert resent.read_bytes() == b"new store"
    assert [p.name for p in resent.parent.iterdir()] == [resent.name]

    # replaced just before the sweep looked: young, never renamed
    fresh = write(spool.image_path(uid(), uid()), YOUNG)
    assert not spool.remove_if_orphan(fresh, cutoff, lambda: True)
    assert fresh.exists()


def test_the_sweep_asks_the_worklist_again_before_removing(engine: Engine,
                                                           tmp_path: Path) -> None:
    """A row inserted after the sweep listed the referenced files still protects its file."""
    spool = Spool(tmp_path / "data")
    late = write(spool.image_path(uid(), uid()), OLD)
    cutoff = time.time() - GRACE
    [(key, path)] = list(spool.stored_files(spool.spool_dir, cutoff))
    assert path == late
    add_row(engine, late)  # after the listing, before the removal

    from cxr_worker.jobs import _unreferenced

    assert not spool.remove_if_orphan(late, cutoff, _unreferenced(engine, "spool_path", key))
    assert late.exists()

    # a worklist that does not answer: nothing is removed, the file is put back
    from sqlalchemy.exc import OperationalError

    gone_db = queue.make_engine(f"sqlite:///{tmp_path / 'no-such-folder' / 'w.db'}")
    orphan = write(spool.image_path(uid(), uid()), OLD, b"kept")
    with pytest.raises(OperationalError):
        spool.remove_if_orphan(orphan, cutoff, _unreferenced(gone_db, "spool_path", "x/y.dcm"))
    gone_db.dispose()
    assert orphan.read_bytes() == b"kept"
    assert [p.name for p in orphan.parent.iterdir()] == [orphan.name]


@pytest.mark.slow
def test_serve_sweeps_at_start_up(make_worker, make_images) -> None:  # type: ignore[no-untyped-def]
    """``serve`` runs the sweep when it starts (after a crash) and then every
    ``jobs.retention_interval_seconds``; logged with the counts."""
    from conftest import storescu

    worker = make_worker(start=False, CXR_WORKER__JOBS__ORPHAN_GRACE_SECONDS="60")
    spool = Spool(worker.data_dir)
    tmp = write(spool.spool_dir / "1.2.3" / ".1.2.3.4.dcm.999.1.abcdef.tmp", OLD)
    orphan = write(spool.image_path("1.2.3", "1.2.3.5"), OLD)
    worker.start()
    wait_until(lambda: "orphan sweep: removed 1 temporary files, 1 spooled images and 0 "
               "results" in worker.text(), 30, "the sweep at start-up, logged")
    assert not tmp.exists() and not orphan.exists()
    # what it receives afterwards is kept, and scored
    storescu(worker.port, *make_images(1, prefix="after-sweep"))
    wait_until(lambda: [r["status"] for r in worker.worklist()] == ["scored"], 60, "scored")
    assert len(list(spool.spool_dir.rglob("*.dcm"))) == 1
    assert worker.stop() == 0
