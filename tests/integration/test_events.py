"""`POST /api/v1/events` against a real Redis and PostgreSQL: the accepted body forms, validation
that refuses a whole batch and changes nothing, metrics with bounded labels, one log line per
event, and what events do to sessions (buffering, quality changes, counting a play)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from edge import keys
from edge.jobs import flush_plays
from edge.sessions import TTL_SESSION, active_key
from tests.conftest import bearer, sample

Client = Any
MakeClient = Any

SID = "aliceSessionAAAAAAAAAA"
OTHER_SID = "bobSessionBBBBBBBBBBBB"
UNKNOWN_SID = "nobodysSessionCCCCCCCC"
URL = "/api/v1/events"


def label_sets(client: Client, metric: str) -> set[tuple[tuple[str, str], ...]]:
    found = set()
    for family in client.app[keys.METRICS].registry.collect():
        for s in family.samples:
            if s.name == metric:
                found.add(tuple(sorted(s.labels.items())))
    return found


def player_events(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        r.msg
        for r in caplog.records
        if isinstance(r.msg, dict) and r.msg.get("event") == "player_event"
    ]


async def post(
    client: Client,
    body: bytes,
    content_type: str = "application/json",
    user: str = "alice",
    tier: str = "premium",
) -> Any:
    resp = await client.post(
        URL, data=body, headers={**bearer(user, tier), "Content-Type": content_type}
    )
    await resp.read()
    return resp


async def post_json(client: Client, doc: Any, user: str = "alice") -> Any:
    return await post(client, json.dumps(doc).encode(), user=user)


async def error_of(resp: Any) -> dict[str, str]:
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert set(body) == {"error"}
    assert body["error"]["message"]
    return dict(body["error"])


def session_key(prefix: str, sid: str) -> str:
    return f"{prefix}streaming:session:{sid}"


async def session_hash(redis: aioredis.Redis, prefix: str, sid: str) -> dict[str, str]:
    raw: dict[Any, Any] = dict(await redis.hgetall(session_key(prefix, sid)))
    return {bytes(k).decode(): bytes(v).decode() for k, v in raw.items()}


async def queued_plays(redis: aioredis.Redis, prefix: str) -> list[dict[str, Any]]:
    return [json.loads(r) for r in await redis.lrange(f"{prefix}plays:queue", 0, -1)]


async def start(client: Client, track: int, sid: str, user: str = "alice", **params: str) -> None:
    """Open a session the way a player does (redirect mode), and let its bookkeeping land."""
    resp = await client.get(
        f"/play/{track}",
        params={"sid": sid, **params},
        headers=bearer(user, "premium"),
        allow_redirects=False,
    )
    assert resp.status == 302
    assert resp.headers["X-Stream-Session"] == sid
    await client.app[keys.BACKGROUND].drain()


@pytest.fixture
async def ready(make_client: MakeClient, playable: dict[str, Any]) -> Client:
    """An app where alice plays hells in SID (mp3 320 chosen) and bob plays shoot in OTHER_SID."""
    client = await make_client()
    await start(client, playable["tracks"]["hells"], SID)
    await start(client, playable["tracks"]["shoot"], OTHER_SID, user="bob")
    return client


# -- accepted forms -----------------------------------------------------------------------------


BATCH = [
    {"sid": SID, "type": "seek", "at": 1_700_000_000.5, "position": 10.0},
    {"sid": SID, "type": "buffer_end", "position": 10.5},
]


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", json.dumps(BATCH)),
        ("application/json", json.dumps({"events": BATCH})),
        ("application/json; charset=utf-8", json.dumps(BATCH)),
        ("text/plain;charset=UTF-8", json.dumps(BATCH)),  # navigator.sendBeacon with a string
        ("text/plain", json.dumps({"events": BATCH})),
    ],
)
async def test_accepted_body_forms(ready: Client, content_type: str, body: str) -> None:
    resp = await post(ready, body.encode(), content_type)
    assert resp.status == 202
    assert await resp.json() == {"accepted": 2}
    assert sample(ready, "edge_player_events_total", type="seek", format="mp3") == 1
    assert sample(ready, "edge_player_events_total", type="buffer_end", format="mp3") == 1


async def test_a_full_batch_of_100_is_accepted(ready: Client) -> None:
    resp = await post_json(ready, [{"sid": SID, "type": "seek", "position": i} for i in range(100)])
    assert resp.status == 202
    assert await resp.json() == {"accepted": 100}


async def test_events_need_a_token(ready: Client) -> None:
    resp = await ready.post(URL, json=BATCH)
    assert resp.status == 401
    assert (await error_of(resp))["code"] == "token_required"


# -- validation: the whole batch or nothing ----------------------------------------------------

# A valid start for every bad batch: were anything applied, the session's buffer count, the play
# queue and the stream slot would show it.
VALID = [
    {"sid": SID, "type": "waiting", "position": 1.0},
    {"sid": SID, "type": "playing", "position": 1.5},
    {"sid": SID, "type": "quality_change", "format": "aac", "bitrate_kbps": 96},
    {"sid": SID, "type": "error", "code": 2},
    {"sid": SID, "type": "paused", "position": 2.0},
]


def batch(*bad: Any) -> bytes:
    return json.dumps([*VALID, *bad]).encode()


BAD: dict[str, tuple[Callable[[], bytes], str, int, str]] = {
    "unknown_type": (lambda: batch({"sid": SID, "type": "dance"}), "json", 400, "bad_event"),
    "missing_type": (lambda: batch({"sid": SID}), "json", 400, "bad_event"),
    "type_not_a_string": (
        lambda: batch({"sid": SID, "type": ["playing"]}),
        "json",
        400,
        "bad_event",
    ),
    "bad_sid_format": (
        lambda: batch({"sid": "nope", "type": "playing"}),
        "json",
        400,
        "bad_session",
    ),
    "sid_with_bad_chars": (
        lambda: batch({"sid": "a" * 20 + "/../", "type": "playing"}),
        "json",
        400,
        "bad_session",
    ),
    "sid_not_a_string": (
        lambda: batch({"sid": 12345678901234567890, "type": "playing"}),
        "json",
        400,
        "bad_session",
    ),
    "missing_sid": (lambda: batch({"type": "playing"}), "json", 400, "bad_session"),
    "unknown_sid": (
        lambda: batch({"sid": UNKNOWN_SID, "type": "playing"}),
        "json",
        404,
        "unknown_session",
    ),
    "another_users_sid": (
        lambda: batch({"sid": OTHER_SID, "type": "paused"}),
        "json",
        403,
        "session_forbidden",
    ),
    "position_not_numeric": (
        lambda: batch({"sid": SID, "type": "seek", "position": "12"}),
        "json",
        400,
        "bad_event",
    ),
    "position_null": (
        lambda: batch({"sid": SID, "type": "seek", "position": None}),
        "json",
        400,
        "bad_event",
    ),
    "position_bool": (
        lambda: batch({"sid": SID, "type": "seek", "position": True}),
        "json",
        400,
        "bad_event",
    ),
    "position_negative": (
        lambda: batch({"sid": SID, "type": "seek", "position": -1}),
        "json",
        400,
        "bad_event",
    ),
    "position_nan": (
        lambda: batch({"sid": SID, "type": "seek", "position": "@"}).replace(b'"@"', b"NaN"),
        "json",
        400,
        "bad_json",
    ),
    "position_infinite": (
        lambda: batch({"sid": SID, "type": "seek", "position": "@"}).replace(b'"@"', b"1e999"),
        "json",
        400,
        "bad_json",
    ),
    "at_negative": (
        lambda: batch({"sid": SID, "type": "seek", "at": -5}),
        "json",
        400,
        "bad_event",
    ),
    "at_not_numeric": (
        lambda: batch({"sid": SID, "type": "seek", "at": "now"}),
        "json",
        400,
        "bad_event",
    ),
    "error_without_code": (lambda: batch({"sid": SID, "type": "error"}), "json", 400, "bad_event"),
    "error_code_null": (
        lambda: batch({"sid": SID, "type": "error", "code": None}),
        "json",
        400,
        "bad_event",
    ),
    "error_code_bool": (
        lambda: batch({"sid": SID, "type": "error", "code": True}),
        "json",
        400,
        "bad_event",
    ),
    "quality_change_without_bitrate": (
        lambda: batch({"sid": SID, "type": "quality_change", "format": "mp3"}),
        "json",
        400,
        "bad_event",
    ),
    "unknown_format": (
        lambda: batch({"sid": SID, "type": "quality_change", "format": "ogg", "bitrate_kbps": 128}),
        "json",
        400,
        "bad_event",
    ),
    "format_not_a_string": (
        lambda: batch({"sid": SID, "type": "seek", "format": ["mp3"]}),
        "json",
        400,
        "bad_event",
    ),
    "bitrate_zero": (
        lambda: batch({"sid": SID, "type": "quality_change", "format": "mp3", "bitrate_kbps": 0}),
        "json",
        400,
        "bad_event",
    ),
    "event_not_an_object": (lambda: batch("playing"), "json", 400, "bad_event"),
    "too_many_events": (
        lambda: json.dumps([*VALID, *[{"sid": SID, "type": "seek"}] * (101 - len(VALID))]).encode(),
        "json",
        400,
        "too_many_events",
    ),
    "too_many_in_events_object": (
        lambda: json.dumps({"events": [{"sid": SID, "type": "seek"}] * 101}).encode(),
        "json",
        400,
        "too_many_events",
    ),
    "body_too_large": (lambda: batch() + b" " * (64 * 1024), "json", 413, "body_too_large"),
    "body_too_large_as_text": (
        lambda: batch() + b" " * (64 * 1024),
        "text/plain",
        413,
        "body_too_large",
    ),
    "wrong_content_type": (
        batch,
        "application/x-www-form-urlencoded",
        415,
        "unsupported_media_type",
    ),
    "octet_stream": (batch, "application/octet-stream", 415, "unsupported_media_type"),
    "invalid_json": (lambda: batch()[:-1], "json", 400, "bad_json"),
    "not_utf8": (lambda: b"[\xff\xfe]", "json", 400, "bad_json"),
    "empty_body": (lambda: b"", "json", 400, "bad_json"),
    "empty_list": (lambda: b"[]", "json", 400, "bad_event"),
    "empty_events_object": (lambda: b'{"events": []}', "json", 400, "bad_event"),
    "object_without_events": (
        lambda: json.dumps({"batch": VALID}).encode(),
        "json",
        400,
        "bad_event",
    ),
    "events_not_a_list": (
        lambda: json.dumps({"events": VALID[0]}).encode(),
        "json",
        400,
        "bad_event",
    ),
    "json_scalar": (lambda: b"42", "json", 400, "bad_event"),
}


@pytest.mark.parametrize("case", sorted(BAD))
async def test_invalid_batches_change_nothing(
    ready: Client,
    redis_client: aioredis.Redis,
    redis_prefix: str,
    caplog: pytest.LogCaptureFixture,
    case: str,
) -> None:
    make_body, ctype, status, code = BAD[case]
    content_type = "application/json" if ctype == "json" else ctype
    active = redis_prefix + active_key("alice")
    before = (
        await session_hash(redis_client, redis_prefix, SID),
        await session_hash(redis_client, redis_prefix, OTHER_SID),
        await queued_plays(redis_client, redis_prefix),
        await redis_client.zrange(active, 0, -1),
    )
    assert "buf_n" not in before[0]
    assert before[3] == [SID.encode()]
    caplog.set_level(logging.INFO)

    resp = await post(ready, make_body(), content_type)
    assert resp.status == status, await resp.text()
    assert (await error_of(resp))["code"] == code

    await ready.app[keys.BACKGROUND].drain()
    after = (
        await session_hash(redis_client, redis_prefix, SID),
        await session_hash(redis_client, redis_prefix, OTHER_SID),
        await queued_plays(redis_client, redis_prefix),
        await redis_client.zrange(active, 0, -1),
    )
    assert after == before
    assert label_sets(ready, "edge_player_events_total") == set()
    assert label_sets(ready, "edge_player_errors_total") == set()
    assert player_events(caplog) == []


async def test_the_same_events_valid_are_applied(
    ready: Client, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    """The control for the test above: its valid part does change the session."""
    resp = await post(ready, batch())
    assert resp.status == 202
    assert await resp.json() == {"accepted": len(VALID)}
    state = await session_hash(redis_client, redis_prefix, SID)
    assert state["buf_n"] == "1"
    assert (state["format"], state["bitrate"]) == ("aac", "96")
    assert len(await queued_plays(redis_client, redis_prefix)) == 1
    assert await redis_client.zrange(redis_prefix + active_key("alice"), 0, -1) == []


async def test_a_batch_arriving_in_pieces_is_read_whole(ready: Client) -> None:
    """A beacon of a few KiB crosses the network in several TCP segments: the handler must read
    the body to its end, not just what had arrived at its first read. A raw socket sends the
    head and the first part, waits until they are flushed, then sends the rest."""
    events = [{"sid": SID, "type": "seek", "position": float(i)} for i in range(40)]
    body = json.dumps({"events": events}).encode()
    assert len(body) > 1500
    token = bearer("alice")["Authorization"]
    for chunked in (False, True):
        reader, writer = await asyncio.open_connection(ready.server.host, ready.server.port)
        framing = (
            b"Transfer-Encoding: chunked\r\n"
            if chunked
            else f"Content-Length: {len(body)}\r\n".encode()
        )
        head = (
            (
                f"POST {URL} HTTP/1.1\r\nHost: edge\r\nAuthorization: {token}\r\n"
                "Content-Type: application/json\r\nConnection: close\r\n"
            ).encode()
            + framing
            + b"\r\n"
        )

        def frame(part: bytes, chunked: bool = chunked) -> bytes:
            return f"{len(part):x}\r\n".encode() + part + b"\r\n" if chunked else part

        writer.write(head + frame(body[:1448]))
        await writer.drain()
        writer.write(frame(body[1448:]) + (b"0\r\n\r\n" if chunked else b""))
        await writer.drain()
        response = await reader.read()
        writer.close()
        status_line, _, rest = response.partition(b"\r\n")
        assert status_line.endswith(b"202 Accepted"), response[:300]
        assert b'{"accepted":40}' in rest


# -- metrics and logs ---------------------------------------------------------------------------


async def test_errors_are_counted_with_bounded_labels(ready: Client) -> None:
    events: list[dict[str, Any]] = [
        {"sid": SID, "type": "error", "code": 1},
        {"sid": SID, "type": "error", "code": 2},
        {"sid": SID, "type": "error", "code": 2},
        {"sid": SID, "type": "error", "code": 3, "format": "aac"},
        {"sid": SID, "type": "error", "code": 4},
        {"sid": SID, "type": "error", "code": 99},
        {"sid": SID, "type": "error", "code": -7},
        {"sid": SID, "type": "error", "code": "MEDIA_ERR_WHATEVER_" + "x" * 200},
        {"sid": SID, "type": "error", "code": "2"},
    ]
    resp = await post_json(ready, events)
    assert resp.status == 202
    assert await resp.json() == {"accepted": len(events)}
    errors = "edge_player_errors_total"
    assert sample(ready, errors, code="aborted", format="mp3") == 1
    assert sample(ready, errors, code="network", format="mp3") == 2
    assert sample(ready, errors, code="decode", format="aac") == 1
    assert sample(ready, errors, code="src_not_supported", format="mp3") == 1
    assert sample(ready, errors, code="other", format="mp3") == 4
    allowed_codes = {"aborted", "network", "decode", "src_not_supported", "other"}
    for labels in label_sets(ready, errors):
        as_dict = dict(labels)
        assert as_dict["code"] in allowed_codes
        assert as_dict["format"] in {"mp3", "aac", "flac", "unknown"}
    assert sample(ready, "edge_player_events_total", type="error", format="mp3") == 8


async def test_buffer_events_are_counted(
    ready: Client, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    events = [
        {"sid": SID, "type": "waiting", "position": 3.0},
        {"sid": SID, "type": "buffer_end", "position": 3.0},
        {"sid": SID, "type": "stalled", "position": 7.0},
        {"sid": OTHER_SID, "type": "waiting"},
    ]
    resp = await post_json(ready, events[:3])
    assert resp.status == 202
    resp = await post_json(ready, events[3:], user="bob")
    assert resp.status == 202
    name = "edge_player_events_total"
    assert sample(ready, name, type="waiting", format="mp3") == 2
    assert sample(ready, name, type="stalled", format="mp3") == 1
    assert sample(ready, name, type="buffer_end", format="mp3") == 1
    assert (await session_hash(redis_client, redis_prefix, SID))["buf_n"] == "2"
    assert (await session_hash(redis_client, redis_prefix, OTHER_SID))["buf_n"] == "1"


async def test_each_event_is_one_log_line_with_session_fields(
    ready: Client, playable: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    events = [
        {"sid": SID, "type": "waiting", "at": 1_700_000_000.25, "position": 3.5},
        {"sid": SID, "type": "error", "code": 3},
        {"sid": SID, "type": "seek", "position": 42},
    ]
    resp = await post_json(ready, events)
    assert resp.status == 202
    lines = player_events(caplog)
    assert [line["type"] for line in lines] == ["waiting", "error", "seek"]
    for line in lines:
        assert line["sid"] == SID
        assert line["user"] == "alice"
        assert line["track"] == str(playable["tracks"]["hells"])
        assert line["format"] == "mp3"
        assert line["bitrate"] == "320"
        assert line["request_id"]
    assert lines[0]["position"] == 3.5
    assert lines[0]["client_at"] == 1_700_000_000.25
    assert lines[1]["code"] == "decode"
    assert lines[2]["position"] == 42


# -- what events do to sessions -----------------------------------------------------------------


async def test_playing_counts_the_play_once(
    ready: Client,
    playable: dict[str, Any],
    db: Any,
    redis_client: aioredis.Redis,
    redis_prefix: str,
) -> None:
    hells = playable["tracks"]["hells"]
    for _ in range(3):
        resp = await post_json(ready, [{"sid": SID, "type": "playing", "position": 0}])
        assert resp.status == 202
    # Twice in one batch is still once.
    resp = await post_json(ready, [{"sid": SID, "type": "playing"}] * 2)
    assert resp.status == 202
    queued = await queued_plays(redis_client, redis_prefix)
    assert [(p["track_id"], p["session_id"], p["user_id"]) for p in queued] == [
        (hells, SID, "alice")
    ]
    assert sample(ready, "edge_plays_counted_total", via="event") == 1

    before = await db.fetchval("SELECT play_count FROM tracks WHERE id = $1", hells)
    assert await flush_plays(ready.app) == 1
    assert await db.fetchval("SELECT play_count FROM tracks WHERE id = $1", hells) == before + 1
    rows = await db.fetch("SELECT track_id, user_id, session_id, format, bitrate_kbps FROM plays")
    assert [tuple(r) for r in rows] == [(hells, "alice", SID, "mp3", 320)]

    # The next track in the same session is another play.
    await start(ready, playable["tracks"]["shoot"], SID, format="aac")
    resp = await post_json(ready, [{"sid": SID, "type": "playing"}])
    assert resp.status == 202
    queued = await queued_plays(redis_client, redis_prefix)
    assert [(p["track_id"], p["format"], p["bitrate_kbps"]) for p in queued] == [
        (playable["tracks"]["shoot"], "aac", 256)
    ]


async def test_quality_change_is_recorded(
    ready: Client, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    resp = await post_json(
        ready, [{"sid": SID, "type": "quality_change", "format": "aac", "bitrate_kbps": 160}]
    )
    assert resp.status == 202
    state = await session_hash(redis_client, redis_prefix, SID)
    assert (state["format"], state["bitrate"]) == ("aac", "160")


async def test_one_bad_session_refuses_a_mixed_batch(
    ready: Client, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    """Bob may post for his session, not for Alice's, even in one batch with his own."""
    before = await session_hash(redis_client, redis_prefix, OTHER_SID)
    resp = await post_json(
        ready,
        [{"sid": OTHER_SID, "type": "waiting"}, {"sid": SID, "type": "paused"}],
        user="bob",
    )
    assert resp.status == 403
    assert await session_hash(redis_client, redis_prefix, OTHER_SID) == before
    assert await redis_client.zrange(redis_prefix + active_key("alice"), 0, -1) == [SID.encode()]


