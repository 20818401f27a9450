"""Which files a command takes as images: DICOM Part 10 files by their content, PNG and JPEG
by their suffix (``score``, ``calibrate``; ``replay`` takes DICOM only).

A folder given to a command is walked and what is not an image is skipped and reported once
(:func:`skipped_line`); a file given by name that does not exist is a usage error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from cxr_worker.errors import StartupError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
NOT_DICOM = "not a DICOM file (no DICM preamble)"
NOT_AN_IMAGE = "not a DICOM file (no DICM preamble) nor PNG/JPEG"


def is_dicom_file(path: Path) -> bool:
    """A Part 10 file (``DICM`` after the 128-byte preamble)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def is_image_input(path: Path) -> bool:
    """DICOM by content, or PNG/JPEG by suffix."""
    return path.suffix.lower() in IMAGE_SUFFIXES or is_dicom_file(path)


def expand(paths: Iterable[Path], accept: Callable[[Path], bool],
           command: str) -> tuple[list[Path], list[Path]]:
    """(files to take, files skipped in folders). Files named explicitly are always taken (the
    command says why it refuses one); folders are walked, keeping what ``accept`` takes. A path
    that does not exist raises :class:`StartupError` before anything is done."""
    paths = list(paths)
    for p in paths:
        if not p.exists():
            raise StartupError(f"{command}: {p}: no such file or folder")
    files: list[Path] = []
    skipped: list[Path] = []
    for p in paths:
        if not p.is_dir():
            files.append(p)
            continue
        for q in sorted(q for q in p.rglob("*") if q.is_file()):
            (files if accept(q) else skipped).append(q)
    return files, skipped


def skipped_line(skipped: list[Path], what: str, shown: int = 10) -> str:
    """One line for the files a folder walk skipped, e.g. ``skipped 2 files that are not DICOM:
    README.md, x.py``."""
    names = [p.name for p in skipped[:shown]]
    more = f" (and {len(skipped) - shown} more)" if len(skipped) > shown else ""
    noun = "file that is" if len(skipped) == 1 else "files that are"
    return f"skipped {len(skipped)} {noun} {what}: {', '.join(names)}{more}"
