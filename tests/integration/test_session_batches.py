"""/play's session scripts go to Redis batched: the calls of one event-loop iteration share one
pipeline, each caller gets its own answer (real Redis)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
from hiredis import pack_command
from prometheus_client import CollectorRegistry, Counter
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from edge.embedded import free_port
from edge.sessions import (
    MAX_PENDING_CALLS,
    Audio,
    ScriptBatch,
    SessionError,
    Sessions,
    SessionState,
)
from tests.conftest import Servers


@pytest.fixture
async def redis_client(servers: Servers) -> AsyncIterator[aioredis.Redis]:
    """As Edge's own client (edge/resources.py): RESP2, so batches read their replies from
    hiredis directly. (The clients this module makes itself are RESP2 too, but where a test
    says otherwise.)"""
    client = aioredis.Redis.from_url(servers.redis_url, protocol=2)
    yield client
    await client.aclose()


def lost_counter() -> Counter:
    return Counter("lost", "choices lost", registry=CollectorRegistry())


async def test_choices_of_one_iteration_are_recorded_together(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    sessions = Sessions(redis_client, redis_prefix, lost_counter())
    states = [
        await sessions.open(None, f"user{n}", 10 + n, limit=3, remaining_seconds=60)
        for n in range(3)
    ]
    for n, state in enumerate(states):
        sessions.record_choice_soon(state.sid, "aac", 96 + n, 10 + n)
    # Nothing is sent until the loop turns (the response goes out first), then one pipeline.
    assert len(sessions._updates._pending) == 3 and not sessions._updates._sending
    await asyncio.sleep(0)
    assert sessions._updates._pending == [] and len(sessions._updates._sending) == 1
    await sessions.drain()
    for n, state in enumerate(states):
        fields = await redis_client.hgetall(sessions.key(state.sid))
        assert fields[b"format"] == b"aac"
        assert fields[b"bitrate"] == str(96 + n).encode()
        assert fields[b"choice_track"] == str(10 + n).encode()


async def test_a_choice_never_resurrects_an_expired_session(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    sessions = Sessions(redis_client, redis_prefix, lost_counter())
    sessions.record_choice_soon("no-such-session-id-0000", "mp3", 128, 1)
    await sessions.drain()
    assert await redis_client.exists(sessions.key("no-such-session-id-0000")) == 0


async def test_choices_lost_to_a_redis_outage_are_counted() -> None:
    down = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=1)
    lost = lost_counter()
    sessions = Sessions(down, "t:", lost)
    try:
        for n in range(4):
            sessions.record_choice_soon(f"sid-{n}-0000000000000000", "mp3", 128, n)
        await sessions.drain()
    finally:
        await down.aclose()
    assert lost._value.get() == 4


@pytest.mark.parametrize("with_audio", [False, True])
async def test_transfers_lost_to_a_redis_outage_are_counted_apart_from_choices(
    with_audio: bool,
) -> None:
    down = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=1)
    choices, transfers = lost_counter(), lost_counter()
    sessions = Sessions(down, "t:", choices, transfers)
    counted: list[int] = []
    try:
        for n in range(3):
            audio = Audio("1:mp3:320", 0, 1, 1000, {"track_id": 1}, lambda: counted.append(1))
            sessions.record_transfer_soon(
                f"sid-{n}-0000000000000000", 65536, 900.0, audio=audio if with_audio else None
            )
        await sessions.drain()
    finally:
        await down.aclose()
    assert (choices._value.get(), transfers._value.get(), counted) == (0, 3, [])


async def test_transfers_add_up_in_one_batch(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    """Transfers queued in one loop iteration go to Redis together, each added to its session
    (bytes summed, the last throughput kept); a session that is gone is not made again."""
    sessions = Sessions(redis_client, redis_prefix, lost_counter(), lost_counter())
    state = await sessions.open(None, "user", 5, limit=3, remaining_seconds=60)
    batches = sessions._transfers.batches
    sessions.record_transfer_soon(state.sid, 1000, None)
    sessions.record_transfer_soon(state.sid, 70000, 812.34, now=1_700_000_000.0)
    sessions.record_transfer_soon("gone-session-000000000000", 5, None)
    await sessions.drain()
    assert sessions._transfers.batches == batches + 1
    fields = await redis_client.hgetall(sessions.key(state.sid))
    assert (fields[b"bytes"], fields[b"tput"], fields[b"tput_at"]) == (
        b"71000",
        b"812.3",
        b"1700000000.000",
    )
    assert await redis_client.exists(sessions.key("gone-session-000000000000")) == 0


async def test_the_queue_is_bounded() -> None:
    down = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=1)
    lost = lost_counter()
    sessions = Sessions(down, "t:", lost)
    try:
        for n in range(MAX_PENDING_CALLS + 5):
            sessions.record_choice_soon(f"sid-{n}", "mp3", 128, n)
        assert len(sessions._updates._pending) == MAX_PENDING_CALLS
        assert lost._value.get() == 5  # refused at once, not queued
        await sessions.drain()
    finally:
        await down.aclose()
    assert lost._value.get() == MAX_PENDING_CALLS + 5


async def test_choices_survive_a_redis_that_lost_its_scripts(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    sessions = Sessions(redis_client, redis_prefix, lost_counter())
    state = await sessions.open(None, "user", 5, limit=3, remaining_seconds=60)
    await redis_client.script_flush()  # what a restarted Redis knows of our scripts
    sessions.record_choice_soon(state.sid, "flac", 900, 5)
    await sessions.drain()
    fields = await redis_client.hgetall(sessions.key(state.sid))
    assert (fields[b"format"], fields[b"bitrate"]) == (b"flac", b"900")
    assert sessions.choices_lost is not None and sessions.choices_lost._value.get() == 0


async def test_concurrent_opens_share_one_pipeline_and_keep_their_answers(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    sessions = Sessions(redis_client, redis_prefix, lost_counter())
    mine = await sessions.open(None, "alice", 1, limit=3, remaining_seconds=60)
    batches = sessions._opens.batches
    results = await asyncio.gather(
        sessions.open(None, "bob", 2, limit=3, remaining_seconds=60),
        sessions.open(mine.sid, "alice", 3, limit=3, remaining_seconds=60),
        sessions.open(mine.sid, "mallory", 4, limit=3, remaining_seconds=60),
        sessions.open(None, "carol", 5, limit=0, remaining_seconds=60),
        return_exceptions=True,
    )
    assert sessions._opens.batches == batches + 1  # four calls, one pipeline
    bob, alice_again, mallory, carol = results
    assert isinstance(bob, SessionState) and bob.user_id == "bob" and bob.track_id == 2
    assert isinstance(alice_again, SessionState)
    assert (alice_again.sid, alice_again.track_id) == (mine.sid, 3)
    assert isinstance(mallory, SessionError) and mallory.kind == "forbidden"
    assert isinstance(carol, SessionError) and carol.kind == "limit"


async def test_opens_fail_together_when_redis_is_down() -> None:
    down = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=1)
    sessions = Sessions(down, "t:", lost_counter())
    try:
        results = await asyncio.gather(
            *(sessions.open(None, f"u{n}", n, limit=3, remaining_seconds=60) for n in range(3)),
            return_exceptions=True,
        )
    finally:
        await down.aclose()
    assert len(results) == 3
    assert all(isinstance(r, (RedisError, OSError)) for r in results), results


async def test_an_open_whose_player_left_does_not_break_the_batch(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    sessions = Sessions(redis_client, redis_prefix, lost_counter())
    gone = asyncio.ensure_future(sessions.open(None, "gone", 1, limit=3, remaining_seconds=60))
    stays = asyncio.ensure_future(sessions.open(None, "stays", 2, limit=3, remaining_seconds=60))
    await asyncio.sleep(0)  # both calls queued
    gone.cancel()
    state = await stays
    assert state.user_id == "stays"
    await sessions.drain()
    assert gone.cancelled()


async def test_a_batch_cancelled_before_it_ran_leaves_nobody_waiting(
    redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    sessions = Sessions(redis_client, redis_prefix, lost_counter())
    waiter = asyncio.ensure_future(sessions.open(None, "u", 1, limit=3, remaining_seconds=60))
    await asyncio.sleep(0)  # the call is queued
    await asyncio.sleep(0)  # its batch is sent: a task that has not run yet
    (task,) = sessions._opens._sending
    task.cancel()  # what a shutdown does to it
    with pytest.raises(asyncio.CancelledError):
        await waiter


async def test_packed_arguments_reach_redis_as_redis_py_sends_them(
    redis_client: aioredis.Redis,
) -> None:
    """The batch packs its commands (hiredis, not redis-py): text, integers and floats arrive as
    they would through redis-py, a call whose script fails gets its own error, and the
    connection stays in step for the calls after it."""
    echo = "if ARGV[1] == 'fail' then return redis.error_reply('ERR asked to') end return ARGV"
    batch = ScriptBatch(redis_client, echo)
    await redis_client.script_load(echo)
    cases: list[tuple[str | int | float, ...]] = [
        ("Dvořák — 東京", 0, -17, 2**62, 0.1, 1e-7, ""),
        ("fail",),
        ("x" * 70_000, 3),
    ]
    answers = [batch.call([], args) for args in cases]
    results = await asyncio.gather(*(a for a in answers if a is not None), return_exceptions=True)
    direct = await redis_client.evalsha(batch.sha, 0, *cases[0])
    assert results[0] == direct
    assert results[0][:2] == ["Dvořák — 東京".encode(), b"0"]
    assert isinstance(results[1], ResponseError) and "asked to" in str(results[1])
    assert results[2] == [b"x" * 70_000, b"3"]
    assert batch.batches == 1
    # The same pooled connection answers the next batch correctly.
    again = batch.call(["k"], ("after",))
    assert again is not None and await again == [b"after"]


async def test_an_argument_that_cannot_be_packed_fails_its_call_alone(
    redis_client: aioredis.Redis,
) -> None:
    """hiredis packs exactly str, int, float and bytes: anything else (None here) fails that
    call at once with a TypeError, while the calls beside it in the batch are answered."""
    batch = ScriptBatch(redis_client, "return ARGV[1]")
    await redis_client.script_load(batch.script)
    before = batch.call([], ("before",))
    bad = batch.call([], (None,))  # type: ignore[arg-type]
    after = batch.call([], ("after",))
    assert bad is not None and bad.done() and isinstance(bad.exception(), TypeError)
    assert before is not None and await before == b"before"
    assert after is not None and await after == b"after"
    assert batch.batches == 1
    lost: list[tuple[int, str]] = []
    quiet = ScriptBatch(redis_client, batch.script, on_lost=lambda n, e: lost.append((n, e)))
    assert quiet.call([], (None,), want_result=False) is None  # type: ignore[arg-type]
    assert lost == [(1, "TypeError")]


async def test_a_pooled_connection_redis_closed_is_replaced(
    redis_client: aioredis.Redis, servers: Servers
) -> None:
    """Redis may close an idle client (its `timeout`, a restart, CLIENT KILL): the next batch
    goes out on a new connection instead of failing its players."""
    name = f"edge-batch-{uuid.uuid4().hex[:8]}"
    own = aioredis.Redis.from_url(servers.redis_url, client_name=name, protocol=2)
    try:
        batch = ScriptBatch(own, "return ARGV[1]")
        await own.script_load(batch.script)
        first = batch.call([], ("one",))
        assert first is not None and await first == b"one"
        clients = await redis_client.client_list()
        (victim,) = [c for c in clients if c.get("name") == name]
        assert await redis_client.client_kill_filter(_id=victim["id"]) == 1
        second = batch.call([], ("two",))
        assert second is not None and await second == b"two"
        assert batch.batches == 2
    finally:
        await own.aclose()


async def test_a_restarted_redis_closed_the_connection_and_forgot_the_script(
    redis_client: aioredis.Redis, servers: Servers
) -> None:
    """After a Redis restart both happen at once: the pooled connection is gone and so is the
    script. One batch needs a new connection and a reload; its players still get answers."""
    name = f"edge-batch-{uuid.uuid4().hex[:8]}"
    own = aioredis.Redis.from_url(servers.redis_url, client_name=name, protocol=2)
    try:
        batch = ScriptBatch(own, f"return ARGV[1] .. '{name}'")  # a script of this test's own
        await own.script_load(batch.script)
        first = batch.call([], ("one",))
        assert first is not None and await first == f"one{name}".encode()
        (victim,) = [c for c in await redis_client.client_list() if c.get("name") == name]
        assert await redis_client.client_kill_filter(_id=victim["id"]) == 1
        await redis_client.script_flush()
        second = batch.call([], ("two",))
        assert second is not None and await second == f"two{name}".encode()
    finally:
        await own.aclose()


async def test_only_the_calls_redis_refused_for_a_missing_script_go_again(
    redis_client: aioredis.Redis, servers: Servers
) -> None:
    """When the script is loaded in the middle of a batch (by another caller: here a SCRIPT
    LOAD put between the calls), the calls before it were refused (NOSCRIPT) and those after
    it ran: only the refused ones are sent again, or a write that adds (a transfer's bytes)
    would be applied twice."""
    key = f"edge-test:{uuid.uuid4().hex}"
    own = aioredis.Redis.from_url(servers.redis_url, protocol=2)
    try:
        batch = ScriptBatch(own, f"return redis.call('INCR', KEYS[1]) -- {key}")
        await redis_client.script_flush()
        refused = batch.call([key], ())
        batch._pending.append((pack_command(("SCRIPT", "LOAD", batch.script)), None))
        ran = batch.call([key], ())
        assert refused is not None and ran is not None
        assert (await ran, await refused) == (1, 2)
        assert await redis_client.get(key) == b"2"
    finally:
        await redis_client.delete(key)
        await own.aclose()


async def test_a_redis_that_stops_answering_fails_the_batch_and_the_next_one_works(
    redis_client: aioredis.Redis, servers: Servers
) -> None:
    """The batch's replies share one deadline (the socket timeout): when Redis stops answering
    (here paused for real), every caller hears of it, and the connection that still owes replies
    is dropped, so a later batch reads its own answers and not the late ones."""
    own = aioredis.Redis.from_url(servers.redis_url, socket_timeout=0.2, protocol=2)
    try:
        batch = ScriptBatch(own, "return ARGV[1]")
        await own.script_load(batch.script)
        first = batch.call([], ("one",))
        assert first is not None and await first == b"one"
        # (5 s at most, should this test die before it unpauses.)
        await redis_client.execute_command("CLIENT", "PAUSE", 5_000, "WRITE")
        try:
            answers = [batch.call([], (f"paused-{n}",)) for n in range(3)]
            results = await asyncio.gather(*(a for a in answers if a), return_exceptions=True)
        finally:
            await redis_client.execute_command("CLIENT", "UNPAUSE")
        assert len(results) == 3
        assert all(isinstance(r, RedisTimeoutError) for r in results), results
        assert "3 replies" in str(results[0])
        again = batch.call([], ("after",))
        assert again is not None and await again == b"after"
        assert batch.batches == 3
    finally:
        await own.aclose()


# A script whose answers are of every shape a batch may get back: a word, an error reply (for
# this call alone), nil, and a reply far longer than one read from the socket.
_SHAPES = """
if ARGV[1] == 'error' then return redis.error_reply('ERR refused ' .. ARGV[2]) end
if ARGV[1] == 'nil' then return false end
if ARGV[1] == 'long' then return string.rep('x', tonumber(ARGV[2])) end
return ARGV[2]
"""


@pytest.mark.parametrize("parser", ["hiredis", "redis-py", "hiredis-resp3"])
async def test_a_batch_reads_every_reply_of_every_shape_in_order(
    servers: Servers, parser: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replies are read straight from the connection's hiredis reader (redis-py's read_response
    is not used), and with another parser or RESP3 (whose push messages come between replies)
    through redis-py: the same answers either way, including an error reply for its call alone
    and a reply that spans many socket reads."""
    from redis._parsers import _AsyncHiredisParser, _AsyncRESP2Parser
    from redis.asyncio.connection import AbstractConnection

    parser_class = _AsyncRESP2Parser if parser == "redis-py" else _AsyncHiredisParser
    protocol = 3 if parser == "hiredis-resp3" else 2
    own = aioredis.Redis.from_url(servers.redis_url, parser_class=parser_class, protocol=protocol)
    read_response = AbstractConnection.read_response
    reads = 0

    async def counted(self: AbstractConnection, *args: object, **kwargs: object) -> object:
        nonlocal reads
        reads += 1
        return await read_response(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(AbstractConnection, "read_response", counted)
    try:
        batch = ScriptBatch(own, _SHAPES)
        await own.script_load(batch.script)  # (connects: its handshake's replies not counted)
        reads = 0
        long_reply = 3 * 1024 * 1024 + 7  # many reads of the parser's 64 KiB
        calls = [
            ("word", "one"),
            ("error", "two"),
            ("nil", ""),
            ("long", str(long_reply)),
            ("word", "five"),
        ]
        answers = [batch.call([], args) for args in calls]
        results = await asyncio.gather(*(a for a in answers if a), return_exceptions=True)
        word, error, nil, long, last = results
        assert word == b"one" and last == b"five" and nil is None
        assert isinstance(error, ResponseError) and "refused two" in str(error)
        assert isinstance(long, bytes) and len(long) == long_reply and set(long) == {ord("x")}
        assert batch.batches == 1
        assert reads == (0 if parser == "hiredis" else len(calls))
    finally:
        await own.aclose()


class CuttingProxy:
    """A TCP proxy in front of the real Redis that can cut a connection after a number of bytes
    of Redis's answers: a Redis (or a network) that dies in the middle of a reply."""

    def __init__(self, redis_url: str) -> None:
        url = urlsplit(redis_url)
        self.upstream = (url.hostname or "127.0.0.1", url.port or 6379)
        self.cut_after: int | None = None  # armed: bytes of answers to pass, then cut
        self.connections = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        redis_r, redis_w = await asyncio.open_connection(*self.upstream)

        async def requests() -> None:
            while data := await client_r.read(65536):
                redis_w.write(data)
                await redis_w.drain()

        async def answers() -> None:
            while data := await redis_r.read(65536):
                if self.cut_after is not None and len(data) >= self.cut_after:
                    client_w.write(data[: self.cut_after])
                    await client_w.drain()
                    self.cut_after = None  # (once)
                    return
                if self.cut_after is not None:
                    self.cut_after -= len(data)
                client_w.write(data)
                await client_w.drain()

        try:
            _done, pending = await asyncio.wait(
                [asyncio.ensure_future(requests()), asyncio.ensure_future(answers())],
                return_when=asyncio.FIRST_COMPLETED,
            )
            for task in pending:
                task.cancel()
        finally:
            client_w.close()
            redis_w.close()

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()


async def test_a_connection_cut_in_the_middle_of_a_reply_is_replaced_and_the_batch_sent_again(
    servers: Servers,
) -> None:
    """Redis's answer stops half-way (the connection closes): the batch is not answered with
    half a reply; it goes out again once on a new connection, and every caller gets its own
    whole answer."""
    proxy = CuttingProxy(servers.redis_url)
    port = await proxy.start()
    own = aioredis.Redis.from_url(f"redis://127.0.0.1:{port}/0", socket_timeout=5, protocol=2)
    try:
        batch = ScriptBatch(own, _SHAPES)
        await own.script_load(batch.script)
        assert proxy.connections == 1
        proxy.cut_after = 100_000  # inside the first reply, 300,000 bytes long
        answers = [batch.call([], ("long", "300000")), batch.call([], ("word", "after"))]
        long, word = await asyncio.gather(*(a for a in answers if a))
        assert long == b"x" * 300_000 and word == b"after"
        assert proxy.connections == 2 and proxy.cut_after is None  # cut once, then replaced
        assert batch.batches == 1
    finally:
        await own.aclose()
        await proxy.close()
