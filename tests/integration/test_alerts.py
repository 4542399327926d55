"""In-process alerts fire and resolve when their condition is produced for real."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from edge import keys

Client = Any


async def alert(client: Client, name: str) -> dict[str, Any]:
    resp = await client.get("/api/v1/alerts")
    assert resp.status == 200
    return {a["name"]: a for a in (await resp.json())["items"]}[name]


def firing_gauge(client: Client, name: str) -> float:
    value = client.app[keys.METRICS].registry.get_sample_value("edge_alert_firing", {"alert": name})
    return float(value if value is not None else -1)


def transitions(caplog: pytest.LogCaptureFixture, event: str, name: str) -> int:
    return sum(
        1
        for r in caplog.records
        if isinstance(r.msg, dict) and r.msg.get("event") == event and r.msg.get("alert") == name
    )


async def test_alerts_are_listed(client: Client) -> None:
    resp = await client.get("/api/v1/alerts")
    names = {a["name"] for a in (await resp.json())["items"]}
    assert names == {
        "response_time",
        "memory",
        "cache_hit_rate",
        "db_pool_exhausted",
        "stream_error_rate",
    }


async def test_response_time_fires_and_resolves(
    make_client: Any, catalog: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    # 0.001 ms: every real request is slower than that.
    client = await make_client(
        alert_response_time_ms=0.001, alert_window_seconds=3600.0, alert_interval_seconds=3600.0
    )
    alerts = client.app[keys.ALERTS]
    for _ in range(5):
        await client.get(f"/api/v1/artists/{catalog['artists']['rem']}")
    alerts.evaluate()
    assert (await alert(client, "response_time"))["firing"]
    assert firing_gauge(client, "response_time") == 1
    alerts.evaluate()  # still firing: logged once, not per evaluation
    assert transitions(caplog, "alert_firing", "response_time") == 1
    # A window later, and one more with no requests in it: nothing slow is left to count.
    later = time.monotonic() + 2 * 3600
    alerts.evaluate(now=later)
    alerts.evaluate(now=later + 3601)
    assert not (await alert(client, "response_time"))["firing"]
    assert firing_gauge(client, "response_time") == 0
    assert transitions(caplog, "alert_resolved", "response_time") == 1


async def test_memory_fires_above_threshold(make_client: Any, catalog: dict[str, Any]) -> None:
    client = await make_client(alert_memory_usage_mb=1, alert_interval_seconds=3600.0)
    client.app[keys.ALERTS].evaluate()
    state = await alert(client, "memory")
    assert state["firing"] and state["value"] > 1


async def test_low_cache_hit_rate_needs_enough_requests(
    make_client: Any, catalog: dict[str, Any]
) -> None:
    client = await make_client(
        alert_min_requests=20, alert_interval_seconds=3600.0, cache_l1_ttl=0.0
    )
    alerts = client.app[keys.ALERTS]
    alerts.evaluate()  # the baseline reading of the window
    # Every search is a different query: all misses, but too few to page.
    for i in range(5):
        await client.get("/api/v1/search", params={"q": f"hells {i}"})
    alerts.evaluate()
    assert not (await alert(client, "cache_hit_rate"))["firing"]
    for i in range(5, 30):
        await client.get("/api/v1/search", params={"q": f"hells {i}"})
    alerts.evaluate()
    state = await alert(client, "cache_hit_rate")
    assert state["firing"] and state["value"] < 0.8
    # Now the same track over and over: hits bring the rate up and the alert resolves.
    track = catalog["tracks"]["hells"]
    for _ in range(400):
        await client.get(f"/api/v1/tracks/{track}")
    alerts.evaluate()
    state = await alert(client, "cache_hit_rate")
    assert not state["firing"] and state["value"] >= 0.8


async def test_pool_exhausted(make_client: Any, catalog: dict[str, Any]) -> None:
    client = await make_client(
        db_pool_min=1,
        db_pool_max=1,
        alert_pool_seconds=0.2,
        alert_interval_seconds=0.05,
        db_pool_acquire_timeout=30.0,
    )
    pool = client.app[keys.PG_POOL]
    async with pool.acquire():  # the only connection is taken: requests wait
        waiting = asyncio.ensure_future(client.get(f"/api/v1/artists/{catalog['artists']['rem']}"))
        state: dict[str, Any] = {}
        async with asyncio.timeout(10):
            while not state.get("firing"):
                state = await alert(client, "db_pool_exhausted")
        assert state["value"] >= 0.2
    resp = await waiting
    assert resp.status == 200
    async with asyncio.timeout(10):
        while (await alert(client, "db_pool_exhausted"))["firing"]:
            pass


async def test_stream_error_rate(make_client: Any, playable: dict[str, Any]) -> None:
    from edge.embedded import free_port
    from tests.conftest import bearer

    client = await make_client(
        cdn_url=f"http://127.0.0.1:{free_port()}",
        play_mode="proxy",
        alert_min_requests=3,
        alert_interval_seconds=3600.0,
    )
    alerts = client.app[keys.ALERTS]
    alerts.evaluate()
    track = playable["tracks"]["hells"]
    for _ in range(3):
        resp = await client.get(f"/play/{track}", headers=bearer())
        assert resp.status == 502
    alerts.evaluate()
    state = await alert(client, "stream_error_rate")
    assert state["firing"] and state["value"] > 0.05
