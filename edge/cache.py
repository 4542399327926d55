"""The catalog cache: key builders, TTL policy, an in-process L1 in front of Redis (L2),
single-flight loading, invalidation, and hit/miss counters per cache and level.

Values are response bodies, encoded once (JSON bytes built by PostgreSQL) and served as they are;
the ETag is computed once per value and kept beside it in L1. When Redis is unreachable the
catalog is served straight from PostgreSQL; the outage is logged once when it starts and once when
it ends, and Redis is not asked again for `redis_retry_seconds` so a dead Redis costs no time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import random
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from edge.metrics import LoopCount, Metrics
from edge.settings import Settings

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = structlog.get_logger(__name__)

# TTLs from the platform's guide (seconds).
TTL_TRACK = 3600
TTL_ALBUM = 3600
TTL_PLAYLIST = 3600
TTL_SEARCH = 600
TTL_POPULAR = 1800
TTL_RECOMMENDATIONS = 1800
TTL_SESSION = 3600

# Hash field of a list's first page (never a cursor); later pages are keyed by their cursor.
FIRST_PAGE = ""


def track_key(track_id: int) -> str:
    return f"track:{track_id}"


def album_key(album_id: int) -> str:
    return f"album:{album_id}"


def playlist_key(playlist_id: int) -> str:
    return f"playlist:{playlist_id}"


def search_key(query: str) -> str:
    encoded = base64.urlsafe_b64encode(query.encode()).rstrip(b"=").decode()
    return f"search:{encoded}"


def popular_key(limit: int) -> str:
    return f"popular-tracks:{limit}"


def recommendations_key(user_id: str, limit: int) -> str:
    return f"recommendations:{user_id}:{limit}"


def session_key(session_id: str) -> str:
    return f"streaming:session:{session_id}"


# HSET, and give the key a TTL only if it has none: the key lives for the TTL of its first
# variant, later variants don't extend it. (EXPIRE NX needs Redis 7; this runs on 6.2 too.)
_HSET_KEEP_TTL = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if redis.call('TTL', KEYS[1]) < 0 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
return 1
"""


# Every invalidation bumps one counter in Redis and logs what it dropped (newest first, bounded);
# each process reads both every half L1 TTL and drops the same slots from its own L1. While
# those reads succeed, an L1 copy is good for L1_MAX_AGE, not just the L1 TTL: a hot key costs
# Redis one read a minute instead of one every 5 s per process, and another process's
# invalidation shows here sooner (within half the TTL), not later.
GENERATION_KEY = "cache:l1:generation"
INVALIDATED_KEY = "cache:l1:invalidated"
# A random value set once: if it changes, Redis lost its data (and the generation with it).
EPOCH_KEY = "cache:l1:epoch"
L1_MAX_AGE = 60.0
# KEYS: generation, log, then the Redis keys to delete; ARGV: log length, the writing process,
# then what to log.
# Deleting and logging in one script: no process can miss an invalidation that took effect.
# One log element per generation, so trimming never keeps half of one.
_INVALIDATE = """
for i = 3, #KEYS do redis.call('UNLINK', KEYS[i]) end
local generation = redis.call('INCR', KEYS[1])
redis.call('LPUSH', KEYS[2], generation .. ' ' .. table.concat(ARGV, ' ', 2))
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[1]) - 1)
return generation
"""


def etag_of(body: bytes) -> str:
    return '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'


@dataclass(frozen=True, slots=True)
class Entry:
    body: bytes
    etag: str


Loader = Callable[[], Awaitable[bytes | None]]


