"""Streaming sessions in Redis, per-user concurrent stream limits, and the play-count queue.

A session (`streaming:session:{id}`, a hash, TTL 3600 s renewed on use) belongs to one user and
records what it plays: track, chosen rendition, bytes served, measured throughput, buffer events,
start and last-seen times, and which track was already counted as a play. It lives only in Redis,
so any Edge process can continue it. Each user's active streams are a sorted set scored by when
they stop counting as active (now + what is left of the track + a grace period).

`/play` costs one Redis round trip on the response path: one script checks ownership and the
stream limit and creates or renews the session, and returns its state for the quality choice.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import math
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson
import structlog
from hiredis import pack_command
from redis._parsers.hiredis import NOT_ENOUGH_DATA, _AsyncHiredisParser
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from edge.cache import TTL_SESSION, session_key

if TYPE_CHECKING:
    from prometheus_client import Counter
    from redis.asyncio import Redis

log = structlog.get_logger(__name__)

ACTIVE_GRACE_SECONDS = 30
MAX_PENDING_CALLS = 10_000  # script calls waiting for their pipeline, at most
REPLIES_PER_TIMEOUT = 64  # a batch's replies may take the socket timeout per this many
PLAYS_QUEUE = "plays:queue"
# Every active stream of the cluster (sid scored by when it stops counting), for the gauge.
ACTIVE_ALL = "streaming:active"


def new_session_id() -> str:
    return secrets.token_urlsafe(16)


def device_session_id(secret: bytes, user_id: str, device: str) -> str:
    """The session of a player that sends no `sid`: one per user and device (client address and
    User-Agent), so its range requests and next tracks continue one session instead of opening
    a new one each (and hitting the concurrent-stream limit). Keyed, so not guessable."""
    if len(user_id) + len(device) <= MAX_REMEMBERED_DEVICE:
        return _remembered_device_session_id(secret, user_id, device)
    return _device_session_id(secret, user_id, device)


def _device_session_id(secret: bytes, user_id: str, device: str) -> str:
    digest = hmac.new(secret, f"{user_id}\x00{device}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode()


# A player asks again and again from one device: one HMAC for it, not one a request. Bounded in
# entries and, with the length limit, in bytes (4096 x 512 characters at most).
MAX_REMEMBERED_DEVICE = 512
_remembered_device_session_id = functools.lru_cache(maxsize=4096)(_device_session_id)


def valid_session_id(sid: str) -> bool:
    if not 16 <= len(sid) <= 64:
        return False
    try:
        base64.urlsafe_b64decode(sid + "=" * (-len(sid) % 4))
    except ValueError:
        return False
    return all(c.isalnum() or c in "-_" for c in sid)


def active_key(user_id: str) -> str:
    return f"streaming:active:{user_id}"


# The fields of a session hash that make its SessionState, in the order the open script
# returns them. (Only these, by position: the whole hash by name made the reply twice as long,
# and reading it cost a redirect about 2% more CPU; bench/PLAY_RESULTS.md, session 10.)
STATE_FIELDS = (
    "user",
    "track",
    "format",
    "bitrate",
    "bytes",
    "tput",
    "tput_at",
    "buf_n",
    "buf_at",
    "started",
    "counted",
    "choice_track",
)

# KEYS: session, user's active set, everybody's active set.
# ARGV: sid, user, track, now, ttl, limit, active_until, preload.
# Returns {'ok' or 'new', the STATE_FIELDS' values (nil where unset)}, or {'forbidden'}, or
# {'limit', active streams}.
_OPEN = """
local owner = redis.call('HGET', KEYS[1], 'user')
if owner and owner ~= ARGV[2] then return {'forbidden'} end
local now = tonumber(ARGV[4])
-- A preload rides on an existing session; one that would open a new session takes a slot.
if ARGV[8] == '0' or not owner then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then
    local n = redis.call('ZCARD', KEYS[2])
    if n >= tonumber(ARGV[6]) then return {'limit', tostring(n)} end
  end
  redis.call('ZADD', KEYS[2], ARGV[7], ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[5])
  redis.call('ZADD', KEYS[3], ARGV[7], ARGV[1])
end
if not owner then
  redis.call('HSET', KEYS[1], 'user', ARGV[2], 'started', ARGV[4], 'bytes', 0)
