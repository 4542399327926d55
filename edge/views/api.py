"""JSON catalog API under /api/v1: parse, ask the cache (which asks the catalog), respond.

Bodies come from the cache as bytes with their ETag; If-None-Match is answered with 304.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson
from aiohttp import hdrs, web

from edge import auth, keys
from edge import cache as ck
from edge.cache import Entry
from edge.catalog import Catalog, CursorError, Page
from edge.errors import ApiError, bad_request, not_found

MAX_ID = 2**63 - 1
MAX_QUERY_CHARS = 200
JSON = "application/json"

routes = web.RouteTableDef()


def _catalog(request: web.Request) -> Catalog:
    return Catalog.of(request.app)


def _id(request: web.Request, name: str = "id") -> int:
    raw = request.match_info[name]
    value = int(raw) if raw.isascii() and raw.isdigit() else 0
    if not 0 < value <= MAX_ID:
        raise bad_request(f"{name} must be a positive integer")
    return value


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", "20")
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise bad_request("limit must be an integer from 1 to 100")
    return int(raw)


def _cursor(request: web.Request) -> str | None:
    cursor = request.query.get("cursor") or None
    if cursor is not None and len(cursor) > 512:
        raise bad_request("cursor is not valid", "bad_cursor")
    return cursor


def _matches(if_none_match: str | None, etag: str) -> bool:
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    # Weak comparison (RFC 9110 13.1.2): W/ prefixes don't matter for If-None-Match.
    tags = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
    return etag in tags


def respond(
    request: web.Request, entry: Entry | None, what: str, cache_control: str = "public, max-age=30"
) -> web.Response:
    if entry is None:
        raise not_found(what)
    if _matches(request.headers.get(hdrs.IF_NONE_MATCH), entry.etag):
        return web.Response(
            status=304, headers={hdrs.ETAG: entry.etag, hdrs.CACHE_CONTROL: cache_control}
        )
    # The header as text, not content_type=: aiohttp would parse and rebuild it per response.
    # (Names as aiohttp's istr constants: the header map need not fold their case.)
    return web.Response(
        body=entry.body,
        headers={hdrs.ETAG: entry.etag, hdrs.CACHE_CONTROL: cache_control, hdrs.CONTENT_TYPE: JSON},
    )


async def _paged(load: Callable[[], Awaitable[Page | None]]) -> bytes | None:
    try:
        page = await load()
    except CursorError as exc:
        raise bad_request(str(exc), "bad_cursor") from None
    return page.body() if page is not None else None


def _variant(limit: int, cursor: str | None) -> str:
    return f"{limit}:{cursor or ''}"


@routes.get("/api/v1/tracks/popular", name="api_popular")
async def popular(request: web.Request) -> web.Response:
    limit, cursor = _limit(request), _cursor(request)
    cache, key, field = request.app[keys.CACHE], ck.popular_key(limit), cursor or ck.FIRST_PAGE

    def load() -> Awaitable[bytes | None]:
        return _paged(lambda: _catalog(request).popular(limit, cursor))

    entry = cache.peek("popular", key, ck.TTL_POPULAR, load, field=field) or await cache.get(
        "popular", key, ck.TTL_POPULAR, load, field=field, l1=True
    )
    return respond(request, entry, "page")


@routes.get("/api/v1/tracks/recent", name="api_recent")
async def recent(request: web.Request) -> web.Response:
    limit, cursor = _limit(request), _cursor(request)
    body = await _paged(lambda: _catalog(request).recent(limit, cursor))
    return respond(request, _uncached(body), "page")


@routes.get("/api/v1/tracks/{id}", name="api_track")
async def track(request: web.Request) -> web.Response:
    track_id = _id(request)
    cache, key = request.app[keys.CACHE], ck.track_key(track_id)

    def load() -> Awaitable[bytes | None]:
        # (The Catalog is made only on a miss: a hit never touches the database.)
        return _catalog(request).track(track_id)

    entry = cache.peek("track", key, ck.TTL_TRACK, load) or await cache.get(
        "track", key, ck.TTL_TRACK, load, l1=True
    )
    return respond(request, entry, "track")


@routes.get("/api/v1/search", name="api_search")
async def search(request: web.Request) -> web.Response:
    query = " ".join(request.query.get("q", "").split())
    if not any(c.isalnum() for c in query):
        raise bad_request("q must contain at least one letter or digit")
    if len(query) > MAX_QUERY_CHARS:
        raise bad_request(f"q must be at most {MAX_QUERY_CHARS} characters")
    limit, cursor = _limit(request), _cursor(request)
    catalog = _catalog(request)
    entry = await request.app[keys.CACHE].get(
        "search",
        ck.search_key(query.casefold()),
        ck.TTL_SEARCH,
        lambda: _paged(lambda: catalog.search(query, limit, cursor)),
        field=_variant(limit, cursor),
    )
    return respond(request, entry, "page")


@routes.get("/api/v1/artists/{id}", name="api_artist")
async def artist(request: web.Request) -> web.Response:
    body = await _catalog(request).artist(_id(request))
    return respond(request, _uncached(body), "artist")


@routes.get("/api/v1/artists/{id}/tracks", name="api_artist_tracks")
async def artist_tracks(request: web.Request) -> web.Response:
    artist_id, limit, cursor = _id(request), _limit(request), _cursor(request)
    body = await _paged(lambda: _catalog(request).artist_tracks(artist_id, limit, cursor))
    return respond(request, _uncached(body), "artist")


@routes.get("/api/v1/albums/{id}", name="api_album")
async def album(request: web.Request) -> web.Response:
    album_id = _id(request)
    catalog = _catalog(request)
    entry = await request.app[keys.CACHE].get(
        "album", ck.album_key(album_id), ck.TTL_ALBUM, lambda: catalog.album(album_id)
    )
    return respond(request, entry, "album")


@routes.get("/api/v1/genres/{name}/tracks", name="api_genre_tracks")
async def genre_tracks(request: web.Request) -> web.Response:
    genre = request.match_info["name"]
    if not 0 < len(genre) <= 100:
        raise bad_request("genre name must be 1 to 100 characters")
    limit, cursor = _limit(request), _cursor(request)
    body = await _paged(lambda: _catalog(request).genre_tracks(genre, limit, cursor))
    return respond(request, _uncached(body), "genre")


@routes.get("/api/v1/playlists/{id}", name="api_playlist")
async def playlist(request: web.Request) -> web.Response:
    playlist_id, limit, cursor = _id(request), _limit(request), _cursor(request)
    catalog = _catalog(request)

    async def load() -> bytes | None:
        try:
            return await catalog.playlist(playlist_id, limit, cursor)
        except CursorError as exc:
            raise bad_request(str(exc), "bad_cursor") from None

    entry = await request.app[keys.CACHE].get(
        "playlist",
        ck.playlist_key(playlist_id),
        ck.TTL_PLAYLIST,
        load,
        field=_variant(limit, cursor),
    )
    return respond(request, entry, "playlist")


@routes.get("/api/v1/users/{id}/recommendations", name="api_recommendations")
async def recommendations(request: web.Request) -> web.Response:
    settings = request.app[keys.SETTINGS]
    who = auth.principal(request, request.app[keys.VERIFIER], settings.anonymous_allowed)
    user_id = request.match_info["id"]
    if who.anonymous or who.user_id != user_id:
        raise ApiError(403, "forbidden", "you may read only your own recommendations")
    limit = _limit(request)
    catalog = _catalog(request)
    entry = await request.app[keys.CACHE].get(
        "recommendations",
        ck.recommendations_key(user_id, limit),
        ck.TTL_RECOMMENDATIONS,
        lambda: _paged(lambda: catalog.recommendations(user_id, limit)),
    )
    # One user's answer: never for shared caches.
    return respond(request, entry, "recommendations", "private, max-age=30")


@routes.get("/api/v1/alerts", name="api_alerts")
async def alerts(request: web.Request) -> web.Response:
    body = orjson.dumps({"items": request.app[keys.ALERTS].as_json(), "next_cursor": None})
    return web.Response(body=body, content_type=JSON, headers={"Cache-Control": "no-store"})


def _uncached(body: bytes | None) -> Entry | None:
    return Entry(body, ck.etag_of(body)) if body is not None else None
