"""The popular_tracks_mv refresh: once per interval across every process sharing the database."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from edge import keys
from edge.jobs import refresh_popular
from edge.metrics import Metrics


async def test_refresh_updates_the_view(client: Any, catalog: dict[str, Any], db: Any) -> None:
    track = catalog["tracks"]["largo"]
    await db.execute("UPDATE tracks SET play_count = 10000000 WHERE id = $1", track)
    pool = client.app[keys.PG_POOL]
    assert await refresh_popular(pool, Metrics())
    assert await db.fetchval("SELECT track_id FROM popular_tracks_mv WHERE rank = 1") == track


async def test_many_processes_refresh_once(database_url: str, catalog: dict[str, Any]) -> None:
    # Five "processes" (own pools) whose timers fire together: exactly one refreshes.
    pools = [await asyncpg.create_pool(database_url, min_size=1, max_size=1) for _ in range(5)]
    try:
        results = await asyncio.gather(*(refresh_popular(p, Metrics(), 60.0) for p in pools))
        assert sorted(results) == [False, False, False, False, True]
        # Within the interval nobody refreshes again; with no minimum age one may.
        assert not await refresh_popular(pools[0], Metrics(), 60.0)
        assert await refresh_popular(pools[1], Metrics(), 0.0)
        runs = await pools[0].fetchval("SELECT runs FROM job_runs WHERE name = 'refresh_popular'")
        assert runs == 2
    finally:
        for p in pools:
            await p.close()
