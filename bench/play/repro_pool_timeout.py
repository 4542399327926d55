"""Reproduce, outside Edge, the instant 504s seen in bench/play.sh's proxy runs: with aiohttp
3.14.5, a pooled keep-alive connection whose response was abandoned mid-body (the player hung up,
the handler was cancelled) can come back from the pool carrying a stale `sock_read` timer; once
that timer fires while the connection sits idle, the next request that reuses it fails at once
with `SocketTimeoutError: Timeout on reading data from socket`. Edge's Cdn.fetch maps that to
504 "origin did not answer in time" and does not retry. Upstream: aio-libs/aiohttp#12953 and
#12795 (fixed for the completed-response path in 3.14.x; this cancelled-mid-body path still
fails on 3.14.5).

Uses Edge's connector settings (limit 512, 256 per host, keepalive 30 s) with a 3 s sock_read
instead of 10 s to be quick:

    python bench/play/repro_pool_timeout.py http://127.0.0.1:NGINX/demo/10001/flac.flac
    python bench/play/repro_pool_timeout.py URL --keepalive 2    # keep-alive < sock_read: none

The failure is timing-dependent (how much of each body was buffered when it was abandoned):
run it a few times.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiohttp


async def fetch(session: aiohttp.ClientSession, url: str, timeout: aiohttp.ClientTimeout) -> int:
    r = await session.get(url, headers={"Range": "bytes=0-1048575"}, timeout=timeout)
    try:
        got = 0
        while got < 1048576:  # read like Edge's proxy: 64 KiB at a time, until the range is done
            block = await asyncio.wait_for(r.content.read(65536), 10)
            if not block:
                break
            got += len(block)
            await asyncio.sleep(0.001)  # a client draining slowly
        return got
    finally:
        r.release()


async def main_async(a: argparse.Namespace) -> None:
    timeout = aiohttp.ClientTimeout(total=None, connect=2, sock_read=a.sock_read)
    connector = aiohttp.TCPConnector(limit=512, limit_per_host=256, keepalive_timeout=a.keepalive)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        # 32 proxied ranges in flight, all abandoned after a moment (players hanging up).
        tasks = [asyncio.create_task(fetch(session, a.url, timeout)) for _ in range(32)]
        await asyncio.sleep(a.cancel_after)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(a.idle)  # a lull longer than sock_read, shorter than keep-alive
        failures: list[str] = []

        async def one() -> None:
            started = time.monotonic()
            try:
                await fetch(session, a.url, timeout)
            except Exception as exc:  # what Edge would answer 504 for
                elapsed = time.monotonic() - started
                failures.append(f"{type(exc).__name__}: {exc} after {elapsed:.3f} s")

        await asyncio.gather(*(one() for _ in range(32)))
    for f in failures[:5]:
        print("  " + f)
    print(
        f"aiohttp {aiohttp.__version__}: abandoned 32 after {a.cancel_after} s, idle {a.idle} s"
        f" (sock_read {a.sock_read} s, keepalive {a.keepalive} s): {len(failures)} of 32 next"
        " requests failed"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("url", help="a file of at least 1 MiB on an HTTP server with ranges (nginx)")
    p.add_argument("--sock-read", type=float, default=3.0)
    p.add_argument("--keepalive", type=float, default=30.0)
    p.add_argument("--cancel-after", type=float, default=0.05)
    p.add_argument("--idle", type=float, default=5.0)
    a = p.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main_async(a))


if __name__ == "__main__":
    main()
