"""Showing text that a sender wrote (DICOM values, file names) in logs and on a terminal.

A DICOM sender controls every string in its data sets. Written raw, a newline in a value
forges a log line, and an escape sequence (``ESC [2J``) drives the terminal of whoever reads
the worklist. :func:`escape_text` is the one place where such text is made safe to show: the
log formatters (:mod:`cxr_worker.logs`) pass every message through it, and the command line
passes every sender-supplied field of its text output through it. JSON output needs nothing
more: ``json.dumps`` escapes control characters itself.

Decisions:

- control characters (C0, DEL, C1), the line and paragraph separators U+2028/U+2029 (line
  breaks to ``str.splitlines`` and JavaScript) and the bidirectional overrides and isolates
  (U+202A-U+202E, U+2066-U+2069, which reorder what a terminal shows) become ``\\xNN`` or
  ``\\uNNNN``; everything else, Japanese or accented names included, is kept as it is;
- a backslash is kept as it is: escaped text then never grows on a second pass (a reason
  escaped when stored is shown unchanged), and a literal ``\\x0a`` a sender writes still
  cannot start a line.
"""

from __future__ import annotations

import re

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")

# how much of a sender's value a message quotes (gate reasons): enough to recognise it
QUOTE_LIMIT = 64


def _escape(m: re.Match[str]) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_text(s: str) -> str:
    """``s`` with every control character shown as an escape (``\\n`` as ``\\x0a``, ESC as
    ``\\x1b``, U+2028 as ``\\u2028``): one line, nothing a terminal acts on."""
    return _UNSAFE.sub(_escape, s)


def quote_value(value: object, limit: int = QUOTE_LIMIT) -> str:
    """A sender's value for a message: cut to ``limit`` characters (``...`` added) and
    escaped."""
    s = str(value)
    return escape_text(s[:limit]) + ("..." if len(s) > limit else "")
