"""`GET|HEAD /play/{track_id}`: who asks -> track and renditions (cache) -> session (one Redis
round trip) -> quality choice -> a signed redirect, or the bytes proxied from the CDN, with a
preload hint for what plays next."""

from __future__ import annotations

import asyncio
import functools
import time
from collections import OrderedDict
from collections.abc import Awaitable
from datetime import datetime
from email.utils import format_datetime
from typing import Any

import orjson
import structlog
from aiohttp import web
from redis.exceptions import RedisError

from edge import auth, keys, quality
from edge import cache as ck
from edge.catalog import Catalog
from edge.cdn import Cdn, UpstreamError
from edge.errors import ApiError, bad_request, not_found
from edge.origin import OriginResponse, Sink
from edge.ranges import ByteRange, resolve
from edge.sessions import Audio, SessionError, SessionState, device_session_id, valid_session_id
from edge.streaming import Representation, head_response, send

log = structlog.get_logger(__name__)
routes = web.RouteTableDef()

MAX_ID = 2**63 - 1
# Throughput is measured only on transfers big enough to say something about the network.
MIN_MEASURED_BYTES = 64 * 1024


class TrackInfo:
    """A track's cached JSON, parsed once per ETag (the hot path never re-decodes it)."""

    __slots__ = ("_by_rendition", "duration_s", "id", "ladder", "renditions")

    def __init__(self, doc: dict[str, Any]) -> None:
        self.id: int = doc["id"]
        self.duration_s: float = doc["duration_ms"] / 1000
        self.renditions: list[dict[str, Any]] = doc["renditions"]
        self.ladder = tuple(
            quality.Rendition(r["format"], r["bitrate_kbps"]) for r in self.renditions
        )
        self._by_rendition: dict[quality.Rendition, dict[str, Any]] = {}
        for rung, item in zip(self.ladder, self.renditions, strict=True):
            self._by_rendition.setdefault(rung, item)  # (the first of equals, as before)

    def find(self, r: quality.Rendition) -> dict[str, Any]:
        return self._by_rendition[r]


class TrackInfos:
    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._parsed: OrderedDict[str, TrackInfo] = OrderedDict()

    def get(self, entry: ck.Entry) -> TrackInfo:
        info = self._parsed.get(entry.etag)
        if info is None:
            info = TrackInfo(orjson.loads(entry.body))
            self._parsed[entry.etag] = info
            while len(self._parsed) > self.size:
                self._parsed.popitem(last=False)
        return info


TRACK_INFOS = web.AppKey("track_infos", TrackInfos)


def _catalog(app: web.Application) -> Catalog:
    return Catalog.of(app)


async def load_track(app: web.Application, track_id: int) -> TrackInfo | None:
    cache, key = app[keys.CACHE], ck.track_key(track_id)

    def load() -> Awaitable[bytes | None]:
        return _catalog(app).track(track_id)

    entry = cache.peek("track", key, ck.TTL_TRACK, load) or await cache.get(
        "track", key, ck.TTL_TRACK, load, l1=True
    )
    return app[TRACK_INFOS].get(entry) if entry is not None else None


def _int_param(request: web.Request, name: str, lo: int = 1, hi: int = MAX_ID) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    if not raw.isascii() or not raw.isdigit() or not lo <= int(raw) <= hi:
        raise bad_request(f"{name} must be an integer from {lo} to {hi}")
    return int(raw)


def _track_id(request: web.Request) -> int:
    raw = request.match_info["id"]
    if not raw.isascii() or not raw.isdigit() or not 0 < int(raw) <= MAX_ID:
        raise bad_request("track id must be a positive integer")
    return int(raw)


def _is_preload(request: web.Request) -> bool:
    purpose = (request.headers.get("Sec-Purpose") or request.headers.get("Purpose") or "").lower()
    return request.query.get("preload") == "1" or "prefetch" in purpose


def _own_base(request: web.Request) -> str:
    """Edge's own address, for proxying from its local origin."""
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if not sockname:
        return f"{request.scheme}://{request.host}"
    host = sockname[0]
    return f"http://[{host}]:{sockname[1]}" if ":" in host else f"http://{host}:{sockname[1]}"


def device_sid(request: web.Request, user_id: str) -> str:
    """The session of this user on this device (address and User-Agent), for a player that
    sends no `sid`."""
    device = f"{request.remote}\x00{request.headers.get('User-Agent', '')}"
    return device_session_id(request.app[keys.SESSION_SECRET], user_id, device)


