"""Operations endpoints: /healthz, /readyz, /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from edge import keys

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


@routes.get("/metrics", name="metrics")
async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[keys.METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
