"""Responses counted the way the observe middleware has them counted: a row in
metrics.HttpStats.rows, settled. For tests that need counts without serving requests."""

from __future__ import annotations

from edge.metrics import HttpStats


class Route:
    """What HttpStats reads of a matched aiohttp route: its name, and that it has a resource."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.resource = self


_ROUTES: dict[str, Route] = {}


def count_response(stats: HttpStats, route: str, method: str, status: int, seconds: float) -> None:
    matched = _ROUTES.setdefault(route, Route(route))
    stats.in_flight += 1  # (as the middleware does; settling a row takes it off)
    stats.rows.append((method, matched, f"/{route}", "test", None, status, 0, 0.0, seconds))
    stats.settle()
