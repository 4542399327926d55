"""Open N streaming sessions on one Edge (each `/play/{id}?sid=<new>` in redirect mode: a new
session per request), then time /metrics scrapes with them active.

    python bench/play/sessions.py --base http://127.0.0.1:PORT --players players.txt \
        --ids ids.txt --sessions 10000 --scrapes 50 --json out.json

1. `--scrapes` scrapes of /metrics before (the baseline), one after another with a short pause;
2. N /play requests at `--concurrency`, every one with its own new sid (statuses counted:
   all must be 302);
3. waits until Edge's `edge_stream_sessions_active` gauge (refreshed from Redis every 10 s)
   reports at least N, and counts the sessions in Redis' active set for comparison;
4. `--scrapes` scrapes again. Times are client-side (request sent -> body read) on 127.0.0.1.

Prints one `SESSIONS_RESULT {...}` line (and writes it to --json).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import re
import secrets
import statistics
import time
from typing import Any

import aiohttp

ACTIVE = re.compile(r"^edge_stream_sessions_active (\S+)$", re.M)


async def scrapes(session: aiohttp.ClientSession, base: str, n: int) -> dict[str, Any]:
    times, sizes = [], []
    for _ in range(n):
        t = time.perf_counter()
        async with session.get(base + "/metrics") as r:
            body = await r.read()
            assert r.status == 200, r.status
        times.append((time.perf_counter() - t) * 1000)
        sizes.append(len(body))
        await asyncio.sleep(0.05)
    times.sort()
    return {
        "n": n,
        "p50_ms": round(statistics.median(times), 2),
        "p90_ms": round(times[int(0.9 * (n - 1))], 2),
        "max_ms": round(times[-1], 2),
        "mean_ms": round(statistics.fmean(times), 2),
        "bytes": int(statistics.median(sizes)),
    }


async def active_gauge(session: aiohttp.ClientSession, base: str) -> float:
    async with session.get(base + "/metrics") as r:
        m = ACTIVE.search(await r.text())
    return float(m.group(1)) if m else -1.0


async def main_async(a: argparse.Namespace) -> dict[str, Any]:
    base = a.base.rstrip("/")
    players, ids = a.player_list, a.id_list
    rng = random.Random(11)
    result: dict[str, Any] = {"sessions": a.sessions}
    connector = aiohttp.TCPConnector(limit=a.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        result["gauge_before"] = await active_gauge(session, base)
        result["before"] = await scrapes(session, base, a.scrapes)

        statuses: collections.Counter[int] = collections.Counter()
        queue: asyncio.Queue[int] = asyncio.Queue()
        for k in range(a.sessions):
            queue.put_nowait(k)

        async def worker() -> None:
            while True:
                try:
                    k = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                token, *query = players[k % len(players)]
                params = {"sid": secrets.token_urlsafe(16)}
                for item in query:
                    name, _, value = item.partition("=")
                    params[name] = value
                async with session.get(
                    f"{base}/play/{rng.choice(ids)}",
                    params=params,
                    headers={"Authorization": f"Bearer {token}"},
                    allow_redirects=False,
                ) as r:
                    await r.read()
                    statuses[r.status] += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(a.concurrency)))
        elapsed = time.perf_counter() - started
        result["create_seconds"] = round(elapsed, 1)
        result["create_rps"] = round(a.sessions / elapsed, 1)
        result["statuses"] = {str(k): v for k, v in statuses.items()}

        deadline = time.time() + a.gauge_wait
        gauge = await active_gauge(session, base)
        while gauge < a.sessions and time.time() < deadline:
            await asyncio.sleep(1)
            gauge = await active_gauge(session, base)
        result["gauge_after"] = gauge
        result["after"] = await scrapes(session, base, a.scrapes)
        result["gauge_end"] = await active_gauge(session, base)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base", required=True)
    p.add_argument("--players", required=True, help="lines 'TOKEN [name=value ...]'")
    p.add_argument("--ids", required=True)
    p.add_argument("--sessions", type=int, default=10000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--scrapes", type=int, default=50)
    p.add_argument("--gauge-wait", type=float, default=30.0)
    p.add_argument("--json")
    a = p.parse_args()
    with open(a.players) as f:
        a.player_list = [line.split(" ", 1) for line in f.read().splitlines() if line]
    with open(a.ids) as f:
        a.id_list = f.read().split()
    result = asyncio.run(main_async(a))
    line = json.dumps(result)
    if a.json:
        with open(a.json, "w") as f:
            f.write(line + "\n")
    print("SESSIONS_RESULT " + line)


if __name__ == "__main__":
    main()
