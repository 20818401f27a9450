"""Durable storage of received datasets: write to a temp file, fsync, rename, fsync the folder.

Layout under ``data_dir``::

    spool/<Study Instance UID>/<SOP Instance UID>.dcm    received images (Part 10 files)
    results/<Study Instance UID>/<SOP Instance UID>.dcm  Secondary Captures built for them
    quarantine/<SOP Instance UID or hash>.dcm            files that could not be processed

File names carry UIDs only; a value that is not a well-formed UID is replaced by its hash.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from cxr_worker.errors import SpoolError

_UID_RE = re.compile(r"^[0-9.]{1,64}$")


def safe_name(uid: str) -> str:
    """``uid`` itself when it is a plain UID, else a hash (never a path component from a peer)."""
    uid = uid.strip().rstrip("\x00")
    if _UID_RE.match(uid) and ".." not in uid and not uid.startswith("."):
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "replace")).hexdigest()[:40]


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write via a temp file in the same folder; the file exists whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SpoolError(f"cannot write {path.name}: {exc.strerror or exc}") from exc
    return path


class Spool:
    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir
        self.spool_dir = data_dir / "spool"
        self.results_dir = data_dir / "results"
        self.quarantine_dir = data_dir / "quarantine"
        for d in (self.spool_dir, self.results_dir, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)

    def image_path(self, study_uid: str, sop_uid: str) -> Path:
        return self.spool_dir / safe_name(study_uid) / f"{safe_name(sop_uid)}.dcm"

    def result_path(self, study_uid: str, sop_uid: str) -> Path:
        return self.results_dir / safe_name(study_uid) / f"{safe_name(sop_uid)}.dcm"

    def quarantine(self, path: Path, reason: str) -> Path:
        """Move a file aside with a ``.reason.txt`` beside it; returns its new path."""
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        dest = self.quarantine_dir / path.name
        if path.exists():
            shutil.move(str(path), dest)
        dest.with_suffix(".reason.txt").write_text(reason + "\n", encoding="utf-8")
        return dest
