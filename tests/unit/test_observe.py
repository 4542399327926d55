"""The per-request instruments: HttpStats (metrics) and AccessLog (the access line)."""

from __future__ import annotations

import asyncio
import datetime
import io
import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
import pytest_asyncio
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from edge import logs, middlewares
from edge.alerts import histogram_quantile, is_response_time
from edge.metrics import HttpStats, Metrics, merge_expositions
from tests.counted import count_response


def families(stats: HttpStats) -> dict[str, list[tuple[dict[str, str], float, str]]]:
    registry = CollectorRegistry()
    registry.register(stats)
    text = generate_latest(registry).decode()
    found: dict[str, list[tuple[dict[str, str], float, str]]] = {}
    for family in text_string_to_metric_families(text):
        found[family.name] = [(s.labels, s.value, s.name) for s in family.samples]
    return found


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    stats = HttpStats(buckets=(0.001, 0.01, 0.1))
    for seconds in (0.0005, 0.001, 0.002, 0.01, 0.5, 3.0):
        count_response(stats, "api_track", "GET", 200, seconds)
    samples = families(stats)["edge_http_request_duration_seconds"]
    buckets = {labels["le"]: value for labels, value, name in samples if name.endswith("_bucket")}
    # A value equal to a bound counts in that bucket (Prometheus' le is "less or equal").
    assert buckets == {"0.001": 2, "0.01": 4, "0.1": 4, "+Inf": 6}
    count = next(v for _, v, name in samples if name.endswith("_count"))
    total = next(v for _, v, name in samples if name.endswith("_sum"))
    assert count == 6
    assert total == pytest.approx(0.0005 + 0.001 + 0.002 + 0.01 + 0.5 + 3.0)


def test_status_classes_and_responses_by_status() -> None:
    stats = HttpStats()
    count_response(stats, "play", "GET", 302, 0.001)
    count_response(stats, "play", "GET", 302, 0.001)
    count_response(stats, "play", "GET", 404, 0.001)
    count_response(stats, "play", "GET", 499, 0.001)
    count_response(stats, "media", "HEAD", 206, 0.001)
    fams = families(stats)
    responses = {
        (labels["route"], labels["method"], labels["status"]): value
        for labels, value, name in fams["edge_http_requests"]
        if name == "edge_http_requests_total"
    }
    assert responses == {
        ("play", "GET", "302"): 2,
        ("play", "GET", "404"): 1,
        ("play", "GET", "499"): 1,
        ("media", "HEAD", "206"): 1,
    }
    classes = {
        (labels["route"], labels["status_class"]): value
        for labels, value, name in fams["edge_http_request_duration_seconds"]
        if name.endswith("_count")
    }
    assert classes == {("play", "3xx"): 2, ("play", "4xx"): 2, ("media", "2xx"): 1}
    assert stats.total() == 5
    assert stats.total(lambda route, method, status: route == "play") == 4
    assert stats.total(lambda route, method, status: 400 <= status < 500) == 2


def test_in_flight_gauge() -> None:
    stats = HttpStats()
    stats.in_flight += 3
    stats.in_flight -= 1
    assert families(stats)["edge_http_requests_in_flight"][0][1] == 2


@pytest.fixture
def json_stream() -> Iterator[io.StringIO]:
    """A handler on the root logger with the pipeline's JSON formatter, as `edge serve` has."""
    root = logging.getLogger()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(root.handlers[0].formatter)
    root.addHandler(handler)
    try:
        yield stream
    finally:
        root.removeHandler(handler)


def json_access_log() -> logs.AccessLog:
    """An AccessLog of its own, rendering JSON like `edge serve`'s."""
    access = logs.AccessLog()
    access.json_formatter = logs.access_log.json_formatter
    return access


@pytest_asyncio.fixture
async def writes(json_stream: io.StringIO) -> list[str]:
    """Each write to the JSON log stream, as it was made (from inside the test's event loop:
    the loop's own start-up line is not one of them)."""
    made: list[str] = []
    original = json_stream.write
    json_stream.write = lambda text: made.append(text) or original(text)  # type: ignore[method-assign]
    return made