@pytest.mark.parametrize("event", ["seek", "waiting", "quality_change", "paused"])
async def test_events_renew_their_session_and_a_refused_batch_does_not(
    ready: Client, redis_client: aioredis.Redis, redis_prefix: str, event: str
) -> None:
    """A session lives TTL_SESSION from its last use, and a player's events are a use (with or
    without a field to write): a long listen in redirect mode reports events between /plays."""
    mine, bobs = session_key(redis_prefix, SID), session_key(redis_prefix, OTHER_SID)
    await redis_client.expire(mine, 100)
    await redis_client.expire(bobs, 100)
    # Bob's batch that names Alice's session is refused: neither session is renewed.
    resp = await post_json(
        ready, [{"sid": OTHER_SID, "type": "seek"}, {"sid": SID, "type": "seek"}], user="bob"
    )
    assert resp.status == 403
    assert 0 < await redis_client.ttl(mine) <= 100
    assert 0 < await redis_client.ttl(bobs) <= 100
    doc: dict[str, Any] = {"sid": SID, "type": event, "position": 12.0}
    if event == "quality_change":
        doc |= {"format": "aac", "bitrate_kbps": 160}
    assert (await post_json(ready, [doc])).status == 202
    assert await redis_client.ttl(mine) > TTL_SESSION - 60
    assert 0 < await redis_client.ttl(bobs) <= 100


