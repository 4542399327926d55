"""The live dashboard's data: a sampler that reads the app's own Prometheus collectors every few
seconds and keeps the last minutes of points (bounded), and the top slow statements from
pg_stat_statements when the server has it."""

from __future__ import annotations

import time
from collections import defaultdict, deque
from typing import Any

import asyncpg

from edge.alerts import Alerts, rss_bytes
from edge.metrics import Metrics

POINTS = 150  # 5 minutes at one point every 2 s

HAS_STATEMENTS_SQL = (
    "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements')"
)
TOP_STATEMENTS_SQL = """
SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 160) AS query, calls,
       round(mean_exec_time::numeric, 3) AS mean_ms, round(total_exec_time::numeric, 1) AS total_ms
FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
ORDER BY mean_exec_time DESC
LIMIT 8
"""


def _samples(metrics: Metrics) -> dict[str, list[tuple[dict[str, str], float, str]]]:
    """Every sample of the registry, by family name."""
    out: dict[str, list[tuple[dict[str, str], float, str]]] = defaultdict(list)
    for family in metrics.registry.collect():
        for s in family.samples:
            out[family.name].append((s.labels, s.value, s.name))
    return out


def _quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """histogram_quantile over cumulative (upper bound, count) pairs."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return prev_bound
            width = count - prev_count
            return prev_bound + (bound - prev_bound) * ((rank - prev_count) / width if width else 1)
        prev_bound, prev_count = bound, count
    return prev_bound


class Sampler:
    def __init__(self, metrics: Metrics, alerts: Alerts) -> None:
        self.metrics = metrics
        self.alerts = alerts
        self.points: deque[dict[str, Any]] = deque(maxlen=POINTS)
        self._last: tuple[float, dict[str, Any]] | None = None
        self._statements: tuple[float, list[dict[str, Any]] | str] | None = None

    def _read(self) -> dict[str, Any]:
        fam = _samples(self.metrics)
        requests: dict[str, float] = defaultdict(float)
        for labels, value, name in fam["edge_http_requests"]:
            if name.endswith("_total"):
                requests[labels["route"]] += value
        buckets: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
        for labels, value, name in fam["edge_http_request_duration_seconds"]:
            if name.endswith("_bucket"):
                buckets[labels["route"]][float(labels["le"])] += value
        lookups: dict[str, float] = defaultdict(float)
        loads: dict[str, float] = defaultdict(float)
        for labels, value, name in fam["edge_cache_lookups"]:
            if name.endswith("_total"):
                lookups[labels["cache"]] += value
        for labels, value, name in fam["edge_cache_loads"]:
            if name.endswith("_total"):
                loads[labels["cache"]] += value

        def total(family: str, **match: str) -> float:
            return sum(
                v
                for labels, v, n in fam[family]
                if n.endswith("_total") and all(labels.get(k) == w for k, w in match.items())
            )

        def gauge(family: str) -> float:
            return sum(v for _, v, _n in fam[family])

        quality = {
            f"{labels['format']} {labels['bitrate']}": value
            for labels, value, name in fam["edge_stream_quality"]
            if name.endswith("_total")
        }
        return {
            "requests": dict(requests),
            "buckets": {r: sorted(b.items()) for r, b in buckets.items()},
            "lookups": dict(lookups),
            "loads": dict(loads),
            "cpu": gauge("process_cpu_seconds"),
            "bytes": total("edge_stream_bytes"),
            "buffer": total("edge_player_events", type="waiting")
            + total("edge_player_events", type="stalled"),
            "errors": total("edge_player_errors") + total("edge_upstream_errors"),
            "pool": {
                "size": gauge("edge_db_pool_size"),
                "idle": gauge("edge_db_pool_idle"),
                "in_use": gauge("edge_db_pool_in_use"),
                "waiting": gauge("edge_db_pool_waiters"),
            },
            "sessions": gauge("edge_stream_sessions_active"),
            "quality": quality,
        }

    def sample(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        current = self._read()
        point: dict[str, Any] = {
            "t": round(now, 3),
            "pool": current["pool"],
            "sessions": current["sessions"],
            "memory_mb": round(rss_bytes() / 1024 / 1024, 1),
            "quality": current["quality"],
            "alerts": [a["name"] for a in self.alerts.as_json() if a["firing"]],
        }
        if self._last is not None:
            then, before = self._last
            dt = max(now - then, 1e-6)
            point["rps"] = {
                route: round((n - before["requests"].get(route, 0.0)) / dt, 2)
                for route, n in current["requests"].items()
                if n - before["requests"].get(route, 0.0) > 0
            }
            latency: dict[str, dict[str, float | None]] = {}
            for route, b in current["buckets"].items():
                old = dict(before["buckets"].get(route, []))
                delta = [(le, c - old.get(le, 0.0)) for le, c in b]
                if delta and delta[-1][1] > 0:
                    p50, p95 = _quantile(delta, 0.5), _quantile(delta, 0.95)
                    latency[route] = {
                        "p50_ms": None if p50 is None else round(p50 * 1000, 2),
                        "p95_ms": None if p95 is None else round(p95 * 1000, 2),
                    }
            point["latency"] = latency
            hit: dict[str, float] = {}
            for cache, n in current["lookups"].items():
                d_lookups = n - before["lookups"].get(cache, 0.0)
                d_loads = current["loads"].get(cache, 0.0) - before["loads"].get(cache, 0.0)
                if d_lookups > 0:
                    hit[cache] = round(max(0.0, 1 - d_loads / d_lookups), 4)
            point["hit_ratio"] = hit
            point["cpu_percent"] = round((current["cpu"] - before["cpu"]) / dt * 100, 1)
            point["bytes_per_s"] = round((current["bytes"] - before["bytes"]) / dt, 1)
            point["buffer_per_s"] = round((current["buffer"] - before["buffer"]) / dt, 3)
            point["errors_per_s"] = round((current["errors"] - before["errors"]) / dt, 3)
            self.points.append(point)
        self._last = (now, current)
        return point

    async def statements(
        self, pool: asyncpg.Pool, now: float | None = None
    ) -> list[dict[str, Any]] | str:
        """Top statements by mean time, or a note why there are none (cached 10 s)."""
        now = time.time() if now is None else now
        if self._statements is not None and now - self._statements[0] < 10:
            return self._statements[1]
        result: list[dict[str, Any]] | str
        try:
            async with pool.acquire(timeout=2) as conn:
                if not await conn.fetchval(HAS_STATEMENTS_SQL):
                    result = (
                        "pg_stat_statements is not available on this server (load it with"
                        " shared_preload_libraries and run edge migrate)"
                    )
                else:
                    rows = await conn.fetch(TOP_STATEMENTS_SQL)
                    result = [
                        {
                            "query": r["query"],
                            "calls": r["calls"],
                            "mean_ms": float(r["mean_ms"]),
                            "total_ms": float(r["total_ms"]),
                        }
                        for r in rows
                    ]
        except (asyncpg.PostgresError, OSError, TimeoutError) as exc:
            result = f"pg_stat_statements could not be read: {type(exc).__name__}"
        self._statements = (now, result)
        return result