# The route names of the rows these tests write (HttpStats.settle hands over its own).
ROUTES = {None: "healthz"}


def row(request_id: str, user_id: str | None = None) -> logs.RequestRow:
    """One row as the observe middleware leaves it: 123 µs to answer."""
    ended = time.perf_counter()
    return ("GET", None, "/healthz", request_id, user_id, 200, 15, ended - 0.000123, ended)


async def test_access_lines_are_written_in_batches(writes: list[str]) -> None:
    stats = HttpStats()
    stats.SETTLE_SECONDS = 0.001
    for n in range(5):
        stats.rows.append(("GET", None, "/healthz", f"r{n}", None, 200, 15, 1.0, 1.0001))
        if n == 0:
            stats.schedule()  # as the middleware does for the first row of a batch
    assert writes == []  # nothing written while the requests are being answered
    for _ in range(1000):  # the settle timer: polled, bounded
        if writes:
            break
        await asyncio.sleep(0.001)
    assert len(writes) == 1
    lines = [json.loads(line) for line in writes[0].splitlines()]
    assert [line["request_id"] for line in lines] == ["r0", "r1", "r2", "r3", "r4"]


def test_access_line_has_the_keys_structlog_renders(json_stream: io.StringIO) -> None:
    # The same event through structlog's pipeline, for comparison.
    logging.getLogger("edge.test").info("x")  # a foreign (stdlib) line also renders as JSON
    structlog_line = json.loads(json_stream.getvalue().splitlines()[-1])
    json_access_log().write([row("abc", "u1")], ROUTES)
    line = json.loads(json_stream.getvalue().splitlines()[-1])
    assert set(structlog_line) <= set(line)
    assert line["event"] == "request" and line["level"] == "info"
    assert line["logger"] == "edge.access"
    assert (line["request_id"], line["user_id"], line["status"]) == ("abc", "u1", 200)
    assert (line["route"], line["path"], line["bytes"], line["duration_ms"]) == (
        "healthz",
        "/healthz",
        15,
        0.123,
    )
    # ISO 8601, UTC, microseconds: the shape of structlog's TimeStamper(fmt="iso", utc=True).
    assert len(line["timestamp"]) == len(structlog_line["timestamp"])
    assert line["timestamp"].endswith("Z") and line["timestamp"][10] == "T"


def test_console_mode_goes_through_structlog(caplog: pytest.LogCaptureFixture) -> None:
    access = logs.AccessLog()  # no JSON formatter: the terminal's readable output
    with caplog.at_level(logging.INFO, logger="edge.access"):
        access.write([row("abc", "u1")], ROUTES)
    events = [r.msg for r in caplog.records if isinstance(r.msg, dict)]
    assert any(e.get("event") == "request" and e.get("user_id") == "u1" for e in events)


# -- several worker processes, one scrape -------------------------------------------------------


def worker_exposition(requests: int, memory: float, sessions: int, started: float) -> str:
    """One worker's /metrics, from the real Metrics class after some traffic."""
    metrics = Metrics()
    for _ in range(requests):
        count_response(metrics.http, "play", "GET", 302, 0.002)
    metrics.cache_requests.labels("track", "l1", "hit").inc(requests)
    metrics.active_sessions.set(sessions)
    metrics.redis_up.set(1)
    text = generate_latest(metrics.registry).decode()
    # The process family is this test process's; give each "worker" its own numbers.
    lines = []
    for line in text.splitlines():
        if line.startswith("process_resident_memory_bytes "):
            line = f"process_resident_memory_bytes {memory}"
        elif line.startswith("process_start_time_seconds "):
            line = f"process_start_time_seconds {started}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def merged_value(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"{name} {labels} not in the merged exposition")


