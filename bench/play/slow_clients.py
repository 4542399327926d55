"""N concurrent slow players in proxy mode, and Edge's memory while they are all connected.

Each client opens its own TCP connection (small receive buffer, so backpressure reaches Edge
instead of piling up in the client's kernel), sends one `GET /play/{id}?mode=proxy&sid=...` with
its own session id, reads the status line and headers, then reads the body at RATE bytes per
second. The script samples Edge's memory before the first connection and while all of them are
open, and checks they really are concurrent: Edge's `edge_http_requests_in_flight`, and the
established connections to Edge's port counted with `ss`.

    python bench/play/slow_clients.py --base http://127.0.0.1:PORT --pid EDGE_PID \
        --tokens tokens.txt --ids ids.txt --count 1000 --rate 4096 --hold 30 --json out.json

Prints one `SLOW_RESULT {...}` line (and writes it to --json).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any

METRIC = re.compile(r"^(\w+)(?:\{[^}]*\})? (\S+)$", re.M)


def vm_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def scrape(base: str) -> dict[str, float]:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    wanted = ("process_resident_memory_bytes", "edge_http_requests_in_flight", "process_open_fds")
    return {m.group(1): float(m.group(2)) for m in METRIC.finditer(text) if m.group(1) in wanted}


def established(port: int) -> tuple[int, int]:
    """Established TCP connections whose local port is Edge's (the server side of each), and
    the bytes their kernel send queues hold (Send-Q: not yet acknowledged by the player). That
    memory is the kernel's, not in Edge's RSS, but a slow player costs it all the same."""
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    ).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()]
    return len(rows), sum(int(row[1]) for row in rows)


def sample(base: str, pid: int, port: int) -> dict[str, Any]:
    m = scrape(base)
    connections, send_queues = established(port)
    return {
        "t": round(time.time(), 1),
        "vmrss_mb": round(vm_rss_bytes(pid) / 2**20, 1),
        "process_resident_memory_mb": round(m.get("process_resident_memory_bytes", 0) / 2**20, 1),
        "in_flight": m.get("edge_http_requests_in_flight"),
        "open_fds": m.get("process_open_fds"),
        "established_to_edge_port": connections,
        "kernel_send_queues_mb": round(send_queues / 2**20, 1),
    }


class Client:
    def __init__(self) -> None:
        self.status: int | None = None
        self.error: str | None = None
        self.body_bytes = 0
        self.content_length: int | None = None
        self.started: float | None = None
        self.headers_at: float | None = None
        self.ended = False  # the body ended (complete, or the connection closed)
        self.answered = asyncio.Event()  # set once the status line arrived, or it failed


async def run_client(
    c: Client,
    host: str,
    port: int,
    path: str,
    token: str,
    rate: int,
    rcvbuf: int,
    stop: asyncio.Event,
) -> None:
    c.started = time.time()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    writer = None
    try:
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), 30)
        reader, writer = await asyncio.open_connection(sock=sock, limit=rate)
        writer.write(
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                f"Authorization: Bearer {token}\r\nUser-Agent: slow-client\r\n\r\n"
            ).encode()
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
        lines = head.decode("latin-1").split("\r\n")
        c.status = int(lines[0].split()[1])
        c.headers_at = time.time()
        c.answered.set()
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                c.content_length = int(value.strip())
        if c.status not in (200, 206):
            c.error = f"status {c.status}"
            return
        # Read RATE bytes a second until told to stop or the body ends.
        while not stop.is_set():
            tick = loop.time()
            got = 0
            while got < rate:
                block = await reader.read(rate - got)
                if not block:
                    c.ended = True
                    return
                got += len(block)
                c.body_bytes += len(block)
            await asyncio.sleep(max(0.0, 1.0 - (loop.time() - tick)))
    except Exception as exc:  # counted by kind, never fatal to the run
        c.error = type(exc).__name__
    finally:
        c.answered.set()
        if writer is not None:
            writer.close()
        else:
            sock.close()


async def main_async(a: argparse.Namespace) -> dict[str, Any]:
    base = a.base.rstrip("/")
    host, port = base.split("//", 1)[1].split(":")
    port_n = int(port)
    tokens, ids = a.token_list, a.id_list
    rng = random.Random(7)
    result: dict[str, Any] = {"count": a.count, "rate_bytes_per_s": a.rate, "rcvbuf": a.rcvbuf}
    result["before"] = await asyncio.to_thread(sample, base, a.pid, port_n)

    clients = [Client() for _ in range(a.count)]
    stop = asyncio.Event()
    tasks = []
    started = time.time()
    for k, c in enumerate(clients):
        sid = secrets.token_urlsafe(16)
        path = f"/play/{rng.choice(ids)}?mode=proxy&format={a.format}&sid={sid}"
        tasks.append(
            asyncio.create_task(
                run_client(c, host, port_n, path, tokens[k % len(tokens)], a.rate, a.rcvbuf, stop)
            )
        )
        if (k + 1) % a.batch == 0:
            await asyncio.sleep(a.batch / a.ramp)  # ramp: RAMP connections a second
    # Wait until every client has its status line (or failed).
    await asyncio.wait(
        [asyncio.create_task(c.answered.wait()) for c in clients], timeout=a.connect_timeout
    )
    result["ramp_seconds"] = round(time.time() - started, 1)
    await asyncio.sleep(a.settle)

    samples = []
    hold_until = time.time() + a.hold
    while True:
        s = await asyncio.to_thread(sample, base, a.pid, port_n)
        s["streaming_clients"] = sum(
            1 for c in clients if c.status in (200, 206) and not c.ended and c.error is None
        )
        samples.append(s)
        print(f"  slow clients: {json.dumps(s)}", file=sys.stderr)
        if time.time() >= hold_until:
            break
        await asyncio.sleep(a.sample_every)
    stop.set()
    await asyncio.wait(tasks, timeout=15)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(3)
    result["after_close"] = await asyncio.to_thread(sample, base, a.pid, port_n)

    statuses = collections.Counter(str(c.status) for c in clients)
    waits: dict[str, list[float]] = collections.defaultdict(list)
    for c in clients:
        if c.status is not None and c.started is not None and c.headers_at is not None:
            waits[str(c.status)].append(c.headers_at - c.started)
    # How long each kind of answer took to arrive (a 504 after the upstream connect timeout).
    result["seconds_to_status_median"] = {
        k: round(sorted(v)[len(v) // 2], 2) for k, v in waits.items()
    }
    errors = collections.Counter(c.error for c in clients if c.error)
    streaming = [s["streaming_clients"] for s in samples]
    result.update(
        samples=samples,
        statuses=dict(statuses),
        errors=dict(errors),
        ended_early=sum(1 for c in clients if c.ended),
        body_mb=round(sum(c.body_bytes for c in clients) / 2**20, 1),
        min_streaming=min(streaming),
        max_rss_mb=max(s["vmrss_mb"] for s in samples),
        max_process_resident_memory_mb=max(s["process_resident_memory_mb"] for s in samples),
        min_in_flight=min(s["in_flight"] or 0 for s in samples),
        min_established=min(s["established_to_edge_port"] for s in samples),
        max_kernel_send_queues_mb=max(s["kernel_send_queues_mb"] for s in samples),
    )
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base", required=True)
    p.add_argument("--pid", type=int, required=True, help="edge serve's pid (for VmRSS)")
    p.add_argument("--tokens", required=True, help="file of player tokens, one a line")
    p.add_argument("--ids", required=True, help="file of track ids, one a line")
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--format", default="flac", help="format= of the requests (the largest file)")
    p.add_argument("--rate", type=int, default=4096, help="bytes a second per client")
    p.add_argument("--rcvbuf", type=int, default=8192, help="SO_RCVBUF of each client socket")
    p.add_argument("--ramp", type=float, default=250.0, help="new connections a second")
    p.add_argument("--batch", type=int, default=25)
    p.add_argument("--connect-timeout", type=float, default=60.0)
    p.add_argument("--settle", type=float, default=5.0, help="seconds after the ramp")
    p.add_argument("--hold", type=float, default=30.0, help="seconds of sampling, all connected")
    p.add_argument("--sample-every", type=float, default=5.0)
    p.add_argument("--json")
    a = p.parse_args()
    with open(a.tokens) as f:
        a.token_list = f.read().split()
    with open(a.ids) as f:
        a.id_list = f.read().split()
    result = asyncio.run(main_async(a))
    line = json.dumps(result)
    if a.json:
        with open(a.json, "w") as f:
            f.write(line + "\n")
    print("SLOW_RESULT " + line)


if __name__ == "__main__":
    main()
