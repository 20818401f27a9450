"""Installing on a server: the systemd unit, ``cxr-worker doctor`` and the conformance
statement (run as a user would, in a subprocess)."""

from __future__ import annotations

import ast
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CLI, REPO, free_port
from conftest import run_cli as run

UNIT = REPO / "deploy" / "cxr-worker.service"
CONFORMANCE = REPO / "docs" / "conformance.md"






# -- systemd unit ---------------------------------------------------------------------------
def _unit_settings() -> dict[str, str]:
    out = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def test_unit_confines_the_worker():
    u = _unit_settings()
    assert u["User"] == u["Group"] == "cxr-worker"
    assert u["ExecStart"] == ("/opt/cxr-worker/venv/bin/cxr-worker --config "
                              "/etc/cxr-worker/cxr-worker.toml serve")
    assert u["StateDirectory"] == "cxr-worker" and u["WorkingDirectory"] == "/var/lib/cxr-worker"
    assert u["ProtectSystem"] == "strict" and u["ProtectHome"] == "yes"
    assert u["PrivateTmp"] == "yes" and u["NoNewPrivileges"] == "yes"
    assert set(u["RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert u["UMask"] == "0077"
    assert u["Restart"] == "on-failure" and u["KillSignal"] == "SIGTERM"
    # long enough to finish a job whose C-STORE to the PACS runs into every timeout
    assert int(u["TimeoutStopSec"]) >= 10 + 3 * 30


def test_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd; .ci/run "
                    "installs it)")
    exe = Path(sys.executable).with_name("cxr-worker")
    assert exe.is_file(), f"{exe} missing: pip install -e . into this venv first"
    # verify needs ExecStart's program to exist: the same unit, pointing at this venv's
    unit = tmp_path / "cxr-worker.service"
    unit.write_text(UNIT.read_text().replace("/opt/cxr-worker/venv/bin/cxr-worker", str(exe)))
    res = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                         timeout=120, check=False)
    about_unit = [line for line in (res.stdout + res.stderr).splitlines()
                  if "cxr-worker.service" in line]
    assert res.returncode == 0 and not about_unit, res.stdout + res.stderr


# -- conformance --------------------------------------------------------------------------
def test_conformance_statement_is_up_to_date(env):
    out = subprocess.run([*CLI, "conformance"], env=env, capture_output=True, timeout=120,
                         check=True).stdout
    assert out == CONFORMANCE.read_bytes(), (
        "docs/conformance.md differs from what the code negotiates: regenerate it with "
        "`cxr-worker conformance > docs/conformance.md` and review the diff")


def test_conformance_does_not_read_the_site_settings(env):
    site = {**env, "CXR_WORKER__LISTENER__AE_TITLE": "SITE_AE",
            "CXR_WORKER__LISTENER__ACCEPT_DX_FOR_PROCESSING": "true"}
    assert run(site, "conformance").stdout == run(env, "conformance").stdout


def test_every_status_the_listener_returns_is_in_the_statement_table():
    from cxr_worker import receive

    tree = ast.parse(Path(receive.__file__).read_text())
    returned = {node.value.id for node in ast.walk(tree)
                if isinstance(node, ast.Return) and isinstance(node.value, ast.Name)
                and node.value.id.startswith("STATUS_")}
    assert returned >= {"STATUS_SUCCESS", "STATUS_OUT_OF_RESOURCES"}
    assert {getattr(receive, name) for name in returned} <= set(receive.STORE_STATUSES)


# -- doctor -------------------------------------------------------------------------------
def _lines(res: subprocess.CompletedProcess[str]) -> dict[str, str]:
    return {line.split()[1].rstrip(":"): line for line in res.stdout.splitlines()}


def test_doctor_all_ok_with_a_fresh_data_dir(env):
    data_dir = Path(env["CXR_WORKER__STORAGE__DATA_DIR"])
    lines = _lines(run(env, "doctor"))
    assert list(lines) == ["config", "tls", "listener", "database", "data_dir", "model",
                           "pacs"]
    assert all(line.startswith("OK ") for name, line in lines.items()
               if name not in ("tls", "pacs")), lines
    assert lines["tls"].startswith("SKIP tls: not configured")
    assert lines["pacs"].startswith("SKIP pacs: not configured")
    assert "not created yet" in lines["database"]
    assert not data_dir.exists()  # the doctor looks, it does not create
    run(env, "db", "upgrade")
    from cxr_worker.worklist.schema import head_revision

    assert f"at the head revision {head_revision()}" in _lines(run(env, "doctor"))["database"]


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another program listens on; it accepts connections and closes them."""
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    srv.close()
    t.join(5)


def test_doctor_fails_on_a_port_in_use(env, busy_port):
    res = run({**env, "CXR_WORKER__LISTENER__PORT": str(busy_port)}, "doctor", rc=1)
    line = _lines(res)["listener"]
    assert line.startswith("FAIL listener: ") and "in use by another program" in line
    assert "-> stop that program or set [listener] port" in line


def test_doctor_recognises_its_own_running_listener(env):
    from pynetdicom import evt

    from cxr_worker import receive

    port = int(env["CXR_WORKER__LISTENER__PORT"])
    ae = receive.make_ae(receive.ListenerConfig("CXR_WORKER", (), False))
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_ECHO, receive.handle_echo)])
    try:
        line = _lines(run(env, "doctor"))["listener"]
    finally:
        server.shutdown()
    assert line.startswith("OK   listener: ") and "running cxr-worker" in line


def test_doctor_fails_when_the_pacs_does_not_answer(env):
    dead = {**env, "CXR_WORKER__PACS__AE_TITLE": "PACS", "CXR_WORKER__PACS__HOST": "127.0.0.1",
            "CXR_WORKER__PACS__PORT": str(free_port()), "CXR_WORKER__PACS__TIMEOUT_SECONDS": "2"}
    lines = _lines(run(dead, "doctor", rc=1))
    assert lines["pacs"].startswith("FAIL pacs: C-ECHO PACS@127.0.0.1:")
    assert "-> check [pacs] ae_title, host and port" in lines["pacs"]
    assert all(line.startswith(("OK ", "SKIP ")) for name, line in lines.items()
               if name != "pacs"), lines


def test_doctor_fails_on_a_bad_setting_and_a_tampered_model(env, tmp_path):
    res = run({**env, "CXR_WORKER__LISTENER__PORT": "eighty"}, "doctor", rc=1)
    assert res.stdout.startswith("FAIL config: ") and "listener.port" in res.stdout
    from cxr_worker.score import SHIPPED_MODEL_DIR

    broken = tmp_path / "model"
    shutil.copytree(SHIPPED_MODEL_DIR, broken)
    tfl = next(broken.glob("*.tflite"))
    tfl.write_bytes(tfl.read_bytes()[:-1] + b"\x00")
    line = _lines(run({**env, "CXR_WORKER__MODEL__PATH": str(broken)}, "doctor", rc=1))["model"]
    assert line.startswith("FAIL model: ") and "sha256" in line


def test_doctor_is_in_the_help():
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_WORKER")}
    out = run(env, "--help").stdout
    assert "doctor" in out and "conformance" in out
