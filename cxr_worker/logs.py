"""Logging for the command line and the service: readable text lines, or one JSON object per
line (``[logging] format = "json"``) for log shippers.

One handler on the root logger, so third-party records (pynetdicom, APScheduler, Alembic,
SQLAlchemy, Python warnings) go through the same formatter as the worker's own.

Every record is one line, whatever its message holds: a sender's value quoted in a message
(a gate reason, an exception's text) may carry a newline that would forge a record, or an
escape sequence for the reader's terminal. Both formatters show the message, the exception
and the stack through :func:`cxr_worker.text.escape_text` (a newline as ``\\x0a``).

pydicom's and highdicom's warnings about invalid values quote the value, which may be a
patient's name, ID or birth date: :func:`configure` keeps them out (their loggers' records
below ERROR, and warnings raised in pydicom's modules, dropped).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import warnings
from typing import Any

from cxr_worker.text import escape_text

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# libraries whose warnings quote DICOM values: pydicom ("Invalid value for VR DA:
# '19800230x'"), highdicom ('value of argument "patient_name" is potentially invalid: "..."')
VALUE_QUOTING_LOGGERS = ("pydicom", "highdicom")


class _State:
    handler: logging.Handler | None = None
    json = False


def _message(record: logging.LogRecord) -> str:
    # a captured warning (py.warnings) ends with a newline: not part of what it says
    return escape_text(record.getMessage().rstrip("\n"))


class TextFormatter(logging.Formatter):
    """:data:`TEXT_FORMAT` with the message, and the traceback and stack appended to it,
    escaped: one line per record (the traceback's own line breaks show as ``\\x0a``)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        record.message = _message(record)
        record.asctime = self.formatTime(record, self.datefmt)
        s = self.formatMessage(record)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            s += escape_text("\n" + record.exc_text)
        if record.stack_info:
            s += escape_text("\n" + self.formatStack(record.stack_info))
        return s


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message"}``, plus ``exception`` (the traceback) and
    ``stack`` when the record carries them; one line per record, and no control character
    in any field once decoded (escaped as in the text format)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": _message(record),
        }
        if record.exc_info:
            out["exception"] = escape_text(self.formatException(record.exc_info))
        elif record.exc_text:
            out["exception"] = escape_text(record.exc_text)
        if record.stack_info:
            out["stack"] = escape_text(self.formatStack(record.stack_info))
        return json.dumps(out, ensure_ascii=False, default=str)


def configure(level: str | int = "INFO", fmt: str = "text") -> None:
    """(Re)install the one stderr handler on the root logger with the ``fmt`` formatter."""
    root = logging.getLogger()
    if _State.handler is not None:
        root.removeHandler(_State.handler)
    handler = logging.StreamHandler(sys.stderr)
    _State.json = fmt == "json"
    handler.setFormatter(JsonFormatter() if _State.json else TextFormatter())
    handler.addFilter(_drop_value_warnings)
    root.addHandler(handler)
    root.setLevel(level)
    _State.handler = handler
    # warnings.warn() output as records through the formatter (escaped), never raw text
    logging.captureWarnings(True)
    quiet_value_warnings()


def quiet_value_warnings() -> None:
    """pydicom's and highdicom's value warnings out of the logs.

    A level set on the ``pydicom`` logger does not hold: ``import pydicom.config`` sets it
    to WARNING (``debug(False)`` at import), and the commands import pydicom after start-up.
    So the handler drops the records of :data:`VALUE_QUOTING_LOGGERS` below ERROR whatever
    their level (:func:`_drop_value_warnings`; tqdm's handler during a replay copies the
    filter), and warnings raised in pydicom's modules are ignored. pydicom is not imported
    here: it costs ~0.3 s that ``worklist`` and ``doctor`` do not need.
    """
    for name in VALUE_QUOTING_LOGGERS:  # until pydicom.config resets it
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"(pydicom|highdicom)(\.|$)")


def _drop_value_warnings(record: logging.LogRecord) -> bool:
    """False (drop) for records of :data:`VALUE_QUOTING_LOGGERS` below ERROR."""
    return record.levelno >= logging.ERROR or record.name.split(".")[0] not in (
        VALUE_QUOTING_LOGGERS)


def json_enabled() -> bool:
    return _State.json


def progress_enabled() -> bool:
    """Progress bars only on a terminal, and never between JSON log lines."""
    return sys.stderr.isatty() and not _State.json