end
if ARGV[8] == '0' then
  redis.call('HSET', KEYS[1], 'track', ARGV[3], 'seen', ARGV[4])
else
  redis.call('HSET', KEYS[1], 'seen', ARGV[4])
end
redis.call('EXPIRE', KEYS[1], ARGV[5])
local state = redis.call('HMGET', KEYS[1], FIELDS)
table.insert(state, 1, owner and 'ok' or 'new')
return state
""".replace("FIELDS", ", ".join(f"'{f}'" for f in STATE_FIELDS))

# KEYS: session, plays queue. ARGV: bytes sent, throughput and its time ('' if not measured),
# then for contiguous audio of one rendition (else nothing): its tag (track:format:bitrate), the
# range's first and past-the-end byte, the track, the bytes that make a play, the play's row.
# Adds the transfer to the session; where the range starts at or before what the session has
# played of that rendition from byte 0, it extends that reach, and once the reach makes a play
# it queues the play (once per session and track). 0: no session; 1: added; 2: a play counted.
_TRANSFER = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'bytes', ARGV[1])
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'tput', ARGV[2], 'tput_at', ARGV[3]) end
redis.call('EXPIRE', KEYS[1], TTL)
if #ARGV < 9 then return 1 end
local seen = redis.call('HMGET', KEYS[1], 'reach_of', 'reach')
local reach = 0
if seen[1] == ARGV[4] then reach = tonumber(seen[2]) or 0 end
if tonumber(ARGV[5]) > reach then return 1 end
if tonumber(ARGV[6]) > reach then
  reach = tonumber(ARGV[6])
  redis.call('HSET', KEYS[1], 'reach_of', ARGV[4], 'reach', ARGV[6])
end
if reach < tonumber(ARGV[8]) or redis.call('HGET', KEYS[1], 'counted') == ARGV[7] then
  return 1
end
redis.call('HSET', KEYS[1], 'counted', ARGV[7])
redis.call('RPUSH', KEYS[2], ARGV[9])
return 2
""".replace("TTL", str(TTL_SESSION))

# KEYS: session, plays queue. ARGV: track, row. Once per session and track.
_COUNT_PLAY = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HGET', KEYS[1], 'counted') == ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'counted', ARGV[1])
redis.call('RPUSH', KEYS[2], ARGV[2])
return 1
"""

# KEYS: session. ARGV: field to increment (or ''), amount, then field/value pairs to set. A
# write is a use of the session: its lifetime starts again.
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] ~= '' then redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2]) end
if #ARGV > 2 then redis.call('HSET', KEYS[1], unpack(ARGV, 3)) end
redis.call('EXPIRE', KEYS[1], TTL)
return 1
""".replace("TTL", str(TTL_SESSION))

# Take up to ARGV[1] queued plays atomically.
_TAKE_PLAYS = """
local rows = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
redis.call('LTRIM', KEYS[1], #rows, -1)
return rows
"""


class SessionState(NamedTuple):
    """A session as Redis holds it. (A tuple: built on every /play, and cheaper to build than
    a frozen dataclass, which sets each of its fields through object.__setattr__.)"""

    sid: str
    user_id: str
    track_id: int | None
    format: str | None
    bitrate_kbps: int | None
    bytes_served: int
    throughput_kbps: float | None
    throughput_at: float | None
    buffer_events: int
    last_buffer_at: float | None
    started: float
    counted_track: int | None
    created: bool
    choice_track: int | None = None

    @classmethod
    def from_redis(cls, sid: str, values: list[Any], created: bool) -> SessionState:
        """From the values of STATE_FIELDS, in that order (None where a field is unset)."""
        (
            user,
            track,
            fmt,
            bitrate,
            served,
            tput,
            tput_at,
            buf_n,
            buf_at,
            started,
            counted,
            choice_track,
        ) = [w.decode() if type(w) is bytes else w for w in values]
        return cls(
            sid,
            user or "",
            _int(track),
            fmt,
            _int(bitrate),
            _int(served) or 0,
            _float(tput),
            _float(tput_at),
            _int(buf_n) or 0,
            _float(buf_at),
            _float(started) or 0.0,
            _int(counted),
            created,
            _int(choice_track),
        )


# One script call, packed (RESP: EVALSHA, its sha, the number of keys, the keys, the arguments).
_Call = bytes