async def test_a_session_write_renews_it(
    ready: Client, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    """What /play records after its answer (a transfer, a choice) is a use too."""
    sessions = ready.app[keys.SESSIONS]
    key = session_key(redis_prefix, SID)
    await redis_client.expire(key, 100)
    sessions.record_transfer_soon(SID, 4096, None)
    await sessions.drain()
    assert await redis_client.ttl(key) > TTL_SESSION - 60
    assert (await session_hash(redis_client, redis_prefix, SID))["bytes"] == "4096"
    # A session that is gone is not made again by a late write.
    await redis_client.delete(key)
    sessions.record_choice_soon(SID, "aac", 96, 1)
    sessions.record_transfer_soon(SID, 1, None)
    await sessions.drain()
    assert not await redis_client.exists(key)


async def test_a_batch_is_applied_in_order_in_one_transaction(
    make_client: MakeClient,
    playable: dict[str, Any],
    redis_client: aioredis.Redis,
    redis_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A whole batch goes to Redis as one MULTI/EXEC (all of it, or nothing if Redis is gone
    before the EXEC; not an event at a time), and each event sees what the ones before it in
    the batch did: the play counted after a quality change is of the new rendition."""
    # (No L1 cache watch: its MULTI/EXEC would be counted too.)
    client = await make_client(cache_l1_ttl=0)
    await start(client, playable["tracks"]["hells"], SID)
    events: list[dict[str, Any]] = [{"sid": SID, "type": "seek", "position": 1.0}] * 30
    events += [
        {"sid": SID, "type": "waiting"},
        {"sid": SID, "type": "stalled"},
        {"sid": SID, "type": "quality_change", "format": "aac", "bitrate_kbps": 160},
        {"sid": SID, "type": "playing"},
        {"sid": SID, "type": "playing"},
        {"sid": SID, "type": "paused"},
    ]
    # The app's own MULTI/EXECs and pipelines, counted as redis-py sends them to the real Redis.
    sent: list[tuple[bool, int]] = []
    real_execute = aioredis.client.Pipeline.execute

    async def execute(self: aioredis.client.Pipeline, *args: Any, **kwargs: Any) -> Any:
        sent.append((self.is_transaction, len(self.command_stack)))
        return await real_execute(self, *args, **kwargs)

    monkeypatch.setattr(aioredis.client.Pipeline, "execute", execute)
    assert (await post_json(client, events)).status == 202
    # One transaction for the 36 events' writes (after the one read of their sessions).
    assert [n for transaction, n in sent if transaction] == [1 + 2 + 1 + 1 + 2]
    monkeypatch.undo()
    state = await session_hash(redis_client, redis_prefix, SID)
    assert (state["buf_n"], state["format"], state["bitrate"]) == ("2", "aac", "160")
    queued = await queued_plays(redis_client, redis_prefix)
    assert [(p["track_id"], p["format"], p["bitrate_kbps"]) for p in queued] == [
        (playable["tracks"]["hells"], "aac", 160)
    ]
    assert sample(client, "edge_plays_counted_total", via="event") == 1
    assert await redis_client.zrange(redis_prefix + active_key("alice"), 0, -1) == []


async def test_a_batch_survives_a_redis_that_lost_its_scripts(
    ready: Client, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    """After a Redis restart the transaction's script calls are refused (the rest of it runs):
    the scripts are loaded and the whole batch, whose writes can all be applied twice, goes
    again. The player gets its 202 and every event is applied once."""
    await redis_client.script_flush()
    events = [
        {"sid": SID, "type": "waiting"},
        {"sid": SID, "type": "quality_change", "format": "aac", "bitrate_kbps": 160},
        {"sid": SID, "type": "playing"},
    ]
    assert (await post_json(ready, events)).status == 202
    state = await session_hash(redis_client, redis_prefix, SID)
    assert (state["buf_n"], state["format"], state["bitrate"]) == ("1", "aac", "160")
    assert len(await queued_plays(redis_client, redis_prefix)) == 1
