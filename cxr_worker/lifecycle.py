"""The process's life: wait for SIGTERM or SIGINT (``serve`` and ``web`` both stop on them)."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

logger = logging.getLogger(__name__)


def wait_for_stop_signal() -> int:
    """Block the main thread until SIGTERM or SIGINT; returns the signal's number."""
    stop = threading.Event()
    received: list[int] = []

    def _on_signal(signum: int, _frame: Any) -> None:
        logger.info("signal %d: shutting down", signum)
        received.append(signum)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    stop.wait()
    return received[0]
