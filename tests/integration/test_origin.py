"""edge.origin against real HTTP servers (aiohttp, and raw asyncio servers for framings and
faults no framework would produce), over plain TCP and TLS, on asyncio's loop and on uvloop (the
one `edge serve` runs): bodies arrive exactly, connections are reused only when that is safe,
a full sink stops the reading, and a silent origin times out (while a waiting player does not).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edge.origin import SLOW_READ, OriginError, OriginPool

BODY = bytes(range(256)) * 4096  # 1 MiB, every offset recognisable

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, None]], None]:
    factory: LoopFactory = (
        asyncio.new_event_loop if request.param == "asyncio" else uvloop.new_event_loop
    )

    def go(coro: Coroutine[Any, Any, None]) -> None:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(asyncio.wait_for(coro, 60))

    return go


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def pool(**kw: Any) -> OriginPool:
    args: dict[str, Any] = {
        "limit": 16,
        "connect_timeout": 2.0,
        "read_timeout": 5.0,
        "read_size": 16 * 1024,
        "keepalive": 30.0,
    }
    args.update(kw)
    return OriginPool(**args)


class Collect:
    """A sink that keeps everything; with `room` it says "full" after that many bytes, until
    `drained` is set."""

    def __init__(self, room: int | None = None, behind: bool = False) -> None:
        self.behind = behind  # a player with bytes always unsent
        self.data = bytearray()
        self.writes = 0
        self.sizes: list[int] = []  # of each write, in order
        self.room = room
        self.full = asyncio.Event()
        self.drained = asyncio.Event()
        self.writes_while_full = 0

    def write(self, data: bytes) -> bool:
        if self.full.is_set() and not self.drained.is_set():
            self.writes_while_full += 1
        self.data += data
        self.writes += 1
        self.sizes.append(len(data))
        if self.room is not None and len(self.data) >= self.room and not self.drained.is_set():
            self.full.set()
            return False
        return True

    def unsent(self) -> int:
        return 1 if self.behind else 0

    async def drain(self) -> None:
        await self.drained.wait()


def file_app(connections: list[object]) -> web.Application:
    async def handler(request: web.Request) -> web.StreamResponse:
        connections.append(request.transport)
        rng = request.headers.get("Range")
        if rng:
            start, end = (int(x) for x in rng.removeprefix("bytes=").split("-"))
            return web.Response(
                status=206,
                body=BODY[start : end + 1],
                headers={"Content-Range": f"bytes {start}-{end}/{len(BODY)}"},
            )
        return web.Response(body=BODY)

    app = web.Application()
    app.router.add_get("/{key:.*}", handler)
    return app


Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def raw_origin(
    behave: Behaviour, tls: ssl.SSLContext | None = None
) -> tuple[asyncio.Server, str]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await behave(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    return server, f"https://localhost:{port}" if tls else f"http://127.0.0.1:{port}"


def answering(*writes: bytes, close: bool = False, accepts: list[int] | None = None) -> Behaviour:
    """An origin that reads one request and writes these answers (then closes, or waits for
    Edge to); `accepts` gets an element per connection."""

    async def behave(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if accepts is not None:
            accepts.append(1)
        await reader.readuntil(b"\r\n\r\n")
        for data in writes:
            w.write(data)
            await w.drain()
        if close:
            w.close()
        else:
            await reader.read()

    return behave


def test_bodies_arrive_exactly_and_connections_are_reused(run: Any) -> None:
    async def main() -> None:
        seen: list[object] = []
        async with TestServer(file_app(seen), host="127.0.0.1") as server:
            origins = pool()
            url = str(server.make_url("/a/b.flac?Expires=1&Signature=x"))
            whole = await origins.get(url, {})
            assert whole.status == 200
            assert whole.headers["Content-Length"] == str(len(BODY))
            sink = Collect()
            assert await whole.pipe(sink, len(BODY)) == len(BODY)
            assert bytes(sink.data) == BODY
            part = await origins.get(url, {"Range": "bytes=1000-70999"})
            assert part.status == 206
            assert part.headers["Content-Range"] == f"bytes 1000-70999/{len(BODY)}"
            sink = Collect()
            assert await part.pipe(sink, 70000) == 70000
            assert bytes(sink.data) == BODY[1000:71000]
            await origins.close()
        assert len(seen) == 2
        assert seen[0] is seen[1], "the second request did not reuse the kept-alive connection"

    run(main())


def test_every_connection_in_use_times_out_and_a_released_one_serves_again(run: Any) -> None:
    """At most `limit` requests at once: one more waits for a slot no longer than the connect
    timeout, then fails as a timeout (a 504 for the player); a response let go frees its slot."""

    async def main() -> None:
        seen: list[object] = []
        async with TestServer(file_app(seen), host="127.0.0.1") as server:
            origins = pool(limit=1, connect_timeout=0.2)
            url = str(server.make_url("/a.flac"))
            held = await origins.get(url, {})
            assert held.status == 200
            with pytest.raises(OriginError) as failed:
                await origins.get(url, {"Range": "bytes=0-9"})
            assert failed.value.kind == "timeout"
            assert "every origin connection is in use" in failed.value.message
            held.close()
            again = await origins.get(url, {"Range": "bytes=0-9"})
            sink = Collect()
            assert await again.pipe(sink, 10) == 10
            assert bytes(sink.data) == BODY[:10]
            await origins.close()
        assert len(seen) == 2  # the request that found no slot never reached the origin

    run(main())


def test_chunked_bodies_are_decoded_across_any_split(run: Any) -> None:
    payload = BODY[:50_000]
    chunks = [payload[:1], payload[1:4097], payload[4097:30000], payload[30000:]]
    wire = b"".join(f"{len(c):x};ext=1\r\n".encode() + c + b"\r\n" for c in chunks)
    wire += b"0\r\nX-Trailer: yes\r\n\r\n"

    async def main() -> None:
        async def behave(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                for i in range(0, len(wire), 777):  # splits inside sizes, data and CRLFs
                    w.write(wire[i : i + 777])
                    await w.drain()

        server, base = await raw_origin(behave)
        async with server:
            origins = pool()
            for _ in range(2):  # the second on the same connection: the framing held
                response = await origins.get(base + "/x", {})
                sink = Collect()
                assert await response.pipe(sink, len(payload)) == len(payload)
                assert bytes(sink.data) == payload
            assert len(origins._open) == 1
            await origins.close()

    run(main())


def test_a_body_ended_by_the_connection_is_read_and_not_reused(run: Any) -> None:
    accepts: list[int] = []

    async def main() -> None:
        server, base = await raw_origin(
            answering(
                b"HTTP/1.0 200 OK\r\nContent-Type: audio/mpeg\r\n\r\n" + BODY[:100_000],
                close=True,
                accepts=accepts,
            )
        )
        async with server:
            origins = pool()
            for _ in range(2):
                response = await origins.get(base + "/x", {})
                sink = Collect()
                assert await response.pipe(sink, 100_000) == 100_000
                assert bytes(sink.data) == BODY[:100_000]
            await origins.close()
        assert len(accepts) == 2

    run(main())


def test_a_body_ended_by_the_connection_ends_when_all_asked_for_has_come(run: Any) -> None:
    """An origin that sends a body framed by the end of the connection, then keeps the
    connection open: the pipe ends with the bytes it was asked for, not with the read timeout."""

    async def main() -> None:
        server, base = await raw_origin(
            answering(b"HTTP/1.1 206 Partial Content\r\n\r\n" + BODY[:50_000])
        )
        async with server:
            origins = pool(read_timeout=30.0)
            response = await origins.get(base + "/x", {"Range": "bytes=0-49999"})
            sink = Collect()
            assert await asyncio.wait_for(response.pipe(sink, 50_000), 10) == 50_000
            assert bytes(sink.data) == BODY[:50_000]
            await origins.close()

    run(main())


def test_a_full_sink_stops_reading_until_it_drains(run: Any) -> None:
    async def main() -> None:
        async with TestServer(file_app([]), host="127.0.0.1") as server:
            origins = pool(read_size=8192)
            response = await origins.get(str(server.make_url("/x")), {})
            sink = Collect(room=20_000)
            task = asyncio.ensure_future(response.pipe(sink, len(BODY)))
            await asyncio.wait_for(sink.full.wait(), 10)
            held = len(sink.data)
            # While the sink is full nothing more is read: the rest waits in the kernel and at
            # the origin. (A few loop iterations give a wrong implementation time to read on.)
            for _ in range(50):
                await asyncio.sleep(0)
            assert sink.writes_while_full == 0
            assert len(sink.data) == held
            assert held < 20_000 + 8192  # at most one read past the sink's room
            sink.drained.set()
            assert await task == len(BODY)
            assert bytes(sink.data) == BODY
            await origins.close()

    run(main())


def test_read_sizes_follow_the_player(run: Any) -> None:
    """A stream starts with SLOW_READ-sized reads; a player that takes everything gets bigger
    ones, up to the buffer; one that always has bytes unsent stays at SLOW_READ, also on a
    connection a fast stream used before."""

    async def main() -> None:
        seen: list[object] = []
        async with TestServer(file_app(seen), host="127.0.0.1") as server:
            origins = pool(read_size=4 * SLOW_READ)
            url = str(server.make_url("/x"))
            fast = Collect()
            assert await (await origins.get(url, {})).pipe(fast, len(BODY)) == len(BODY)
            assert bytes(fast.data) == BODY
            assert max(fast.sizes) == 4 * SLOW_READ
            slow = Collect(behind=True)
            assert await (await origins.get(url, {})).pipe(slow, len(BODY)) == len(BODY)
            assert bytes(slow.data) == BODY
            assert max(slow.sizes) <= SLOW_READ
            await origins.close()
        assert len(seen) == 2 and seen[0] is seen[1]  # the same connection, reused

    run(main())


class TransportSink(asyncio.Protocol):
    """A real connection as the sink, as streaming.ClientSink uses the player's: bytes go to the
    transport, it is full while the transport has paused writing, and what is unsent is the
    transport's write buffer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self.resumed = asyncio.Event()
        self.sizes: list[int] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def pause_writing(self) -> None:
        self.paused = True
        self.resumed.clear()

    def resume_writing(self) -> None:
        self.paused = False
        self.resumed.set()

    def write(self, data: bytes) -> bool:
        assert self.transport is not None
        self.sizes.append(len(data))
        self.transport.write(data)
        return not self.paused

    def unsent(self) -> int:
        assert self.transport is not None
        return self.transport.get_write_buffer_size()

    async def drain(self) -> None:
        while self.paused:
            await self.resumed.wait()