def _hiredis_reader(conn: Any) -> tuple[Any, asyncio.StreamReader, int] | None:
    """The connection's hiredis reader, its stream and read size, where its replies can be read
    from them directly: a RESP2 connection (RESP3 interleaves push messages with replies) whose
    parser is redis-py's hiredis one, with the attributes this version of redis-py has (5.3 to
    8.x do). Else None: the replies go through redis-py's read_response."""
    parser = conn._parser
    if type(parser) is not _AsyncHiredisParser or conn.protocol not in (2, "2"):
        return None
    reader = getattr(parser, "_reader", None)
    stream = getattr(parser, "_stream", None)
    size = getattr(parser, "_read_size", None)
    if reader is None or not isinstance(stream, asyncio.StreamReader) or type(size) is not int:
        return None
    return reader, stream, size


async def _read_replies(
    reader: Any, stream: asyncio.StreamReader, size: int, count: int, results: list[Any]
) -> None:
    """A batch's replies straight from the connection's hiredis reader. redis-py's
    read_response goes through three coroutines and formats the server's address for each reply;
    a redirect costs about 4% less CPU without them (bench/PLAY_RESULTS.md, session 10). What
    that path adds is not needed here: the batch has one deadline (the caller's), an error reply
    is this call's result (hiredis gives it as an exception object, as redis-py would raise it),
    a socket error is a ConnectionError as redis-py makes it, and the caller disconnects a
    connection that failed."""
    for _ in range(count):
        reply = reader.gets()
        while reply is NOT_ENOUGH_DATA:
            try:
                data = await stream.read(size)
            except OSError as exc:
                raise RedisConnectionError(f"Error while reading from Redis: {exc}") from exc
            if not data:
                raise RedisConnectionError("Connection closed by server.")
            reader.feed(data)
            reply = reader.gets()
        # (What redis-py raises rather than returns, as its parser does.)
        if isinstance(reply, RedisConnectionError):
            raise reply
        if type(reply) is list and reply and isinstance(reply[0], RedisConnectionError):
            raise reply[0]
        results.append(reply)


def _abandon(batch: list[tuple[_Call, asyncio.Future[Any] | None]], _: object) -> None:
    for _call, answer in batch:
        if answer is not None:
            answer.cancel()  # a no-op for an answer already given


