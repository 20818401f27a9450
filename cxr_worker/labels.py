"""The words a result is given, shared by score, report and the worklist."""

from __future__ import annotations

import enum


class Label(enum.StrEnum):
    SUSPECTED = "SUSPECTED PNEUMONIA"
    NEGATIVE = "NO PNEUMONIA DETECTED"
