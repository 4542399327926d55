"""Every `web.AppKey`: the state an app owns (no module-level singletons)."""

from __future__ import annotations

import asyncpg
from aiohttp import web
from redis.asyncio import Redis

from edge.alerts import Alerts
from edge.auth import Verifier
from edge.background import Background
from edge.cache import Cache
from edge.cdn import Cdn
from edge.dashboard import Sampler
from edge.metrics import Metrics
from edge.sessions import Sessions
from edge.settings import Settings
from edge.signing import LocalSigner

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
DATABASE_URL = web.AppKey("database_url", str)
REDIS_URL = web.AppKey("redis_url", str)
PG_POOL = web.AppKey("pg_pool", asyncpg.Pool)
REDIS = web.AppKey("redis", Redis)
CACHE = web.AppKey("cache", Cache)
VERIFIER = web.AppKey("verifier", Verifier)
SESSIONS = web.AppKey("sessions", Sessions)
CDN = web.AppKey("cdn", Cdn)
LOCAL_SIGNER = web.AppKey("local_signer", LocalSigner)
BACKGROUND = web.AppKey("background", Background)
SESSION_SECRET = web.AppKey("session_secret", bytes)
ALERTS = web.AppKey("alerts", Alerts)
SAMPLER = web.AppKey("sampler", Sampler)
