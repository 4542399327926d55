"""/metrics after real traffic (families and the values that traffic must have produced, and
`promtool check metrics`), and the JSON access log with the request id."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import shutil
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge import jobs, keys
from edge.metrics import HttpStats
from tests.conftest import bearer

Client = Any


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict[str, Any], family: str, sample: str, **labels: str) -> float:
    total = 0.0
    for s in fams[family].samples:
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
            total += s.value
    return total


async def test_metrics_after_real_traffic(make_client: Any, playable: dict[str, Any]) -> None:
    client = await make_client(play_mode="proxy")
    hells = playable["tracks"]["hells"]
    for _ in range(3):
        assert (await client.get(f"/api/v1/tracks/{hells}")).status == 200
    assert (await client.get("/api/v1/search", params={"q": "hell"})).status == 200
    assert (await client.get("/api/v1/tracks/999999")).status == 404
    resp = await client.get(f"/play/{hells}", headers=bearer(tier="premium"))
    body = await resp.read()
    assert resp.status == 200
    sid = resp.headers["X-Stream-Session"]
    events = [{"sid": sid, "type": "waiting"}, {"sid": sid, "type": "error", "code": 3}]
    resp = await client.post("/api/v1/events", json=events, headers=bearer(tier="premium"))
    assert resp.status == 202
    await client.app[keys.BACKGROUND].drain()

    scrape = await client.get("/metrics")
    assert scrape.status == 200
    assert scrape.headers["Content-Type"].startswith("text/plain")
    text = await scrape.text()
    fams = families(text)

    # HTTP, by route name (never raw paths).
    assert (
        value(
            fams, "edge_http_requests", "edge_http_requests_total", route="api_track", status="200"
        )
        == 3
    )
    assert (
        value(
            fams, "edge_http_requests", "edge_http_requests_total", route="api_track", status="404"
        )
        == 1
    )
    assert f"/api/v1/tracks/{hells}" not in text
    assert (
        value(
            fams,
            "edge_http_request_duration_seconds",
            "edge_http_request_duration_seconds_count",
            route="api_search",
        )
        == 1
    )
    # Cache: the first track request missed Redis, the next two hit L1.
    assert (
        value(
            fams,
            "edge_cache_requests",
            "edge_cache_requests_total",
            cache="track",
            level="l1",
            result="hit",
        )
        >= 2
    )
    # Database: named queries and the pool.
    assert (
        value(
            fams,
            "edge_db_query_duration_seconds",
            "edge_db_query_duration_seconds_count",
            query="search",
        )
        == 1
    )
    assert value(fams, "edge_db_pool_size", "edge_db_pool_size") >= 1
    # Streaming: bytes proxied, quality chosen, player events and errors.
    assert value(
        fams, "edge_stream_bytes", "edge_stream_bytes_total", mode="proxy", format="mp3"
    ) == len(body)
    assert (
        value(fams, "edge_stream_quality", "edge_stream_quality_total", format="mp3", bitrate="320")
        == 1
    )
    assert value(fams, "edge_player_events", "edge_player_events_total", type="waiting") == 1
    assert value(fams, "edge_player_errors", "edge_player_errors_total", code="decode") == 1
    assert (
        value(
            fams,
            "edge_stream_sessions_started",
            "edge_stream_sessions_started_total",
            tier="premium",
        )
        == 1
    )
    # Process and loop.
    assert value(fams, "process_resident_memory_bytes", "process_resident_memory_bytes") > 0
    assert "edge_event_loop_lag_seconds" in fams
    assert "edge_alert_firing" in fams

    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: apt-get install prometheus (see .ci/run)"
    proc = await asyncio.create_subprocess_exec(
        promtool,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(text.encode()), 30)
    assert proc.returncode == 0, out + err
    assert out.strip() == b"" and err.strip() == b"", out + err


async def test_two_apps_in_one_process_do_not_collide(
    make_client: Any, catalog: dict[str, Any]
) -> None:
    a, b = await make_client(), await make_client()
    await a.get(f"/api/v1/tracks/{catalog['tracks']['hells']}")
    fa = families(await (await a.get("/metrics")).text())
    fb = families(await (await b.get("/metrics")).text())
    assert value(fa, "edge_http_requests", "edge_http_requests_total", route="api_track") == 1
    assert value(fb, "edge_http_requests", "edge_http_requests_total", route="api_track") == 0


async def test_access_log_is_json_with_the_request_id(
    client: Client, catalog: dict[str, Any]
) -> None:
    root = logging.getLogger()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(root.handlers[0].formatter)  # the pipeline `edge serve` uses
    root.addHandler(handler)
    try:
        token = bearer("alice")["Authorization"]
        resp = await client.get(
            f"/api/v1/tracks/{catalog['tracks']['hells']}?token=secret-in-query",
            headers={"X-Request-ID": "req-42", "Authorization": token},
        )
        assert resp.status == 200
        resp = await client.get(
            "/api/v1/users/alice/recommendations", headers={"Authorization": token}
        )
        assert resp.status == 200
        # Requests are counted and their access lines written in batches.
        client.app[keys.METRICS].http.settle()
    finally:
        root.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    access = [line for line in lines if line.get("event") == "request"]
    first = next(line for line in access if line["request_id"] == "req-42")
    assert first["route"] == "api_track"
    assert first["status"] == 200 and first["method"] == "GET"
    assert first["bytes"] > 0 and first["duration_ms"] > 0
    recs = next(line for line in access if line["route"] == "api_recommendations")
    assert recs["user_id"] == "alice"
    text = stream.getvalue()
    assert "secret-in-query" not in text
    assert token.split()[1] not in text


async def test_requests_are_counted_in_batches_and_before_every_read(
    make_client: Any, catalog: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(HttpStats, "MAX_ROWS", 3)
    # Only a full batch or a read settles here: no timer, no alert evaluation, no dashboard
    # sample (its first one is taken at start, long before the warm-up request has returned).
    monkeypatch.setattr(HttpStats, "SETTLE_SECONDS", 3600.0)
    monkeypatch.setattr(jobs, "SAMPLE_SECONDS", 3600.0)
    client = await make_client(alert_interval_seconds=3600.0)
    http = client.app[keys.METRICS].http
    assert (await client.get("/healthz")).status == 200
    http.settle()
    http.entries.clear()
    track = f"/api/v1/tracks/{catalog['tracks']['hells']}"
    for _ in range(2):
        assert (await client.get(track)).status == 200
    assert len(http.rows) == 2 and http.entries == {}  # waiting for their batch
    assert (await client.get(track)).status == 200
    assert http.rows == []  # the third filled the batch: counted at once
    assert sum(sum(e[:-1]) for e in http.entries.values()) == 3
    assert (await client.get(track)).status == 200
    # A scrape settles what waits first, and counts itself as the one request in flight.
    fams = families(await (await client.get("/metrics")).text())
    assert value(fams, "edge_http_requests", "edge_http_requests_total", route="api_track") == 4
    assert value(fams, "edge_http_requests_in_flight", "edge_http_requests_in_flight") == 1
