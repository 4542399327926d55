"""SIGINT/SIGTERM for `edge serve`: stop serving, or, during the start, stop the start."""

from __future__ import annotations

import asyncio
import signal


class Stop:
    """Installs the handlers for the current task. A signal sets `event`; until `started()`
    it also cancels the task, so a long start (seeding the demo catalog) is interrupted and
    leaves through its cleanups."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self._main = asyncio.current_task()
        self._started = False
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal)

    def started(self) -> None:
        self._started = True

    async def wait(self) -> None:
        await self.event.wait()

    def _on_signal(self) -> None:
        if self.event.is_set():
            return
        self.event.set()
        if not self._started and self._main is not None:
            self._main.cancel()
