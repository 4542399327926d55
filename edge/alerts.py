"""Threshold alerts from the platform's guide, evaluated in process on a timer.

Response time (p95 over a window), memory, cache hit rate (with a minimum request count, so an
idle edge does not page), database pool exhausted (waiters for longer than a few seconds), and
streaming error rate. Each alert's firing and resolved transitions are logged once, exported as
`edge_alert_firing{alert}`, and listed at `GET /api/v1/alerts`. deploy/prometheus/alerts.yml
holds the same rules for Prometheus.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from prometheus_client import Counter

from edge.metrics import LoopCounter, Metrics
from edge.settings import Settings

_PLAY_ROUTES = frozenset({"play", "play_head"})
_NOT_RESPONSE_TIMES = frozenset({"metrics", "media", "media_head"})

log = structlog.get_logger(__name__)


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def counter_total(
    counter: Counter | LoopCounter, where: Callable[[dict[str, str]], bool] | None = None
) -> float:
    total = 0.0
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and (where is None or where(sample.labels)):
                total += sample.value
    return total


@dataclass(slots=True)
class AlertState:
    name: str
    description: str
    threshold: float
    unit: str
    firing: bool = False
    since: float | None = None
    value: float | None = None
    last_change: float | None = None

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "firing": self.firing,
            "since": self.since,
            "value": self.value,
            "threshold": self.threshold,
            "unit": self.unit,
            "description": self.description,
        }


@dataclass(slots=True)
class _Window:
    """Counter readings over time, to take rates over the last `seconds`."""

    seconds: float
    points: deque[tuple[float, dict[str, float]]] = field(default_factory=deque)

    def add(self, now: float, values: dict[str, float]) -> dict[str, float]:
        self.points.append((now, values))
        while len(self.points) > 2 and self.points[1][0] <= now - self.seconds:
            self.points.popleft()
        _, oldest = self.points[0]
        return {k: values[k] - oldest.get(k, 0.0) for k in values}


class Alerts:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.metrics = metrics
        self.window_seconds = settings.alert_window_seconds
        self.min_requests = settings.alert_min_requests
        self.pool_seconds = settings.alert_pool_seconds
        self.memory_bytes = settings.alert_memory_usage_mb * 1024 * 1024
        self.response_seconds = settings.alert_response_time_ms / 1000
        self.hit_rate = settings.alert_cache_hit_rate
        self.stream_error_rate = settings.alert_stream_error_rate
        self._counters = _Window(self.window_seconds)
        # Readings of the response-time histogram (metrics.HttpStats): the window's p95 comes
        # from the difference of two, as histogram_quantile does in the Prometheus rule, so a
        # request costs nothing here. The first reading is the start: every bucket empty.
        self._latency = _Window(self.window_seconds, deque([(time.monotonic(), {})]))
        self._waiting_since: float | None = None
        self.states = {
            s.name: s
            for s in (
                AlertState(
                    "response_time",
                    "p95 response time over the window",
                    self.response_seconds * 1000,
                    "ms",
                ),
                AlertState(
                    "memory", "resident memory", float(settings.alert_memory_usage_mb), "MB"
                ),
                AlertState(
                    "cache_hit_rate",
                    "catalog cache hit rate over the window",
                    self.hit_rate,
                    "ratio",
                ),
                AlertState(
                    "db_pool_exhausted",
                    "requests waiting for a database connection",
                    self.pool_seconds,
                    "s",
                ),
                AlertState(
                    "stream_error_rate",
                    "streaming errors per /play request",
                    self.stream_error_rate,
                    "ratio",
                ),
            )
        }
        for name in self.states:
            metrics.alert_firing.labels(name).set(0)

    def evaluate(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        m = self.metrics
        deltas = self._counters.add(
            now,
            {
                "lookups": counter_total(m.cache_lookups),
                "loads": counter_total(m.cache_loads),
                "plays": m.http.total(lambda route, _method, _status: route in _PLAY_ROUTES),
                "stream_errors": counter_total(m.upstream_errors) + counter_total(m.player_errors),
            },
        )

        counts = m.http.buckets(is_response_time)
        latency = self._latency.add(now, {str(n): c for n, c in enumerate(counts)})
        p95 = histogram_quantile(0.95, m.http.bounds, [latency[str(n)] for n in range(len(counts))])
        self._set(
            "response_time",
            p95 is not None and p95 > self.response_seconds,
            None if p95 is None else round(p95 * 1000, 3),
            now,
        )

        rss = rss_bytes()
        self._set("memory", rss > self.memory_bytes, round(rss / 1024 / 1024, 1), now)

        lookups = deltas["lookups"]
        rate = None if lookups <= 0 else 1.0 - deltas["loads"] / lookups
        self._set(
            "cache_hit_rate",
            rate is not None and lookups >= self.min_requests and rate < self.hit_rate,
            None if rate is None else round(rate, 4),
            now,
        )

        waiters = m.registry.get_sample_value("edge_db_pool_waiters") or 0.0
        if waiters > 0:
            self._waiting_since = self._waiting_since or now
        else:
            self._waiting_since = None
        waited = 0.0 if self._waiting_since is None else now - self._waiting_since
        self._set("db_pool_exhausted", waited >= self.pool_seconds, round(waited, 2), now)

        plays = deltas["plays"]
        error_rate = None if plays <= 0 else deltas["stream_errors"] / plays
        self._set(
            "stream_error_rate",
            error_rate is not None
            and plays >= self.min_requests
            and error_rate > self.stream_error_rate,
            None if error_rate is None else round(error_rate, 4),
            now,
        )

    def _set(self, name: str, firing: bool, value: float | None, now: float) -> None:
        state = self.states[name]
        state.value = value
        if firing == state.firing:
            return
        state.firing = firing
        state.last_change = time.time()
        state.since = state.last_change if firing else None
        self.metrics.alert_firing.labels(name).set(1 if firing else 0)
        event = "alert_firing" if firing else "alert_resolved"
        (log.warning if firing else log.info)(
            event, alert=name, value=value, threshold=state.threshold, unit=state.unit
        )

    def as_json(self) -> list[dict[str, object]]:
        return [s.as_json() for s in self.states.values()]


def is_response_time(route: str, _method: str, status: int) -> bool:
    """Whether a response's duration is a response time, as the EdgeSlowResponses rule in
    deploy/prometheus/alerts.yml selects them: not a scrape, not the local origin's streamed
    media, and of /play only what is not a streamed body (redirects and errors)."""
    if route in _PLAY_ROUTES:
        return not 200 <= status < 300
    return route not in _NOT_RESPONSE_TIMES


def histogram_quantile(q: float, bounds: tuple[float, ...], counts: list[float]) -> float | None:
    """The q-quantile of a histogram (`counts` per bucket, the last one +Inf), interpolated
    within its bucket as Prometheus's histogram_quantile does; None when it is empty. In the
    +Inf bucket it is the highest finite bound."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    below = 0.0
    for n, count in enumerate(counts):
        if count > 0 and below + count >= rank:
            if n >= len(bounds):
                return bounds[-1]
            lower = bounds[n - 1] if n else 0.0
            return lower + (bounds[n] - lower) * (rank - below) / count
        below += count
    return bounds[-1]
