"""The cache in front of the catalog: exact keys and TTLs, L1/Redis hits and misses, single-flight
loading, invalidation, warming, and serving from PostgreSQL while Redis is down."""

from __future__ import annotations

import asyncio
import base64
import logging
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from edge import keys
from edge.embedded import embedded_redis, free_port
from tests.conftest import sample

Client = Any


def cache_count(client: Client, cache: str, level: str, result: str) -> float:
    return sample(client, "edge_cache_requests_total", cache=cache, level=level, result=result)


def queries(client: Client, name: str) -> float:
    return sample(client, "edge_db_query_duration_seconds_count", query=name)


async def test_track_key_ttl_and_levels(
    client: Client, catalog: dict[str, Any], redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    track = catalog["tracks"]["formation"]
    first = await client.get(f"/api/v1/tracks/{track}")
    assert first.status == 200
    key = f"{redis_prefix}track:{track}"
    assert await redis_client.get(key) == await first.read()
    ttl = await redis_client.ttl(key)
    assert 3600 * 0.89 <= ttl <= 3600  # the guide's TTL, shortened by at most 10% jitter
    assert cache_count(client, "track", "redis", "miss") == 1
    assert queries(client, "track") == 1

    second = await client.get(f"/api/v1/tracks/{track}")
    assert await second.read() == await first.read()
    assert cache_count(client, "track", "l1", "hit") == 1
    assert queries(client, "track") == 1


async def test_redis_hit_without_l1(
    make_client: Any, catalog: dict[str, Any], redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    client = await make_client(cache_l1_ttl=0.0)
    track = catalog["tracks"]["hold"]
    await client.get(f"/api/v1/tracks/{track}")
    await client.get(f"/api/v1/tracks/{track}")
    assert cache_count(client, "track", "redis", "hit") == 1
    assert cache_count(client, "track", "redis", "miss") == 1
    assert queries(client, "track") == 1


async def test_search_key_holds_pages_as_fields(
    client: Client, catalog: dict[str, Any], redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    await client.get("/api/v1/search", params={"q": "Back in Black", "limit": "2"})
    await client.get("/api/v1/search", params={"q": "back  in black", "limit": "3"})
    encoded = base64.urlsafe_b64encode(b"back in black").rstrip(b"=").decode()
    key = f"{redis_prefix}search:{encoded}"
    assert sorted(await redis_client.hkeys(key)) == [b"2:", b"3:"]
    assert 600 * 0.89 <= await redis_client.ttl(key) <= 600
    assert queries(client, "search") == 2


async def test_popular_is_warmed_at_start(
    client: Client, catalog: dict[str, Any], redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    for limit in (20, 50):
        key = f"{redis_prefix}popular-tracks:{limit}"
        assert await redis_client.hexists(key, "")
        assert 1800 * 0.89 <= await redis_client.ttl(key) <= 1800
    before = queries(client, "popular")
    resp = await client.get("/api/v1/tracks/popular")
    assert resp.status == 200
    assert queries(client, "popular") == before
    assert cache_count(client, "popular", "l1", "hit") == 1


async def test_stampede_makes_one_query(make_client: Any, catalog: dict[str, Any]) -> None:
    client = await make_client(cache_l1_ttl=0.0, db_pool_max=2)
    track = catalog["tracks"]["largo"]
    responses = await asyncio.gather(*(client.get(f"/api/v1/tracks/{track}") for _ in range(1000)))
    assert {r.status for r in responses} == {200}
    assert queries(client, "track") == 1
    assert sample(client, "edge_cache_loads_total", cache="track") == 1


async def test_invalidation(client: Client, catalog: dict[str, Any], db: Any) -> None:
    track = catalog["tracks"]["shoot"]
    album = catalog["albums"]["black"]
    playlist = catalog["playlist"]
    urls = [f"/api/v1/tracks/{track}", f"/api/v1/albums/{album}", f"/api/v1/playlists/{playlist}"]
    before = [await (await client.get(u)).text() for u in urls]
    await db.execute("UPDATE tracks SET title = 'Shoot to Chill' WHERE id = $1", track)
    await db.execute(
        "UPDATE playlist_entries SET track_id = $1 WHERE playlist_id = $2 AND position = 0",
        track,
        playlist,
    )
    # Still cached...
    assert [await (await client.get(u)).text() for u in urls] == before
    cache = client.app[keys.CACHE]
    await cache.invalidate_track(track)
    await cache.invalidate_album(album)
    await cache.invalidate_playlist(playlist)
    after = [await (await client.get(u)).json() for u in urls]
    assert after[0]["title"] == "Shoot to Chill"
    assert "Shoot to Chill" in [t["title"] for t in after[1]["tracks"]]
    assert after[2]["items"][0]["track"]["id"] == track


async def test_invalidate_pattern(
    client: Client, catalog: dict[str, Any], redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    for q in ("hells", "formation", "largo"):
        await client.get("/api/v1/search", params={"q": q})
    removed = await client.app[keys.CACHE].invalidate_pattern("search", "search:*")
    assert removed == 3
    assert [k async for k in redis_client.scan_iter(match=f"{redis_prefix}search:*")] == []


def _events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [r.msg for r in caplog.records if isinstance(r.msg, dict) and r.msg.get("event") == name]


async def test_unreachable_redis_serves_from_postgres(
    make_client: Any, catalog: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    closed = f"redis://127.0.0.1:{free_port()}/0"
    client = await make_client(redis_url=closed, redis_retry_seconds=60.0)
    for key in ("hells", "largo", "formation"):
        for _ in range(3):
            resp = await client.get(f"/api/v1/tracks/{catalog['tracks'][key]}")
            assert resp.status == 200
    resp = await client.get("/api/v1/search", params={"q": "acdc"})
    assert len((await resp.json())["items"]) == 4
    assert sample(client, "edge_redis_outages_total") == 1
    assert sample(client, "edge_redis_up") == 0
    assert len(_events(caplog, "redis_unreachable")) == 1
    ready = await client.get("/readyz")
    assert ready.status == 503
    assert (await ready.json())["checks"]["redis"].startswith("down")


async def test_redis_dying_mid_run(
    make_client: Any, catalog: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with embedded_redis(tmp_path) as url:
        client = await make_client(redis_url=url, cache_l1_ttl=0.0, redis_retry_seconds=0.0)
        track = catalog["tracks"]["religion"]
        assert (await client.get(f"/api/v1/tracks/{track}")).status == 200
        assert cache_count(client, "track", "redis", "miss") == 1
    # The server is gone now: every request still answers, from PostgreSQL.
    for _ in range(5):
        resp = await client.get(f"/api/v1/tracks/{track}")
        assert resp.status == 200
        assert (await resp.json())["title"] == "Losing My Religion"
    assert sample(client, "edge_redis_outages_total") == 1
    assert len(_events(caplog, "redis_unreachable")) == 1
    assert queries(client, "track") == 6


def age_l1(client: Client, key: str, seconds: float) -> None:
    """Make this process's L1 copy of `key` as old as if `seconds` had passed."""
    cache = client.app[keys.CACHE]
    aged = 0
    for slot, (expires, entry) in list(cache._l1.items()):
        if slot[0] == key:
            cache._l1[slot] = (expires - seconds, entry)
            aged += 1
    assert aged == 1


async def two_processes(make_client: Any, log_length: int | None = None) -> tuple[Any, ...]:
    """Two Edge apps on one Redis, A having made its first read of the invalidation log. With a
    600 s L1 TTL the watch reads once at start and not again during a test: the reads that
    matter are the ones the test makes."""
    a = await make_client(cache_l1_ttl=600.0)
    b = await make_client(cache_l1_ttl=600.0)
    a_cache, b_cache = a.app[keys.CACHE], b.app[keys.CACHE]
    if log_length is not None:
        a_cache.LOG_LENGTH = b_cache.LOG_LENGTH = log_length
    await a_cache.apply_invalidations()
    return a, b, a_cache, b_cache


async def test_another_process_invalidation_reaches_l1_at_its_next_read(
    make_client: Any, catalog: dict[str, Any], db: Any
) -> None:
    """Two Edge processes on one Redis: B's invalidation is logged in Redis, and A's L1 drops
    that key (only that key) when it next reads the log, which it does every half L1 TTL."""
    a, b, a_cache, _ = await two_processes(make_client)
    track, other = catalog["tracks"]["shoot"], catalog["tracks"]["formation"]
    url = f"/api/v1/tracks/{track}"
    assert (await (await a.get(url)).json())["title"] == "Shoot to Thrill"
    assert (await a.get(f"/api/v1/tracks/{other}")).status == 200
    await db.execute("UPDATE tracks SET title = 'Shoot to Chill' WHERE id = $1", track)
    await b.app[keys.CACHE].invalidate_track(track)
    assert (await (await b.get(url)).json())["title"] == "Shoot to Chill"
    assert (await (await a.get(url)).json())["title"] == "Shoot to Thrill"  # until A reads

    await a_cache.apply_invalidations()
    hits = cache_count(a, "track", "l1", "hit")
    assert (await (await a.get(url)).json())["title"] == "Shoot to Chill"
    assert (await a.get(f"/api/v1/tracks/{other}")).status == 200
    assert cache_count(a, "track", "l1", "hit") == hits + 1  # the other track stayed in L1


async def test_l1_that_fell_behind_the_invalidation_log_is_dropped(
    make_client: Any, catalog: dict[str, Any]
) -> None:
    a, _, a_cache, b_cache = await two_processes(make_client, log_length=2)
    assert (await a.get("/api/v1/tracks/popular")).status == 200
    assert a_cache._l1
    for n in range(3):  # more than the log keeps, none of them A's key
        await b_cache.invalidate("track", f"track:{10**9 + n}")
    await a_cache.apply_invalidations()
    assert len(a_cache._l1) == 0


async def test_l1_keeps_its_ttl_when_invalidations_are_not_read(
    make_client: Any, catalog: dict[str, Any], db: Any
) -> None:
    """Without reads of the invalidation log (Redis unreachable, or the watch stopped), an L1
    copy lives for the L1 TTL: a hot key past it is served once more while A refreshes it (no
    listener waits for Redis); a key idle for more than twice the TTL is loaded again."""
    a = await make_client(cache_l1_ttl=5.0)
    b = await make_client(cache_l1_ttl=5.0)
    await a.app[keys.CACHE].stop_watching()
    track = catalog["tracks"]["shoot"]
    url = f"/api/v1/tracks/{track}"
    key = f"track:{track}"  # L1 slots are keyed without the Redis prefix
    assert (await (await a.get(url)).json())["title"] == "Shoot to Thrill"
    await db.execute("UPDATE tracks SET title = 'Shoot to Chill' WHERE id = $1", track)
    await b.app[keys.CACHE].invalidate_track(track)
    assert (await (await b.get(url)).json())["title"] == "Shoot to Chill"
    assert (await (await a.get(url)).json())["title"] == "Shoot to Thrill"  # A's L1, fresh

    age_l1(a, key, 5.5)  # past the TTL, within the grace
    misses, from_redis = (
        cache_count(a, "track", "l1", "miss"),
        cache_count(a, "track", "redis", "hit"),
    )
    stale = await a.get(url)
    assert (await stale.json())["title"] == "Shoot to Thrill"  # served at once, refreshing
    for _ in range(1000):  # the refresh runs beside the response: polled, bounded
        if cache_count(a, "track", "redis", "hit") > from_redis:
            break
        await asyncio.sleep(0.001)
    assert (await (await a.get(url)).json())["title"] == "Shoot to Chill"
    assert cache_count(a, "track", "l1", "miss") == misses  # nobody waited for Redis
    assert cache_count(a, "track", "redis", "hit") == from_redis + 1  # one refresh

    await db.execute("UPDATE tracks SET title = 'Shoot to Spill' WHERE id = $1", track)
    await b.app[keys.CACHE].invalidate_track(track)
    age_l1(a, key, 10.5)  # idle past TTL and grace: a plain miss
    assert (await (await a.get(url)).json())["title"] == "Shoot to Spill"


async def test_one_invalidation_of_more_keys_than_the_log_keeps_reaches_l1_whole(
    make_client: Any, catalog: dict[str, Any]
) -> None:
    a, _, a_cache, b_cache = await two_processes(make_client, log_length=2)
    track = catalog["tracks"]["shoot"]
    assert (await a.get(f"/api/v1/tracks/{track}")).status == 200
    assert (await a.get("/api/v1/tracks/popular")).status == 200
    await b_cache.invalidate("track", "track:999999998", "track:999999999", f"track:{track}")
    await a_cache.apply_invalidations()
    assert [slot for slot, _ in a_cache._l1.items() if slot[0].startswith("track:")] == []
    assert any(slot[0].startswith("popular-tracks:") for slot in a_cache._l1)  # not named: kept


async def test_warming_reaches_other_processes_l1(
    make_client: Any, catalog: dict[str, Any]
) -> None:
    a, _, a_cache, b_cache = await two_processes(make_client)
    assert (await a.get("/api/v1/tracks/popular")).status == 200
    assert any(slot[0] == "popular-tracks:20" for slot in a_cache._l1)

    async def load() -> bytes:
        return b'{"items":[],"next_cursor":null}'

    await b_cache.refresh("popular", "popular-tracks:20", 60, load, field="", l1=True)
    await a_cache.apply_invalidations()
    assert not any(slot[0] == "popular-tracks:20" for slot in a_cache._l1)
    assert (await (await a.get("/api/v1/tracks/popular")).json())["items"] == []  # B's copy


async def test_l1_is_dropped_when_redis_lost_its_data(
    make_client: Any, catalog: dict[str, Any], redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    a = await make_client(cache_l1_ttl=600.0)
    a_cache = a.app[keys.CACHE]
    await a_cache.apply_invalidations()
    assert (await a.get("/api/v1/tracks/popular")).status == 200
    assert a_cache._l1
    # As after a restart without persistence: the generation starts again, the epoch is new.
    await redis_client.delete(
        f"{redis_prefix}cache:l1:epoch",
        f"{redis_prefix}cache:l1:generation",
        f"{redis_prefix}cache:l1:invalidated",
    )
    await a_cache.apply_invalidations()
    assert not a_cache._l1