def test_merged_workers_sum_counters_histograms_and_memory() -> None:
    a = worker_exposition(requests=3, memory=100e6, sessions=7, started=1000.0)
    b = worker_exposition(requests=5, memory=50e6, sessions=7, started=900.0)
    text = merge_expositions([a, b]).decode()
    play = {"route": "play", "method": "GET"}
    assert merged_value(text, "edge_http_requests_total", status="302", **play) == 8
    assert merged_value(text, "edge_http_request_duration_seconds_count", **play) == 8
    assert merged_value(text, "edge_http_request_duration_seconds_bucket", le="0.0025", **play) == 8
    assert merged_value(text, "edge_http_request_duration_seconds_sum", **play) == pytest.approx(
        0.016
    )
    assert merged_value(text, "edge_cache_requests_total", cache="track") == 8
    assert merged_value(text, "process_resident_memory_bytes") == 150e6
    # Cluster-wide numbers every worker reads from Redis are not multiplied by the workers.
    assert merged_value(text, "edge_stream_sessions_active") == 7
    assert merged_value(text, "edge_redis_up") == 1
    assert merged_value(text, "process_start_time_seconds") == 900.0
    assert merged_value(text, "edge_workers") == 2


def test_a_worker_that_reports_redis_down_shows() -> None:
    a = worker_exposition(requests=1, memory=1.0, sessions=0, started=1.0)
    b = worker_exposition(requests=1, memory=1.0, sessions=0, started=1.0).replace(
        "edge_redis_up 1.0", "edge_redis_up 0.0"
    )
    assert "edge_redis_up 0.0" in b
    assert merged_value(merge_expositions([a, b]).decode(), "edge_redis_up") == 0


def test_merged_exposition_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: apt-get install prometheus (see .ci/run)"
    a = worker_exposition(requests=3, memory=1.0, sessions=1, started=1.0)
    b = worker_exposition(requests=2, memory=1.0, sessions=1, started=1.0)
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=merge_expositions([a, b]),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == b"" and result.stderr.strip() == b""


# -- rows left by the middleware, settled in batches --------------------------------------------


async def _ok(request: web.Request) -> web.Response:
    return web.Response()


async def test_rows_are_counted_and_logged_when_settled(writes: list[str]) -> None:
    app = web.Application()
    route = app.router.add_get("/x", _ok, name="api_x")
    stats = HttpStats(buckets=(0.001, 0.01))
    stats.in_flight = 3  # three requests started; two have finished
    stats.rows.append(("GET", route, "/x", "r1", None, 200, 15, 10.0, 10.0005))
    stats.rows.append(("POST", None, "/nowhere", "r2", "u\u00e9", 404, None, 11.0, 11.02))
    assert writes == []
    # Reading the numbers settles the rows first: nothing read is ever behind.
    assert stats.total() == 2
    assert stats.rows == [] and stats.in_flight == 1
    buckets = {
        (labels["route"], labels["le"]): value
        for labels, value, name in families(stats)["edge_http_request_duration_seconds"]
        if name.endswith("_bucket")
    }
    assert buckets[("api_x", "0.001")] == 1
    assert buckets[("unmatched", "0.01")] == 0 and buckets[("unmatched", "+Inf")] == 1
    lines = [json.loads(line) for write in writes for line in write.splitlines()]
    assert [(x["request_id"], x["route"], x["status"], x["bytes"]) for x in lines] == [
        ("r1", "api_x", 200, 15),
        ("r2", "unmatched", 404, None),
    ]
    assert "user_id" not in lines[0] and lines[1]["user_id"] == "u\u00e9"
    assert lines[0]["duration_ms"] == 0.5 and lines[1]["duration_ms"] == 20.0


def test_access_lines_escape_what_needs_it(json_stream: io.StringIO) -> None:
    line_fields = ("GET", None, '/s/"x"\\', "r1", 'a"b\\c\n', 200, None, 10.0, 11.5)
    json_access_log().write([line_fields], {None: "page_search"})
    line = json.loads(json_stream.getvalue().splitlines()[-1])
    assert line["user_id"] == 'a"b\\c\n' and line["path"] == '/s/"x"\\'
    assert line["bytes"] is None and line["duration_ms"] == 1500.0


