"""Keyset pagination: a whole list walked page by page, with rows inserted meanwhile, comes out
complete and without duplicates."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

Client = Any


async def bulk_tracks(
    db: asyncpg.Connection, artist_id: int, n: int, *, genre: str, title: str
) -> list[int]:
    rng = random.Random(n)
    base = datetime(2024, 1, 1, tzinfo=UTC)
    rows = await db.fetch(
        "INSERT INTO tracks (title, artist_id, genre, duration_ms, play_count, created_at)"
        " SELECT $1 || ' ' || g, $2, $3, 1000, p, c"
        " FROM unnest($4::int[], $5::bigint[], $6::timestamptz[]) AS u(g, p, c) RETURNING id",
        title,
        artist_id,
        genre,
        list(range(n)),
        # Many equal play counts and timestamps: the id must break ties.
        [rng.choice((5, 5, 7, 100)) for _ in range(n)],
        [base + timedelta(seconds=rng.choice((0, 0, 1, 2))) for _ in range(n)],
    )
    return [r["id"] for r in rows]


async def walk(client: Client, url: str, limit: int, between_pages: Any = None) -> list[int]:
    seen: list[int] = []
    cursor = None
    for _ in range(1000):
        params = {"limit": str(limit)}
        if cursor:
            params["cursor"] = cursor
        resp = await client.get(url, params=params)
        body = await resp.json()
        assert resp.status == 200, body
        seen += [item.get("track", item)["id"] for item in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            return seen
        if between_pages is not None:
            await between_pages()
    raise AssertionError("pagination did not end")


@pytest.mark.parametrize(
    ("url", "genre"),
    [
        ("/api/v1/genres/walk/tracks", "walk"),
        ("/api/v1/artists/{artist}/tracks", "walk"),
        ("/api/v1/tracks/recent", "walk"),
        ("/api/v1/search?q=walkabout", "walk"),
    ],
)
async def test_walk_with_concurrent_inserts(
    client: Client, catalog: dict[str, Any], db: asyncpg.Connection, url: str, genre: str
) -> None:
    artist = await db.fetchval("INSERT INTO artists (name) VALUES ('Walker') RETURNING id")
    ids = await bulk_tracks(db, artist, 230, genre=genre, title="Walkabout")
    inserted: list[int] = []

    async def insert_more() -> None:
        # New rows at the front of every order (newest, most played, best match).
        row = await db.fetchval(
            "INSERT INTO tracks (title, artist_id, genre, duration_ms, play_count, created_at)"
            " VALUES ('Walkabout', $1, $2, 1, 1000000, now() + interval '1 year') RETURNING id",
            artist,
            genre,
        )
        inserted.append(row)

    seen = await walk(client, url.format(artist=artist), 17, insert_more)
    assert len(seen) == len(set(seen)), "a row was returned twice"
    missing = set(ids) - set(seen)
    assert not missing, f"{len(missing)} rows lost"
    # Rows inserted ahead of the cursor are not shown on later pages.
    assert not set(inserted) & set(seen[17:])


async def test_popular_walk_matches_the_view(
    client: Client, catalog: dict[str, Any], db: asyncpg.Connection
) -> None:
    artist = await db.fetchval("INSERT INTO artists (name) VALUES ('Pop') RETURNING id")
    await bulk_tracks(db, artist, 120, genre="pop", title="Chart")
    await db.execute("REFRESH MATERIALIZED VIEW popular_tracks_mv")
    seen = await walk(client, "/api/v1/tracks/popular", 13)
    expected = [
        r["track_id"]
        for r in await db.fetch("SELECT track_id FROM popular_tracks_mv ORDER BY rank")
    ]
    assert seen == expected


async def test_cursor_from_another_list_is_refused(client: Client, catalog: dict[str, Any]) -> None:
    resp = await client.get("/api/v1/genres/rock/tracks", params={"limit": "1"})
    cursor = (await resp.json())["next_cursor"]
    resp = await client.get("/api/v1/search", params={"q": "hell", "cursor": cursor})
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "bad_cursor"
