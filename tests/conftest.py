"""Real PostgreSQL and Redis for every test that needs them.

With DATABASE_URL / REDIS_URL (or DB_* / REDIS_*) set, the tests use those servers; otherwise they
start the embedded ones (the same code as `edge serve`'s zero-config default). Each test gets its
own database, cloned from a migrated template, and its own Redis key prefix.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from edge import keys, logs
from edge.app import create_app
from edge.embedded import embedded_postgres, embedded_redis
from edge.migrations import migrate
from edge.settings import Settings


@pytest.fixture(scope="session", autouse=True)
def _logging() -> None:
    """The same structlog pipeline as `edge serve`, so tests can read log events via caplog."""
    logs.configure("DEBUG", "json")


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@dataclass(frozen=True)
class Servers:
    pg_admin_url: str
    template: str
    redis_url: str


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def servers() -> AsyncIterator[Servers]:
    env = Settings.from_env()
    async with contextlib.AsyncExitStack() as stack:
        data = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edge-test-")))
        pg_url = env.database_url or await stack.enter_async_context(embedded_postgres(data))
        redis_url = env.redis_url or await stack.enter_async_context(embedded_redis(data))
        template = f"edge_tpl_{os.getpid()}"
        admin = await asyncpg.connect(pg_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{template}"')
            await admin.execute(f'CREATE DATABASE "{template}"')
        finally:
            await admin.close()
        conn = await asyncpg.connect(_with_database(pg_url, template))
        try:
            await migrate(conn)
        finally:
            await conn.close()
        yield Servers(pg_url, template, redis_url)
        admin = await asyncpg.connect(pg_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest_asyncio.fixture
async def database_url(servers: Servers) -> AsyncIterator[str]:
    """A fresh, migrated database of this test's own."""
    name = f"edge_t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(servers.pg_admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{servers.template}"')
    finally:
        await admin.close()
    yield _with_database(servers.pg_admin_url, name)
    admin = await asyncpg.connect(servers.pg_admin_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest_asyncio.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


@pytest_asyncio.fixture
async def redis_prefix(servers: Servers) -> AsyncIterator[str]:
    prefix = f"t:{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = aioredis.Redis.from_url(servers.redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await client.unlink(*keys)
    finally:
        await client.aclose()


@pytest_asyncio.fixture
async def redis_client(servers: Servers) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(servers.redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def settings(database_url: str, servers: Servers, redis_prefix: str, tmp_path: Path) -> Settings:
    from edge.settings import Secret

    return Settings(
        database_url=Secret(database_url),
        redis_url=Secret(servers.redis_url),
        redis_key_prefix=redis_prefix,
        data_dir=tmp_path / "data",
        db_pool_min=1,
        db_pool_max=5,
        demo_seed=False,
        log_format="json",
        jwt_secret=Secret(JWT_SECRET),
        media_secret=Secret("test-media-secret-0123456789"),
        allow_anonymous=False,
        plays_flush_seconds=3600.0,
    )


JWT_SECRET = "test-jwt-secret-0123456789abcdef"


def sample(client: TestClient[web.Request, web.Application], name: str, **labels: str) -> float:
    """One series of the app's own metrics registry (0 when it has no such series yet)."""
    value = client.app[keys.METRICS].registry.get_sample_value(name, labels)
    return float(value or 0.0)


def token(user: str = "alice", tier: str = "premium", ttl: int = 3600) -> str:
    """A player token as Edge's own `edge token` makes it."""
    from edge.auth import issue

    return issue(JWT_SECRET, user, tier, ttl)  # type: ignore[arg-type]


def bearer(user: str = "alice", tier: str = "premium") -> dict[str, str]:
    return {"Authorization": f"Bearer {token(user, tier)}"}


@pytest.fixture(scope="session")
def audio_files(tmp_path_factory: pytest.TempPathFactory) -> list[list[Any]]:
    """Three short real tracks encoded once per test session into the full rendition ladder."""
    from edge.ingest import Tags, encode_renditions, synthesize

    root = tmp_path_factory.mktemp("audio")
    made = []
    for n in range(3):
        tags = Tags(f"Test {n}", "Edge", "Tests", "test", n + 1)
        made.append(encode_renditions(synthesize(n + 1, 4.0), 44100, tags, root, f"t/{n}"))
    return made


@pytest_asyncio.fixture
async def playable(
    catalog: dict[str, Any],
    db: asyncpg.Connection,
    settings: Settings,
    audio_files: list[list[Any]],
) -> dict[str, Any]:
    """Real renditions for the three tracks of "Back in Black" (album order: hells, shoot,
    backinblack), copied into this test's media folder and recorded in the catalog."""
    import shutil

    from edge.seed import INSERT_RENDITION_SQL, _rendition_row

    order = ["hells", "shoot", "backinblack"]
    await db.execute("DELETE FROM renditions")
    for key, files in zip(order, audio_files, strict=True):
        track_id = catalog["tracks"][key]
        for f in files:
            target = settings.media_root / f.object_key
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f.path, target)
        await db.executemany(INSERT_RENDITION_SQL, [_rendition_row(track_id, f) for f in files])
        await db.execute(
            "UPDATE tracks SET duration_ms = $2 WHERE id = $1", track_id, files[0].duration_ms
        )
    return {**catalog, "files": dict(zip(order, audio_files, strict=True))}


MakeClient = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest_asyncio.fixture
async def make_client(settings: Settings) -> AsyncIterator[MakeClient]:
    """Build the app with the same factory as `edge serve`; keyword args override settings.
    The clients are closed here, before this test's database is dropped."""
    clients: list[TestClient[web.Request, web.Application]] = []

    async def make(**overrides: Any) -> TestClient[web.Request, web.Application]:
        client: TestClient[web.Request, web.Application] = TestClient(
            TestServer(create_app(settings.with_(**overrides)))
        )
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in reversed(clients):
        await client.close()


@pytest_asyncio.fixture
async def client(
    make_client: MakeClient, catalog: dict[str, Any]
) -> TestClient[web.Request, web.Application]:
    return await make_client()


# -- a small catalog with the names search must cope with ---------------------------------------

CATALOG_ARTISTS = {
    "acdc": "AC/DC",
    "rem": "R.E.M.",
    "beyonce": "Beyoncé",
    "dvorak": "Antonín Dvořák",
    "sigur": "Sigur Rós",
    "motorhead": "Motörhead",
}
CATALOG_ALBUMS = {
    "black": ("acdc", "Back in Black", 1980),
    "highway": ("acdc", "Highway to Hell", 1979),
    "oot": ("rem", "Out of Time", 1991),
    "lemonade": ("beyonce", "Lemonade", 2016),
    "newworld": ("dvorak", 'Symphony No. 9 "From the New World"', 1893),
    "takk": ("sigur", "Takk...", 2005),
    "aces": ("motorhead", "Ace of Spades", 1980),
}
CATALOG_TRACKS = [
    # key, title, album, genre, number, plays
    ("hells", "Hells Bells", "black", "rock", 1, 9000),
    ("shoot", "Shoot to Thrill", "black", "rock", 2, 5000),
    ("backinblack", "Back in Black", "black", "rock", 6, 12000),
    ("highway", "Highway to Hell", "highway", "rock", 1, 15000),
    ("religion", "Losing My Religion", "oot", "rock", 2, 20000),
    ("shiny", "Shiny Happy People", "oot", "pop", 10, 7000),
    ("formation", "Formation", "lemonade", "pop", 12, 11000),
    ("hold", "Hold Up", "lemonade", "pop", 2, 4000),
    ("largo", "Largo", "newworld", "classical", 2, 3000),
    ("allegro", "Allegro con fuoco", "newworld", "classical", 4, 2500),
    ("hoppipolla", "Hoppípolla", "takk", "ambient", 3, 6000),
    ("glosoli", "Glósóli", "takk", "ambient", 2, 3500),
    ("spades", "Ace of Spades", "aces", "metal", 1, 8000),
]


@pytest_asyncio.fixture
async def catalog(db: asyncpg.Connection) -> dict[str, Any]:
    """Insert the small catalog through the normal triggers; returns ids by key."""
    ids: dict[str, Any] = {"artists": {}, "albums": {}, "tracks": {}}
    for key, name in CATALOG_ARTISTS.items():
        ids["artists"][key] = await db.fetchval(
            "INSERT INTO artists (name) VALUES ($1) RETURNING id", name
        )
    for key, (artist, title, year) in CATALOG_ALBUMS.items():
        ids["albums"][key] = await db.fetchval(
            "INSERT INTO albums (artist_id, title, release_year) VALUES ($1, $2, $3) RETURNING id",
            ids["artists"][artist],
            title,
            year,
        )
    for key, title, album, genre, number, plays in CATALOG_TRACKS:
        artist_id = await db.fetchval(
            "SELECT artist_id FROM albums WHERE id = $1", ids["albums"][album]
        )
        ids["tracks"][key] = await db.fetchval(
            "INSERT INTO tracks (title, artist_id, album_id, genre, track_number, duration_ms,"
            " play_count) VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
            title,
            artist_id,
            ids["albums"][album],
            genre,
            number,
            200_000,
            plays,
        )
    ids["artists"]["solo"] = await db.fetchval(
        "INSERT INTO artists (name) VALUES ('Nobody Yet') RETURNING id"
    )
    await db.execute(
        "INSERT INTO renditions (track_id, format, codec, bitrate_kbps, sample_rate, bytes,"
        " content_type, object_key, etag) VALUES"
        " ($1, 'mp3', 'mp3', 128, 44100, 1000, 'audio/mpeg', 'k/a.mp3', 'e1'),"
        " ($1, 'flac', 'flac', 900, 44100, 9000, 'audio/flac', 'k/a.flac', 'e2')",
        ids["tracks"]["hells"],
    )
    ids["playlist"] = await db.fetchval(
        "INSERT INTO playlists (name) VALUES ('Road Trip') RETURNING id"
    )
    order = ["highway", "religion", "hoppipolla", "hells", "formation"]
    for position, key in enumerate(order):
        await db.execute(
            "INSERT INTO playlist_entries (playlist_id, position, track_id) VALUES ($1, $2, $3)",
            ids["playlist"],
            position,
            ids["tracks"][key],
        )
    ids["playlist_order"] = [ids["tracks"][k] for k in order]
    await db.execute("REFRESH MATERIALIZED VIEW popular_tracks_mv")
    return ids