class Cache:
    """L1 (this process, hottest keys only) + L2 (Redis, the guide's TTLs).

    A key may hold variants in a Redis hash (`field`), e.g. one per page size and cursor of a
    search, so the key itself stays exactly the guide's and one DEL invalidates all variants.

    An L1 copy is fresh for the L1 TTL, or for L1_MAX_AGE while the watch (`start_watching`)
    keeps reading the invalidations every process logs in Redis (GENERATION_KEY); past that it
    is served once more while one refresh runs, and past twice that it is gone.
    """

    # Invalidations kept in Redis for other processes: one that falls further behind drops its
    # whole L1.
    LOG_LENGTH = 1000

    def __init__(self, redis: Redis | None, metrics: Metrics, settings: Settings) -> None:
        self.redis = redis
        self.metrics = metrics
        self.prefix = settings.redis_key_prefix
        self.l1_ttl = settings.cache_l1_ttl
        self.l1_size = settings.cache_l1_size
        self.jitter = settings.cache_ttl_jitter
        self.retry_seconds = settings.redis_retry_seconds
        # slot -> (when its load began, entry), least recently stored first
        self._l1: OrderedDict[tuple[str, str | None], tuple[float, Entry]] = OrderedDict()
        # The invalidation generation this L1 has applied, and until when that is known to be
        # current (monotonic time; 0: not watching, copies live for the L1 TTL only).
        self._generation: int | None = None
        self._epoch: str | None = None
        self._origin = secrets.token_hex(4)  # this process, in the invalidation log
        self._applying = asyncio.Lock()
        self._watched_until = 0.0
        self._watch_began = 0.0
        self._watch: asyncio.Task[None] | None = None
        # cache -> its lookups and L1 hits counters (peek's, bound once)
        self._hit_counts: dict[str, tuple[LoopCount, LoopCount]] = {}
        # Bumped by every drop from L1: a load that started before one may carry what was
        # dropped, so it is not stored in L1.
        self._drops = 0
        self._inflight: dict[tuple[str, str | None], asyncio.Future[Entry | None]] = {}
        self._down_until = 0.0
        self._down = False
        metrics.redis_up.set(1 if redis is not None else 0)

    # -- public API ---------------------------------------------------------------------------

    async def get(
        self,
        cache: str,
        key: str,
        ttl: int,
        loader: Loader,
        *,
        field: str | None = None,
        l1: bool = False,
    ) -> Entry | None:
        """The cached entry, or the loader's result (None: not found, not cached)."""
        if l1:
            hit = self.peek(cache, key, ttl, loader, field=field)
            if hit is not None:
                return hit
            self.metrics.cache_requests.labels(cache, "l1", "miss").inc()
        self.metrics.cache_lookups.labels(cache).inc()
        slot = (key, field)
        pending = self._inflight.get(slot) or self._load(cache, key, ttl, loader, field, l1)
        # shield: a client that goes away must not cancel the load others are waiting for.
        return await asyncio.shield(pending)

    def peek(
        self, cache: str, key: str, ttl: int, loader: Loader, *, field: str | None = None
    ) -> Entry | None:
        """The L1 copy, without a coroutine (a hit is most of the catalog's traffic), or None:
        then `get(..., l1=True)` does the rest. A copy past its lifetime is returned and
        refreshed ahead: this listener gets it now, the next one a new copy from Redis."""
        slot = (key, field)
        hit, fresh = self._l1_get(slot)
        if hit is None:
            return None
        counts = self._hit_counts.get(cache)
        if counts is None:
            counts = self._hit_counts[cache] = (
                self.metrics.cache_lookups.labels(cache),
                self.metrics.cache_requests.labels(cache, "l1", "hit"),
            )
        counts[0].value += 1
        counts[1].value += 1
        if not fresh and slot not in self._inflight:
            self._load(cache, key, ttl, loader, field, True)
        return hit

    def _load(
        self, cache: str, key: str, ttl: int, loader: Loader, field: str | None, l1: bool
    ) -> asyncio.Future[Entry | None]:
        """One load per slot at a time (single-flight)."""
        slot = (key, field)
        pending = asyncio.ensure_future(self._fill(cache, key, ttl, loader, field, l1))
        self._inflight[slot] = pending
        pending.add_done_callback(functools.partial(self._landed, slot))
        return pending

    async def refresh(
        self,
        cache: str,
        key: str,
        ttl: int,
        loader: Loader,
        *,
        field: str | None = None,
        l1: bool = False,
    ) -> Entry | None:
        """Load now and overwrite the cached value (warming)."""
        drops, began = self._drops, time.monotonic()
        body = await loader()
        if body is None:
            return None
        self.metrics.cache_loads.labels(cache).inc()
        entry = Entry(body, etag_of(body))
        await self._l2_set(key, field, body, ttl)
        # Other processes' L1 copies of this key are now old: they drop them at their next read.
        await self._invalidate_l2((), (key,))
        if l1 and self._drops == drops:
            self._l1_put((key, field), entry, began)
        return entry

    async def invalidate(self, cache: str, *keys: str) -> None:
        """Drop keys (all their variants) from L1 here and from Redis, and log them for the
        other processes' L1 (`apply_invalidations`)."""
        if not keys:
            return
        self._drop_l1(keys)
        self.metrics.cache_invalidations.labels(cache).inc(len(keys))
        await self._invalidate_l2(keys, keys)

    async def invalidate_track(self, track_id: int) -> None:
        await self.invalidate("track", track_key(track_id))

    async def invalidate_album(self, album_id: int) -> None:
        await self.invalidate("album", album_key(album_id))

    async def invalidate_playlist(self, playlist_id: int) -> None:
        await self.invalidate("playlist", playlist_key(playlist_id))

    async def invalidate_pattern(self, cache: str, pattern: str) -> int:
        """Drop every key matching a pattern, e.g. `search:*` after a catalog change (SCAN, never
        KEYS, so a large Redis is not blocked)."""
        self._drop_l1((), (pattern,))

        async def scan_and_unlink(r: Redis) -> int:
            removed = 0
            batch: list[bytes] = []
            async for k in r.scan_iter(match=self.prefix + pattern, count=1000):
                batch.append(k)
                if len(batch) >= 500:
                    removed += await r.unlink(*batch)
                    batch.clear()
            if batch:
                removed += await r.unlink(*batch)
            return removed

        removed = await self._redis_call(scan_and_unlink)
        await self._invalidate_l2((), (pattern,))
        count = removed if isinstance(removed, int) else 0
        self.metrics.cache_invalidations.labels(cache).inc(count)
        return count

    @property
    def redis_available(self) -> bool:
        return self.redis is not None and not self._down

    def start_watching(self) -> None:
        """Apply other processes' invalidations to this L1 every half L1 TTL, from now until
        stop_watching (the app does both)."""
        if self.redis is not None and self.l1_ttl > 0 and self._watch is None:
            self._watch = asyncio.create_task(self._watch_loop())

    async def stop_watching(self) -> None:
        """Stop reading invalidations; from then on L1 copies live for the L1 TTL."""
        watch, self._watch = self._watch, None
        self._watched_until = 0.0
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch

    async def _watch_loop(self) -> None:
        interval = self.l1_ttl / 2
        while True:
            try:
                await self.apply_invalidations()
            except Exception as exc:  # a bad log entry must not stop the watch
                log.error("cache_l1_watch_failed", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(interval)  # the schedule itself, not synchronisation

    async def apply_invalidations(self) -> None:
        """Read the invalidation log once and drop what it names from L1. If it cannot be
        read, L1 copies fall back to the L1 TTL when the last good read is that old."""
        if self.redis is None or self.l1_ttl <= 0:
            return
        # One read at a time: two answers applied out of order would move the generation back.
        async with self._applying:
            await self._apply_invalidations()

    async def _apply_invalidations(self) -> None:
        checked = time.monotonic()
        epoch = self._epoch or secrets.token_hex(8)

        async def read(r: Redis) -> list[Any]:
            pipe = r.pipeline(transaction=True)
            pipe.set(self.prefix + EPOCH_KEY, epoch, nx=True)
            pipe.get(self.prefix + EPOCH_KEY)
            pipe.get(self.prefix + GENERATION_KEY)
            pipe.lrange(self.prefix + INVALIDATED_KEY, 0, self.LOG_LENGTH - 1)
            return await pipe.execute()

        got = await self._redis_call(read)
        if not isinstance(got, list):
            return
        current_epoch, generation = got[1].decode(), int(got[2] or 0)
        seen = self._generation
        if seen is None:
            # What was loaded before the first read returned may predate invalidations it
            # cannot see: that keeps the L1 TTL.
            self._watch_began = time.monotonic()
        elif current_epoch != self._epoch:
            # Redis lost its data: whatever was invalidated since, the log cannot say.
            self._clear_l1()
            log.info("cache_l1_cleared", reason="redis_reset")
        elif generation != seen:
            newer = {}
            for element in got[3]:
                g, origin, *what = element.decode().split(" ")
                if int(g) > seen:
                    # (What this process logged, it dropped or replaced itself.)
                    newer[int(g)] = what if origin != self._origin else []
            if len(newer) != generation - seen:
                # This process fell further behind than the log reaches.
                self._clear_l1()
                log.info("cache_l1_cleared", reason="behind", generation=generation, seen=seen)
            else:
                named = {w for ws in newer.values() for w in ws}
                self._drop_l1(
                    [w for w in named if not w.endswith("*")], [w for w in named if w.endswith("*")]
                )
        self._epoch = current_epoch
        self._generation = generation
        self._watched_until = checked + self.l1_ttl

    # -- internals ----------------------------------------------------------------------------

    async def _fill(
        self, cache: str, key: str, ttl: int, loader: Loader, field: str | None, l1: bool
    ) -> Entry | None:
        drops, began = self._drops, time.monotonic()
        cached = await self._l2_get(key, field)
        if cached is not None:
            self.metrics.cache_requests.labels(cache, "redis", "hit").inc()
            entry = Entry(cached, etag_of(cached))
        else:
            result = "miss" if self.redis_available else "error"
            self.metrics.cache_requests.labels(cache, "redis", result).inc()
            body = await loader()
            self.metrics.cache_loads.labels(cache).inc()
            if body is None:
                return None
            entry = Entry(body, etag_of(body))
            await self._l2_set(key, field, body, ttl)
        if l1 and self._drops == drops:
            self._l1_put((key, field), entry, began)
        return entry

    def _landed(self, slot: tuple[str, str | None], future: asyncio.Future[Entry | None]) -> None:
        self._inflight.pop(slot, None)
        # Retrieve the exception so a load whose waiters all went away logs no warning.
        if not future.cancelled():
            future.exception()

    def _l1_get(self, slot: tuple[str, str | None]) -> tuple[Entry | None, bool]:
        """(entry, fresh). Past its lifetime an entry is still served, once refreshing, for
        another lifetime (a hot key then never waits for Redis); past that it is gone."""
        found = self._l1.get(slot)
        if found is None:
            return None, False
        stored, entry = found
        now = time.monotonic()
        watched = self._watched_until >= now and stored >= self._watch_began
        lifetime = L1_MAX_AGE if watched else self.l1_ttl
        age = now - stored
        if age <= lifetime:
            return entry, True
        if age <= 2 * lifetime:
            return entry, False
        del self._l1[slot]
        return None, False

    def _clear_l1(self) -> None:
        self._l1.clear()
        self._drops += 1

    def _drop_l1(self, keys: Iterable[str], patterns: Iterable[str] = ()) -> None:
        keys, patterns = set(keys), tuple(patterns)
        self._drops += 1
        for slot in [s for s in self._l1 if s[0] in keys or _matches_any(s[0], patterns)]:
            del self._l1[slot]

    async def _invalidate_l2(self, delete: Iterable[str], log_as: Iterable[str]) -> None:
        """Delete keys from Redis and log `log_as` for the other processes' L1, atomically."""
        delete = [self.prefix + k for k in delete]
        await self._redis_call(
            lambda r: r.eval(
                _INVALIDATE,
                2 + len(delete),
                self.prefix + GENERATION_KEY,
                self.prefix + INVALIDATED_KEY,
                *delete,
                self.LOG_LENGTH,
                self._origin,
                *log_as,
            )
        )

    def _l1_put(self, slot: tuple[str, str | None], entry: Entry, loaded: float) -> None:
        """Keep an entry whose load (its read of Redis or PostgreSQL) began at `loaded`: its
        age counts from then."""
        if self.l1_size <= 0 or self.l1_ttl <= 0:
            return
        self._l1[slot] = (loaded, entry)
        self._l1.move_to_end(slot)
        while len(self._l1) > self.l1_size:
            self._l1.popitem(last=False)

    def _jittered(self, ttl: int) -> int:
        # Only ever shorter than the guide's TTL, so keys written together expire apart.
        return max(1, int(ttl * (1.0 - self.jitter * random.random())))

    async def _l2_get(self, key: str, field: str | None) -> bytes | None:
        full = self.prefix + key
        if field is None:
            value = await self._redis_call(lambda r: r.get(full))
        else:
            value = await self._redis_call(lambda r: r.hget(full, field))
        return value if isinstance(value, bytes) else None

    async def _l2_set(self, key: str, field: str | None, body: bytes, ttl: int) -> None:
        full = self.prefix + key
        expiry = self._jittered(ttl)
        if field is None:
            await self._redis_call(lambda r: r.set(full, body, ex=expiry))
            return

        await self._redis_call(lambda r: r.eval(_HSET_KEEP_TTL, 1, full, field, body, expiry))

    async def _redis_call(self, op: Callable[[Redis], Awaitable[object]]) -> object:
        if self.redis is None:
            return None
        now = time.monotonic()
        if self._down and now < self._down_until:
            return None
        try:
            result = await op(self.redis)
        except (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError) as exc:
            self._mark_down(exc)
            return None
        except RedisError as exc:
            # Redis answered, with an error: a bug of ours, not an outage.
            self.metrics.cache_requests.labels("redis", "redis", "error").inc()
            log.error("redis_command_failed", error=f"{type(exc).__name__}: {exc}")
            return None
        if self._down:
            self._down = False
            self.metrics.redis_up.set(1)
            log.warning("redis_recovered")
        return result

    def _mark_down(self, exc: BaseException) -> None:
        self._down_until = time.monotonic() + self.retry_seconds
        if not self._down:
            self._down = True
            self.metrics.redis_up.set(0)
            self.metrics.redis_outages.inc()
            log.error("redis_unreachable", error=f"{type(exc).__name__}: {exc}")


def _matches_any(key: str, patterns: tuple[str, ...]) -> bool:
    return any(_glob_prefix_match(key, p) for p in patterns)


def _glob_prefix_match(key: str, pattern: str) -> bool:
    return key.startswith(pattern.rstrip("*")) if pattern.endswith("*") else key == pattern
