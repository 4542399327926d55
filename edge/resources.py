"""One cleanup context per resource, entered in order at start and left in reverse at stop.

embedded servers (zero-config) -> schema (+ demo catalog) -> PostgreSQL pool -> Redis -> cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator

import asyncpg
import redis.asyncio as aioredis
import structlog
from aiohttp import web

from edge import keys
from edge.auth import Verifier, local_secret
from edge.background import Background
from edge.cache import Cache
from edge.cdn import Cdn
from edge.embedded import embedded_postgres, embedded_redis
from edge.migrations import migrate
from edge.origin import OriginPool
from edge.sessions import Sessions
from edge.settings import Settings
from edge.signing import CloudFrontSigner, LocalSigner, SignedUrlCache, Signer

log = structlog.get_logger(__name__)


async def embedded_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    async with contextlib.AsyncExitStack() as stack:
        if settings.database_url is not None:
            app[keys.DATABASE_URL] = settings.database_url
        elif settings.supervisor_database_url is not None:  # a worker of `--workers N`
            app[keys.DATABASE_URL] = settings.supervisor_database_url
        else:
            app[keys.DATABASE_URL] = await stack.enter_async_context(
                embedded_postgres(settings.data_dir)
            )
        if settings.redis_url is not None:
            app[keys.REDIS_URL] = settings.redis_url
        elif settings.supervisor_redis_url is not None:
            app[keys.REDIS_URL] = settings.supervisor_redis_url
        else:
            app[keys.REDIS_URL] = await stack.enter_async_context(embedded_redis(settings.data_dir))
        yield


async def schema_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    if settings.worker_dir is None:  # a worker's supervisor has prepared the schema
        await prepare_schema(settings, app[keys.DATABASE_URL])
    yield


async def prepare_schema(settings: Settings, database_url: str) -> None:
    """Migrations, and on the embedded default's first start the demo catalog."""
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn)
        if settings.embedded_postgres and settings.demo_seed:
            from edge.seed import seed_demo_if_empty

            await seed_demo_if_empty(conn, settings.media_root)
    finally:
        await conn.close()


async def _init_connection(conn: asyncpg.Connection) -> None:
    # JIT compilation costs more than these short catalog queries ever take.
    await conn.execute("SET jit = off")


def pool_kwargs(settings: Settings) -> dict[str, object]:
    return {
        "min_size": settings.db_pool_min,
        "max_size": settings.db_pool_max,
        "server_settings": {
            "application_name": "edge",
            "statement_timeout": str(settings.db_statement_timeout_ms),
        },
        "init": _init_connection,
    }


async def postgres_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    pool = await asyncpg.create_pool(app[keys.DATABASE_URL], **pool_kwargs(settings))
    app[keys.PG_POOL] = pool
    log.info("postgres_pool_ready", min=settings.db_pool_min, max=settings.db_pool_max)
    try:
        yield
    finally:
        await pool.close()


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    client: aioredis.Redis = aioredis.Redis.from_url(
        app[keys.REDIS_URL],
        socket_timeout=settings.redis_timeout,
        socket_connect_timeout=settings.redis_timeout,
        health_check_interval=30,
        max_connections=256,
        # RESP2 unless the URL asks for another (`?protocol=3`): Edge uses nothing of RESP3,
        # and on RESP2 a batch's replies are read straight from hiredis (sessions.ScriptBatch),
        # which RESP3's push messages between replies would not allow.
        protocol=2,
    )
    app[keys.REDIS] = client
    app[keys.CACHE] = cache = Cache(client, app[keys.METRICS], settings)
    cache.start_watching()
    try:
        yield
    finally:
        await cache.stop_watching()
        await client.aclose()


async def streaming_ctx(app: web.Application) -> AsyncIterator[None]:
    """Token verifier, sessions, signers and the pooled CDN client."""
    settings = app[keys.SETTINGS]
    jwt_secret: str = settings.jwt_secret
    if not jwt_secret and not settings.jwt_public_key and settings.embedded_postgres:
        # The zero-config default: a key of its own under the data dir (`edge token` uses it).
        jwt_secret = await asyncio.to_thread(local_secret, settings.data_dir, "jwt")
    app[keys.VERIFIER] = Verifier(jwt_secret, settings.jwt_public_key)
    media_secret: str = settings.media_secret
    if not media_secret:
        media_secret = await asyncio.to_thread(local_secret, settings.data_dir, "media")
    local = LocalSigner(media_secret.encode())
    app[keys.SESSION_SECRET] = hashlib.sha256(
        b"edge-device-session\x00" + media_secret.encode()
    ).digest()
    app[keys.LOCAL_SIGNER] = local
    signer: Signer = local
    if settings.cdn_base and settings.cloudfront_key_pair_id and settings.cloudfront_private_key:
        signer = CloudFrontSigner(
            settings.cloudfront_key_pair_id, str(settings.cloudfront_private_key)
        )
    urls = SignedUrlCache(signer, settings.signed_url_lifetime, settings.signed_url_window)
    metrics = app[keys.METRICS]
    app[keys.SESSIONS] = Sessions(
        app[keys.REDIS],
        settings.redis_key_prefix,
        metrics.session_choices_lost,
        metrics.session_transfers_lost,
    )
    app[keys.BACKGROUND] = Background()
    # A proxied stream holds its origin connection for its whole length: the pool is sized for
    # streams, not requests.
    origins = OriginPool(
        limit=settings.upstream_connections,
        connect_timeout=settings.upstream_connect_timeout,
        read_timeout=settings.upstream_read_timeout,
        read_size=settings.upstream_buffer,
        keepalive=max(1.0, min(30.0, settings.upstream_read_timeout / 2)),
    )
    app[keys.CDN] = Cdn(settings.cdn_base, urls, origins, app[keys.METRICS])
    try:
        yield
    finally:
        await app[keys.BACKGROUND].drain()
        await app[keys.SESSIONS].drain()
        await origins.close()
