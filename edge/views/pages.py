"""The web page: server-rendered catalog pages (aiohttp-jinja2, autoescaped) and the demo tier.

Pages are rendered from the catalog's JSON (the same bytes, and where the API caches them the
same cache entries, as /api/v1), so listing, search and navigation work without JavaScript.
static/player.js adds the player bar; it treats each page's track list as the queue.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp_jinja2
import orjson
from aiohttp import web

from edge import auth, keys
from edge import cache as ck
from edge.catalog import Catalog, CursorError, Page

routes = web.RouteTableDef()

PAGE_SIZE = 20
MAX_ID = 2**63 - 1
MAX_QUERY_CHARS = 200
MAX_CURSOR_CHARS = 512
DEMO_TOKEN_TTL = 24 * 3600


class PageError(Exception):
    """A request the page cannot answer: rendered as an HTML error page."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def duration(ms: int | None) -> str:
    if not ms or ms < 0:
        return "-"
    seconds = round(ms / 1000)
    return f"{seconds // 60}:{seconds % 60:02d}"


def _tracks(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for t in docs:
        t["duration"] = duration(t.get("duration_ms"))
    return docs


def _page_items(body: bytes) -> tuple[list[dict[str, Any]], str | None]:
    data = orjson.loads(body)
    return _tracks(data["items"]), data["next_cursor"]


def _id(request: web.Request) -> int:
    raw = request.match_info["id"]
    if not raw.isascii() or not raw.isdigit() or not 0 < int(raw) <= MAX_ID:
        raise PageError(404, "No such page.")
    return int(raw)


def _cursor(request: web.Request) -> str | None:
    cursor = request.query.get("cursor") or None
    if cursor is not None and len(cursor) > MAX_CURSOR_CHARS:
        raise PageError(400, "That “More” link is not valid.")
    return cursor


async def _paged(load: Callable[[], Awaitable[Page | None]]) -> bytes | None:
    try:
        page = await load()
    except CursorError:
        raise PageError(400, "That “More” link is not valid.") from None
    return page.body() if page is not None else None


def _demo_tier(request: web.Request) -> str | None:
    """The tier of the listener's cookie token (None when the demo selector is off)."""
    if not request.app[keys.SETTINGS].anonymous_allowed:
        return None
    token = request.cookies.get(auth.COOKIE)
    if not token:
        return "free"
    try:
        return request.app[keys.VERIFIER].verify(token).tier
    except auth.TokenError:
        return "free"


def _render(
    request: web.Request, template: str, context: dict[str, Any], status: int = 200
) -> web.Response:
    context = {
        **context,
        "tiers": auth.TIERS,
        "demo_tier": _demo_tier(request),
        "back": request.path_qs,
        "query": context.get("query", ""),
    }
    response = aiohttp_jinja2.render_template(template, request, context, status=status)
    response.headers["Cache-Control"] = "no-store"
    # The browser's estimate of its bandwidth, on the page's later requests (its /play ones
    # too): the quality choice's `Downlink` hint (RFC 8942; Chromium sends it).
    response.headers["Accept-CH"] = "Downlink"
    return response


def page(
    template: str,
) -> Callable[
    [Callable[[web.Request], Awaitable[dict[str, Any]]]],
    Callable[[web.Request], Awaitable[web.Response]],
]:
    """A handler returning a context, rendered into `template`; PageError becomes an HTML page."""

    def wrap(
        handler: Callable[[web.Request], Awaitable[dict[str, Any]]],
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def run(request: web.Request) -> web.Response:
            try:
                context = await handler(request)
            except PageError as exc:
                context = {"status": exc.status, "message": exc.message}
                return _render(request, "error.html", context, exc.status)
            return _render(request, template, context)

        run.__name__ = handler.__name__
        run.__doc__ = handler.__doc__
        return run

    return wrap


async def _popular(request: web.Request, cursor: str | None) -> bytes | None:
    catalog = Catalog.of(request.app)
    entry = await request.app[keys.CACHE].get(
        "popular",
        ck.popular_key(PAGE_SIZE),
        ck.TTL_POPULAR,
        lambda: _paged(lambda: catalog.popular(PAGE_SIZE, cursor)),
        field=cursor or ck.FIRST_PAGE,
        l1=True,
    )
    return entry.body if entry is not None else None


async def _recent(request: web.Request, cursor: str | None) -> bytes | None:
    return await _paged(lambda: Catalog.of(request.app).recent(PAGE_SIZE, cursor))


@routes.get("/", name="page_home")
@page("home.html")
async def home(request: web.Request) -> dict[str, Any]:
    cursor = _cursor(request)
    which = request.query.get("list")
    lists: list[dict[str, Any]] = []
    for name, title, load in (
        ("popular", "Popular tracks", _popular),
        ("recent", "New tracks", _recent),
    ):
        if which in ("popular", "recent") and which != name:
            continue
        body = await load(request, cursor if which == name else None)
        items, next_cursor = _page_items(body) if body is not None else ([], None)
        lists.append({"name": name, "title": title, "tracks": items, "next_cursor": next_cursor})
    return {"lists": lists, "paged": which in ("popular", "recent")}


@routes.get("/search", name="page_search")
@page("search.html")
async def search(request: web.Request) -> dict[str, Any]:
    query = " ".join(request.query.get("q", "").split())
    if not any(c.isalnum() for c in query):
        return {"query": query, "tracks": None, "next_cursor": None}
    if len(query) > MAX_QUERY_CHARS:
        raise PageError(400, f"A search is at most {MAX_QUERY_CHARS} characters.")
    cursor = _cursor(request)
    catalog = Catalog.of(request.app)
    entry = await request.app[keys.CACHE].get(
        "search",
        ck.search_key(query.casefold()),
        ck.TTL_SEARCH,
        lambda: _paged(lambda: catalog.search(query, PAGE_SIZE, cursor)),
        field=f"{PAGE_SIZE}:{cursor or ''}",
    )
    items, next_cursor = _page_items(entry.body) if entry is not None else ([], None)
    return {"query": query, "tracks": items, "next_cursor": next_cursor}


@routes.get("/artists/{id}", name="page_artist")
@page("artist.html")
async def artist(request: web.Request) -> dict[str, Any]:
    artist_id, cursor = _id(request), _cursor(request)
    catalog = Catalog.of(request.app)
    doc, body = await asyncio.gather(
        catalog.artist(artist_id),
        _paged(lambda: catalog.artist_tracks(artist_id, PAGE_SIZE, cursor)),
    )
    if doc is None or body is None:
        raise PageError(404, "No such artist.")
    items, next_cursor = _page_items(body)
    return {"artist": orjson.loads(doc), "tracks": items, "next_cursor": next_cursor}


@routes.get("/albums/{id}", name="page_album")
@page("album.html")
async def album(request: web.Request) -> dict[str, Any]:
    album_id = _id(request)
    catalog = Catalog.of(request.app)
    entry = await request.app[keys.CACHE].get(
        "album", ck.album_key(album_id), ck.TTL_ALBUM, lambda: catalog.album(album_id)
    )
    if entry is None:
        raise PageError(404, "No such album.")
    doc = orjson.loads(entry.body)
    return {"album": doc, "tracks": _tracks(doc["tracks"])}


@routes.get("/genres/{name}", name="page_genre")
@page("genre.html")
async def genre(request: web.Request) -> dict[str, Any]:
    name = request.match_info["name"]
    if not 0 < len(name) <= 100:
        raise PageError(404, "No such genre.")
    cursor = _cursor(request)
    body = await _paged(lambda: Catalog.of(request.app).genre_tracks(name, PAGE_SIZE, cursor))
    if body is None:
        raise PageError(404, "No such genre.")
    items, next_cursor = _page_items(body)
    return {"genre": name, "tracks": items, "next_cursor": next_cursor}


@routes.get("/playlists/{id}", name="page_playlist")
@page("playlist.html")
async def playlist(request: web.Request) -> dict[str, Any]:
    playlist_id, cursor = _id(request), _cursor(request)
    catalog = Catalog.of(request.app)

    async def load() -> bytes | None:
        try:
            return await catalog.playlist(playlist_id, PAGE_SIZE, cursor)
        except CursorError:
            raise PageError(400, "That “More” link is not valid.") from None

    entry = await request.app[keys.CACHE].get(
        "playlist",
        ck.playlist_key(playlist_id),
        ck.TTL_PLAYLIST,
        load,
        field=f"{PAGE_SIZE}:{cursor or ''}",
    )
    if entry is None:
        raise PageError(404, "No such playlist.")
    doc = orjson.loads(entry.body)
    tracks = _tracks([e["track"] for e in doc["items"]])
    return {"playlist": doc, "tracks": tracks, "next_cursor": doc["next_cursor"]}


def _back(raw: str) -> str:
    # Only a path on this site: never an open redirect.
    if raw.startswith("/") and not raw.startswith("//") and "\\" not in raw:
        return raw
    return "/"


@routes.post("/demo/token", name="page_demo_token")
async def demo_token(request: web.Request) -> web.StreamResponse:
    """The zero-config demo: pick a tier and hear the difference. Only where anonymous
    listening is allowed, so it never hands out tokens on a configured deployment."""
    settings = request.app[keys.SETTINGS]
    if not settings.anonymous_allowed or settings.jwt_public_key:
        raise web.HTTPNotFound()
    form = await request.post()
    tier = form.get("tier")
    if tier not in auth.TIERS:
        raise web.HTTPBadRequest(reason="tier must be free, premium or hifi")
    secret = str(settings.jwt_secret) or await asyncio.to_thread(
        auth.local_secret, settings.data_dir, "jwt"
    )
    token = auth.issue(secret, f"demo-{tier}", tier, ttl=DEMO_TOKEN_TTL)
    back = form.get("back")
    location = _back(back if isinstance(back, str) else "/")
    response = web.Response(status=303, headers={"Location": location})
    response.set_cookie(
        auth.COOKIE,
        token,
        max_age=DEMO_TOKEN_TTL,
        path="/",
        httponly=True,
        samesite="Lax",
        secure=request.secure,
    )
    return response
