"""Every `web.AppKey`: the state an app owns (no module-level singletons)."""

from __future__ import annotations

import asyncpg
from aiohttp import web
from redis.asyncio import Redis

from edge.cache import Cache
from edge.metrics import Metrics
from edge.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
DATABASE_URL = web.AppKey("database_url", str)
REDIS_URL = web.AppKey("redis_url", str)
PG_POOL = web.AppKey("pg_pool", asyncpg.Pool)
REDIS = web.AppKey("redis", Redis)
CACHE = web.AppKey("cache", Cache)
