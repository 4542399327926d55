"""Prometheus collectors, in a registry owned by the app so two apps in one process never collide.

Label values are bounded: route names (never raw paths), status classes, cache names and levels.
"""

from __future__ import annotations

import asyncio
import operator
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from itertools import accumulate
from typing import Any

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from edge.logs import RequestRow, access_log

log = structlog.get_logger(__name__)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class PoolCollector(Collector):
    """The PostgreSQL pool's size, read at scrape time (cheap: counters asyncpg keeps)."""

    def __init__(self, pool: Callable[[], Any]) -> None:
        self.pool = pool

    def collect(self) -> Iterator[GaugeMetricFamily]:
        pool = self.pool()
        if pool is None:
            return
        size, idle = pool.get_size(), pool.get_idle_size()
        yield GaugeMetricFamily("edge_db_pool_size", "Connections open in the pool", size)
        yield GaugeMetricFamily("edge_db_pool_idle", "Idle pooled connections", idle)
        yield GaugeMetricFamily("edge_db_pool_in_use", "Pooled connections in use", size - idle)
        yield GaugeMetricFamily("edge_db_pool_max", "Pool size limit", pool.get_max_size())


class LoopCounter(Collector):
    """A labelled counter for the per-request path, counted in a plain dict.

    prometheus-client's Counter takes a lock and checks its value on every inc() (about 0.8 µs;
    an L1 hit counts twice). Here inc() is one addition: the event loop is the only writer,
    and a scrape copies before it reads. The samples are those a Counter would expose (without
    `_created`).
    """

    def __init__(
        self, name: str, documentation: str, labelnames: Iterable[str], registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], LoopCount] = {}
        registry.register(self)

    def labels(self, *values: str) -> LoopCount:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            child = self._children[values] = LoopCount()
        return child

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(values, child.value)
        yield family


class LoopCount:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


def route_label(route: Any) -> str:
    """A request's route (request.match_info.route) as a label value: its name. Unmatched
    paths share one value, as raw paths would make the label set unbounded."""
    if route is None or route.resource is None:
        return "unmatched"
    return str(route.name or "unnamed")


class _RouteNames(dict[Any, str]):
    """Route -> route_label, looked up once per route. Only routes of the app's router are
    kept (a bounded set); an unmatched request gets a new system route each time, and is named
    each time."""

    def __missing__(self, route: Any) -> str:
        name = route_label(route)
        if name != "unmatched":
            self[route] = name
        return name


