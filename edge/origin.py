"""The origin client of proxy mode: HTTP/1.1 GETs over pooled keep-alive connections (plain or
TLS) whose response bodies are piped straight into the player's connection.

Why not aiohttp's client here: its body passes through a StreamReader and a coroutine step per
chunk, and whatever the socket holds is read ahead into this process. Here the origin socket is
read (into one fixed buffer per connection) only while the player takes the bytes: each read is
written to the player's transport from the read callback itself, and when the player's unsent
bytes pass the transport's high-water mark, reading from the origin stops until the player has
drained. A slow player's backlog stays in the kernel and at the origin, never here; a fast one
costs one callback per read.

Only what proxy mode needs: GET with a few headers; bodies framed by Content-Length, chunked, or
the end of the connection; one connection per stream, kept alive for the next request when the
body was read to its end.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Protocol, cast

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

MAX_HEAD = 64 * 1024  # status line and headers of one response
# Bytes read from the origin at once at a stream's start and after the player was full; a
# player that takes all it is sent gets up to the whole buffer, EDGE_UPSTREAM_BUFFER. 1000 slow
# players proxied from nginx held 118 MB with 8 KiB reads, 148 MB with 32 KiB (bench/
# PLAY_RESULTS.md, session 7).
SLOW_READ = 8 * 1024
_DECIMAL = re.compile(r"[0-9]{1,18}")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")


class OriginError(Exception):
    """A request to the origin failed. `kind`: connect (nothing was answered: refused, no
    connection within the connect timeout, reset or closed before the first byte; worth one
    retry), timeout (no answer to a request sent, or no free connection slot), closed
    (mid-body), or protocol (an answer that is not HTTP/1.1 as we read it)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


class Sink(Protocol):
    """Where a body goes: `write` returns False when the receiver wants no more for now;
    `drain` waits until it does. Either may raise ConnectionError (the receiver went away).
    `unsent` is what it holds, written but not yet taken by the receiver."""

    def write(self, data: bytes) -> bool: ...

    def unsent(self) -> int: ...

    async def drain(self) -> None: ...


class _Chunked:
    """Decoder of a chunked body (RFC 9112 §7.1): data slices out of each read, trailers
    skipped."""

    __slots__ = ("done", "extra", "failed", "left", "line", "state")

    def __init__(self) -> None:
        self.state = "size"  # size | data | data_crlf | trailer
        self.left = 0
        self.line = bytearray()
        self.done = False
        self.extra = False  # bytes came after the end of the body
        self.failed: OriginError | None = None

    def feed(self, view: memoryview) -> list[memoryview]:
        """The data in this read, up to a framing error (then in `failed`)."""
        out: list[memoryview] = []
        try:
            self._feed(view, out)
        except OriginError as exc:
            self.failed = exc
        return out

    def _feed(self, view: memoryview, out: list[memoryview]) -> None:
        data = bytes(view)  # one copy per read, for find(); chunked origins are the rare case
        view = memoryview(data)
        i, n = 0, len(view)
        while i < n and not self.done:
            if self.state == "data":
                take = min(self.left, n - i)
                out.append(view[i : i + take])
                i += take
                self.left -= take
                if self.left == 0:
                    self.state = "data_crlf"
                continue
            # A line: a chunk size, the CRLF after a chunk's data, or a trailer line.
            end = data.find(b"\n", i)
            if end < 0:
                self.line += view[i:n]
                if len(self.line) > 4096:
                    raise OriginError("protocol", "chunked body: line too long")
                if self.state == "data_crlf" and not b"\r\n".startswith(self.line):
                    raise OriginError("protocol", "chunked body: no CRLF after a chunk")
                break
            self.line += view[i:end]
            i = end + 1
            line = bytes(self.line).rstrip(b"\r")
            self.line.clear()
            if self.state == "data_crlf":
                if line:
                    raise OriginError("protocol", "chunked body: no CRLF after a chunk")
                self.state = "size"
            elif self.state == "size":
                size_text = line.split(b";", 1)[0].strip()
                if not _HEX.fullmatch(size_text):
                    raise OriginError("protocol", f"chunked body: bad size {size_text[:40]!r}")
                self.left = int(size_text, 16)
                self.state = "data" if self.left else "trailer"
            elif not line:  # the empty line that ends the trailers
                self.done = True
        if self.done and i < n:
            self.extra = True


