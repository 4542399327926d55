"""Migrations from an empty database, re-runs, and the objects the platform's guide names."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from edge.migrations import discover, migrate
from tests.conftest import Servers, _with_database

GUIDE_INDEXES = {
    "idx_tracks_play_count_desc",
    "idx_tracks_created_at_desc",
    "idx_tracks_artist_id",
    "idx_tracks_album_id",
    "idx_tracks_title_fts",
    "idx_artists_name_fts",
    "idx_albums_title_fts",
    "idx_tracks_artist_play_count",
    "idx_tracks_genre_play_count",
}


async def _fresh_database(servers: Servers, name: str) -> str:
    admin = await asyncpg.connect(servers.pg_admin_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return _with_database(servers.pg_admin_url, name)


async def _drop(servers: Servers, name: str) -> None:
    admin = await asyncpg.connect(servers.pg_admin_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def test_from_empty_and_rerun(servers: Servers) -> None:
    url = await _fresh_database(servers, "edge_mig_empty")
    try:
        conn = await asyncpg.connect(url)
        try:
            applied = await migrate(conn)
            assert [m.version for m in applied] == [m.version for m in discover()]
            assert await migrate(conn) == []
            recorded = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY 1")
            assert [(r["version"], r["name"]) for r in recorded] == [
                (m.version, m.name) for m in discover()
            ]
        finally:
            await conn.close()
    finally:
        await _drop(servers, "edge_mig_empty")


async def test_concurrent_runs_apply_once(servers: Servers) -> None:
    url = await _fresh_database(servers, "edge_mig_race")
    try:
        conns = [await asyncpg.connect(url) for _ in range(3)]
        try:
            results = await asyncio.gather(*(migrate(c) for c in conns))
            assert sorted(len(r) for r in results) == [0, 0, len(discover())]
        finally:
            for c in conns:
                await c.close()
    finally:
        await _drop(servers, "edge_mig_race")


async def test_failed_migration_rolls_back(servers: Servers, tmp_path: Any) -> None:
    url = await _fresh_database(servers, "edge_mig_fail")
    bad = tmp_path / "migrations"
    bad.mkdir()
    (bad / "001_ok.sql").write_text("CREATE TABLE ok_table (id int);")
    (bad / "002_broken.sql").write_text("CREATE TABLE half (id int); SELECT no_such_function();")
    try:
        conn = await asyncpg.connect(url)
        try:
            try:
                await migrate(conn, bad)
            except asyncpg.UndefinedFunctionError:
                pass
            else:
                raise AssertionError("the broken migration did not fail")
            tables = {
                r["relname"]
                for r in await conn.fetch("SELECT relname FROM pg_class WHERE relkind = 'r'")
            }
            assert "ok_table" in tables
            assert "half" not in tables
            assert await conn.fetchval("SELECT max(version) FROM schema_migrations") == 1
        finally:
            await conn.close()
    finally:
        await _drop(servers, "edge_mig_fail")


async def test_guide_objects_exist(db: asyncpg.Connection) -> None:
    names = {r["indexname"] for r in await db.fetch("SELECT indexname FROM pg_indexes")}
    assert GUIDE_INDEXES <= names
    assert (
        await db.fetchval(
            "SELECT count(*) FROM pg_matviews WHERE matviewname = 'popular_tracks_mv'"
        )
        == 1
    )
    unique = await db.fetchval(
        "SELECT count(*) FROM pg_indexes WHERE tablename = 'popular_tracks_mv'"
        " AND indexdef LIKE 'CREATE UNIQUE INDEX%'"
    )
    assert unique >= 1
    # CONCURRENTLY needs that unique index; this would raise without it.
    await db.execute("REFRESH MATERIALIZED VIEW CONCURRENTLY popular_tracks_mv")


async def test_guide_indexes_are_used(db: asyncpg.Connection, catalog: dict[str, Any]) -> None:
    await db.execute("SET enable_seqscan = off")
    plan = "\n".join(
        r[0]
        for r in await db.fetch(
            "EXPLAIN SELECT id FROM tracks WHERE genre = 'rock' ORDER BY play_count DESC, id DESC"
            " LIMIT 5"
        )
    )
    assert "idx_tracks_genre_play_count" in plan
    plan = "\n".join(
        r[0]
        for r in await db.fetch(
            "EXPLAIN SELECT id FROM tracks WHERE search_tsv @@ edge_search_query('hells')"
        )
    )
    assert "idx_tracks_title_fts" in plan