class ScriptBatch:
    """Calls of one Lua script made during one event-loop iteration, sent to Redis together in
    one pipeline right after it; each caller still gets its own answer.

    A /play is one EVALSHA, and through redis-py one call costs more CPU than the rest of a
    redirect (pool, retry wrapper, packing, parsing): batched, the calls of concurrent players
    share that cost and the round trip. A caller waits one loop iteration longer. The batch is
    packed by hiredis (in C; redis-py's own packing was an eighth of a redirect's CPU) and
    written on a connection of redis-py's pool, whose connection handling (auth, database,
    timeouts) it keeps; the replies are read from that connection's hiredis reader directly
    (`_read_replies`) where it has one, else through redis-py. A server that lost its scripts
    (a restart) answers NOSCRIPT, then the script is loaded and the batch sent once more. At
    most MAX_PENDING_CALLS wait: past that a call fails at once, as if Redis were down.
    """

    def __init__(
        self, redis: Redis, script: str, on_lost: Callable[[int, str], None] | None = None
    ) -> None:
        self.redis = redis
        self.script = script
        self.sha = hashlib.sha1(script.encode()).hexdigest()
        self.on_lost = on_lost  # for calls nobody waits for
        # (the packed call, and who waits for the answer)
        self._pending: list[tuple[_Call, asyncio.Future[Any] | None]] = []
        self._sending: set[asyncio.Task[None]] = set()
        self.batches = 0

    def call(
        self, keys: list[str], args: tuple[str | int | float | bytes, ...], want_result: bool = True
    ) -> asyncio.Future[Any] | None:
        loop = asyncio.get_running_loop()
        answer = loop.create_future() if want_result else None
        if len(self._pending) >= MAX_PENDING_CALLS:
            error = RedisError("too many Redis calls waiting")
            if answer is None:
                self._lost(1, type(error).__name__)
            else:
                answer.set_exception(error)
            return answer
        try:
            # Packed now, so that an argument hiredis cannot pack (it takes exactly str, int,
            # float and bytes) fails this call alone, before any connection is taken. (Its
            # stub types the argument as a 1-tuple; it takes any tuple of words.)
            packed = pack_command(("EVALSHA", self.sha, len(keys), *keys, *args))  # type: ignore[arg-type]
        except TypeError as exc:
            if answer is None:
                self._lost(1, type(exc).__name__)
            else:
                answer.set_exception(exc)
            return answer
        self._pending.append((packed, answer))
        if len(self._pending) == 1:
            loop.call_soon(self._send)
        return answer

    def _send(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.ensure_future(self._run(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)
        # However the batch ends (cancelled at shutdown, even before it started), nobody is
        # left waiting for ever.
        task.add_done_callback(functools.partial(_abandon, batch))

    async def _run(
        self,
        batch: list[tuple[_Call, asyncio.Future[Any] | None]],
    ) -> None:
        self.batches += 1
        results: list[Any]
        try:
            results = await self._execute([call for call, _ in batch])
        except Exception as exc:  # Redis down, or anything else: every caller hears of it
            results = [exc] * len(batch)
        lost = 0
        for (_, answer), result in zip(batch, results, strict=True):
            failed = isinstance(result, BaseException)
            if answer is None:
                lost += failed
            elif not answer.done():  # (its waiter may have gone: a player that hung up)
                if failed:
                    answer.set_exception(result)
                else:
                    answer.set_result(result)
        if lost:
            failures = [r for r in results if isinstance(r, BaseException)]
            self._lost(lost, type(failures[0]).__name__)

    async def _execute(self, calls: list[_Call]) -> list[Any]:
        # Two things may need one more try, each once: a pooled connection Redis had closed
        # (a new one), and a script Redis no longer has (loaded again). A restarted Redis
        # needs both.
        reconnected = reloaded = False
        results: list[Any] | None = None
        sending = calls
        while True:
            try:
                answered = await self._round_trip(sending)
            except RedisConnectionError:
                if reconnected:
                    raise
                reconnected = True
                continue
            if results is None:
                results = answered
            else:  # the refused calls, sent again: their answers into their places
                again = iter(answered)
                results = [next(again) if isinstance(r, NoScriptError) else r for r in results]
            missing = [
                c for c, r in zip(calls, results, strict=True) if isinstance(r, NoScriptError)
            ]
            if reloaded or not missing:
                return results
            reloaded = True
            await self.redis.script_load(self.script)
            # Only the refused calls go again: the others ran (a transfer's bytes must not be
            # added twice) when another caller's load came in the middle of the batch.
            sending = missing

    async def _round_trip(self, calls: list[_Call]) -> list[Any]:
        pool = self.redis.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await conn.send_packed_command(b"".join(calls))
            results: list[Any] = []
            # One deadline for the batch's replies, not a timer set and cancelled per reply as
            # redis-py's read_response does by default (where the replies still go through it,
            # timeout=inf skips its own; older redis-py still sets one, harmlessly). The socket
            # timeout for each REPLIES_PER_TIMEOUT replies: a big batch on a busy but healthy
            # Redis is not taken for a dead one.
            timeout = conn.socket_timeout
            if timeout is not None:
                timeout *= -(-len(calls) // REPLIES_PER_TIMEOUT)
            try:
                async with asyncio.timeout(timeout):
                    direct = _hiredis_reader(conn)
                    if direct is not None:
                        await _read_replies(*direct, len(calls), results)
                        # (As read_response does: a connection that just answered needs no
                        # health-check PING before its next use.)
                        if conn.health_check_interval:
                            loop = asyncio.get_running_loop()
                            conn.next_health_check = loop.time() + conn.health_check_interval
                    else:
                        for _ in calls:
                            try:
                                results.append(await conn.read_response(timeout=math.inf))
                            except ResponseError as exc:  # this call's error (NOSCRIPT, ...)
                                results.append(exc)
            except TimeoutError:
                raise RedisTimeoutError(
                    f"Timeout reading {len(calls)} replies from Redis"
                ) from None
        except BaseException:
            # A reply left unread would answer the connection's next user: drop it.
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)
        return results

    def _lost(self, count: int, error: str) -> None:
        if self.on_lost is not None:
            self.on_lost(count, error)

    async def drain(self) -> None:
        if self._pending:
            self._send()
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)


class Audio(NamedTuple):
    """What a proxied transfer was, for counting a play by bytes (Sessions.record_transfer_soon):
    contiguous bytes of one rendition (`tag`: track, format and bitrate) from `start`."""

    tag: str
    start: int
    track_id: int
    play_bytes: int  # what makes a play: about EDGE_PLAY_THRESHOLD_SECONDS of it, or all of it
    row: dict[str, Any]  # the play, as the flush job writes it
    counted: Callable[[], None]  # called when this transfer counted the play


class SessionWrites:
    """Writes to sessions, gathered and then sent as one MULTI/EXEC: Redis applies all of them
    at once, or none if it is gone before the EXEC. One round trip for a whole batch of events
    instead of one per event. `execute` returns each write's result in the order the writes
    were added. Every write may be applied twice (it sets, expires, removes, or counts a play
    once per session and track): a Redis that lost the scripts (a restart) runs the rest of the
    transaction and refuses their calls, and then the whole batch goes again."""

    def __init__(self, sessions: Sessions) -> None:
        self._sessions = sessions
        self._commands: list[tuple[str | int | bytes, ...]] = []

    def _add(self, *command: str | int | bytes) -> int:
        self._commands.append(command)
        return len(self._commands) - 1

    def renew(self, sids: list[str]) -> None:
        """The sessions were used: each lives TTL_SESSION from now. (A session already gone
        stays gone: EXPIRE makes no key.)"""
        for sid in sids:
            self._add("EXPIRE", self._sessions.key(sid), TTL_SESSION)

    def update(self, sid: str, fields: dict[str, str | int]) -> int:
        """Set fields of a live session (an expired one is not made again)."""
        args: list[str | int] = ["", 0]
        for name, value in fields.items():
            args += [name, value]
        return self._add("EVALSHA", self._sessions._update.sha, 1, self._sessions.key(sid), *args)

    def count_play(self, sid: str, row: dict[str, Any]) -> int:
        """Queue a play for the flush job unless this session already counted this track: its
        result is 1 where the play was queued."""
        s = self._sessions
        keys = (s.key(sid), s.prefix + PLAYS_QUEUE)
        return self._add("EVALSHA", s._count.sha, 2, *keys, row["track_id"], orjson.dumps(row))

    def stop(self, sid: str, user_id: str) -> None:
        """The player paused or ended: its stream no longer takes a slot."""
        self._add("ZREM", self._sessions.prefix + active_key(user_id), sid)
        self._add("ZREM", self._sessions.prefix + ACTIVE_ALL, sid)

    async def execute(self) -> list[Any]:
        if not self._commands:
            return []
        redis = self._sessions.redis
        for attempt in (1, 2):
            async with redis.pipeline(transaction=True) as pipe:
                for command in self._commands:
                    pipe.execute_command(*command)
                try:
                    return list(await pipe.execute())
                except NoScriptError:
                    if attempt == 2:
                        raise
            for script in (self._sessions._update, self._sessions._count):
                await redis.script_load(script.script)
        raise AssertionError("unreachable")


class SessionError(Exception):
    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(kind)
        self.kind = kind  # "forbidden" | "limit"
        self.detail = detail


class Sessions:
    def __init__(
        self,
        redis: Redis,
        prefix: str = "",
        choices_lost: Counter | None = None,
        transfers_lost: Counter | None = None,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.choices_lost = choices_lost
        self.transfers_lost = transfers_lost
        self._count = redis.register_script(_COUNT_PLAY)
        self._take = redis.register_script(_TAKE_PLAYS)
        self._update = redis.register_script(_UPDATE)
        # The hot path's scripts go out batched: one pipeline per event-loop iteration.
        self._opens = ScriptBatch(redis, _OPEN)
        self._updates = ScriptBatch(redis, _UPDATE, on_lost=self._lost)
        self._transfers = ScriptBatch(redis, _TRANSFER, on_lost=self._transfers_lost)

    def key(self, sid: str) -> str:
        return self.prefix + session_key(sid)

    async def open(
        self,
        sid: str | None,
        user_id: str,
        track_id: int,
        *,
        limit: int,
        remaining_seconds: float,
        preload: bool = False,
        now: float | None = None,
    ) -> SessionState:
        """Continue `sid` (or start a session) for `user_id` playing `track_id`: one round trip."""
        now = time.time() if now is None else now
        sid = sid or new_session_id()
        answer = self._opens.call(
            [self.key(sid), self.prefix + active_key(user_id), self.prefix + ACTIVE_ALL],
            (
                sid,
                user_id,
                track_id,
                f"{now:.3f}",
                TTL_SESSION,
                limit,
                f"{now + remaining_seconds + ACTIVE_GRACE_SECONDS:.3f}",
                1 if preload else 0,
            ),
        )
        assert answer is not None
        result = await answer
        status = _s(result[0])
        if status == "forbidden":
            raise SessionError("forbidden")
        if status == "limit":
            raise SessionError("limit", _s(result[1]))
        return SessionState.from_redis(sid, result[1:], status == "new")

    def record_choice_soon(self, sid: str, fmt: str, bitrate_kbps: int, track_id: int) -> None:
        """record_choice without waiting: /play answers first, and the choice goes to Redis
        with the other calls of this event-loop iteration (see ScriptBatch)."""
        args = ("", 0, "format", fmt, "bitrate", bitrate_kbps, "choice_track", track_id)
        self._updates.call([self.key(sid)], args, want_result=False)

    def _lost(self, count: int, error: str) -> None:
        if self.choices_lost is not None:
            self.choices_lost.inc(count)
        log.warning("session_choices_lost", count=count, error=error)

    def _transfers_lost(self, count: int, error: str) -> None:
        if self.transfers_lost is not None:
            self.transfers_lost.inc(count)
        log.warning("session_transfers_lost", count=count, error=error)

    async def drain(self) -> None:
        """Send what is queued and wait for it (at shutdown)."""
        await self._opens.drain()
        await self._updates.drain()
        await self._transfers.drain()

    def record_transfer_soon(
        self,
        sid: str,
        sent: int,
        kbps: float | None,
        now: float | None = None,
        audio: Audio | None = None,
    ) -> None:
        """Add a proxied transfer to the session (its bytes, and the throughput measured on
        it), without waiting: batched with the other writes of this event-loop iteration, as
        record_choice_soon. (A task and a redis-py call per stream cost proxy mode about 7% of
        its CPU on small ranges: bench/PLAY_RESULTS.md, session 12.) With `audio` (the
        transfer was contiguous audio of one rendition) it also counts the play once the
        session has played enough of it from byte 0, in one response or in consecutive ranges
        (a player that reads a file a range at a time), and then calls `audio.counted`."""
        tput = (
            ("", "")
            if kbps is None
            else (f"{kbps:.1f}", f"{time.time() if now is None else now:.3f}")
        )
        keys = [self.key(sid), self.prefix + PLAYS_QUEUE]
        if audio is None:
            self._transfers.call(keys, (sent, *tput), want_result=False)
            return
        args = (
            sent,
            *tput,
            audio.tag,
            audio.start,
            audio.start + sent,
            audio.track_id,
            audio.play_bytes,
            orjson.dumps(audio.row),
        )
        answer = self._transfers.call(keys, args)
        if answer is not None:
            answer.add_done_callback(functools.partial(self._transferred, audio.counted))

    def _transferred(self, counted: Callable[[], None], answer: asyncio.Future[Any]) -> None:
        if answer.cancelled():
            return
        error = answer.exception()
        if error is not None:
            self._transfers_lost(1, type(error).__name__)
        elif answer.result() == 2:
            counted()

    def writes(self) -> SessionWrites:
        """Writes to sessions to send together, all or none (a player's batch of events)."""
        return SessionWrites(self)

    async def active_count(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(self.prefix + ACTIVE_ALL, "-inf", now)
            pipe.zcard(self.prefix + ACTIVE_ALL)
            _, count = await pipe.execute()
        return int(count)

    async def get_many(self, sids: list[str]) -> dict[str, dict[str, str]]:
        """Sessions by id (missing ones absent), in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for sid in sids:
                pipe.hgetall(self.key(sid))
            found = await pipe.execute()
        return {
            sid: {_s(k): _s(v) for k, v in h.items()}
            for sid, h in zip(sids, found, strict=True)
            if h
        }

    async def take_plays(self, batch: int) -> list[dict[str, Any]]:
        rows = await self._take(keys=[self.prefix + PLAYS_QUEUE], args=[batch])
        return [orjson.loads(r) for r in rows]

    async def requeue_plays(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            await self.redis.lpush(
                self.prefix + PLAYS_QUEUE, *(orjson.dumps(r) for r in reversed(rows))
            )


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None