def test_access_line_times_are_the_rows_own_to_the_microsecond(json_stream: io.StringIO) -> None:
    # Rows spread over 2.5 s (so over second and millisecond boundaries, where the cached
    # text of a millisecond must not leak into the next), each rendered to its own instant.
    now = time.perf_counter()
    starts = [now + n * 0.0123457 for n in range(200)]
    rows = [
        ("GET", None, "/healthz", f"r{n}", None, 200, 15, start, start + took)
        for n, (start, took) in enumerate(
            zip(starts, [0.000123, 0.0009996, 0.0125, 1.5, 0.0000004] * 40, strict=True)
        )
    ]
    wall = time.time() - time.perf_counter()
    json_access_log().write(rows, ROUTES)
    wall_after = time.time() - time.perf_counter()
    lines = [json.loads(text) for text in json_stream.getvalue().splitlines()[-len(rows) :]]
    assert [line["request_id"] for line in lines] == [row[3] for row in rows]
    for line, (*_, started, ended) in zip(lines, rows, strict=True):
        stamp = datetime.datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00"))
        # (The clock offset is read once per batch, between these two readings.)
        assert ended + wall - 0.000002 <= stamp.timestamp() <= ended + wall_after + 0.000002
        assert line["duration_ms"] == round((ended - started) * 1000, 3)


def new_id() -> str:
    """The next request id, as the observe middleware takes it."""
    return next(middlewares._new_ids, None) or middlewares._more_ids()


def test_request_ids_are_unique_random_hex_across_batches() -> None:
    taken = [new_id() for _ in range(3 * 1024 + 7)]  # past three reads of the random source
    assert len(set(taken)) == len(taken)
    assert all(len(i) == 32 and set(i) <= set("0123456789abcdef") for i in taken)


def test_a_client_request_id_is_honoured_only_whole() -> None:
    assert middlewares._REQUEST_ID.fullmatch("req-42:a.b_c")
    for bad in ("req-42\n", "", "a b", "x" * 129, 'a"b'):
        assert not middlewares._REQUEST_ID.fullmatch(bad), bad


def test_a_forked_child_hands_out_ids_of_its_own() -> None:
    new_id()  # the parent has a batch under way
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, then gone without running pytest's teardown
        try:
            os.write(write, " ".join(new_id() for _ in range(10)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = pipe.read().split()
    os.waitpid(pid, 0)
    parent = [new_id() for _ in range(10)]
    assert len(child) == 10 and not set(child) & set(parent)


# -- the response-time alert reads the same histogram -------------------------------------------


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    bounds = (0.1, 0.2, 0.4)
    assert histogram_quantile(0.95, bounds, [0, 0, 0, 0]) is None
    # 100 responses, all in (0.1, 0.2]: the 95th lies 95% of the way through that bucket.
    assert histogram_quantile(0.95, bounds, [0, 100, 0, 0]) == pytest.approx(0.195)
    # 90 fast and 10 in (0.2, 0.4]: the 95th is half way through the last finite bucket.
    assert histogram_quantile(0.95, bounds, [90, 0, 10, 0]) == pytest.approx(0.3)
    # In the +Inf bucket it is the highest finite bound, as histogram_quantile says.
    assert histogram_quantile(0.95, bounds, [1, 0, 0, 99]) == 0.4


def test_response_times_are_what_the_prometheus_rule_counts() -> None:
    assert is_response_time("api_track", "GET", 200)
    assert is_response_time("play", "GET", 302)  # a redirect is an answer
    assert is_response_time("play", "GET", 429)
    assert not is_response_time("play", "GET", 206)  # a streamed body lasts as the player does
    assert not is_response_time("media", "GET", 200)
    assert not is_response_time("metrics", "GET", 200)


def test_a_batch_that_cannot_be_settled_is_logged_and_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stats = HttpStats()
    # A route without .resource: not one aiohttp makes, so settling the row fails.
    stats.rows.append(("GET", object(), "/x", "r1", None, 200, 0, 1.0, 1.001))
    with caplog.at_level(logging.ERROR):
        stats.settle()  # does not raise: the request that filled the batch is still answered
    assert stats.rows == [] and stats.total() == 0
    assert any(
        isinstance(r.msg, dict) and r.msg.get("event") == "http_stats_settle_failed"
        for r in caplog.records
    )