def test_a_player_that_takes_everything_gets_whole_buffer_reads(run: Any) -> None:
    """Through a real transport on each loop, a player reading as fast as it can gets reads that
    grow from SLOW_READ to the whole buffer, and every byte."""

    async def main() -> None:
        got = bytearray()
        done = asyncio.Event()

        async def player(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while chunk := await reader.read(1 << 16):
                got.extend(chunk)
            done.set()
            writer.close()

        server = await asyncio.start_server(player, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        _, sink = await loop.create_connection(TransportSink, "127.0.0.1", port)
        async with TestServer(file_app([]), host="127.0.0.1") as origin:
            origins = pool(read_size=4 * SLOW_READ)
            response = await origins.get(str(origin.make_url("/x")), {})
            assert await response.pipe(sink, len(BODY)) == len(BODY)
            await origins.close()
        assert sink.transport is not None
        sink.transport.close()
        await asyncio.wait_for(done.wait(), 10)
        server.close()
        await server.wait_closed()
        assert bytes(got) == BODY
        assert sink.sizes[0] <= SLOW_READ
        assert max(sink.sizes) == 4 * SLOW_READ

    run(main())


def test_a_silent_origin_times_out_but_a_waiting_sink_does_not(run: Any) -> None:
    async def main() -> None:
        release = asyncio.Event()

        async def behave(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + BODY[:1000])
            await w.drain()
            await release.wait()  # silent mid-body
            w.write(BODY[1000:100_000])
            await w.drain()
            await reader.read()

        server, base = await raw_origin(behave)
        async with server:
            origins = pool(read_timeout=0.3)
            response = await origins.get(base + "/silent", {})
            with pytest.raises(OriginError) as caught:
                await response.pipe(Collect(), 100_000)
            assert caught.value.kind == "timeout"

            # A sink that waits longer than the read timeout is the player's time, not the
            # origin's silence.
            release.set()
            response = await origins.get(base + "/slow-player", {})
            sink = Collect(room=500)
            task = asyncio.ensure_future(response.pipe(sink, 100_000))
            await sink.full.wait()
            await asyncio.sleep(0.6)  # the test's own condition: twice the read timeout
            assert not task.done()
            sink.drained.set()
            assert await task == 100_000
            assert bytes(sink.data) == BODY[:100_000]
            await origins.close()

    run(main())


def test_an_idle_connection_the_origin_closed_is_not_used(run: Any) -> None:
    accepts: list[int] = []

    async def main() -> None:
        server, base = await raw_origin(
            answering(
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", close=True, accepts=accepts
            )
        )  # keep-alive allowed by the headers, closed anyway once idle
        async with server:
            origins = pool()
            response = await origins.get(base + "/1", {})
            sink = Collect()
            assert await response.pipe(sink, 5) == 5
            await eventually(lambda: not origins._open)  # the origin's FIN reached the pool
            response = await origins.get(base + "/2", {})
            sink = Collect()
            assert await response.pipe(sink, 5) == 5 and bytes(sink.data) == b"hello"
            await origins.close()
        assert len(accepts) == 2

    run(main())


def test_a_kept_alive_connection_closed_as_it_is_reused_is_replaced(run: Any) -> None:
    """The origin closes a kept-alive connection just as the next request goes out on it
    (its keep-alive timeout ran out): nothing was answered, so the GET goes again on a new
    connection, and the caller sees an answer, not an error."""
    accepts: list[int] = []

    async def behave(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepts.append(1)
        await reader.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        await w.drain()
        if len(accepts) == 1:
            await reader.readuntil(b"\r\n\r\n")  # the next request: closed unanswered

    async def main() -> None:
        server, base = await raw_origin(behave)
        async with server:
            origins = pool()
            for n in range(2):
                response = await origins.get(base + f"/{n}", {})
                sink = Collect()
                assert await response.pipe(sink, 5) == 5 and bytes(sink.data) == b"hello"
            await origins.close()
        assert len(accepts) == 2

    run(main())


@pytest.mark.parametrize(
    ("answer", "kind"),
    [
        (b"", "connect"),  # closed before any byte
        (b"SPDY/3 200 OK\r\n\r\n", "protocol"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", "protocol"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "protocol"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: \xc2\xb2\r\n\r\n", "protocol"),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n", "protocol"),
        (b"HTTP/1.1 200 OK\r\n folded: header\r\n\r\n", "protocol"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", "protocol"),
        (b"HTTP/1.1 200 OK\r\nContent-Le", "protocol"),  # closed mid-head
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "protocol"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
            "protocol",
        ),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "protocol"),
    ],
    ids=[
        "closed",
        "not-http",
        "two-lengths",
        "bad-length",
        "superscript-length",
        "switching",
        "folded",
        "huge-head",
        "mid-head",
        "gzip-chunked",
        "two-te-lines",
        "gzip",
    ],
)
def test_broken_answers_are_origin_errors(run: Any, answer: bytes, kind: str) -> None:
    async def main() -> None:
        server, base = await raw_origin(answering(answer, close=True))
        async with server:
            # One slot: a slot the first failure leaked would make the second one a timeout.
            origins = pool(limit=1)
            for _ in range(2):
                with pytest.raises(OriginError) as caught:
                    await origins.get(base + "/x", {})
                assert caught.value.kind == kind
                assert not origins._open
            await origins.close()

    run(main())


def test_a_broken_chunked_body_fails_the_pipe(run: Any) -> None:
    async def main() -> None:
        server, base = await raw_origin(
            answering(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX")
        )
        async with server:
            origins = pool()
            response = await origins.get(base + "/x", {})
            sink = Collect()
            with pytest.raises(OriginError) as caught:
                await response.pipe(sink, 100)
            assert caught.value.kind == "protocol"
            assert bytes(sink.data) == b"hello"
            await origins.close()

    run(main())


def test_asking_for_less_than_the_body_stops_and_drops_the_connection(run: Any) -> None:
    async def main() -> None:
        seen: list[object] = []
        async with TestServer(file_app(seen), host="127.0.0.1") as server:
            origins = pool()
            url = str(server.make_url("/x"))
            response = await origins.get(url, {})
            sink = Collect()
            assert await response.pipe(sink, 10_000) == 10_000
            assert bytes(sink.data) == BODY[:10_000]
            assert not origins._idle.get(("http", "127.0.0.1", server.port))
            again = await origins.get(url, {"Range": "bytes=0-9"})
            sink = Collect()
            assert await again.pipe(sink, 10) == 10 and bytes(sink.data) == BODY[:10]
            await origins.close()
        assert len(seen) == 2 and seen[0] is not seen[1]

    run(main())


def test_refused_and_unreachable(run: Any) -> None:
    async def main() -> None:
        server, base = await raw_origin(lambda r, w: asyncio.sleep(0))
        server.close()
        await server.wait_closed()
        origins = pool()
        with pytest.raises(OriginError) as caught:
            await origins.get(base + "/x", {})
        assert caught.value.kind == "connect"
        with pytest.raises(OriginError) as caught:
            await origins.get("ftp://127.0.0.1/x", {})
        assert caught.value.kind == "protocol"
        await origins.close()

    run(main())


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_origins(run: Any, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def main() -> None:
        seen: list[object] = []
        runner = web.AppRunner(file_app(seen))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
        await site.start()
        port = runner.addresses[0][1]
        try:
            origins = pool(ssl_context=ssl.create_default_context(cafile=str(cert)))
            for rng, want in (("bytes=5-300004", BODY[5:300005]), ("bytes=0-0", BODY[:1])):
                response = await origins.get(f"https://localhost:{port}/x", {"Range": rng})
                assert response.status == 206
                sink = Collect()
                assert await response.pipe(sink, len(want)) == len(want)
                assert bytes(sink.data) == want
            assert len(seen) == 2 and seen[0] is seen[1]
            # An origin whose certificate is not trusted is refused before any request.
            untrusting = pool()
            with pytest.raises(OriginError) as caught:
                await untrusting.get(f"https://localhost:{port}/x", {})
            assert caught.value.kind == "connect"
            await origins.close()
            await untrusting.close()
        finally:
            await runner.cleanup()

    run(main())


@pytest.mark.parametrize("framing", ["length", "connection"])
def test_a_tls_origin_closing_before_the_body_is_piped_still_gives_it_whole(
    run: Any, tmp_path: Path, framing: str
) -> None:
    """Over TLS the end of the connection can arrive while the response waits for its player
    (reading paused): the bytes that came before it are the body, not a failure."""
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    payload = BODY[:3000]

    async def main() -> None:
        async def behave(reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            if framing == "length":
                head = b"HTTP/1.1 200 OK\r\nContent-Length: 3000\r\nConnection: close\r\n\r\n"
            else:
                head = b"HTTP/1.0 200 OK\r\n\r\n"
            w.write(head + payload)
            await w.drain()
            w.close()
            await w.wait_closed()

        server, base = await raw_origin(behave, server_ctx)
        async with server:
            origins = pool(limit=1, ssl_context=ssl.create_default_context(cafile=str(cert)))
            for _ in range(3):  # and the one slot comes back each time
                response = await origins.get(base + "/x", {})
                conn = response._conn
                assert conn is not None
                await eventually(lambda c=conn: c.lost)  # type: ignore[misc]
                sink = Collect()
                assert await response.pipe(sink, len(payload)) == len(payload)
                assert bytes(sink.data) == payload
            await origins.close()

    run(main())


def test_interim_answers_are_skipped(run: Any) -> None:
    async def main() -> None:
        server, base = await raw_origin(
            answering(
                b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n",
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 206 Partial Content\r\n",
                b"Content-Range: bytes 0-4/10\r\nContent-Length: 5\r\n\r\nhello",
            )
        )
        async with server:
            origins = pool()
            response = await origins.get(base + "/x", {"Range": "bytes=0-4"})
            assert response.status == 206
            assert response.headers["Content-Range"] == "bytes 0-4/10"
            assert "Link" not in response.headers
            sink = Collect()
            assert await response.pipe(sink, 5) == 5 and bytes(sink.data) == b"hello"
            await origins.close()

    run(main())


@pytest.mark.parametrize(
    ("head", "body", "want", "reused"),
    [
        # bytes after the last chunk: the connection is out of step
        (b"Transfer-Encoding: chunked", b"5\r\nhello\r\n0\r\n\r\nJUNK", b"hello", False),
        # the coding in its own header line, beside another header: chunked framing
        (
            b"X-Cache: hit\r\nTransfer-Encoding: Chunked",
            b"2\r\nhi\r\n0\r\n\r\n",
            b"hi",
            True,
        ),
        # Content-Length beside Transfer-Encoding: ignored, and the connection not reused
        (
            b"Content-Length: 99\r\nTransfer-Encoding: chunked",
            b"2\r\nhi\r\n0\r\n\r\n",
            b"hi",
            False,
        ),
    ],
    ids=["after-the-end", "te-line", "te-and-length"],
)
def test_transfer_codings_frame_the_body(
    run: Any, head: bytes, body: bytes, want: bytes, reused: bool
) -> None:
    async def main() -> None:
        server, base = await raw_origin(
            answering(b"HTTP/1.1 200 OK\r\n" + head + b"\r\n\r\n" + body)
        )
        async with server:
            origins = pool()
            response = await origins.get(base + "/x", {})
            sink = Collect()
            assert await response.pipe(sink, 100) == len(want)
            assert bytes(sink.data) == want
            assert (
                bool(origins._idle.get(("http", "127.0.0.1", server.sockets[0].getsockname()[1])))
                is reused
            )
            await origins.close()

    run(main())


@pytest.mark.parametrize("size", [b"0x10", b"+5", b"1_0", b"-1", b"\xb2"])
def test_chunk_sizes_are_strict_hex(run: Any, size: bytes) -> None:
    async def main() -> None:
        server, base = await raw_origin(
            answering(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + size + b"\r\n")
        )
        async with server:
            origins = pool(limit=1)
            response = await origins.get(base + "/x", {})
            with pytest.raises(OriginError) as caught:
                await response.pipe(Collect(), 100)
            assert caught.value.kind == "protocol"
            assert not origins._open
            await origins.close()

    run(main())
