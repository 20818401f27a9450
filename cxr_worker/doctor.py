"""``cxr-worker doctor``: is this installation ready to serve? One line per check.

Each check reads, never changes: no database or folder is created, no migration run. A line is
``OK``, ``WARN`` (works, but look), ``SKIP`` (not configured) or ``FAIL`` followed by what to
do; the command exits 1 when any check fails.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import make_url

from cxr_worker.errors import ConfigError, CxrWorkerError
from cxr_worker.settings import CONFIG_ENV, Settings, load_settings

OK, WARN, SKIP, FAIL = "OK", "WARN", "SKIP", "FAIL"
MIN_FREE_BYTES = 2**30  # warn below 1 GiB free on data_dir
SELF_ECHO_TIMEOUT = 5.0


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status:<4} {self.name}: {self.detail}"
        return f"{text} -> {self.fix}" if self.fix else text


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def check_config(path: str | None) -> tuple[Check, Settings | None]:
    source = path or os.environ.get(CONFIG_ENV) or "defaults (no --config, no $CXR_WORKER_CONFIG)"
    try:
        s = load_settings(path)
    except ConfigError as exc:
        return Check("config", FAIL, f"{source}: {exc}",
                     "correct the key named (see deploy/cxr-worker.toml)"), None
    return Check("config", OK, f"{source} loads (listener {s.listener.ae_title}@"
                 f"{s.listener.host}:{s.listener.port})"), s


def check_tls(s: Settings) -> Check:
    """The TLS files load (as ``serve`` loads them) and no private key is readable by
    others."""
    from cxr_worker import tls

    if not s.listener.tls_certificate and not s.pacs.tls:
        return Check("tls", SKIP, "not configured: the listener and the PACS connection are "
                     "plain DICOM")
    try:
        tls.server_context(s.listener)
        tls.client_context(s.pacs)
    except CxrWorkerError as exc:
        return Check("tls", FAIL, str(exc), "correct the file or the key named")
    used = []
    if s.listener.tls_certificate:
        clients = ("required" if s.listener.tls_require_client_certificate else "optional")
        used.append(f"listener (client certificates {clients})")
    if s.pacs.tls:
        used.append("PACS")
    detail = f"{' and '.join(used)}: certificates and keys load"
    for key, path in (("listener.tls_private_key", s.listener.tls_private_key),
                      ("pacs.tls_private_key", s.pacs.tls_private_key)):
        if path and tls.readable_by_others(path):
            return Check("tls", WARN, f"{detail}, but {key} {path} is readable by every user",
                         f"chmod o-r {path} (0600, or 0640 with the worker's group)")
    return Check("tls", OK, detail)


def check_listener(s: Settings) -> Check:
    from cxr_worker import send, tls

    host, port = s.listener.host, s.listener.port
    where = f"{host}:{port}"
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as sock:
            # as the listener binds (pynetdicom's server): a port in TIME_WAIT is free
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            return Check("listener", FAIL, f"cannot listen on {where}: {exc.strerror or exc}",
                         "set [listener] host to an address of this machine (ports below "
                         "1024 need CAP_NET_BIND_SERVICE)")
        try:
            send.echo(tls.self_peer(s, "CXR_DOCTOR", SELF_ECHO_TIMEOUT))
        except Exception as echo_exc:  # whatever holds the port, it is not our listener
            return Check("listener", FAIL, f"{where} is in use by another program (C-ECHO as "
                         f"{s.listener.ae_title}: {echo_exc})",
                         "stop that program or set [listener] port to a free port")
        return Check("listener", OK, f"{where} is in use by a running cxr-worker (C-ECHO as "
                     f"{s.listener.ae_title} answered)")
    return Check("listener", OK, f"{where} is free")


def check_database(s: Settings) -> Check:
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    from cxr_worker.worklist import queue, schema

    url = make_url(s.database_url)
    shown = url.render_as_string(hide_password=True)
    head = schema.head_revision()
    if schema.not_created(s.database_url):
        return Check("database", OK, f"{shown} not created yet (serve creates it at revision "
                     f"{head})")
    try:
        engine = queue.make_engine(s.database_url)
        try:
            current = schema.current_revision(engine)
        finally:
            engine.dispose()
    except Exception as exc:
        return Check("database", FAIL, f"{shown}: cannot connect ({_first_line(exc)})",
                     "check [database] url and that the database server runs and lets this "
                     "user in")
    if current == head:
        return Check("database", OK, f"{shown} at the head revision {head}")
    upgrade = "run 'cxr-worker db upgrade' (serve also migrates at start-up unless --no-migrate)"
    if current is None:
        return Check("database", FAIL, f"{shown} has no worklist schema", upgrade)
    try:
        ScriptDirectory(str(schema.MIGRATIONS)).get_revision(current)
    except CommandError:
        return Check("database", FAIL, f"{shown} at revision {current}, unknown to this "
                     f"cxr-worker (head {head}): a newer version wrote it",
                     "install the cxr-worker version that migrated it")
    return Check("database", FAIL, f"{shown} at revision {current}, head is {head}", upgrade)


def check_disk(s: Settings) -> Check:
    path = s.data_dir
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    note = "" if path.exists() else f" (not created yet; serve creates it in {probe})"
    if not os.access(probe, os.W_OK | os.X_OK):
        return Check("data_dir", FAIL, f"{probe} is not writable by this user{note}",
                     "give the worker's user the folder (the systemd unit's StateDirectory= "
                     "does) or set [storage] data_dir")
    free = shutil.disk_usage(probe).free
    detail = f"{path}: {free / 2**30:.1f} GiB free{note}"
    if free < MIN_FREE_BYTES:
        return Check("data_dir", WARN, detail, "free space, or lower [storage] retention_days; "
                     "a full disk makes the listener refuse images (0xA700)")
    return Check("data_dir", OK, detail)


def check_model(s: Settings) -> Check:
    from cxr_worker.model import card as model_card
    from cxr_worker.score import SHIPPED_MODEL_DIR

    model_dir = Path(s.model.path) if s.model.path else SHIPPED_MODEL_DIR
    try:
        card = model_card.load_card(model_dir)
        for name in card["files"]:
            model_card.verify_file(model_dir, name, card)
    except CxrWorkerError as exc:
        return Check("model", FAIL, str(exc),
                     "reinstall cxr-worker (bundled model) or restore the folder of [model] "
                     "path with the card its files were released with")
    return Check("model", OK, f"{card['model_version']}: {len(card['files'])} files match "
                 f"the model card's sha256 ({model_dir})")


def check_pacs(s: Settings) -> Check:
    from cxr_worker import send, tls

    if not s.pacs_configured:
        return Check("pacs", SKIP, "not configured: results stay in the worklist and under "
                     "data_dir/results")
    target = f"{s.pacs.ae_title}@{s.pacs.host}:{s.pacs.port}"
    try:
        peer = tls.pacs_peer(s)
        assert peer is not None
        send.echo(peer)
    except Exception as exc:
        return Check("pacs", FAIL, f"C-ECHO {target} failed: {exc}",
                     f"check [pacs] ae_title, host and port, and that the PACS knows this "
                     f"worker as {s.listener.ae_title}")
    return Check("pacs", OK, f"C-ECHO {target} answered (calling as {s.listener.ae_title})")


def run(config_path: str | None) -> Iterator[Check]:
    """The checks, in order; stops after the config check when the settings do not load."""
    check, s = check_config(config_path)
    yield check
    if s is None:
        return
    yield check_tls(s)
    yield check_listener(s)
    yield check_database(s)
    yield check_disk(s)
    yield check_model(s)
    yield check_pacs(s)