class HttpStats(Collector):
    """Per-request HTTP numbers, kept in plain dicts and exported at scrape time.

    Every request updates these, so they must cost next to nothing: prometheus-client's
    labelled children take a lock and a label lookup per update (about 5 µs for the three
    families of a request, an eighth of a whole /healthz). The observe middleware only
    appends a row (RequestRow) to `rows`; `settle` takes the rows in batches, every
    SETTLE_SECONDS or MAX_ROWS, and before anything reads these numbers (a scrape, the alerts),
    so what is read is always up to date. It turns them into the counts (a dict update per
    row) and hands the access lines to logs.access_log, in the same pass. The event loop is
    the only writer. The families and samples are those prometheus-client would expose.
    """

    SETTLE_SECONDS = 0.05
    MAX_ROWS = 256

    def __init__(self, buckets: tuple[float, ...] = _LATENCY_BUCKETS) -> None:
        self.bounds = tuple(float(b) for b in buckets)
        # Requests started and not yet settled: a row settled is a request finished.
        self.in_flight = 0
        # (route, method, status) -> [responses per duration bucket (the last one +Inf)...,
        # sum of durations]. The counter by status and the histogram by status class are
        # added up from these at scrape time.
        self.entries: dict[tuple[str, str, int], list[float]] = {}
        self.rows: list[RequestRow] = []
        self._names = _RouteNames()
        self._timer: asyncio.TimerHandle | None = None

    def schedule(self) -> None:
        """The middleware added the first row of a batch: settle it soon."""
        self._timer = asyncio.get_running_loop().call_later(self.SETTLE_SECONDS, self.settle)

    def settle(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.rows:
            return
        rows = self.rows.copy()
        self.rows.clear()  # (in place: the middleware holds this list)
        self.in_flight -= len(rows)
        # (A bug here must not fail the request whose row filled the batch: logged, and the
        # batch is dropped.)
        try:
            # One pass, a handful of operations a row, to count them; the access lines are
            # rendered from the same rows (no intermediate tuple per row).
            entries, bounds, names = self.entries, self.bounds, self._names
            width = len(bounds) + 2
            for method, route, _, _, _, status, _, started, ended in rows:
                seconds = ended - started
                key = (names[route], method, status)
                entry = entries.get(key)
                if entry is None:
                    entry = entries[key] = [0] * width
                entry[bisect_left(bounds, seconds)] += 1
                entry[-1] += seconds
            access_log.write(rows, names)
        except Exception:
            log.exception("http_stats_settle_failed", rows=len(rows))

    def collect(self) -> Iterator[Metric]:
        self.settle()
        entries = [(labels, entry[:]) for labels, entry in list(self.entries.items())]
        responses = CounterMetricFamily(
            "edge_http_requests", "HTTP responses sent", labels=["route", "method", "status"]
        )
        by_class: dict[tuple[str, str, str], list[float]] = {}
        for (route, method, status), entry in entries:
            responses.add_metric([route, method, str(status)], sum(entry[:-1]))
            key = (route, method, _STATUS_CLASSES.get(status // 100, "other"))
            total = by_class.setdefault(key, [0] * len(entry))
            for n, value in enumerate(entry):
                total[n] += value
        yield responses
        duration = HistogramMetricFamily(
            "edge_http_request_duration_seconds",
            "Time to handle a request (for streamed audio: until the body was sent)",
            labels=["route", "method", "status_class"],
        )
        les = [*(floatToGoString(b) for b in self.bounds), "+Inf"]  # type: ignore[no-untyped-call]
        for labels, total in by_class.items():
            cumulative = list(accumulate(total[:-1]))
            duration.add_metric(labels, list(zip(les, cumulative, strict=True)), total[-1])
        yield duration
        yield GaugeMetricFamily(
            "edge_http_requests_in_flight", "Requests being handled", self.in_flight
        )

    def buckets(self, where: Callable[[str, str, int], bool]) -> list[float]:
        """Responses per duration bucket (the last one +Inf) of the (route, method, status)
        that `where` accepts, added up since start: a window's histogram is the difference of
        two readings."""
        self.settle()
        total = [0.0] * (len(self.bounds) + 1)
        for labels, entry in list(self.entries.items()):
            if where(*labels):
                for n in range(len(total)):
                    total[n] += entry[n]
        return total

    def total(self, where: Callable[[str, str, int], bool] | None = None) -> int:
        """Responses sent, all or those whose (route, method, status) `where` accepts."""
        self.settle()
        return int(
            sum(
                sum(entry[:-1])
                for labels, entry in list(self.entries.items())
                if where is None or where(*labels)
            )
        )


_STATUS_CLASSES = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # Resident memory, CPU seconds, open file descriptors of this process.
        ProcessCollector(registry=r)
        self.loop_lag = Histogram(
            "edge_event_loop_lag_seconds",
            "How late a 0.25 s timer fires: blocking in the loop",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.http = HttpStats()
        r.register(self.http)
        self.errors = Counter("edge_errors", "Error responses by error code", ["code"], registry=r)
        # (Counted on every catalog request: plain counters.)
        self.cache_requests = LoopCounter(
            "edge_cache_requests",
            "Cache look-ups by cache, level and result",
            ["cache", "level", "result"],
            r,
        )
        self.cache_lookups = LoopCounter(
            "edge_cache_lookups",
            "Cache look-ups by cache (hit rate = 1 - loads / lookups)",
            ["cache"],
            r,
        )
        self.cache_loads = LoopCounter(
            "edge_cache_loads", "Loads from PostgreSQL after a miss (single-flight)", ["cache"], r
        )
        self.cache_invalidations = Counter(
            "edge_cache_invalidations", "Keys invalidated", ["cache"], registry=r
        )
        self.redis_up = Gauge(
            "edge_redis_up", "1 while Redis answers, 0 during an outage", registry=r
        )
        self.redis_outages = Counter(
            "edge_redis_outages", "Times Redis became unreachable", registry=r
        )
        self.db_query_duration = Histogram(
            "edge_db_query_duration_seconds",
            "Catalog query time by named query",
            ["query"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.db_acquire_duration = Histogram(
            "edge_db_pool_acquire_seconds",
            "Time waiting for a pooled connection",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.db_pool_waiters = Gauge(
            "edge_db_pool_waiters", "Requests waiting for a pooled connection", registry=r
        )
        self.db_slow_queries = Counter(
            "edge_db_slow_queries",
            "Catalog queries slower than EDGE_SLOW_QUERY_MS",
            ["query"],
            registry=r,
        )
        self.session_choices_lost = Counter(
            "edge_session_choices_lost",
            "Renditions chosen by /play that could not be recorded in their session",
            registry=r,
        )
        self.session_transfers_lost = Counter(
            "edge_session_transfers_lost",
            "Proxied transfers (bytes, throughput) that could not be added to their session",
            registry=r,
        )
        self.db_retries = Counter(
            "edge_db_retries",
            "Catalog queries run again after their connection died under them",
            ["query"],
            registry=r,
        )
        self.db_errors = Counter(
            "edge_db_errors", "Catalog queries that failed, by kind", ["kind"], registry=r
        )
        self.popular_refreshes = Counter(
            "edge_popular_refreshes",
            "popular_tracks_mv refreshes by result",
            ["result"],
            registry=r,
        )
        # Streaming.
        # (Counted on every /play: plain counters, as the cache's.)
        self.sessions_started = LoopCounter(
            "edge_stream_sessions_started", "Streaming sessions created", ["tier"], r
        )
        self.stream_rejections = Counter(
            "edge_stream_rejections", "/play requests refused, by reason", ["reason"], registry=r
        )
        self.bytes_streamed = Counter(
            "edge_stream_bytes",
            "Bytes streamed to players (proxy and local origin)",
            ["mode", "format"],
            registry=r,
        )
        self.time_to_first_byte = Histogram(
            "edge_stream_time_to_first_byte_seconds",
            "From request to the first body byte in proxy mode",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "edge_upstream_request_duration_seconds",
            "CDN/origin requests until headers",
            ["status_class"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "edge_upstream_errors",
            "Origin failures by source and kind",
            ["source", "kind"],
            registry=r,
        )
        self.client_disconnects = Counter(
            "edge_client_disconnects", "Clients gone mid-body", ["route"], registry=r
        )
        self.signatures = LoopCounter(
            "edge_signed_urls", "Signed URLs by how they were obtained", ["result"], r
        )
        self.quality_chosen = LoopCounter(
            "edge_stream_quality", "Renditions chosen by /play", ["format", "bitrate"], r
        )
        self.downgrades = LoopCounter(
            "edge_stream_downgrades", "Choices below what was asked, by reason", ["reason"], r
        )
        self.player_events = Counter(
            "edge_player_events",
            "Player events by type and format",
            ["type", "format"],
            registry=r,
        )
        self.player_errors = Counter(
            "edge_player_errors",
            "Player errors by code and format",
            ["code", "format"],
            registry=r,
        )
        self.plays_counted = Counter(
            "edge_plays_counted",
            "Plays counted (once per session and track)",
            ["via"],
            registry=r,
        )
        self.plays_flushed = Counter(
            "edge_plays_flushed", "Plays written to PostgreSQL by the flush job", registry=r
        )
        self.active_sessions = Gauge(
            "edge_stream_sessions_active",
            "Streaming sessions active across the cluster (from Redis, refreshed periodically)",
            registry=r,
        )

        self.alert_firing = Gauge(
            "edge_alert_firing", "1 while the in-process alert fires", ["alert"], registry=r
        )

        # Known label values exist from the start, so rate() sees the first increment.
        for kind in ("connect", "timeout", "protocol", "status", "mid_body"):
            self.upstream_errors.labels("cdn", kind)
        for cache in ("track", "popular", "search", "album", "playlist", "recommendations"):
            self.cache_lookups.labels(cache)
            self.cache_loads.labels(cache)
            for level, result in (
                ("l1", "hit"),
                ("l1", "miss"),
                ("redis", "hit"),
                ("redis", "miss"),
                ("redis", "error"),
            ):
                self.cache_requests.labels(cache, level, result)

    def watch_pool(self, pool: Callable[[], Any]) -> None:
        self.registry.register(PoolCollector(pool))


# How one family's samples from several worker processes combine: summed, except where every
# worker reports the same cluster-wide number (read from Redis), a state, or a per-process
# limit or time.
_COMBINE: dict[str, Callable[[float, float], float]] = {
    "edge_stream_sessions_active": max,
    "edge_redis_up": min,
    "edge_alert_firing": max,
    "process_start_time_seconds": min,
    "process_max_fds": min,
}


def merge_expositions(texts: Iterable[str]) -> bytes:
    """The Prometheus text of several worker processes as one: every series summed over the
    workers (counters, histogram buckets, sums and counts, memory, CPU, in-flight requests,
    pool sizes), except the few _COMBINE names and *_created times (the earliest). Adds
    `edge_workers`, the number of processes the numbers cover."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    count = 0
    for text in texts:
        count += 1
        for family in text_string_to_metric_families(text):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            combine = _COMBINE.get(family.name)
            if combine is None:
                combine = min if family.name.endswith("_created") else operator.add
            merged = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                old = merged.get(key)
                merged[key] = sample.value if old is None else combine(old, sample.value)
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    workers = GaugeMetricFamily(
        "edge_workers", "Worker processes whose numbers this scrape sums", count
    )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed([*families.values(), workers]))
    return generate_latest(registry)


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)
