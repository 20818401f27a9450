"""Live updates: the worklist version, and ``GET /api/v1/events`` (server-sent events).

The version is the counter in ``worklist_version`` that database triggers raise when a
change the list shows commits (migration 0005). One thread per process reads it once a
second (:class:`VersionWatcher`, started by the first subscriber), whatever the number of
open pages; each stream compares its last sent value with the watcher's in memory. A stream
sends ``retry: 3000``, then at once ``event: changed`` with ``id`` and ``data``
``{"version": N}`` (the current version, so a page that reconnects knows whether it missed
something), again whenever the version moves, and a ``: keepalive`` comment every 15 s
(proxies close idle connections). It ends when the server stops, or when its session or
token is no longer valid (checked every 30 s); the browser's EventSource reconnects.

The same version is the list's ETag (``GET /api/v1/studies``): a page may poll with
``If-None-Match`` instead and gets 304 until something changed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from cxr_worker.http import sleep_or_stop
from cxr_worker.worklist.models import WorklistVersion

logger = logging.getLogger(__name__)

POLL_SECONDS = 1.0
TICK_SECONDS = 0.25
KEEPALIVE_SECONDS = 15.0
RECHECK_SECONDS = 30.0


def read_version(engine: Engine) -> int:
    with Session(engine) as s:
        return int(s.scalar(select(WorklistVersion.version).where(WorklistVersion.id == 1))
                   or 0)


class VersionWatcher:
    def __init__(self, engine_of: Callable[[], Engine | None], stopping: threading.Event,
                 poll_seconds: float = POLL_SECONDS) -> None:
        self._engine_of = engine_of
        self._stopping = stopping
        self._poll = poll_seconds
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.version: int | None = None
        self._failing = False

    def ensure_running(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="worklist-version",
                                                daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            engine = self._engine_of()
            if engine is not None:
                try:
                    self.version = read_version(engine)
                    if self._failing:
                        logger.info("worklist version readable again")
                    self._failing = False
                except Exception as exc:
                    if not self._failing:
                        logger.warning("cannot read the worklist version: %s",
                                       type(exc).__name__)
                    self._failing = True
            self._stopping.wait(self._poll)


def event(version: int) -> str:
    return f"event: changed\nid: {version}\ndata: {json.dumps({'version': version})}\n\n"


async def stream(watcher: VersionWatcher, stopping: threading.Event,
                 still_allowed: Callable[[], Awaitable[bool]]) -> AsyncIterator[str]:
    watcher.ensure_running()
    yield "retry: 3000\n\n"
    loop = asyncio.get_running_loop()
    sent: int | None = None
    last_write = last_check = loop.time()
    while True:
        version = watcher.version
        now = loop.time()
        if version is not None and version != sent:
            sent, last_write = version, now
            yield event(version)
        elif now - last_write >= KEEPALIVE_SECONDS:
            last_write = now
            yield ": keepalive\n\n"
        if now - last_check >= RECHECK_SECONDS:
            last_check = now
            if not await still_allowed():
                return
        if await sleep_or_stop(stopping, TICK_SECONDS):
            return
