"""Logging for the command line and the service: readable text lines, or one JSON object per
line (``[logging] format = "json"``) for log shippers.

One handler on the root logger, so third-party records (pynetdicom, APScheduler, Alembic,
SQLAlchemy, Python warnings) go through the same formatter as the worker's own.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

class _State:
    handler: logging.Handler | None = None
    json = False


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message"}``, plus ``exception`` (the traceback) and
    ``stack`` when the record carries them; one line per record."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure(level: str | int = "INFO", fmt: str = "text") -> None:
    """(Re)install the one stderr handler on the root logger with the ``fmt`` formatter."""
    root = logging.getLogger()
    if _State.handler is not None:
        root.removeHandler(_State.handler)
    handler = logging.StreamHandler(sys.stderr)
    _State.json = fmt == "json"
    handler.setFormatter(JsonFormatter() if _State.json else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    _State.handler = handler
    logging.captureWarnings(_State.json)  # warnings.warn() output as records, not raw text


def json_enabled() -> bool:
    return _State.json


def progress_enabled() -> bool:
    """Progress bars only on a terminal, and never between JSON log lines."""
    return sys.stderr.isatty() and not _State.json
