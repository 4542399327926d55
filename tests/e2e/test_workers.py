"""`edge serve --workers 2`, end to end: real processes on one port, one scrape that sums them,
a worker killed and started again, and a stop that leaves nothing behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge.cli import LISTEN_BACKLOG
from edge.embedded import free_port
from tests.conftest import Servers
from tests.e2e.test_zero_config import listen_backlogs

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

START_DEADLINE = 60.0
STOP_DEADLINE = 30.0


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def until(check: Callable[[], bool], deadline: float, what: str) -> None:
    """Poll an outside process until `check()` holds."""
    end = time.monotonic() + deadline
    while True:
        try:
            if check():
                return
        except (OSError, urllib.error.URLError):
            pass  # not listening yet
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {deadline} s")
        time.sleep(0.05)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def healthz_count(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> float:
    return sum(
        v
        for (name, labels), v in samples.items()
        if name == "edge_http_requests_total" and ("route", "healthz") in labels
    )


def workers_of(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(proc.pid).children():
        try:
            if "--worker-dir" in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.Error:  # exited while we looked
            pass
    return found


def exited(process: psutil.Process) -> bool:
    """Gone or a zombie: its sockets are closed (the kernel closes files before the zombie)."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def edge_env(
    servers: Servers, database_url: str, redis_prefix: str, tmp_path: Path
) -> dict[str, str]:
    """This machine's environment, pointed at this test's database and Redis prefix only."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DB_", "REDIS_", "EDGE_")) and k != "DATABASE_URL"
    }
    return env | {
        "DATABASE_URL": database_url,
        "REDIS_URL": servers.redis_url,
        "EDGE_REDIS_KEY_PREFIX": redis_prefix,
        "EDGE_DATA_DIR": str(tmp_path / "data"),
        "EDGE_LOG_FORMAT": "json",
        "DB_POOL_MIN": "1",
        "DB_POOL_MAX": "2",
    }


@pytest.fixture
def supervisor(
    servers: Servers, database_url: str, redis_prefix: str, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    env = edge_env(servers, database_url, redis_prefix, tmp_path)
    log = (tmp_path / "edge.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge", "serve", "--workers", "2", "--port", str(port)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
    )
    try:
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(STOP_DEADLINE)
        log.close()


def test_two_workers_one_port_one_summed_scrape(
    supervisor: tuple[subprocess.Popen[bytes], int],
) -> None:
    proc, port = supervisor
    until(lambda: scrape(port).get(("edge_workers", ())) == 2, START_DEADLINE, "two workers up")
    first = workers_of(proc)
    assert len(first) == 2
    # Each worker's listener (SO_REUSEPORT: one queue each) holds a burst of players.
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    assert listen_backlogs(port) == [min(LISTEN_BACKLOG, somaxconn)] * 2

    # Requests on fresh connections, which the kernel spreads over both listeners.
    before = healthz_count(scrape(port))
    for _ in range(60):
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    samples = scrape(port)
    assert healthz_count(samples) - before == 60
    assert samples[("edge_workers", ())] == 2
    # Two processes' memory, summed: more than either worker has alone.
    alone = max(p.memory_info().rss for p in first)
    assert samples[("process_resident_memory_bytes", ())] > alone

    # A worker that dies is started again; the port keeps answering meanwhile. (A connection
    # the kernel had handed to the dying worker's listener is reset: SO_REUSEPORT gives each
    # listener its own queue. A player retries; so does this loop, once per request.)
    first[0].kill()
    until(lambda: exited(first[0]), STOP_DEADLINE, "the killed worker gone")
    resets = 0
    for _ in range(20):
        try:
            status = get(f"http://127.0.0.1:{port}/healthz")[0]
        except ConnectionResetError:
            resets += 1
            status = get(f"http://127.0.0.1:{port}/healthz")[0]
        assert status == 200
    assert resets <= 1
    until(
        lambda: (
            len(workers_of(proc)) == 2 and first[0].pid not in {p.pid for p in workers_of(proc)}
        ),
        START_DEADLINE,
        "the killed worker replaced",
    )
    until(lambda: scrape(port).get(("edge_workers", ())) == 2, START_DEADLINE, "both answer")

    # SIGTERM stops the workers, then the supervisor; nothing is left behind.
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(STOP_DEADLINE) == 0
    _gone, alive = psutil.wait_procs(children, timeout=STOP_DEADLINE)
    assert alive == []


def test_workers_need_a_fixed_port() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edge", "serve", "--workers", "2", "--port", "0"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert b"--workers needs a fixed port" in result.stderr


def test_workers_that_cannot_start_make_the_supervisor_give_up(
    servers: Servers, database_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    """The port is taken by someone else: every worker fails to bind. The supervisor says so
    and exits with 1, instead of restarting them forever."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    env = edge_env(servers, database_url, redis_prefix, tmp_path)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge", "serve", "--workers", "2", "--port", str(port)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    finally:
        taken.close()
    assert proc.returncode == 1, err[-2000:]
    assert b"exited 3 times within 10 s of its start" in err
    assert b'"event": "worker_exited"' in err
