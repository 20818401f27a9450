"""DICOM TLS (issue 10): the listener with dcmtk's ``echoscu``/``storescu +tls`` as the
modality, and Orthanc as a TLS PACS. Certificates are made per module with the ``openssl``
command (a throwaway CA, a certificate for the worker and Orthanc, one for the modality and
the worker as a client, and a second, untrusted CA with a client certificate of its own);
every file is mode 0600."""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import (
    CLI,
    DCMTK_ENV,
    Orthanc,
    OrthancTls,
    Worker,
    need,
    run_cli,
    wait_until,
    worker_env,
)
from pydicom import dcmread

pytestmark = pytest.mark.slow

RESULT_SERIES = "AI triage result"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path  # names 127.0.0.1 and localhost; serverAuth and clientAuth
    server_key: Path
    client_cert: Path  # the modality's, and the worker's towards the PACS
    client_key: Path
    rogue_ca: Path  # a CA nobody here trusts
    rogue_cert: Path  # signed by rogue_ca
    rogue_key: Path


def _openssl(folder: Path, *args: str) -> None:
    subprocess.run([need("openssl"), *args], cwd=folder, check=True, capture_output=True,
                   timeout=60)


def _ca(folder: Path, name: str) -> None:
    _openssl(folder, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN={name} test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")


def _leaf(folder: Path, name: str, ca: str, serial: int, extensions: str) -> None:
    (folder / f"{name}.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        + extensions)
    _openssl(folder, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", f"/CN={name}")
    _openssl(folder, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey",
             f"{ca}.key", "-set_serial", str(serial), "-days", "2", "-out", f"{name}.pem",
             "-extfile", f"{name}.ext")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    _ca(folder, "ca")
    _ca(folder, "rogue")
    _leaf(folder, "server", "ca", 2, "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
          "extendedKeyUsage=serverAuth,clientAuth\n")
    _leaf(folder, "modality", "ca", 3, "extendedKeyUsage=clientAuth\n")
    _leaf(folder, "intruder", "rogue", 4, "extendedKeyUsage=clientAuth\n")
    for f in folder.iterdir():
        f.chmod(0o600)
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in folder.iterdir())
    return Pki(folder / "ca.pem", folder / "server.pem", folder / "server.key",
               folder / "modality.pem", folder / "modality.key", folder / "rogue.pem",
               folder / "intruder.pem", folder / "intruder.key")


def listener_tls(pki: Pki, **extra: str) -> dict[str, str]:
    return {"CXR_WORKER__LISTENER__TLS_CERTIFICATE": str(pki.server_cert),
            "CXR_WORKER__LISTENER__TLS_PRIVATE_KEY": str(pki.server_key),
            "CXR_WORKER__LISTENER__TLS_CA_CERTIFICATES": str(pki.ca), **extra}


def pacs_tls(pki: Pki, ca: Path | None = None, **extra: str) -> dict[str, str]:
    return {"CXR_WORKER__PACS__TLS": "true",
            "CXR_WORKER__PACS__TLS_CA_CERTIFICATES": str(ca or pki.ca),
            "CXR_WORKER__PACS__TLS_CERTIFICATE": str(pki.client_cert),
            "CXR_WORKER__PACS__TLS_PRIVATE_KEY": str(pki.client_key), **extra}


def dcmtk(tool: str, port: int, *options: str, files: tuple[Path, ...] = ()
          ) -> subprocess.CompletedProcess[str]:
    """dcmtk's ``echoscu``/``storescu`` as a modality runs it, with short timeouts."""
    return subprocess.run(
        [need(tool), "-to", "5", "-ta", "5", "-td", "5", "-aet", "MODALITY",
         "-aec", "CXR_WORKER", *options, "127.0.0.1", str(port), *map(str, files)],
        env=DCMTK_ENV, capture_output=True, text=True, timeout=60, check=False)


def with_cert(pki: Pki, cert: Path | None = None, key: Path | None = None) -> list[str]:
    """dcmtk's options for TLS with a client certificate, trusting our CA."""
    return ["+tls", str(key or pki.client_key), str(cert or pki.client_cert),
            "+cf", str(pki.ca)]


@pytest.fixture
def tls_worker(make_worker: Callable[..., Worker], pki: Pki) -> Worker:
    return make_worker(**listener_tls(pki))


def _handshake_refusals(worker: Worker) -> list[str]:
    return [line for line in worker.text().splitlines() if "TLS handshake from 127.0.0.1:" in line]


def test_modality_with_a_certificate_echoes_and_stores_over_tls(tls_worker: Worker, pki: Pki,
                                                               make_images) -> None:
    res = dcmtk("echoscu", tls_worker.port, *with_cert(pki))
    assert res.returncode == 0, res.stdout + res.stderr
    files = make_images(1, prefix="tls")
    res = dcmtk("storescu", tls_worker.port, "-v", *with_cert(pki), files=(files[0],))
    assert "Received Store Response (Success)" in res.stdout + res.stderr, res.stderr
    rows = wait_until(lambda: (r := tls_worker.worklist()) and r[0]["status"] == "scored" and r,
                      60, "the image sent over TLS scored")
    assert rows[0]["study_instance_uid"] == dcmread(files[0]).StudyInstanceUID
    # the worker's own C-ECHO reaches its TLS listener (its certificate pinned and presented)
    assert "success" in tls_worker.cli("echo", "--self").stdout
    assert _handshake_refusals(tls_worker) == []


def test_plain_anonymous_and_untrusted_clients_are_refused(tls_worker: Worker, pki: Pki) -> None:
    """Each refusal is at the TLS handshake, logged with the peer's address and the reason;
    an honest modality is answered afterwards."""
    plain = dcmtk("echoscu", tls_worker.port)
    assert plain.returncode != 0
    anonymous = dcmtk("echoscu", tls_worker.port, "+tla", "+cf", str(pki.ca))
    assert anonymous.returncode != 0
    untrusted = dcmtk("echoscu", tls_worker.port,
                      *with_cert(pki, pki.rogue_cert, pki.rogue_key))
    assert untrusted.returncode != 0
    refusals = wait_until(lambda: len(r := _handshake_refusals(tls_worker)) >= 3 and r, 10,
                          "three refusals logged")
    assert len(refusals) == 3, refusals
    plain_line, anonymous_line, untrusted_line = refusals
    assert "refused: WRONG_VERSION_NUMBER (not TLS: a plain DICOM client?)" in plain_line
    assert "refused: PEER_DID_NOT_RETURN_A_CERTIFICATE (the client presented no certificate)" \
        in anonymous_line
    assert "refused: client certificate not accepted (unable to get local issuer certificate" \
        in untrusted_line
    ok = dcmtk("echoscu", tls_worker.port, *with_cert(pki))
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_a_client_that_never_handshakes_blocks_nobody(make_worker, pki: Pki) -> None:
    """pynetdicom would run the handshake in its accept loop, where a client that connects
    and sends nothing (or half a ClientHello) would hold every other modality off; here it
    holds only its own connection, which is closed after listener.acse_timeout_seconds."""
    worker = make_worker(**listener_tls(pki), CXR_WORKER__LISTENER__ACSE_TIMEOUT_SECONDS="2")
    with socket.create_connection(("127.0.0.1", worker.port)) as quiet, \
            socket.create_connection(("127.0.0.1", worker.port)) as half:
        half.sendall(b"\x16\x03\x01\x02\x00\x01")  # a ClientHello's first bytes, then nothing
        t0 = time.monotonic()
        ok = dcmtk("echoscu", worker.port, *with_cert(pki))
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert time.monotonic() - t0 < 2
        for sock in (quiet, half):
            sock.settimeout(10)
            assert sock.recv(1024) == b"", "the worker did not close the connection"
        assert time.monotonic() - t0 < 2 + 5
    refusals = _handshake_refusals(worker)
    assert len(refusals) == 2 and all("no handshake within the timeout" in r for r in refusals), \
        refusals


def test_tls_1_1_is_refused(tls_worker: Worker, pki: Pki) -> None:
    """dcmtk cannot be held to TLS 1.1 (its profiles set a minimum only), so OpenSSL's own
    client is, with the security level lowered so that it can offer TLS 1.1 at all; the same
    client offering TLS 1.2 is accepted, so the refusal is the version's."""
    def s_client(version: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [need("openssl"), "s_client", version, "-cipher", "DEFAULT:@SECLEVEL=0",
             "-connect", f"127.0.0.1:{tls_worker.port}", "-cert", str(pki.client_cert),
             "-key", str(pki.client_key), "-CAfile", str(pki.ca), "-verify_return_error"],
            input="", capture_output=True, text=True, timeout=30, check=False)

    old = s_client("-tls1_1")
    if "no protocols available" in old.stderr:  # an OpenSSL built without TLS 1.1
        pytest.skip("this OpenSSL cannot offer TLS 1.1 at all: nothing to refuse")
    assert old.returncode != 0 and "Cipher is (NONE)" in old.stdout, old.stdout + old.stderr
    refusal = wait_until(lambda: _handshake_refusals(tls_worker), 10, "the refusal logged")
    assert "refused: UNSUPPORTED_PROTOCOL" in refusal[-1], refusal
    current = s_client("-tls1_2")
    assert "Protocol  : TLSv1.2" in current.stdout, current.stdout + current.stderr
    assert "Verify return code: 0 (ok)" in current.stdout


def test_client_certificates_optional_when_configured(make_worker, pki: Pki) -> None:
    worker = make_worker(**listener_tls(
        pki, CXR_WORKER__LISTENER__TLS_REQUIRE_CLIENT_CERTIFICATE="false"))
    anonymous = dcmtk("echoscu", worker.port, "+tla", "+cf", str(pki.ca))
    assert anonymous.returncode == 0, anonymous.stdout + anonymous.stderr
    # a certificate that is presented is still verified
    untrusted = dcmtk("echoscu", worker.port, *with_cert(pki, pki.rogue_cert, pki.rogue_key))
    assert untrusted.returncode != 0
    assert dcmtk("echoscu", worker.port).returncode != 0  # and plain DICOM stays refused


# -- start-up errors ---------------------------------------------------------------------
@pytest.mark.parametrize(("change", "message"), [
    ({"CXR_WORKER__LISTENER__TLS_PRIVATE_KEY": "{missing}"},
     "listener.tls_private_key {missing}: no such file"),
    ({"CXR_WORKER__LISTENER__TLS_PRIVATE_KEY": "{client_key}"},
     "listener.tls_private_key {client_key}: is not the private key of "
     "listener.tls_certificate"),
    ({"CXR_WORKER__LISTENER__TLS_CA_CERTIFICATES": "{ext}"},
     "listener.tls_ca_certificates {ext}: no PEM certificate in it"),
    ({"CXR_WORKER__LISTENER__TLS_CERTIFICATE": "{folder}"},
     "listener.tls_certificate {folder}: is a folder"),
    ({"CXR_WORKER__LISTENER__TLS_CA_CERTIFICATES": ""},
     "listener.tls_ca_certificates: required when listener.tls_certificate is set"),
    ({"CXR_WORKER__PACS__TLS_PRIVATE_KEY": "{encrypted}"},
     "pacs.tls_private_key {encrypted}: the private key is encrypted"),
    ({"CXR_WORKER__PACS__TLS": "false"}, "pacs.tls_ca_certificates: set, but pacs.tls is false"),
])
def test_unusable_tls_settings_stop_serve_naming_key_and_path(tmp_path, pki: Pki, change,
                                                              message) -> None:
    encrypted = tmp_path / "encrypted.key"
    _openssl(tmp_path, "pkey", "-in", str(pki.client_key), "-aes256", "-passout", "pass:x",
             "-out", str(encrypted))
    names = {"missing": str(tmp_path / "nope.key"), "client_key": str(pki.client_key),
             "ext": str(pki.ca.parent / "server.ext"), "folder": str(tmp_path),
             "encrypted": str(encrypted)}
    env = worker_env(tmp_path / "data", 0, None, **listener_tls(pki), **pacs_tls(pki),
                     CXR_WORKER__PACS__AE_TITLE="PACS")
    env.update({k: v.format(**names) for k, v in change.items()})
    res = subprocess.run([*CLI, "serve"], env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert res.returncode == 2, res.stdout + res.stderr
    assert message.format(**names) in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr  # one line, no traceback
    assert "ready" not in res.stdout


# -- the PACS over TLS (Orthanc) -----------------------------------------------------------
@pytest.fixture
def tls_orthanc(tmp_path: Path, pki: Pki):
    o = Orthanc(tmp_path / "tls-pacs", tls=OrthancTls(pki.server_cert, pki.server_key, pki.ca))
    o.start()
    yield o
    o.stop()


def test_echo_to_a_tls_pacs(tls_orthanc: Orthanc, pki: Pki, tmp_path) -> None:
    env = worker_env(tmp_path / "data", 0, tls_orthanc, **pacs_tls(pki))
    out = run_cli(env, "echo").stdout
    assert f"C-ECHO {tls_orthanc.aet}@127.0.0.1:{tls_orthanc.dicom_port}: success" in out
    # plain DICOM to the TLS port fails
    plain = {k: v for k, v in env.items() if "__PACS__TLS" not in k}
    assert run_cli(plain, "echo", rc=1).returncode == 1
    # the PACS requires a client certificate: without one the association fails, saying why
    anonymous = {k: v for k, v in env.items()
                 if k not in ("CXR_WORKER__PACS__TLS_CERTIFICATE",
                              "CXR_WORKER__PACS__TLS_PRIVATE_KEY")}
    err = run_cli(anonymous, "echo", rc=1).stderr
    assert f"association with {tls_orthanc.aet}@127.0.0.1:{tls_orthanc.dicom_port} failed: " \
           "TLS handshake refused" in err, err
    # the certificate names 127.0.0.1 but not 127.0.0.2 (the same Orthanc, all of
    # 127.0.0.0/8 is loopback): the host name is checked unless told otherwise
    other = {**env, "CXR_WORKER__PACS__HOST": "127.0.0.2"}
    err = run_cli(other, "echo", rc=1).stderr
    assert "not accepted" in err and "127.0.0.2" in err, err
    unchecked = {**other, "CXR_WORKER__PACS__TLS_VERIFY_HOSTNAME": "false"}
    assert "success" in run_cli(unchecked, "echo").stdout


def test_results_reach_a_tls_pacs_and_a_wrong_ca_is_retried_not_lost(
        make_worker, tls_orthanc: Orthanc, pki: Pki, make_images) -> None:
    """With a CA that did not sign Orthanc's certificate, every delivery fails with an error
    naming the PACS and the reason, and the result waits (retrying); with the right CA, after
    a restart, it reaches Orthanc over TLS."""
    worker = make_worker(pacs=tls_orthanc, **pacs_tls(pki, ca=pki.rogue_ca))
    files = make_images(1, prefix="tlspacs")
    study_uid = str(dcmread(files[0]).StudyInstanceUID)
    res = dcmtk("storescu", worker.port, files=(files[0],))
    assert res.returncode == 0, res.stdout + res.stderr
    (row,) = wait_until(lambda: (r := worker.worklist()) and r[0]["status"] == "retrying" and r,
                        60, "the result retrying while the PACS's certificate is not trusted")
    where = f"{tls_orthanc.aet}@127.0.0.1:{tls_orthanc.dicom_port}"
    [sc] = [d for d in row["deliveries"] if d["kind"] == "sc"]
    assert sc["status"] == "retrying" and sc["attempts"] >= 1, row
    assert f"association with {where} failed: TLS: the peer's certificate is not accepted (" \
        in sc["last_error"], row
    log = wait_until(lambda: (t := worker.text()) and f"association with {where} failed: TLS: "
                     "the peer's certificate is not accepted" in t and t, 30,
                     "the reason in the log")
    # OpenSSL's reason follows ("self-signed certificate in certificate chain": Orthanc sends
    # its chain up to a root this CA bundle does not hold)
    assert re.search(r"certificate is not accepted \([a-z][^)]+\)", log), log[-3000:]
    assert tls_orthanc.instances_in_series_with_description(study_uid, RESULT_SERIES) == []
    assert worker.stop() == 0

    worker.env.update(pacs_tls(pki))
    worker.start()
    wait_until(lambda: [r["status"] for r in worker.worklist()] == ["sent"], 60,
               "the result delivered with the right CA")
    (inst,) = tls_orthanc.instances_in_series_with_description(study_uid, RESULT_SERIES)
    tags = tls_orthanc.get(f"/instances/{inst}/simplified-tags")
    assert tags["SourceImageSequence"][0]["ReferencedSOPInstanceUID"] == \
        str(dcmread(files[0]).SOPInstanceUID)


def test_doctor_checks_the_tls_files(tmp_path, pki: Pki) -> None:
    env = worker_env(tmp_path / "data", 0, None, **listener_tls(pki))
    res = subprocess.run([*CLI, "doctor"], env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert "OK   tls: listener (client certificates required): certificates and keys load" \
        in res.stdout, res.stdout
    exposed = tmp_path / "exposed.key"
    exposed.write_bytes(pki.server_key.read_bytes())
    os.chmod(exposed, 0o644)
    env["CXR_WORKER__LISTENER__TLS_PRIVATE_KEY"] = str(exposed)
    res = subprocess.run([*CLI, "doctor"], env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert f"WARN tls: listener (client certificates required): certificates and keys load, " \
           f"but listener.tls_private_key {exposed} is readable by every user" in res.stdout, \
        res.stdout