class _Connection(asyncio.BufferedProtocol):
    """One origin connection and the response being read on it."""

    def __init__(
        self,
        key: tuple[str, str, int],
        buffer: memoryview,
        read_timeout: float,
        on_idle_lost: Callable[[_Connection], None],
    ) -> None:
        self.key = key
        self.loop = asyncio.get_running_loop()
        # Shared by every connection of the pool: each read is copied out (or consumed) in
        # buffer_updated, before the loop reads from any other socket.
        self.buffer = buffer
        self.read_timeout = read_timeout
        self.on_idle_lost = on_idle_lost
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.idle_since = 0.0
        self.reset()

    def reset(self) -> None:
        self.phase = "idle"  # idle | head | held | body | done
        self.head = bytearray()
        self.pending: bytes = b""  # body bytes that came with the head
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.last_read = 0.0
        self.answered = False  # a byte of this response arrived
        self.reusable = False
        self.remaining = -1  # body bytes still due (Content-Length), -1 if not framed by it
        self.chunked: _Chunked | None = None
        self.sink: Sink | None = None
        self.expected = 0  # bytes the pipe still wants
        self.sent = 0
        self.sink_full = False
        self.read_size = min(SLOW_READ, len(self.buffer))
        self.status = 0
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())

    # -- asyncio.BufferedProtocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses, but have its methods.)
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer[: self.read_size]

    def buffer_updated(self, nbytes: int) -> None:
        self.last_read = self.loop.time()
        self.answered = True
        view = self.buffer[:nbytes]
        if self.phase == "body":
            self._deliver(view)
        elif self.phase == "head":
            self._head_bytes(view)
        elif self.phase == "held":  # a transport may hand over what it read before the pause
            self.pending += bytes(view)
        else:  # bytes nobody asked for (idle, or past the end of the body): not reusable
            self.reusable = False
            self.close()

    def eof_received(self) -> bool:
        return False  # close the transport: HTTP/1.1 has no half-closed use here

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.reusable = False
        if self.phase == "idle":
            self.on_idle_lost(self)
        elif self.phase == "head":
            if self.answered:
                self._fail(OriginError("protocol", "origin closed the connection mid-header"))
            else:
                reason = f": {exc}" if exc else ""
                self._fail(OriginError("connect", f"origin closed the connection{reason}"))
        elif self.phase == "body":
            self._body_ended()
        # (While held, the end is taken into account once the body has somewhere to go: a TLS
        # transport may report it though reading is paused, and `pending` may hold it all.)
        self._wake()

    def _body_ended(self) -> None:
        """The origin closed the connection during the body."""
        if self.remaining < 0 and self.chunked is None and self.error is None:
            self._finish()  # a body framed by the end of the connection
        else:
            self._fail(OriginError("closed", "origin closed the connection mid-body"))

    # -- the head --------------------------------------------------------------------------------

    def _head_bytes(self, view: memoryview) -> None:
        self.head += view
        end = self.head.find(b"\r\n\r\n")
        if end > MAX_HEAD or (end < 0 and len(self.head) > MAX_HEAD):
            self._fail(OriginError("protocol", "response head too large"))
            return
        if end < 0:
            return
        try:
            self._parse_head(bytes(self.head[:end]))
        except OriginError as exc:
            self._fail(exc)
            return
        rest = self.head[end + 4 :]
        if 100 <= self.status < 200:
            # An interim answer (103 Early Hints, 100 Continue): the final one follows.
            self.head = bytearray()
            self.remaining, self.chunked, self.status = -1, None, 0
            if rest:
                self._head_bytes(memoryview(rest))
            return
        self.pending = bytes(rest)
        self.head = bytearray()
        self.phase = "held"
        self._cancel_timer()
        # Nothing more is read until the body has somewhere to go.
        self.transport.pause_reading()  # type: ignore[union-attr]
        self._wake()

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise OriginError("protocol", f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        self.status = int(parts[1])
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip() or line[:1] in (b" ", b"\t"):
                raise OriginError("protocol", f"malformed header line: {line[:80]!r}")
            headers.add(name.decode("latin-1"), value.strip().decode("latin-1"))
        self.headers = CIMultiDictProxy(headers)
        connection = headers.get("Connection", "").lower()
        self.reusable = parts[0] == b"HTTP/1.1" and "close" not in connection
        if self.status == 101:
            raise OriginError("protocol", "origin switched protocols")
        if 100 <= self.status < 200:
            return  # interim: no body
        codings = [
            c.strip().lower()
            for value in headers.getall("Transfer-Encoding", [])
            for c in value.split(",")
            if c.strip()
        ]
        if codings:
            # Edge sends no TE header, so chunked alone is the one coding an origin may use
            # (RFC 9112 §6.1): under any other the bytes are not the object's, and must never
            # reach a player as audio. A Content-Length beside it is ignored (§6.3), and the
            # connection not reused.
            if codings != ["chunked"]:
                raise OriginError("protocol", f"unsupported transfer coding {', '.join(codings)}")
            if "Content-Length" in headers:
                self.reusable = False
            self.chunked = _Chunked()
        elif "Content-Length" in headers:
            lengths = headers.getall("Content-Length")
            if len(lengths) > 1 or not _DECIMAL.fullmatch(lengths[0]):
                raise OriginError("protocol", f"bad Content-Length {lengths[0]!r}")
            self.remaining = int(lengths[0])
        else:
            self.reusable = False  # the body ends with the connection
        if self.status in (204, 304):
            self.remaining = 0
            self.chunked = None

    # -- the body --------------------------------------------------------------------------------

    def start_body(self, sink: Sink, expected: int) -> None:
        self.sink = sink
        self.expected = expected
        self.phase = "body"
        self.arm_timer()
        pending, self.pending = self.pending, b""
        if pending:
            self._deliver(memoryview(pending))
        if self.phase != "body":
            return
        if self.remaining == 0:
            self._finish()
        elif self.lost:
            self._body_ended()
        elif not self.sink_full:
            self.transport.resume_reading()  # type: ignore[union-attr]

    def resume(self) -> None:
        """The sink drained: read from the origin again."""
        self.sink_full = False
        self.last_read = self.loop.time()  # the wait was the player's, not the origin's
        if self.phase == "body" and self.transport is not None and not self.lost:
            self.transport.resume_reading()

    def _deliver(self, view: memoryview) -> None:
        if self.chunked is not None:
            for piece in self.chunked.feed(view):
                self._emit(piece)
                if self.phase != "body":
                    return
            if self.chunked.failed is not None:
                self._fail(self.chunked.failed)
            elif self.chunked.done:
                if self.chunked.extra:
                    self.reusable = False  # out of step: those bytes answer nothing we asked
                self._finish()
            return
        if self.remaining >= 0:
            if len(view) >= self.remaining:
                if len(view) > self.remaining:
                    self.reusable = False  # more than the body: the connection is out of step
                view = view[: self.remaining]
                self.remaining = 0
                self._emit(view)
                if self.phase == "body":
                    self._finish()
                return
            self.remaining -= len(view)
        self._emit(view)

    def _emit(self, view: memoryview) -> None:
        if not view:
            return
        overflow = len(view) > self.expected
        if overflow:  # the origin sends more than was asked for: stop there
            view = view[: self.expected]
            self.reusable = False
        room = True
        if view:
            # A copy: the sink may keep the bytes past this read, and the buffer is shared.
            data = bytes(view)
            self.expected -= len(data)
            self.sent += len(data)
            try:
                # Read sizes follow the player: they double up to the buffer while it has taken
                # everything written before (a fast one costs few reads), and go back to
                # SLOW_READ when it is full (what a slow one holds here stays small). Asked
                # before this write, of the writes before it: a transport may send this one
                # only later in the loop iteration.
                taken = not self.sink.unsent()  # type: ignore[union-attr]
                room = self.sink.write(data)  # type: ignore[union-attr]
                if not room:
                    self.read_size = min(SLOW_READ, len(self.buffer))
                elif taken and self.read_size < len(self.buffer):
                    self.read_size = min(2 * self.read_size, len(self.buffer))
            except ConnectionError as exc:
                self._fail(exc)
                return
        # All that was asked has come, but the body goes on (Content-Length), or ends only with
        # the connection, which the origin may keep open: done, and the connection with it.
        if overflow or (
            self.expected == 0
            and (self.remaining > 0 or (self.remaining < 0 and self.chunked is None))
        ):
            self.reusable = False
            self._finish()
        elif not room and self.transport is not None:
            self.sink_full = True
            self.transport.pause_reading()
            self._wake()

    def _finish(self) -> None:
        self.phase = "done"
        self._cancel_timer()
        if not self.reusable and self.transport is not None:
            self.transport.close()
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.reusable = False
        self.phase = "done"
        self._cancel_timer()
        if self.transport is not None:
            self.transport.abort()
        self._wake()

    # -- waiting ---------------------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self) -> None:
        self.waiter = self.loop.create_future()
        await self.waiter

    def arm_timer(self) -> None:
        self.last_read = self.loop.time()
        self.timer = self.loop.call_at(self.last_read + self.read_timeout, self._check_timer)

    def _check_timer(self) -> None:
        self.timer = None
        if self.phase not in ("head", "body"):
            return
        now = self.loop.time()
        if self.phase == "body" and self.sink_full:
            self.timer = self.loop.call_at(now + self.read_timeout, self._check_timer)
            return
        due = self.last_read + self.read_timeout
        if now >= due:
            where = "before answering" if self.phase == "head" else "mid-body"
            self._fail(OriginError("timeout", f"origin went silent {where}"))
        else:
            self.timer = self.loop.call_at(due, self._check_timer)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def close(self) -> None:
        self._cancel_timer()
        self.reusable = False
        if self.transport is not None:
            self.transport.abort()


class OriginResponse:
    """An origin's answer, head read, body not yet. Pipe the body, or close it."""

    def __init__(self, pool: OriginPool, conn: _Connection) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        self.status = conn.status
        self.headers = conn.headers

    async def pipe(self, sink: Sink, expected: int) -> int:
        """Write up to `expected` body bytes to the sink, reading from the origin only while the
        sink has room; returns how many were written (fewer: the body ended early). Raises
        ConnectionError when the sink went away, OriginError when the origin went silent, went
        away mid-body or broke the framing."""
        conn = self._conn
        assert conn is not None, "body already piped"
        try:
            conn.start_body(sink, expected)
            while conn.phase == "body":
                if conn.sink_full:
                    await sink.drain()
                    conn.resume()
                else:
                    await conn.wait()
            if conn.error is not None:
                raise conn.error
            return conn.sent
        finally:
            self.close()

    def close(self) -> None:
        """Done with the response: its connection goes back to the pool if the body was read to
        its end, else it is closed."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool._release(conn)


class OriginPool:
    """Keep-alive connections per origin (scheme, host, port). At most `limit` requests are in
    flight at once (a stream holds its slot for its length); idle connections are closed when
    the origin closes them or, once past `keepalive`, when their origin is next used."""

    def __init__(
        self,
        *,
        limit: int,
        connect_timeout: float,
        read_timeout: float,
        read_size: int,
        keepalive: float,
        ssl_context: ssl.SSLContext | None = None,
        user_agent: str = "edge",
    ) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive = keepalive
        self.user_agent = user_agent
        self._ssl = ssl_context
        self._buffer = memoryview(bytearray(read_size))
        self._slots = asyncio.Semaphore(limit)
        self._idle: dict[tuple[str, str, int], deque[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._closed = False

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    async def get(
        self,
        url: str,
        headers: Mapping[str, str],
        *,
        fresh: bool = False,
    ) -> OriginResponse:
        """Send a GET and read the head of the answer. `fresh` skips pooled connections (a
        retry). OriginError on failure; the connection is then closed."""
        if self._closed:
            raise OriginError("connect", "origin pool is closed")
        target = URL(url, encoded=True)
        scheme, host, port = target.scheme, target.raw_host or "", target.port
        if scheme not in ("http", "https") or not host or port is None:
            raise OriginError("protocol", f"not an http(s) URL: {url}")
        key = (scheme, host, port)
        if self._slots.locked():  # (a free slot is taken at once: no timer to set and cancel)
            try:
                async with asyncio.timeout(self.connect_timeout):
                    await self._slots.acquire()
            except TimeoutError:
                raise OriginError("timeout", "every origin connection is in use") from None
        else:
            await self._slots.acquire()
        conn: _Connection | None = None
        try:
            reused = None if fresh else self._pooled(key)
            default_port = 443 if scheme == "https" else 80
            name = f"[{host}]" if ":" in host else host  # an IPv6 address
            host_header = name if port == default_port else f"{name}:{port}"
            lines = [f"GET {target.raw_path_qs} HTTP/1.1", f"Host: {host_header}"]
            lines += [f"{k}: {v}" for k, v in headers.items()]
            lines.append(f"User-Agent: {self.user_agent}")
            request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
            while True:
                conn = reused or await self._connect(key)
                conn.reset()
                conn.phase = "head"
                assert conn.transport is not None
                conn.transport.write(request)
                conn.arm_timer()
                while conn.phase == "head":
                    await conn.wait()
                error = conn.error
                if error is None:
                    return OriginResponse(self, conn)
                if (
                    reused is not None
                    and isinstance(error, OriginError)
                    and error.kind == "connect"
                ):
                    # A kept-alive connection the origin closed as we sent: nothing was
                    # answered, so the GET goes again, once, on a new connection.
                    conn.close()
                    self._open.discard(conn)
                    conn = reused = None
                    continue
                raise error
        except BaseException:
            if conn is not None:
                conn.close()
                self._open.discard(conn)
            self._slots.release()
            raise

    def _pooled(self, key: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be closed
            if conn.lost or now - conn.idle_since > self.keepalive:
                conn.close()
                self._open.discard(conn)
                continue
            return conn
        return None

    async def _connect(self, key: tuple[str, str, int]) -> _Connection:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(key, self._buffer, self.read_timeout, self._drop_idle),
                    host,
                    port,
                    ssl=self._ssl_context() if scheme == "https" else None,
                    server_hostname=host if scheme == "https" else None,
                )
        except TimeoutError:
            # Nothing was asked yet: a connect failure like a refusal (one retry, then 502),
            # not an origin gone silent on a request (504).
            raise OriginError(
                "connect", f"no connection to {host}:{port} in {self.connect_timeout:g} s"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise OriginError("connect", f"cannot connect to {host}:{port}: {exc}") from None
        self._open.add(conn)
        return conn

    def _release(self, conn: _Connection) -> None:
        self._slots.release()
        if conn.phase == "held" and conn.remaining == 0 and not conn.pending and not conn.lost:
            conn.phase = "done"  # a body of no bytes needs no reading
        if (
            self._closed
            or not conn.reusable
            or conn.lost
            or conn.phase != "done"
            or conn.error is not None
        ):
            conn.close()
            self._open.discard(conn)
            return
        conn._cancel_timer()
        conn.phase = "idle"
        conn.sink = None
        # Reading while idle is how an origin's closing of the connection is noticed.
        conn.transport.resume_reading()  # type: ignore[union-attr]
        now = conn.idle_since = time.monotonic()
        idle = self._idle.setdefault(conn.key, deque())
        idle.append(conn)
        while now - idle[0].idle_since > self.keepalive:  # the oldest first
            old = idle.popleft()
            old.close()
            self._open.discard(old)

    def _drop_idle(self, conn: _Connection) -> None:
        """The origin closed an idle connection."""
        self._open.discard(conn)
        idle = self._idle.get(conn.key)
        if idle is not None:
            try:
                idle.remove(conn)
            except ValueError:
                pass

    async def close(self) -> None:
        self._closed = True
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports run their connection_lost
