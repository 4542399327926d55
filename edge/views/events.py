"""`POST /api/v1/events`: batches of player events (JSON, or text/plain from sendBeacon).

The whole batch is validated before anything is applied: a bad event refuses the batch (4xx)
and changes nothing. Each event is logged as one line with its session's fields bound, counted by
type and format (bounded labels), and fed into the session: buffer events steer the next quality
choice, `playing` counts the play, `paused`/`ended` free the stream slot.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from aiohttp import web

from edge import auth, keys, quality
from edge.errors import ApiError, bad_request
from edge.sessions import SessionWrites, valid_session_id
from edge.views.play import play_row

log = structlog.get_logger("edge.player")
routes = web.RouteTableDef()

MAX_EVENTS = 100
MAX_BODY = 64 * 1024
TYPES = frozenset(
    {
        "playing",
        "paused",
        "ended",
        "waiting",
        "buffer_end",
        "stalled",
        "error",
        "quality_change",
        "seek",
    }
)
BUFFER_TYPES = frozenset({"waiting", "stalled"})
# HTML MediaError codes; anything else is "other" so the label set stays bounded.
ERROR_CODES = {1: "aborted", 2: "network", 3: "decode", 4: "src_not_supported"}
FORMATS = frozenset({"mp3", "aac", "flac"})


@dataclass(frozen=True, slots=True)
class Event:
    sid: str
    type: str
    at: float
    position: float | None
    code: str | None
    format: str | None
    bitrate_kbps: int | None


def _number(value: Any, name: str, index: int, *, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_request(f"events[{index}].{name} must be a number", "bad_event")
    number = float(value)
    if not math.isfinite(number) or number < minimum:
        raise bad_request(
            f"events[{index}].{name} must be a finite number >= {minimum}", "bad_event"
        )
    return number


def parse_event(raw: Any, index: int) -> Event:
    if not isinstance(raw, dict):
        raise bad_request(f"events[{index}] must be an object", "bad_event")
    sid, kind = raw.get("sid"), raw.get("type")
    if not isinstance(sid, str) or not valid_session_id(sid):
        raise bad_request(f"events[{index}].sid is not a session id", "bad_session")
    if not isinstance(kind, str) or kind not in TYPES:
        raise bad_request(
            f"events[{index}].type must be one of {', '.join(sorted(TYPES))}", "bad_event"
        )
    at = _number(raw.get("at", 0), "at", index)
    position = _number(raw["position"], "position", index) if "position" in raw else None
    code = None
    if kind == "error":
        value = raw.get("code")
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise bad_request(f"events[{index}].code is required for an error", "bad_event")
        code = ERROR_CODES.get(value, "other") if isinstance(value, int) else "other"
    fmt, bitrate = raw.get("format"), raw.get("bitrate_kbps")
    if fmt is not None and (not isinstance(fmt, str) or fmt not in FORMATS):
        raise bad_request(f"events[{index}].format must be mp3, aac or flac", "bad_event")
    if bitrate is not None:
        bitrate = int(_number(bitrate, "bitrate_kbps", index, minimum=1))
    if kind == "quality_change" and (fmt is None or bitrate is None):
        raise bad_request(
            f"events[{index}]: quality_change needs format and bitrate_kbps", "bad_event"
        )
    return Event(sid, kind, at, position, code, fmt, bitrate)


async def _body(request: web.Request) -> list[Any]:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise ApiError(413, "body_too_large", f"an events batch is at most {MAX_BODY} bytes")
    raw = bytearray()
    # Read to the end (a beacon may arrive in several segments), never more than the limit.
    while chunk := await request.content.read(MAX_BODY + 1 - len(raw)):
        raw += chunk
        if len(raw) > MAX_BODY:
            raise ApiError(413, "body_too_large", f"an events batch is at most {MAX_BODY} bytes")
    ctype = request.content_type
    if ctype not in ("application/json", "text/plain"):
        raise ApiError(415, "unsupported_media_type", "send application/json or text/plain")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise bad_request("the body is not JSON", "bad_json") from None
    events = data.get("events") if isinstance(data, dict) else data
    if not isinstance(events, list) or not events:
        raise bad_request('send a non-empty list of events, or {"events": [...]}', "bad_event")
    if len(events) > MAX_EVENTS:
        raise bad_request(f"a batch holds at most {MAX_EVENTS} events", "too_many_events")
    return events


@routes.post("/api/v1/events", name="api_events")
async def events(request: web.Request) -> web.Response:
    app = request.app
    settings = app[keys.SETTINGS]
    who = auth.principal(request, app[keys.VERIFIER], settings.anonymous_allowed)
    batch = [parse_event(raw, i) for i, raw in enumerate(await _body(request))]
    sessions = app[keys.SESSIONS]
    found = await sessions.get_many(sorted({e.sid for e in batch}))
    for e in batch:
        state = found.get(e.sid)
        if state is None:
            raise ApiError(404, "unknown_session", f"session {e.sid} does not exist (expired?)")
        if state.get("user") != who.user_id:
            raise ApiError(403, "session_forbidden", "this session is another user's")
    # Everything is valid: apply, in one MULTI/EXEC (all of the batch, or nothing if Redis
    # fails). Events are a use of their sessions: a player that keeps reporting (a long listen
    # in redirect mode asks /play once a track) keeps its session.
    writes = sessions.writes()
    writes.renew(sorted(found))
    now = time.time()
    metrics = app[keys.METRICS]
    plays: list[int] = []  # where in the writes a play is counted
    for e in batch:
        state = found[e.sid]
        fmt = e.format or state.get("format") or "unknown"
        # (Counted and logged whether or not Redis then takes the batch: what players report
        # during an outage is what operators need to see most.)
        metrics.player_events.labels(e.type, fmt if fmt in FORMATS else "unknown").inc()
        log.info(
            "player_event",
            type=e.type,
            sid=e.sid,
            user=who.user_id,
            track=state.get("track"),
            format=fmt,
            bitrate=state.get("bitrate"),
            position=e.position,
            code=e.code,
            client_at=e.at,
        )
        if e.type == "error":
            metrics.player_errors.labels(
                e.code or "other", fmt if fmt in FORMATS else "unknown"
            ).inc()
        _stage(writes, e, state, now, plays)
    results = await writes.execute()
    for index in plays:
        if results[index] == 1:
            metrics.plays_counted.labels("event").inc()
    return web.Response(
        status=202, body=orjson.dumps({"accepted": len(batch)}), content_type="application/json"
    )


def _stage(
    writes: SessionWrites, e: Event, state: dict[str, str], now: float, plays: list[int]
) -> None:
    """The event's writes; `state` (the session as read before the batch) follows them, so a
    later event of the batch sees what an earlier one did."""
    if e.type in BUFFER_TYPES:
        # Only recent buffering steps quality down: what a clean stretch took off the count
        # stays off (quality.buffer_step).
        last = _float(state.get("buf_at"))
        count = min(
            quality.buffer_step(_int(state.get("buf_n")) or 0, last, now) + 1,
            quality.MAX_BUFFER_STEP,
        )
        state["buf_n"], state["buf_at"] = str(count), f"{now:.3f}"
        writes.update(e.sid, {"buf_n": count, "buf_at": f"{now:.3f}"})
    elif e.type == "quality_change" and e.format and e.bitrate_kbps:
        state["format"], state["bitrate"] = e.format, str(e.bitrate_kbps)
        writes.update(e.sid, {"format": e.format, "bitrate": e.bitrate_kbps})
    elif e.type == "playing":
        track = state.get("track")
        if track and state.get("counted") != track:
            rendition = {"format": state.get("format"), "bitrate_kbps": _int(state.get("bitrate"))}
            row = play_row(state["user"], e.sid, int(track), rendition, now)
            plays.append(writes.count_play(e.sid, row))
            state["counted"] = track
    elif e.type in ("paused", "ended"):
        writes.stop(e.sid, state["user"])


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


def _int(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None
