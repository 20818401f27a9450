"""A hostile sender against ``cxr-worker serve`` (issue 10, "no leaks"): dcmtk's storescu sends
data sets whose values forge log lines, drive the terminal or are invalid (pydicom warns,
quoting them); nothing of it reaches the log raw, and every file the worker writes is
private."""

from __future__ import annotations

import json
import os
import re
import stat
import warnings
from pathlib import Path

import pytest
from conftest import storescu, wait_until
from pydicom import dcmread

pytestmark = pytest.mark.slow

FORGED_TIME = "2026-01-01 00:00:00,000"
FORGED = f"\n{FORGED_TIME} INFO cxr_worker.pipeline: sent result FAKE"
# no caret: highdicom warns that it is "potentially invalid", quoting it
NAME = "Hostile Yamada\n山田 太郎"
BIRTH_DATE = "19800230x"  # invalid DA: pydicom warns, quoting it
ACCESSION = "\x1b[2JACC1"  # clears the screen of whoever reads the worklist
RECORD_START = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def _edit(path: Path, **values: str | None) -> Path:
    """Rewrite the DICOM file with these values (None: element removed), invalid ones too."""
    with warnings.catch_warnings():  # pydicom warns about every invalid value written
        warnings.simplefilter("ignore")
        ds = dcmread(path)
        for keyword, value in values.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=True)
    return path


def test_hostile_values_leave_no_trace_in_the_log_and_no_escape_on_the_terminal(
        make_worker, make_images):
    worker = make_worker()
    scored, refused = make_images(2, prefix="hostile")
    # no Patient Age: the gate reads the invalid birth date, and pydicom warns quoting it
    _edit(scored, PatientName=NAME, PatientBirthDate=BIRTH_DATE, PatientAge=None,
          AccessionNumber=ACCESSION)
    # the gate refuses it and its reason quotes the value: the forged line
    _edit(refused, BodyPartExamined=f"X{FORGED}", PatientName=NAME)
    storescu(worker.port, scored, refused)
    rows = wait_until(
        lambda: (r := worker.worklist()) and sorted(x["status"] for x in r) == [
            "not_scored", "scored"] and r, 60, "one image scored, the forged one refused")

    log = worker.text()
    lines = log.splitlines()
    # the refusal is logged, the forged newline escaped: one record, one line
    assert f"\\x0a{FORGED_TIME} INFO CXR_WORKER.PIPELINE" in log, log[-3000:]
    assert not [x for x in lines if x.startswith(FORGED_TIME)], "a forged log line"
    for line in lines:
        assert RECORD_START.match(line) or line.startswith("cxr-worker ready: "), \
            f"a line that is not a record: {line!r}"
    # no trace of the patient: name (either line of it), birth date; no control character
    for value in ("Hostile", "Yamada", "山田", BIRTH_DATE, "19800230"):
        assert value not in log, f"patient data {value!r} in the worker log"
    assert "\x1b" not in log

    # the stored reason is escaped already; JSON output escapes ESC as \u001b
    refusal = next(r for r in rows if r["status"] == "not_scored")
    assert "body_part" in refusal["reason"] and "\\x0a" in refusal["reason"]
    assert "\n" not in refusal["reason"]
    listed = worker.cli("worklist", "--json").stdout
    assert "\\u001b[2JACC1" in listed and "\x1b" not in listed
    assert json.loads(listed.splitlines()[0])  # still JSON lines
    # the text worklist shows the accession's ESC as \x1b, never sends it to the terminal
    text = worker.cli("worklist").stdout
    assert "\\x1b[2JACC1" in text and "\x1b" not in text
    assert f"\\x0a{FORGED_TIME}" in text
    assert len(text.splitlines()) == 3  # header + two studies: no forged row
    assert worker.stop() == 0
    assert "19800230" not in worker.text() and "Yamada" not in worker.text()


def _private(path: Path) -> str | None:
    """None when only the owner may read it (files 0600 or stricter, folders 0700), else why."""
    mode = stat.S_IMODE(path.lstat().st_mode)
    if mode & 0o077:
        return f"{path} is mode {mode:04o}"
    return None


def test_every_file_and_folder_the_worker_writes_is_private(make_worker, make_images):
    worker = make_worker(start=False)
    worker.data_dir.rmdir()  # the worker creates data_dir itself
    good = make_images(1, prefix="private")[0]
    broken = make_images(1, prefix="broken", offset=1)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(broken)
        ds.PixelData = ds.PixelData[:1000]  # decodes to nothing: quarantined
        ds.save_as(broken, enforce_file_format=True)
    old = os.umask(0)  # the most permissive caller: the worker must not rely on ours
    try:
        worker.start()
    finally:
        os.umask(old)
    storescu(worker.port, good, broken)
    wait_until(lambda: sorted(r["status"] for r in worker.worklist()) == [
        "not_scored", "scored"], 60, "the image scored and the broken one quarantined")

    def check() -> list[Path]:
        paths = [worker.data_dir, *worker.data_dir.rglob("*")]
        bad = [why for p in paths if (why := _private(p))]
        assert not bad, "\n".join(bad)
        return paths

    paths = check()  # while it runs: the SQLite -wal and -shm exist now
    names = {p.name for p in paths}
    assert {"worklist.db", "worklist.db-wal", "worklist.db-shm"} <= names, sorted(names)
    kinds = {p.relative_to(worker.data_dir).parts[0] for p in paths if p.is_file()}
    assert {"results", "quarantine"} <= kinds, sorted(kinds)
    assert len([p for p in paths if p.suffix == ".dcm"]) >= 3  # spooled, result, quarantined
    assert worker.stop() == 0
    check()
