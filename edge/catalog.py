"""Catalog queries: SQL as named constants next to the typed functions that run them.

PostgreSQL builds each item's JSON, so a page is assembled by joining bytes, never decoded and
re-encoded in Python. Lists use keyset pagination (no OFFSET): every ORDER BY ends with the id
so the order is total, and the opaque cursor carries the sort key of the last item returned.
asyncpg prepares each statement once per connection and reuses it.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson
from aiohttp import web

from edge import keys
from edge.metrics import Metrics

MAX_BIGINT = 2**63 - 1

# The JSON of a track in lists; `t`, `ar`, `al` are tracks, artists, albums.
TRACK_FIELDS = """
    'id', t.id, 'title', t.title,
    'artist', json_build_object('id', ar.id, 'name', ar.name),
    'album', CASE WHEN al.id IS NULL THEN NULL
                  ELSE json_build_object('id', al.id, 'title', al.title) END,
    'genre', t.genre, 'track_number', t.track_number, 'duration_ms', t.duration_ms,
    'play_count', t.play_count, 'created_at', t.created_at
"""
TRACK_JOINS = """
    JOIN artists ar ON ar.id = t.artist_id
    LEFT JOIN albums al ON al.id = t.album_id
"""

POPULAR_SQL = f"""
SELECT p.rank, json_build_object({TRACK_FIELDS})::text AS doc
FROM popular_tracks_mv p
JOIN tracks t ON t.id = p.track_id
{TRACK_JOINS}
WHERE p.rank > $1
ORDER BY p.rank
LIMIT $2
"""

RECENT_SQL = f"""
SELECT t.created_at, t.id, json_build_object({TRACK_FIELDS})::text AS doc
FROM tracks t
{TRACK_JOINS}
WHERE (t.created_at, t.id) < ($1::timestamptz, $2::bigint)
ORDER BY t.created_at DESC, t.id DESC
LIMIT $3
"""

TRACK_SQL = f"""
SELECT json_build_object({TRACK_FIELDS},
    'renditions', coalesce((
        SELECT json_agg(json_build_object(
                   'format', r.format, 'codec', r.codec, 'bitrate_kbps', r.bitrate_kbps,
                   'sample_rate', r.sample_rate, 'channels', r.channels, 'bytes', r.bytes,
                   'content_type', r.content_type, 'object_key', r.object_key, 'etag', r.etag,
                   'created_at', r.created_at)
               ORDER BY r.format, r.bitrate_kbps)
        FROM renditions r WHERE r.track_id = t.id), '[]'::json)
)::text
FROM tracks t
{TRACK_JOINS}
WHERE t.id = $1
"""

ARTIST_SQL = """
SELECT json_build_object(
    'id', a.id, 'name', a.name,
    'track_count', (SELECT count(*) FROM tracks t WHERE t.artist_id = a.id),
    'albums', coalesce((
        SELECT json_agg(json_build_object('id', al.id, 'title', al.title,
                                          'release_year', al.release_year)
               ORDER BY al.release_year DESC NULLS LAST, al.id)
        FROM albums al WHERE al.artist_id = a.id), '[]'::json)
)::text
FROM artists a
WHERE a.id = $1
"""

ARTIST_EXISTS_SQL = "SELECT EXISTS (SELECT 1 FROM artists WHERE id = $1)"

ARTIST_TRACKS_SQL = f"""
SELECT t.play_count, t.id, json_build_object({TRACK_FIELDS})::text AS doc
FROM tracks t
{TRACK_JOINS}
WHERE t.artist_id = $1 AND (t.play_count, t.id) < ($2::bigint, $3::bigint)
ORDER BY t.play_count DESC, t.id DESC
LIMIT $4
"""

ALBUM_SQL = f"""
SELECT json_build_object(
    'id', al.id, 'title', al.title, 'release_year', al.release_year,
    'artist', json_build_object('id', ar.id, 'name', ar.name),
    'tracks', coalesce((
        SELECT json_agg(json_build_object({TRACK_FIELDS})
                        ORDER BY t.track_number NULLS LAST, t.id)
        FROM tracks t WHERE t.album_id = al.id), '[]'::json)
)::text
FROM albums al
JOIN artists ar ON ar.id = al.artist_id
WHERE al.id = $1
"""

GENRE_TRACKS_SQL = f"""
SELECT t.play_count, t.id, json_build_object({TRACK_FIELDS})::text AS doc
FROM tracks t
{TRACK_JOINS}
WHERE t.genre = $1 AND (t.play_count, t.id) < ($2::bigint, $3::bigint)
ORDER BY t.play_count DESC, t.id DESC
LIMIT $4
"""

GENRE_EXISTS_SQL = "SELECT EXISTS (SELECT 1 FROM tracks WHERE genre = $1)"

PLAYLIST_SQL = """
SELECT json_build_object(
    'id', p.id, 'name', p.name, 'description', p.description, 'owner_id', p.owner_id,
    'track_count', (SELECT count(*) FROM playlist_entries e WHERE e.playlist_id = p.id),
    'created_at', p.created_at, 'updated_at', p.updated_at
)::text
FROM playlists p
WHERE p.id = $1
"""

PLAYLIST_ENTRIES_SQL = f"""
SELECT e.position, json_build_object(
    'position', e.position, 'added_at', e.added_at,
    'track', json_build_object({TRACK_FIELDS})
)::text AS doc
FROM playlist_entries e
JOIN tracks t ON t.id = e.track_id
{TRACK_JOINS}
WHERE e.playlist_id = $1 AND e.position > $2
ORDER BY e.position
LIMIT $3
"""

# The three orders of a search (see 007_search_page.sql); a first page picks one from the
# estimated number of matches, and the cursor keeps every later page in it.
# - below TIER_MATCHES, ranked by ts_rank (title > artist > album, occurrences, word distance),
#   which scores every match: ~3 us a match, so ~10 ms at this bound;
# - from TIER_MATCHES, by tier (the title matches, then title and artist, then the album), each
#   tier by popularity: one page of an index walk, whatever the number of matches;
# - from BROAD_MATCHES (EDGE_SEARCH_BROAD_MATCHES), by popularity alone.
TIER_MATCHES = 3_000
BROAD_MATCHES = 20_000
# How far down the popularity order a walk goes before it gives up. A first page examines this
# many tracks to check its estimate (an AND of words is estimated at its rarest word's count,
# which may be far too high: if they hold less than a page of matches, the few matches are ranked)
# and, for tiers, to see which tiers are dense enough to walk; a sparse tier is read from its
# field's index instead. ~0.25 us a track, so ~5 ms; a query with less than a page of matches in
# them has about 1,000 matches or fewer.
WALK_ENTRIES = 20_000

# One page of search results in one statement: edge_search_page makes the plan (tsquery,
# estimated matches) and returns the page's keys in order; the JSON is built only for the page.
# $2 is the order a cursor came from ('ranked', 'tiers', 'popular'), NULL on a first page.
SEARCH_SQL = f"""
SELECT p.list_kind, p.rank, p.play_count, p.id, json_build_object({TRACK_FIELDS})::text AS doc
FROM edge_search_page($1, $2, $3, $4, $5, $6, $7, $8, $9) WITH ORDINALITY
    AS p(list_kind, rank, play_count, id, position)
