"""`edge serve --workers N`: a supervisor and N worker processes sharing one port.

One Python process serves one core. With N workers the kernel spreads connections over N
processes listening on the same port (SO_REUSEPORT). The supervisor starts what they share
first: the embedded PostgreSQL and Redis when none is configured, migrations, the demo catalog;
then it starts the workers, starts a worker again when one dies, and on SIGINT/SIGTERM stops
them all (SIGKILL after the shutdown timeout) before its own servers. Every worker gets
PR_SET_PDEATHSIG, so a SIGKILLed supervisor leaves no worker behind either.

Each worker also listens on a Unix socket in a private directory; `/metrics` on any worker
asks the others for their own numbers there and answers with the sum (metrics.
merge_expositions), so Prometheus scraping the one port sees the whole edge.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import tempfile
import time
from pathlib import Path

import structlog

from edge.embedded import _child_setup, embedded_postgres, embedded_redis
from edge.resources import prepare_schema
from edge.settings import Settings
from edge.signals import Stop

log = structlog.get_logger(__name__)

STOP_GRACE_SECONDS = 15.0  # the workers' own shutdown timeout (10 s) and some
RESTART_DELAY_SECONDS = 1.0  # a worker that dies at once is not restarted in a hot loop
# A worker that exits this soon after its start, this many times in a row, cannot start at all
# (the port is taken, the configuration is wrong): the supervisor gives up and exits.
EARLY_EXIT_SECONDS = 10.0
EARLY_EXITS_TO_GIVE_UP = 3


class WorkersFailing(Exception):
    pass


def socket_path(worker_dir: Path, pid: int) -> Path:
    return worker_dir / f"{pid}.sock"


class Supervisor:
    def __init__(self, settings: Settings, worker_dir: Path, database_url: str, redis_url: str):
        self.settings = settings
        self.worker_dir = worker_dir
        self.database_url = database_url
        self.redis_url = redis_url
        self.stopping = False
        self.procs: dict[int, asyncio.subprocess.Process] = {}  # slot -> process
        self.started_at: dict[int, float] = {}

    def command(self) -> list[str]:
        s = self.settings
        cmd = [sys.executable, "-m", "edge", "serve", "--host", s.host, "--port", str(s.port)]
        cmd += ["--workers", "1", "--worker-dir", str(self.worker_dir)]
        if s.database_url is None:
            cmd += ["--supervisor-database-url", self.database_url]
        if s.redis_url is None:
            cmd += ["--supervisor-redis-url", self.redis_url]
        return cmd

    async def start(self, slot: int) -> None:
        proc = await asyncio.create_subprocess_exec(*self.command(), preexec_fn=_child_setup())
        self.procs[slot] = proc
        self.started_at[slot] = time.monotonic()
        log.info("worker_started", slot=slot, pid=proc.pid)

    async def watch(self, slot: int) -> None:
        """Keep a worker in `slot` running until the supervisor stops; raise WorkersFailing if
        it cannot start at all."""
        early_exits = 0
        while not self.stopping:
            proc = self.procs[slot]
            code = await proc.wait()
            socket_path(self.worker_dir, proc.pid).unlink(missing_ok=True)
            if self.stopping:
                return
            lived = time.monotonic() - self.started_at[slot]
            early_exits = early_exits + 1 if lived < EARLY_EXIT_SECONDS else 0
            log.error("worker_exited", slot=slot, pid=proc.pid, code=code, lived_s=round(lived, 1))
            if early_exits >= EARLY_EXITS_TO_GIVE_UP:
                raise WorkersFailing(
                    f"worker {slot} exited {early_exits} times within {EARLY_EXIT_SECONDS:.0f} s"
                    " of its start (see its log lines above)"
                )
            await asyncio.sleep(RESTART_DELAY_SECONDS)  # back-off, not synchronisation
            if not self.stopping:
                await self.start(slot)

    async def stop(self) -> None:
        self.stopping = True
        running = [p for p in self.procs.values() if p.returncode is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        waits = [asyncio.ensure_future(p.wait()) for p in running]
        if not waits:
            return
        _, late = await asyncio.wait(waits, timeout=STOP_GRACE_SECONDS)
        for proc in running:
            if proc.returncode is None:
                log.error("worker_killed", pid=proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        if late:
            await asyncio.wait(late)


async def supervise(settings: Settings) -> None:
    """Run settings.workers workers until SIGINT/SIGTERM (a signal during the start, e.g. while
    the demo catalog is seeded, stops the start)."""
    stop = Stop()
    async with contextlib.AsyncExitStack() as stack:
        database_url: str
        redis_url: str
        if settings.database_url is not None:
            database_url = settings.database_url
        else:
            database_url = await stack.enter_async_context(embedded_postgres(settings.data_dir))
        if settings.redis_url is not None:
            redis_url = settings.redis_url
        else:
            redis_url = await stack.enter_async_context(embedded_redis(settings.data_dir))
        await prepare_schema(settings, database_url)
        worker_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edge-workers-")))
        supervisor = Supervisor(settings, worker_dir, database_url, redis_url)
        stack.push_async_callback(supervisor.stop)
        for slot in range(settings.workers):
            await supervisor.start(slot)
        watchers = [asyncio.ensure_future(supervisor.watch(slot)) for slot in supervisor.procs]
        stop.started()
        log.info(
            "supervising",
            workers=settings.workers,
            url=f"http://{settings.host}:{settings.port}/",
            pids=[p.pid for p in supervisor.procs.values()],
        )
        try:
            # Until a signal, or until a worker turns out unable to start.
            stopping = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait([stopping, *watchers], return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            for task in done:
                if task is not stopping and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            log.info("stopping")
        finally:
            supervisor.stopping = True
            for watcher in watchers:
                watcher.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
