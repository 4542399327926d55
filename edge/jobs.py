"""Background work: refreshing popular_tracks_mv (once per interval across every Edge process that
shares the database) and warming the popular-tracks cache after each refresh."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import asyncpg
import structlog
from aiohttp import web

from edge import cache as ck
from edge import keys
from edge.cache import Cache
from edge.catalog import RECOUNT_SEARCH_WORDS_SQL, REFRESH_POPULAR_SQL, Catalog
from edge.metrics import Metrics

log = structlog.get_logger(__name__)

_REFRESH_LOCK = 0x65646770  # "edgp"
JOB_POPULAR = "refresh_popular"

CLAIM_SQL = """
INSERT INTO job_runs AS j (name, started_at) VALUES ($1, now())
ON CONFLICT (name) DO UPDATE SET started_at = now(), finished_at = NULL, status = 'running',
                                 runs = j.runs + 1
WHERE j.started_at < now() - make_interval(secs => $2)
RETURNING runs
"""
FINISH_SQL = "UPDATE job_runs SET finished_at = now(), status = $2 WHERE name = $1"


async def refresh_popular(pool: asyncpg.Pool, metrics: Metrics, min_age: float = 0.0) -> bool:
    """Refresh the view unless another process is doing it or did within `min_age` seconds.
    Returns whether this call refreshed it."""
    async with pool.acquire() as conn:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _REFRESH_LOCK):
            metrics.popular_refreshes.labels("skipped").inc()
            return False
        try:
            if await conn.fetchval(CLAIM_SQL, JOB_POPULAR, min_age) is None:
                metrics.popular_refreshes.labels("skipped").inc()
                return False
            status = "failed"
            started = time.perf_counter()
            try:
                await conn.execute(REFRESH_POPULAR_SQL)
                await conn.execute(RECOUNT_SEARCH_WORDS_SQL)
                status = "ok"
            finally:
                await conn.execute(FINISH_SQL, JOB_POPULAR, status)
                metrics.popular_refreshes.labels(status).inc()
                metrics.db_query_duration.labels("refresh_popular").observe(
                    time.perf_counter() - started
                )
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _REFRESH_LOCK)
    log.info("popular_refreshed", seconds=round(time.perf_counter() - started, 3))
    return True


async def warm_popular(app: web.Application) -> None:
    catalog = Catalog.of(app)
    cache: Cache = app[keys.CACHE]
    for limit in app[keys.SETTINGS].popular_warm_limits:

        async def load(limit: int = limit) -> bytes:
            return (await catalog.popular(limit, None)).body()

        await cache.refresh(
            "popular", ck.popular_key(limit), ck.TTL_POPULAR, load, field=ck.FIRST_PAGE, l1=True
        )


async def _refresh_loop(app: web.Application) -> None:
    interval = app[keys.SETTINGS].popular_refresh_seconds
    while True:
        await asyncio.sleep(interval)  # the schedule itself, not synchronisation
        try:
            # 0.9: a process whose timer fires a little early still leaves the run to the one
            # that ran on time.
            if await refresh_popular(app[keys.PG_POOL], app[keys.METRICS], interval * 0.9):
                await warm_popular(app)
        except Exception:
            log.exception("popular_refresh_failed")


FLUSH_PLAYS_SQL = """
WITH r AS (
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::int[],
                         $6::float8[]) AS r(track_id, user_id, session_id, format, bitrate, at)
    WHERE EXISTS (SELECT 1 FROM tracks t WHERE t.id = r.track_id)
), logged AS (
    INSERT INTO plays (track_id, user_id, session_id, format, bitrate_kbps, played_at)
    SELECT track_id, user_id, session_id, format, bitrate, to_timestamp(at) FROM r
)
UPDATE tracks t SET play_count = t.play_count + c.n
FROM (SELECT track_id, count(*) AS n FROM r GROUP BY track_id) c
WHERE t.id = c.track_id
"""
FLUSH_BATCH = 1000


async def flush_plays(app: web.Application) -> int:
    """Move queued plays from Redis to PostgreSQL: one statement per batch, no UPDATE per play.
    If PostgreSQL fails, the batch goes back to the head of the queue."""
    sessions = app[keys.SESSIONS]
    total = 0
    while True:
        rows = await sessions.take_plays(FLUSH_BATCH)
        if not rows:
            return total
        try:
            async with app[keys.PG_POOL].acquire() as conn:
                await conn.execute(
                    FLUSH_PLAYS_SQL,
                    [r["track_id"] for r in rows],
                    [r.get("user_id") for r in rows],
                    [r.get("session_id") for r in rows],
                    [r.get("format") for r in rows],
                    [r.get("bitrate_kbps") for r in rows],
                    [float(r.get("at") or time.time()) for r in rows],
                )
        except BaseException:
            await sessions.requeue_plays(rows)
            raise
        total += len(rows)
        app[keys.METRICS].plays_flushed.inc(len(rows))
        if len(rows) < FLUSH_BATCH:
            return total


async def _flush_loop(app: web.Application) -> None:
    interval = app[keys.SETTINGS].plays_flush_seconds
    while True:
        await asyncio.sleep(interval)  # the schedule itself
        try:
            flushed = await flush_plays(app)
            if flushed:
                log.info("plays_flushed", plays=flushed)
        except Exception:
            log.exception("plays_flush_failed")


LAG_TICK_SECONDS = 0.25
ACTIVE_REFRESH_SECONDS = 10.0


async def _lag_ticker(app: web.Application) -> None:
    """How late a timer fires is how long something blocked the event loop."""
    loop = asyncio.get_running_loop()
    histogram = app[keys.METRICS].loop_lag
    while True:
        expected = loop.time() + LAG_TICK_SECONDS
        await asyncio.sleep(LAG_TICK_SECONDS)
        histogram.observe(max(0.0, loop.time() - expected))


async def _active_sessions_loop(app: web.Application) -> None:
    """The cluster-wide active-session gauge, from Redis on a timer (never per scrape)."""
    while True:
        try:
            app[keys.METRICS].active_sessions.set(await app[keys.SESSIONS].active_count())
        except Exception as exc:  # Redis down: the cache logs the outage; keep the last value
            log.debug("active_sessions_unavailable", error=str(exc))
        await asyncio.sleep(ACTIVE_REFRESH_SECONDS)


async def _alerts_loop(app: web.Application) -> None:
    alerts = app[keys.ALERTS]
    interval = app[keys.SETTINGS].alert_interval_seconds
    while True:
        await asyncio.sleep(interval)  # the schedule itself
        try:
            alerts.evaluate()
        except Exception:
            log.exception("alerts_failed")


SAMPLE_SECONDS = 2.0


async def _sampler_loop(app: web.Application) -> None:
    sampler = app[keys.SAMPLER]
    while True:
        try:
            sampler.sample()
        except Exception:
            log.exception("dashboard_sample_failed")
        await asyncio.sleep(SAMPLE_SECONDS)  # the schedule itself


async def jobs_ctx(app: web.Application) -> AsyncIterator[None]:
    try:
        await warm_popular(app)
    except Exception:  # a cold cache is not a reason to refuse to start
        log.exception("cache_warm_failed")
    tasks = [
        asyncio.create_task(_refresh_loop(app), name="refresh-popular"),
        asyncio.create_task(_flush_loop(app), name="flush-plays"),
        asyncio.create_task(_lag_ticker(app), name="loop-lag"),
        asyncio.create_task(_alerts_loop(app), name="alerts"),
        asyncio.create_task(_sampler_loop(app), name="dashboard-sampler"),
        asyncio.create_task(_active_sessions_loop(app), name="active-sessions"),
    ]
    yield
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    # What players played until now reaches PostgreSQL before we stop.
    await app[keys.BACKGROUND].drain()
    try:
        await flush_plays(app)
    except Exception:
        log.exception("plays_flush_failed")
