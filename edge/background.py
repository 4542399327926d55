"""Fire-and-forget work off the response path (session bookkeeping), kept referenced until done
and awaited at shutdown, with a bound so a stuck Redis cannot pile tasks up without limit."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import structlog

log = structlog.get_logger(__name__)


class Background:
    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self._tasks: set[asyncio.Task[Any]] = set()
        self.dropped = 0

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        if len(self._tasks) >= self.limit:
            coro.close()
            self.dropped += 1
            log.warning("background_dropped", pending=len(self._tasks))
            return
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.warning("background_failed", error=f"{type(exc).__name__}: {exc}")

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def __len__(self) -> int:
        return len(self._tasks)