JOIN tracks t ON t.id = p.id
{TRACK_JOINS}
ORDER BY p.position
"""

# Word counts for the broad-query estimate, recounted after bulk loads and on refresh.
RECOUNT_SEARCH_WORDS_SQL = """
INSERT INTO search_words AS w (word, ndoc)
SELECT word, ndoc FROM ts_stat('SELECT search_tsv FROM tracks')
ON CONFLICT (word) DO UPDATE SET ndoc = EXCLUDED.ndoc WHERE w.ndoc <> EXCLUDED.ndoc
"""

NEXT_IN_PLAYLIST_SQL = """
SELECT position, track_id FROM playlist_entries
WHERE playlist_id = $1 AND position > $2
ORDER BY position
LIMIT 1
"""

# From the user's recent plays: tracks of their favourite artists (weighted double) and genres,
# not heard yet, popularity as tie-break. Each candidate list is an index range scan.
RECOMMENDATIONS_SQL = f"""
WITH mine AS (
    SELECT track_id FROM plays WHERE user_id = $1 ORDER BY played_at DESC LIMIT 500
), fav_artists AS (
    SELECT t.artist_id, count(*) AS w FROM mine JOIN tracks t ON t.id = mine.track_id
    GROUP BY t.artist_id ORDER BY w DESC, t.artist_id LIMIT 5
), fav_genres AS (
    SELECT t.genre, count(*) AS w FROM mine JOIN tracks t ON t.id = mine.track_id
    GROUP BY t.genre ORDER BY w DESC, t.genre LIMIT 3
), candidates AS (
    SELECT c.id, c.play_count, 2 * a.w AS score
    FROM fav_artists a
    CROSS JOIN LATERAL (SELECT id, play_count FROM tracks WHERE artist_id = a.artist_id
                        ORDER BY play_count DESC, id DESC LIMIT 50) c
    UNION ALL
    SELECT c.id, c.play_count, g.w AS score
    FROM fav_genres g
    CROSS JOIN LATERAL (SELECT id, play_count FROM tracks WHERE genre = g.genre
                        ORDER BY play_count DESC, id DESC LIMIT 100) c
), ranked AS (
    SELECT id, sum(score) AS score, max(play_count) AS play_count
    FROM candidates c
    WHERE NOT EXISTS (SELECT 1 FROM plays p WHERE p.user_id = $1 AND p.track_id = c.id)
    GROUP BY id
    ORDER BY score DESC, play_count DESC, id DESC
    LIMIT $2
)
SELECT json_build_object({TRACK_FIELDS})::text AS doc
FROM ranked
JOIN tracks t ON t.id = ranked.id
{TRACK_JOINS}
ORDER BY ranked.score DESC, ranked.play_count DESC, ranked.id DESC
"""

# Cold start, or nothing left to suggest: the popular list, less what the user has heard.
POPULAR_UNHEARD_SQL = f"""
SELECT json_build_object({TRACK_FIELDS})::text AS doc
FROM popular_tracks_mv p
JOIN tracks t ON t.id = p.track_id
{TRACK_JOINS}
WHERE NOT EXISTS (SELECT 1 FROM plays x WHERE x.user_id = $1 AND x.track_id = p.track_id)
ORDER BY p.rank
LIMIT $2
"""

REFRESH_POPULAR_SQL = "REFRESH MATERIALIZED VIEW CONCURRENTLY popular_tracks_mv"


# A connection that died under a statement: the statement may be run again on another one.
# asyncpg reports a backend terminated between statements in several ways, among them an
# InternalClientError ("cannot switch to state ...") when the FATAL arrives mid-prepare.
_CONNECTION_LOST = (
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    ConnectionError,
)
# The database cannot be reached or would not serve us in time: no retry.
_UNREACHABLE = (
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    OSError,
    TimeoutError,
)


class DatabaseUnavailable(Exception):
    """PostgreSQL is unreachable, refusing connections, or no pooled connection came in time."""


class CursorError(ValueError):
    """A cursor that this endpoint did not issue (or that was tampered with)."""


def encode_cursor(kind: str, *values: Any) -> str:
    raw = orjson.dumps([kind, *[v.isoformat() if isinstance(v, datetime) else v for v in values]])
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def cursor_kind(cursor: str) -> str | None:
    """Which list a cursor belongs to (None if it is not one of ours)."""
    try:
        data = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, orjson.JSONDecodeError):
        raise CursorError("cursor is not valid") from None
    if not isinstance(data, list) or not data or not isinstance(data[0], str):
        raise CursorError("cursor is not valid")
    return data[0]


def decode_cursor(cursor: str, kind: str, types: tuple[type, ...]) -> tuple[Any, ...]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = orjson.loads(raw)
    except (ValueError, orjson.JSONDecodeError):
        raise CursorError("cursor is not valid") from None
    if not isinstance(data, list) or len(data) != len(types) + 1 or data[0] != kind:
        raise CursorError("cursor does not belong to this list")
    values: list[Any] = []
    for value, wanted in zip(data[1:], types, strict=True):
        try:
            if wanted is datetime:
                values.append(datetime.fromisoformat(value))
            elif wanted is float and isinstance(value, int | float) and not isinstance(value, bool):
                values.append(float(value))
            elif wanted is int and isinstance(value, int) and not isinstance(value, bool):
                values.append(value)
            else:
                raise TypeError
        except (TypeError, ValueError):
            raise CursorError("cursor is not valid") from None
    return tuple(values)


def compact(doc: str) -> bytes:
    """PostgreSQL's json text (`{"id" : 1, ...}`) without its spaces: a document is made once
    per cache fill and sent with every hit, where its bytes cost (a track's is an eighth
    smaller). Keys keep their order."""
    return orjson.dumps(orjson.loads(doc))


@dataclass(frozen=True, slots=True)
class Page:
    docs: list[bytes]
    next_cursor: str | None

    def body(self) -> bytes:
        return (
            b'{"items":['
            + b",".join(self.docs)
            + b'],"next_cursor":'
            + orjson.dumps(self.next_cursor)
            + b"}"
        )


class Catalog:
    """Typed query functions over a pool. A connection is held only for one statement."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        metrics: Metrics,
        acquire_timeout: float = 30.0,
        slow_query_seconds: float = 0.1,
        broad_matches: int = BROAD_MATCHES,
        tier_matches: int = TIER_MATCHES,
        walk_entries: int = WALK_ENTRIES,
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.acquire_timeout = acquire_timeout
        self.slow_query_seconds = slow_query_seconds
        self.broad_matches = broad_matches
        self.tier_matches = tier_matches
        self.walk_entries = walk_entries

    @classmethod
    def of(cls, app: web.Application) -> Catalog:
        settings = app[keys.SETTINGS]
        return cls(
            app[keys.PG_POOL],
            app[keys.METRICS],
            settings.db_pool_acquire_timeout,
            settings.slow_query_ms / 1000,
            settings.search_broad_matches,
        )

    async def _run(self, name: str, method: str, sql: str, args: tuple[Any, ...]) -> Any:
        # Every catalog statement is a read, so one that died with its connection (server
        # restarted, backend terminated, a pooled connection found dead) is run once more on
        # another connection before the caller hears the database is unavailable.
        for attempt in (1, 2):
            try:
                return await self._run_once(name, method, sql, args)
            except _CONNECTION_LOST as exc:
                if attempt == 2:
                    raise DatabaseUnavailable(f"{type(exc).__name__}: {exc}") from exc
                self.metrics.db_retries.labels(name).inc()
            except _UNREACHABLE as exc:
                raise DatabaseUnavailable(f"{type(exc).__name__}: {exc}") from exc
        raise AssertionError("unreachable")

    async def _run_once(self, name: str, method: str, sql: str, args: tuple[Any, ...]) -> Any:
        m = self.metrics
        waiting_since = time.perf_counter()
        m.db_pool_waiters.inc()
        waiting = True
        try:
            async with self.pool.acquire(timeout=self.acquire_timeout) as conn:
                m.db_pool_waiters.dec()
                waiting = False
                started = time.perf_counter()
                m.db_acquire_duration.observe(started - waiting_since)
                try:
                    return await getattr(conn, method)(sql, *args)
                finally:
                    elapsed = time.perf_counter() - started
                    m.db_query_duration.labels(name).observe(elapsed)
                    if elapsed >= self.slow_query_seconds:
                        m.db_slow_queries.labels(name).inc()
        finally:
            if waiting:
                m.db_pool_waiters.dec()

    async def _fetch(self, name: str, sql: str, *args: Any) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await self._run(name, "fetch", sql, args)
        return rows

    async def _fetchval(self, name: str, sql: str, *args: Any) -> Any:
        return await self._run(name, "fetchval", sql, args)

    async def _doc(self, name: str, sql: str, *args: Any) -> bytes | None:
        doc = await self._fetchval(name, sql, *args)
        return compact(doc) if doc is not None else None

    def _page(self, kind: str, rows: list[asyncpg.Record], limit: int, nkeys: int) -> Page:
        docs = [compact(r["doc"]) for r in rows[:limit]]
        cursor = None
        if len(rows) > limit:
            last = rows[limit - 1]
            cursor = encode_cursor(kind, *(last[i] for i in range(nkeys)))
        return Page(docs, cursor)

    async def popular(self, limit: int, cursor: str | None) -> Page:
        (after,) = decode_cursor(cursor, "popular", (int,)) if cursor else (0,)
        rows = await self._fetch("popular", POPULAR_SQL, after, limit + 1)
        return self._page("popular", rows, limit, 1)

    async def recent(self, limit: int, cursor: str | None) -> Page:
        if cursor:
            created, last_id = decode_cursor(cursor, "recent", (datetime, int))
        else:
            created, last_id = datetime.max, MAX_BIGINT
        rows = await self._fetch("recent", RECENT_SQL, created, last_id, limit + 1)
        return self._page("recent", rows, limit, 2)

    async def track(self, track_id: int) -> bytes | None:
        return await self._doc("track", TRACK_SQL, track_id)

    async def artist(self, artist_id: int) -> bytes | None:
        return await self._doc("artist", ARTIST_SQL, artist_id)

    async def artist_tracks(self, artist_id: int, limit: int, cursor: str | None) -> Page | None:
        plays, last_id = (
            decode_cursor(cursor, "artist", (int, int)) if cursor else (MAX_BIGINT, MAX_BIGINT)
        )
        rows = await self._fetch(
            "artist_tracks", ARTIST_TRACKS_SQL, artist_id, plays, last_id, limit + 1
        )
        if (
            not rows
            and not cursor
            and not await self._fetchval("artist_exists", ARTIST_EXISTS_SQL, artist_id)
        ):
            return None
        return self._page("artist", rows, limit, 2)

    async def album(self, album_id: int) -> bytes | None:
        return await self._doc("album", ALBUM_SQL, album_id)

    async def genre_tracks(self, genre: str, limit: int, cursor: str | None) -> Page | None:
        plays, last_id = (
            decode_cursor(cursor, "genre", (int, int)) if cursor else (MAX_BIGINT, MAX_BIGINT)
        )
        rows = await self._fetch("genre_tracks", GENRE_TRACKS_SQL, genre, plays, last_id, limit + 1)
        if (
            not rows
            and not cursor
            and not await self._fetchval("genre_exists", GENRE_EXISTS_SQL, genre)
        ):
            return None
        return self._page("genre", rows, limit, 2)

    async def playlist(self, playlist_id: int, limit: int, cursor: str | None) -> bytes | None:
        (after,) = decode_cursor(cursor, "playlist", (int,)) if cursor else (-1,)
        head = await self._doc("playlist", PLAYLIST_SQL, playlist_id)
        if head is None:
            return None
        rows = await self._fetch(
            "playlist_entries", PLAYLIST_ENTRIES_SQL, playlist_id, after, limit + 1
        )
        page = self._page("playlist", rows, limit, 1)
        # The playlist object carries its entries as a page: {..., "items": [...], "next_cursor"}.
        return head[:-1] + b"," + page.body()[1:]

    async def next_in_playlist(self, playlist_id: int, position: int) -> tuple[int, int] | None:
        rows = await self._fetch("next_in_playlist", NEXT_IN_PLAYLIST_SQL, playlist_id, position)
        return (rows[0]["position"], rows[0]["track_id"]) if rows else None

    async def recommendations(self, user_id: str, limit: int) -> Page:
        rows = await self._fetch("recommendations", RECOMMENDATIONS_SQL, user_id, limit)
        if len(rows) < limit:
            seen = {r["doc"] for r in rows}
            more = await self._fetch("popular_unheard", POPULAR_UNHEARD_SQL, user_id, limit)
            rows += [r for r in more if r["doc"] not in seen][: limit - len(rows)]
        return Page([compact(r["doc"]) for r in rows], None)

    async def search(self, query: str, limit: int, cursor: str | None) -> Page:
        """Ranked, by tier or by popularity, as the first page found best for the number of
        matches (see SEARCH_SQL). The cursor says which, so every page of one list follows the
        order of its first page."""
        after: tuple[Any, ...]
        kind = cursor_kind(cursor) if cursor else None
        if cursor is None:
            after = (None, float("inf"), MAX_BIGINT, MAX_BIGINT)
        elif kind == "search-popular":
            after = ("popular", None, *decode_cursor(cursor, kind, (int, int)))
        elif kind == "search-tier":
            after = ("tiers", *decode_cursor(cursor, kind, (int, int, int)))
        else:
            after = ("ranked", *decode_cursor(cursor, "search", (float, int, int)))
        rows = await self._fetch(
            "search",
            SEARCH_SQL,
            query,
            *after,
            limit + 1,
            self.tier_matches,
            self.broad_matches,
            self.walk_entries,
        )
        next_cursor = None
        if len(rows) > limit:
            last = rows[limit - 1]
            plays, last_id = last["play_count"], last["id"]
            if last["list_kind"] == "popular":
                next_cursor = encode_cursor("search-popular", plays, last_id)
            elif last["list_kind"] == "tiers":
                next_cursor = encode_cursor("search-tier", int(last["rank"]), plays, last_id)
            else:
                next_cursor = encode_cursor("search", last["rank"], plays, last_id)
        return Page([compact(r["doc"]) for r in rows[:limit]], next_cursor)