@routes.route("GET", "/play/{id}", name="play")
@routes.route("HEAD", "/play/{id}", name="play_head")
async def play(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    app = request.app
    settings = app[keys.SETTINGS]
    metrics = app[keys.METRICS]
    who = auth.principal(request, app[keys.VERIFIER], settings.anonymous_allowed)
    track_id = _track_id(request)
    mode = request.query.get("mode") or settings.play_mode
    if mode not in ("redirect", "proxy"):
        raise bad_request("mode must be redirect or proxy")
    sid = request.query.get("sid") or None
    if sid is not None and not valid_session_id(sid):
        raise bad_request("sid is not a session id", "bad_session")
    if sid is None:
        sid = device_sid(request, who.user_id)
    requested_bitrate = _int_param(request, "bitrate", 1, 100_000)
    track = await load_track(app, track_id)
    if track is None:
        raise not_found("track")
    preload = _is_preload(request)
    now = time.time()

    state = await _open_session(request, who, sid, track, preload, now)
    accepted = quality.parse_formats(request.query.get("format"), request.headers.get("Accept"))
    bandwidth = quality.parse_bandwidth(
        request.query.get("bw"),
        request.headers.get("Downlink"),
        state.throughput_kbps if state else None,
        state.throughput_at if state else None,
        now,
    )
    step = quality.buffer_step(state.buffer_events, state.last_buffer_at, now) if state else 0
    pinned = _pinned(request, state, track, who, requested_bitrate)
    try:
        choice = pinned or quality.choose(
            who.tier, track.ladder, accepted, bandwidth, step, requested_bitrate
        )
    except quality.NoPlayableRendition:
        raise ApiError(404, "no_rendition", "no rendition of this track is playable") from None
    rendition = track.find(choice.rendition)
    if not preload:
        metrics.quality_chosen.labels(rendition["format"], str(rendition["bitrate_kbps"])).inc()
        if choice.downgraded:
            metrics.downgrades.labels(choice.downgraded).inc()
        if state is not None and (state.format, state.bitrate_kbps, state.choice_track) != (
            rendition["format"],
            rendition["bitrate_kbps"],
            track.id,
        ):
            app[keys.SESSIONS].record_choice_soon(
                state.sid, rendition["format"], rendition["bitrate_kbps"], track.id
            )

    headers = {
        "X-Stream-Format": rendition["format"],
        "X-Stream-Bitrate": str(rendition["bitrate_kbps"]),
        "Cache-Control": "private, no-store",
        "Vary": "Accept, Downlink, Authorization, Cookie",
    }
    if state is not None:
        headers["X-Stream-Session"] = state.sid
    if choice.downgraded:
        headers["X-Stream-Downgraded"] = choice.downgraded
    link = await _preload_hint(request, who, track, mode, accepted, bandwidth, state)
    if link:
        headers["Link"] = link

    cdn = app[keys.CDN]
    if mode == "redirect":
        headers["Location"] = cdn.signed_url(rendition["object_key"])
        return web.Response(status=302, headers=headers)
    return await _proxy(request, track, rendition, headers, state, preload, started)


def _pinned(
    request: web.Request,
    state: SessionState | None,
    track: TrackInfo,
    who: auth.Principal,
    requested_bitrate: int | None,
) -> quality.Choice | None:
    """A range from the middle of a track the session is already playing (a seek, a resumed
    download) must come from the same file: bytes of two renditions never mix in one track."""
    if state is None or state.choice_track != track.id or requested_bitrate is not None:
        return None
    if "format" in request.query or state.format is None or state.bitrate_kbps is None:
        return None
    header = request.headers.get("Range", "").replace(" ", "").lower()
    if not header or header.startswith("bytes=0-"):
        return None  # a (re)start from the beginning may choose afresh
    current = quality.Rendition(state.format, state.bitrate_kbps)
    if current not in track.ladder or not quality.tier_allows(who.tier, current):
        return None
    return quality.Choice(current, None, "same rendition as the rest of this track")


async def _open_session(
    request: web.Request,
    who: auth.Principal,
    sid: str | None,
    track: TrackInfo,
    preload: bool,
    now: float,
) -> SessionState | None:
    app = request.app
    metrics = app[keys.METRICS]
    try:
        state = await app[keys.SESSIONS].open(
            sid,
            who.user_id,
            track.id,
            limit=app[keys.SETTINGS].stream_limit(who.tier),
            remaining_seconds=track.duration_s,
            preload=preload,
            now=now,
        )
    except SessionError as exc:
        metrics.stream_rejections.labels(exc.kind).inc()
        if exc.kind == "forbidden":
            raise ApiError(
                403, "session_forbidden", "this session belongs to another user"
            ) from None
        limit = app[keys.SETTINGS].stream_limit(who.tier)
        raise ApiError(
            429,
            "stream_limit",
            f"tier {who.tier} allows {limit} concurrent stream{'s' if limit > 1 else ''}; "
            "stop another one first",
        ) from None
    except (RedisError, OSError, TimeoutError) as exc:
        # Players keep playing through a Redis outage: no session, no limits, counted and logged.
        metrics.stream_rejections.labels("sessions_unavailable").inc()
        log.error("sessions_unavailable", error=f"{type(exc).__name__}: {exc}")
        return None
    if state.created:
        metrics.sessions_started.labels(who.tier).inc()
    return state


async def _next_track_id(
    request: web.Request, track: TrackInfo
) -> tuple[int, dict[str, str]] | None:
    """What plays next: `next=ID`, or the next entry of `playlist=ID&pos=N`, or of `album=ID`."""
    next_id = _int_param(request, "next")
    if next_id is not None:
        return next_id, {}
    playlist = _int_param(request, "playlist")
    if playlist is not None:
        pos = _int_param(request, "pos", 0, 2**31 - 1)
        if pos is None:
            raise bad_request("playlist needs pos (the current entry's position)")
        found = await _catalog(request.app).next_in_playlist(playlist, pos)
        if found is None:
            return None
        return found[1], {"playlist": str(playlist), "pos": str(found[0])}
    album = _int_param(request, "album")
    if album is not None:
        catalog = _catalog(request.app)
        entry = await request.app[keys.CACHE].get(
            "album", ck.album_key(album), ck.TTL_ALBUM, lambda: catalog.album(album)
        )
        if entry is None:
            return None
        ids = [t["id"] for t in orjson.loads(entry.body)["tracks"]]
        if track.id in ids and ids.index(track.id) + 1 < len(ids):
            return ids[ids.index(track.id) + 1], {"album": str(album)}
        return None
    return None


async def _preload_hint(
    request: web.Request,
    who: auth.Principal,
    track: TrackInfo,
    mode: str,
    accepted: tuple[str, ...],
    bandwidth: float | None,
    state: SessionState | None,
) -> str | None:
    found = await _next_track_id(request, track)
    if found is None:
        return None
    next_id, context = found
    upcoming = await load_track(request.app, next_id)
    if upcoming is None:
        return None
    try:
        choice = quality.choose(who.tier, upcoming.ladder, accepted, bandwidth)
    except quality.NoPlayableRendition:
        return None
    if mode == "redirect":
        url = request.app[keys.CDN].signed_url(upcoming.find(choice.rendition)["object_key"])
    else:
        params = {"mode": "proxy", "preload": "1", **context}
        if state is not None:
            params["sid"] = state.sid
        if "token" in request.query:  # a player that authenticates by URL needs it here too
            params["token"] = request.query["token"]
        if "format" in request.query:
            params["format"] = request.query["format"]
        url = str(request.app.router["play"].url_for(id=str(next_id)).with_query(params))
    return f"<{url}>; rel=preload; as=audio"


@functools.lru_cache(maxsize=4096)  # (per rendition; parsing and formatting it per request cost 2%)
def _http_date(iso: str) -> tuple[str, datetime]:
    moment = datetime.fromisoformat(iso)
    return format_datetime(moment.replace(microsecond=0), usegmt=True), moment.replace(
        microsecond=0
    )


async def _proxy(
    request: web.Request,
    track: TrackInfo,
    rendition: dict[str, Any],
    headers: dict[str, str],
    state: SessionState | None,
    preload: bool,
    started: float,
) -> web.StreamResponse:
    app = request.app
    metrics = app[keys.METRICS]
    settings = app[keys.SETTINGS]
    cdn = app[keys.CDN]
    last_modified, modified_at = _http_date(rendition["created_at"])
    rep = Representation(
        size=rendition["bytes"],
        content_type=rendition["content_type"],
        etag=f'"{rendition["etag"]}"',
        last_modified=last_modified,
    )
    decision = resolve(
        request.headers.get("Range"),
        rep.size,
        if_range=request.headers.get("If-Range"),
        etag=rep.etag,
        last_modified=modified_at,
    )
    if request.method == "HEAD" or decision.status == 416:
        response = head_response(decision, rep)
        response.headers.update(headers)
        return response

    base = None if cdn.base else _own_base(request)
    key = rendition["object_key"]
    first_part = decision.ranges[0] if decision.status == 206 else None
    try:
        first: OriginResponse | None = await cdn.fetch(
            key, first_part, base, size=rep.size, etag=rep.etag
        )
    except UpstreamError as exc:
        log.error("upstream_failed", kind=exc.kind, message=exc.message, key=key)
        raise ApiError(exc.status, f"upstream_{exc.kind}", exc.message) from None
    metrics.time_to_first_byte.observe(time.perf_counter() - started)

    def source(part: ByteRange | None) -> OriginResponse | _LaterPart:
        # The first part was fetched above (its failure is still a clean 502/504); the parts of
        # a multipart answer after it are fetched as their turn comes.
        nonlocal first
        if first is not None:
            response, first = first, None
            return response
        return _LaterPart(cdn, key, part, base, rep)

    transfer_started = time.perf_counter()
    try:
        sent = await send(
            request, decision, rep, source, headers, kernel_unsent=settings.stream_kernel_unsent
        )
    except asyncio.CancelledError:
        # The client went away and aiohttp cancelled the handler (the pipe closed its origin
        # response): count it like any disconnect.
        metrics.client_disconnects.labels("play").inc()
        log.debug("client_gone", route="play")
        raise
    finally:
        if first is not None:  # never piped: the response failed before its body
            first.close()
    elapsed = time.perf_counter() - transfer_started
    metrics.bytes_streamed.labels("proxy", rendition["format"]).inc(sent.bytes)
    if sent.outcome == "client_gone":
        metrics.client_disconnects.labels("play").inc()
        log.debug("client_gone", route="play", sent=sent.bytes)
    elif sent.outcome == "source_failed":
        metrics.upstream_errors.labels("cdn", "mid_body").inc()
        log.error("upstream_died_mid_body", key=key, sent=sent.bytes, reason=sent.reason)
    if state is not None and not preload:
        kbps = sent.bytes * 8 / 1000 / elapsed if sent.bytes >= MIN_MEASURED_BYTES else None
        audio = None
        # Playback is contiguous audio from byte 0: one response, or consecutive ranges (not
        # the parts of a multipart read).
        if not decision.is_multipart and state.counted_track != track.id:
            audio = Audio(
                f"{track.id}:{rendition['format']}:{rendition['bitrate_kbps']}",
                0 if decision.status == 200 else decision.ranges[0].start,
                track.id,
                min(
                    rep.size,
                    int(rendition["bitrate_kbps"] * 1000 / 8 * settings.play_threshold_seconds),
                ),
                play_row(state.user_id, state.sid, track.id, rendition, time.time()),
                metrics.plays_counted.labels("bytes").inc,
            )
        app[keys.SESSIONS].record_transfer_soon(state.sid, sent.bytes, kbps, audio=audio)
    return sent.response


class _LaterPart:
    """A later part of a multipart answer: fetched from the origin when it is piped."""

    def __init__(
        self, cdn: Cdn, key: str, part: ByteRange | None, base: str | None, rep: Representation
    ) -> None:
        self.cdn, self.key, self.part, self.base, self.rep = cdn, key, part, base, rep

    async def pipe(self, sink: Sink, expected: int) -> int:
        response = await self.cdn.fetch(
            self.key, self.part, self.base, size=self.rep.size, etag=self.rep.etag
        )
        return await response.pipe(sink, expected)

    def close(self) -> None:
        pass  # nothing fetched yet


def play_row(
    user_id: str, sid: str, track_id: int, rendition: dict[str, Any], at: float
) -> dict[str, Any]:
    """A counted play as the flush job writes it to `plays`."""
    return {
        "track_id": track_id,
        "user_id": user_id,
        "session_id": sid,
        "format": rendition.get("format"),
        "bitrate_kbps": rendition.get("bitrate_kbps"),
        "at": at,
    }
