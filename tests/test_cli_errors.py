"""Failures a user can cause: one line on stderr naming the key, path, port or URL and what to
do, with the documented exit code (run as a user would, in a subprocess); help and JSON logs."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import CLI, SAMPLES, free_port
from conftest import run_cli as run

DICOM = SAMPLES / "cr_pa_normal_12bit.dcm"




def one_line(res) -> str:
    """The stderr of a failed command: exactly one line, no traceback."""
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    return lines[0]


def error_line(res) -> str:
    """The one error line of a command that logged its start-up (``serve``) before failing:
    the last line; every other line is a log record."""
    *logged, last = res.stderr.splitlines()
    assert "Traceback" not in res.stderr
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|WARNING) ", x)
               for x in logged), res.stderr
    return last




# -- storage.data_dir ---------------------------------------------------------------------
@pytest.mark.parametrize("command", [("db", "upgrade"), ("serve",)])
def test_uncreatable_data_dir_names_the_key(env, tmp_path, command):
    afile = tmp_path / "afile"
    afile.write_text("a file, not a folder")  # a folder under a file fails even for root
    bad = {**env, "CXR_WORKER__STORAGE__DATA_DIR": str(afile / "sub")}
    line = one_line(run(bad, *command, rc=2))
    assert f"storage.data_dir {afile / 'sub'}: cannot create or write it" in line


def test_worklist_never_creates_the_data_dir_and_names_where_it_looked(env, tmp_path):
    """``worklist`` only reads: with no worklist where the settings point, it creates nothing
    and names the database path, the settings read and storage.data_dir."""
    data = tmp_path / "elsewhere"
    line = one_line(run({**env, "CXR_WORKER__STORAGE__DATA_DIR": str(data)}, "worklist", rc=2))
    assert f"no worklist database at {data / 'worklist.db'}" in line
    assert f"storage.data_dir {data}" in line and "no settings file read" in line
    assert not data.exists()


# -- listener.port -------------------------------------------------------------------------
def test_listener_port_in_use(env):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = run({**env, "CXR_WORKER__LISTENER__PORT": str(port)}, "serve", rc=2)
    assert f"listener.port {port} on 127.0.0.1 is in use" in error_line(res)


# -- database.url ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgres://cxr:secret@127.0.0.1/cxr", "no dialect for postgres://"),
        ("postgresql+pg8000://cxr:secret@127.0.0.1/cxr", "driver module 'pg8000'"),
        ("not a url", "not a database URL"),
    ],
)
def test_database_url_scheme_or_driver(env, url, expected):
    line = one_line(run({**env, "CXR_WORKER__DATABASE__URL": url}, "worklist", rc=2))
    assert "database.url" in line and expected in line
    assert "postgresql+psycopg://" in line and "pip install 'cxr-worker[postgres]'" in line
    assert "secret" not in line


def test_unreachable_database_masks_the_password(env):
    url = f"postgresql+psycopg://cxr:secret@127.0.0.1:{free_port()}/cxr"
    # exit 1, not 2: the server may come up later, and systemd restarts on 1 (not on 2)
    line = one_line(run({**env, "CXR_WORKER__DATABASE__URL": url}, "db", "current", rc=1))
    assert "database.url postgresql+psycopg://cxr:***@127.0.0.1:" in line
    assert "cannot connect" in line and "secret" not in line


# -- model.path ---------------------------------------------------------------------------
def _corrupt_model(tmp_path: Path) -> Path:
    """A model folder whose .tflite is garbage but whose card has the garbage's sha256."""
    from cxr_worker.model import card as model_card
    from cxr_worker.score import SHIPPED_MODEL_DIR

    folder = tmp_path / "model"
    shutil.copytree(SHIPPED_MODEL_DIR, folder)
    card = json.loads((folder / model_card.CARD_FILE).read_text())
    name = str(model_card.members(card)[0]["tflite"])
    (folder / name).write_bytes(b"not a flatbuffer" * 64)
    card["files"][name]["sha256"] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    (folder / model_card.CARD_FILE).write_text(json.dumps(card))
    return folder


@pytest.mark.parametrize("case", ["file", "no_card", "corrupt"])
def test_unusable_model_path(env, tmp_path, case):
    from cxr_worker.score import SHIPPED_MODEL_DIR

    if case == "file":
        path, expected = SHIPPED_MODEL_DIR / "model_card.json", "is a file, not the model folder"
    elif case == "no_card":
        path, expected = tmp_path, "no model_card.json in this folder"
    else:
        path, expected = _corrupt_model(tmp_path), ".tflite cannot be loaded"
    res = run({**env, "CXR_WORKER__MODEL__PATH": str(path)}, "score", str(DICOM), rc=2)
    line = one_line(res)
    assert f"model.path {path}" in line and expected in line


