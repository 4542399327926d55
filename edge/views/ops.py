"""Operations endpoints: /healthz, /readyz, /metrics, and the live /dashboard."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable
from pathlib import Path

import aiohttp
import aiohttp_jinja2
import orjson
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from edge import keys
from edge.metrics import merge_expositions
from edge.workers import socket_path

log = structlog.get_logger(__name__)

routes = web.RouteTableDef()
READY_TIMEOUT = 1.0


@routes.get("/healthz", name="healthz")
async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


async def _check(probe: Awaitable[object]) -> str | None:
    try:
        await asyncio.wait_for(probe, READY_TIMEOUT)
    except Exception as exc:  # any failure means "not ready"; the reason is reported
        return f"{type(exc).__name__}: {exc}"[:200] or type(exc).__name__
    return None


@routes.get("/readyz", name="readyz")
async def readyz(request: web.Request) -> web.Response:
    pg_error, redis_error = await asyncio.gather(
        _check(request.app[keys.PG_POOL].fetchval("SELECT 1")),
        _check(request.app[keys.REDIS].ping()),
    )
    checks = {
        "postgres": "ok" if pg_error is None else f"down: {pg_error}",
        "redis": "ok" if redis_error is None else f"down: {redis_error}",
    }
    ready = pg_error is None and redis_error is None
    return web.Response(
        body=orjson.dumps({"status": "ready" if ready else "not_ready", "checks": checks}),
        status=200 if ready else 503,
        content_type="application/json",
    )


SIBLING_TIMEOUT = 2.0


@routes.get("/metrics", name="metrics")
async def metrics(request: web.Request) -> web.Response:
    """This process's metrics; for a worker of `edge serve --workers N`, the sum over all
    workers (`?scope=worker`: only this one's, which is what the siblings ask each other)."""
    own = generate_latest(request.app[keys.METRICS].registry)
    worker_dir = request.app[keys.SETTINGS].worker_dir
    if worker_dir is None or request.query.get("scope") == "worker":
        return web.Response(body=own, headers={"Content-Type": CONTENT_TYPE_LATEST})
    mine = socket_path(worker_dir, os.getpid())
    siblings = [p for p in worker_dir.glob("*.sock") if p != mine]
    answers = await asyncio.gather(*(_worker_metrics(p) for p in siblings))
    texts = [own.decode(), *(text for text in answers if text is not None)]
    # Parsing and summing a few thousand lines per worker: off the event loop.
    body = await asyncio.to_thread(merge_expositions, texts)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _worker_metrics(path: Path) -> str | None:
    """Another worker's own metrics, or None if it does not answer (stopping, restarting)."""
    timeout = aiohttp.ClientTimeout(total=SIBLING_TIMEOUT)
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(path)), timeout=timeout
        ) as session:
            async with session.get("http://worker/metrics?scope=worker") as resp:
                resp.raise_for_status()
                return await resp.text()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        log.warning("worker_metrics_missing", socket=path.name, error=type(exc).__name__)
        return None


CHARTS = (
    {"id": "rps", "title": "Requests per second by route", "series": "rps.*", "unit": "req/s"},
    {"id": "p95", "title": "p95 response time by route", "series": "latency.*", "unit": "ms"},
    {"id": "sessions", "title": "Active streaming sessions", "series": "sessions", "unit": ""},
    {
        "id": "pool",
        "title": "Database pool",
        "series": "pool.in_use,pool.idle,pool.waiting",
        "unit": "conns",
    },
    {"id": "hit", "title": "Cache hit ratio by cache", "series": "hit_ratio.*", "unit": ""},
    {"id": "memory", "title": "Memory (RSS)", "series": "memory_mb", "unit": "MB"},
    {"id": "cpu", "title": "CPU", "series": "cpu_percent", "unit": "%"},
    {"id": "bytes", "title": "Bytes streamed per second", "series": "bytes_per_s", "unit": "B/s"},
    {
        "id": "buffer",
        "title": "Buffer events and errors per second",
        "series": "buffer_per_s,errors_per_s",
        "unit": "/s",
    },
)


@routes.get("/dashboard", name="dashboard")
@aiohttp_jinja2.template("dashboard.html")
async def dashboard(request: web.Request) -> dict[str, object]:
    static = request.app.router["static"]
    return {
        "charts": CHARTS,
        "data_url": request.app.router["dashboard_data"].url_for(),
        "css_url": static.url_for(filename="dashboard.css"),
        "js_url": static.url_for(filename="dashboard.js"),
    }


@routes.get("/dashboard/data", name="dashboard_data")
async def dashboard_data(request: web.Request) -> web.Response:
    sampler = request.app[keys.SAMPLER]
    body = {
        "points": list(sampler.points),
        "alerts": request.app[keys.ALERTS].as_json(),
        "statements": await sampler.statements(request.app[keys.PG_POOL]),
    }
    return web.Response(
        body=orjson.dumps(body),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )
