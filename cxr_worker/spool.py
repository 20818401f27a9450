"""Durable storage of received datasets: write to a temp file, fsync, rename, fsync the folder.

Layout under ``data_dir``::

    spool/<Study Instance UID>/<SOP Instance UID>.dcm    received images (Part 10 files)
    results/<Study Instance UID>/<SOP Instance UID>.dcm  Secondary Captures built for them
    results/<Study Instance UID>/<SOP Instance UID>.heatmap.png  their Grad-CAM heatmaps
                                                          (8-bit grey, 224x224; [report] heatmap)
    results/<Study Instance UID>/<SOP Instance UID>.<kind>.<result UID>.dcm|.hl7
                        the other outputs ([outputs] kinds): structured reports (sr), rejection
                        notes (kos), HL7 messages (hl7, named by their MSH-10), one file each
    quarantine/<SOP Instance UID or hash>.dcm            files that could not be processed

File names carry UIDs only; a value that is not a well-formed UID is replaced by its hash, so
no name is ever built from a value with a path separator (the listener refuses such UIDs before
anything is written; this is the second line of defence).

Folders are created mode 0700 and files 0600, set explicitly (``chmod``), whatever the umask.
Temporary files are dot-prefixed, in the destination's folder (so that the rename is atomic),
and unique per write: process, thread and a random suffix, created with ``O_EXCL``.

Orphans (the sweeper, :func:`cxr_worker.jobs.sweep_orphans`): a temporary file outlives its
write only when the process died (``kill -9``), and a spooled image no worklist row refers to
is a store the database refused after the file was written. Both are removed once older than a
grace period; a file is only ever removed through :meth:`Spool.remove_if_orphan`, which cannot
remove a file written meanwhile.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from cxr_worker.errors import SpoolError

DIR_MODE = 0o700
FILE_MODE = 0o600
UID_MAX_LENGTH = 64
# PS3.5 9.1: components of digits separated by dots, none empty, no leading zero in a
# component of more than one digit
_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def is_valid_uid(value: str) -> bool:
    """Whether ``value`` is a UID as PS3.5 9.1 defines it (at most 64 characters)."""
    return len(value) <= UID_MAX_LENGTH and _UID_RE.fullmatch(value) is not None


def safe_name(uid: str) -> str:
    """``uid`` itself when it is a valid UID, else a hash (never a path component from a peer)."""
    uid = uid.strip().rstrip("\x00")
    if is_valid_uid(uid):
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "replace")).hexdigest()[:40]


def _child(folder: Path, name: str) -> Path:
    """``folder / name``, refusing any name that could leave ``folder``."""
    separators = {"/", "\x00", os.sep, os.altsep or "/"}
    if name in ("", ".", "..") or any(c in name for c in separators):
        raise ValueError(f"not a plain file name: {name!r}")
    return folder / name


def make_dirs(path: Path) -> None:
    """``mkdir -p`` where every folder created gets mode 0700 (chmod: not left to the umask)."""
    missing: list[Path] = []
    p = path
    while not p.is_dir():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=DIR_MODE)
        except FileExistsError:
            if not d.is_dir():
                raise
            continue  # created meanwhile by another thread or process
        os.chmod(d, DIR_MODE)


TEMP_SUFFIX = ".tmp"


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one of :func:`atomic_write`'s temporary files."""
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}."
                          f"{secrets.token_hex(6)}{TEMP_SUFFIX}")


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write via a temp file in the same folder; the file exists whole or not at all.

    Concurrent writes of the same ``path`` (a modality sending one image on several
    associations at once) each use their own temp file; the last rename wins, whole.
    """
    tmp: Path | None = None
    try:
        make_dirs(path.parent)
        tmp = _temp_name(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                     FILE_MODE)
        with open(fd, "wb") as f:
            os.fchmod(fd, FILE_MODE)
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
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise SpoolError(f"cannot write {path.name}: {exc.strerror or exc}") from exc
    return path


HEATMAP_SUFFIX = ".heatmap.png"
OUTPUT_SUFFIXES = {"sr": ".dcm", "kos": ".dcm", "hl7": ".hl7"}


def heatmap_path_for(result_path: str | Path) -> Path:
    """The heatmap kept beside a result: ``<sop>.dcm`` -> ``<sop>.heatmap.png``."""
    p = Path(result_path)
    return p.with_name(p.stem + HEATMAP_SUFFIX)


class Spool:
    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir
        self.spool_dir = data_dir / "spool"
        self.results_dir = data_dir / "results"
        self.quarantine_dir = data_dir / "quarantine"
        for d in (self.spool_dir, self.results_dir, self.quarantine_dir):
            make_dirs(d)

    def image_path(self, study_uid: str, sop_uid: str) -> Path:
        return _child(_child(self.spool_dir, safe_name(study_uid)), f"{safe_name(sop_uid)}.dcm")

    def result_path(self, study_uid: str, sop_uid: str) -> Path:
        return _child(_child(self.results_dir, safe_name(study_uid)),
                      f"{safe_name(sop_uid)}.dcm")

    def output_path(self, study_uid: str, sop_uid: str, kind: str, result_uid: str) -> Path:
        """The file of one output (``sr``, ``kos``: DICOM; ``hl7``: the message as sent)."""
        if kind not in OUTPUT_SUFFIXES:
            raise ValueError(f"not an output kind with a file of its own: {kind!r}")
        return _child(_child(self.results_dir, safe_name(study_uid)),
                      f"{safe_name(sop_uid)}.{kind}.{safe_name(result_uid)}"
                      f"{OUTPUT_SUFFIXES[kind]}")

    def heatmap_path(self, study_uid: str, sop_uid: str) -> Path:
        return heatmap_path_for(self.result_path(study_uid, sop_uid))

    def quarantine(self, path: Path, reason: str) -> Path:
        """Move a file aside with a ``.reason.txt`` beside it; returns its new path."""
        make_dirs(self.quarantine_dir)
        dest = _child(self.quarantine_dir, path.name)
        if path.exists():
            shutil.move(str(path), dest)
            os.chmod(dest, FILE_MODE)
        text = (reason + "\n").encode("utf-8")

        def write(f: BinaryIO) -> None:
            f.write(text)

        atomic_write(dest.with_suffix(".reason.txt"), write)
        return dest

    # -- orphans ----------------------------------------------------------------------------
    def remove_old_temp_files(self, cutoff: float) -> int:
        """Remove :func:`atomic_write` temporary files last modified before ``cutoff`` (a
        ``time.time()``) under spool, results and quarantine; returns how many. A temporary
        name is never reused, so an old one is a write that died with its process."""
        removed = 0
        for folder in (self.spool_dir, self.results_dir, self.quarantine_dir):
            for path in folder.rglob(f".*{TEMP_SUFFIX}"):
                try:
                    if path.is_file() and path.stat().st_mtime < cutoff:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:
                    continue  # renamed into place or removed meanwhile
        return removed

    def stored_files(self, folder: Path, cutoff: float,
                     suffixes: tuple[str, ...] = (".dcm",)) -> Iterator[tuple[str, Path]]:
        """``(key, path)`` of the ``<study>/<name><suffix>`` files under ``folder`` (the spool
        or the results) last modified before ``cutoff``; ``key`` is ``<study>/<file name>``,
        the part of a worklist path that does not depend on where ``data_dir`` lies. Nothing
        else (a file this worker did not lay out that way, a temporary file) is listed."""
        paths = (p for suffix in suffixes for p in folder.glob(f"*/*{suffix}"))
        for path in paths:
            if is_temp_name(path.name):
                continue
            try:
                if path.is_file() and path.stat().st_mtime < cutoff:
                    yield f"{path.parent.name}/{path.name}", path
            except FileNotFoundError:
                continue

    def remove_if_orphan(self, path: Path, cutoff: float,
                         unreferenced: Callable[[], bool]) -> bool:
        """Remove ``path`` if it is older than ``cutoff`` and ``unreferenced()`` still holds;
        True when removed.

        Decision: a store may replace the file at any moment (a modality re-sending the
        instance), so it is first renamed aside, atomically; the file renamed is then checked
        (same inode, still old) and the worklist asked again. If either fails, a writer or a
        row got there first and the file is put back, unless a newer one took its place."""
        try:
            before = path.stat()
        except FileNotFoundError:
            return False
        if before.st_mtime >= cutoff:
            return False
        aside = _temp_name(path)
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        try:
            moved = aside.stat()
            same = (moved.st_ino, moved.st_dev) == (before.st_ino, before.st_dev)
            orphan = same and moved.st_mtime < cutoff and unreferenced()
        except BaseException:  # the worklist did not answer: nothing is removed
            _put_back(aside, path)
            raise
        if orphan:
            aside.unlink()
            return True
        _put_back(aside, path)
        return False


def _put_back(aside: Path, path: Path) -> None:
    """Undo :meth:`Spool.remove_if_orphan`'s rename, unless a newer file took the name."""
    try:
        os.link(aside, path)
    except FileExistsError:
        pass
    except OSError:  # a file system without hard links: rename back if still free
        if not path.exists():
            os.rename(aside, path)
            return
    aside.unlink()