# -- inputs of replay and score ----------------------------------------------------------------
def test_missing_input_is_a_usage_error(env):
    line = one_line(run(env, "replay", "/nonexistent.dcm", rc=2))
    assert line.endswith("replay: /nonexistent.dcm: no such file or folder")
    line = one_line(run(env, "score", str(DICOM), "/nonexistent.dcm", rc=2))
    assert line.endswith("score: /nonexistent.dcm: no such file or folder")


@pytest.fixture
def mixed_folder(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(DICOM, folder / "image")  # DICOM by its preamble, whatever its name
    (folder / "README.md").write_text("# notes\n")
    (folder / "x.py").write_text("print()\n")
    return folder


def test_replay_folder_takes_dicom_only_and_reports_the_rest_once(env, mixed_folder):
    res = run(env, "replay", str(mixed_folder), "--json")
    (row,) = [json.loads(x) for x in res.stdout.splitlines()]
    assert row["status"] == "scored"
    skipped = [x for x in res.stderr.splitlines() if "skipped" in x]
    assert skipped == ["skipped 2 files that are not DICOM: README.md, x.py"], res.stderr
    assert "\r" not in res.stderr and "image/s" not in res.stderr  # no progress bar: no TTY


def test_score_folder_and_a_named_non_dicom_file(env, mixed_folder):
    res = run(env, "score", str(mixed_folder))
    assert res.stdout.count("\n") == 1 and "image:" in res.stdout
    assert one_line(res) == "skipped 2 files that are not DICOM, PNG or JPEG: README.md, x.py"
    notes = mixed_folder / "notes.txt"
    notes.write_text("not an image")
    res = run(env, "score", str(notes), rc=1)
    assert one_line(res) == f"{notes}: not a DICOM file (no DICM preamble) nor PNG/JPEG"
    assert "force=True" not in res.stderr + res.stdout
    row = json.loads(run(env, "score", "--json", str(notes), rc=1).stdout)
    assert not row["scored"] and "no DICM preamble" in row["reason"]


def test_debug_adds_the_traceback(env):
    res = run(env, "--log-level", "DEBUG", "replay", "/nonexistent.dcm", rc=2)
    assert "Traceback" in res.stderr
    assert res.stderr.rstrip().splitlines()[-1].endswith("/nonexistent.dcm: no such file or "
                                                          "folder")


# -- help ---------------------------------------------------------------------------------
def test_help_shows_defaults_environment_and_exit_codes(env):
    top = run(env, "--help").stdout
    for text in ("CXR_WORKER_CONFIG", "CXR_WORKER__<SECTION>__<KEY>", "exit codes:",
                 "0  success", "1  the command ran but something failed", "2  usage or "
                 "configuration errors", "(default: INFO)"):
        assert text in top, text
    assert "(default: 50)" in run(env, "worklist", "--help").stdout
    assert "(default: head)" in run(env, "db", "upgrade", "--help").stdout
    train = run(env, "train", "--help").stdout
    assert "(default: 32)" in train and "(default: 0)" in train  # --batch-size, --seed
    for cmd in ("serve", "score", "replay", "evaluate", "calibrate", "stats"):
        assert "(default: INFO)" in run(env, cmd, "--help").stdout, cmd


# -- JSON logs ------------------------------------------------------------------------------
def test_serve_with_json_logs_prints_only_json_lines(env, tmp_path):
    env = {**env, "CXR_WORKER__LOGGING__FORMAT": "json"}
    with open(tmp_path / "stderr", "w+") as err:
        proc = subprocess.Popen([*CLI, "--log-level", "DEBUG", "serve"], env=env,
                                stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            assert proc.stdout is not None
            ready = proc.stdout.readline()  # "cxr-worker ready: ..." once listening
            assert ready.startswith("cxr-worker ready"), ready
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        err.seek(0)
        stderr = err.read()
    assert proc.returncode == 0, stderr
    records = [json.loads(line) for line in stderr.splitlines()]  # each line is JSON
    assert records and all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    loggers = {r["logger"] for r in records}
    assert "cxr_worker.service" in loggers
    assert any(not name.startswith("cxr_worker") for name in loggers)  # third-party, same form
    # LiteRT's C++ banner comes through logging, not straight to fd 2
    assert any("XNNPACK" in r["message"] and r["level"] == "DEBUG" for r in records)


def test_json_error_line_and_no_litert_banner_in_text_mode(env):
    res = run({**env, "CXR_WORKER__LOGGING__FORMAT": "json"}, "replay", "/nonexistent.dcm",
              rc=2)
    record = json.loads(one_line(res))
    assert record["level"] == "ERROR" and "/nonexistent.dcm" in record["message"]
    debug = run({**env, "CXR_WORKER__LOGGING__FORMAT": "json"}, "--log-level", "DEBUG",
                "replay", "/nonexistent.dcm", rc=2)
    records = [json.loads(line) for line in debug.stderr.splitlines()]
    assert any("Traceback" in r.get("exception", "") for r in records)
    assert "XNNPACK" not in run(env, "score", str(DICOM)).stderr
