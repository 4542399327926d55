"""Prometheus collectors, in a registry owned by the app so two apps in one process never collide.

Label values are bounded: route names (never raw paths), status classes, cache names and levels.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter(
            "edge_http_requests", "HTTP responses sent", ["route", "method", "status"], registry=r
        )
        self.http_duration = Histogram(
            "edge_http_request_duration_seconds",
            "Time from request to response start",
            ["route", "method", "status_class"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.http_in_flight = Gauge(
            "edge_http_requests_in_flight", "Requests being handled", registry=r
        )
        self.errors = Counter("edge_errors", "Error responses by error code", ["code"], registry=r)
        self.cache_requests = Counter(
            "edge_cache_requests",
            "Cache look-ups by cache, level and result",
            ["cache", "level", "result"],
            registry=r,
        )
        self.cache_loads = Counter(
            "edge_cache_loads",
            "Loads from PostgreSQL after a miss (single-flight)",
            ["cache"],
            registry=r,
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
        self.db_errors = Counter(
            "edge_db_errors", "Catalog queries that failed, by kind", ["kind"], registry=r
        )
        self.popular_refreshes = Counter(
            "edge_popular_refreshes",
            "popular_tracks_mv refreshes by result",
            ["result"],
            registry=r,
        )
