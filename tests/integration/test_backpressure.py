"""Backpressure in streaming.send: a slow player's unsent bytes stay in the kernel and in at most
about one chunk here; the source (the CDN, a file) is read only as fast as the player takes it.

A real aiohttp server and a real TCP client that reads slowly, both with small socket buffers,
so the server's transport really fills up.
"""

from __future__ import annotations

import asyncio
import fcntl
import socket
import ssl
import struct
import sys
import termios
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiohttp.typedefs import Handler

from edge.ranges import ByteRange, RangeDecision
from edge.streaming import CLIENT_WRITE_BUFFER, Representation, send
from tests.integration.test_origin import _self_signed
from tests.integration.test_proxy import eventually

CHUNK = 32 * 1024
CHUNKS = 48  # 1.5 MiB: far more than the socket buffers below hold


async def read_slowly(handler: Handler) -> int:
    """GET / from a server with this handler, as a slow reader with a small receive buffer
    (small reads): the bytes received, headers and body."""
    app = web.Application()
    app.router.add_get("/", handler)
    async with TestServer(app) as server:
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(client, (server.host, server.port))
        await loop.sock_sendall(client, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        received = 0
        while chunk := await loop.sock_recv(client, 2048):
            received += len(chunk)
        client.close()
    return received


@pytest.mark.parametrize("client_buffer", [CLIENT_WRITE_BUFFER, 0], ids=["default", "none"])
async def test_source_is_read_only_when_the_client_has_taken_the_last_chunk(
    client_buffer: int,
) -> None:
    """With the default, at most CLIENT_WRITE_BUFFER unsent bytes wait here when the next chunk
    is read; with client_buffer=0 (the local origin's files), none: the kernel took them all."""
    # The transport's unsent bytes each time the source is asked for its next chunk.
    unsent_at_read: list[int] = []
    kernel_at_read: list[int] = []  # and the bytes queued in the socket's kernel buffer

    async def handler(request: web.Request) -> web.StreamResponse:
        sock = request.transport.get_extra_info("socket") if request.transport else None
        assert sock is not None
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

        async def source(_: ByteRange | None) -> AsyncIterator[bytes]:
            for n in range(CHUNKS):
                assert request.transport is not None
                unsent_at_read.append(request.transport.get_write_buffer_size())
                queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4)
                kernel_at_read.append(int.from_bytes(queued, sys.byteorder))
                yield bytes([n]) * CHUNK

        rep = Representation(CHUNK * CHUNKS, "audio/flac", None, None)
        sent = await send(request, RangeDecision(200), rep, source, client_buffer=client_buffer)
        return sent.response

    received = await read_slowly(handler)

    assert received > CHUNK * CHUNKS  # the whole body (and the headers) arrived
    assert len(unsent_at_read) == CHUNKS
    # Without waiting for the transport, a slow client's unsent bytes grow to 64 KiB and more
    # before aiohttp's own write() waits.
    assert max(unsent_at_read) <= client_buffer
    # The client really was slower than the source: its backlog was in the kernel.
    assert min(kernel_at_read[CHUNKS // 2 :]) > 0


SIOCOUTQNSD = 0x894B  # (linux/sockios.h) a TCP socket's bytes queued and not yet sent


@pytest.mark.parametrize("kernel_unsent", [64 * 1024, 0], ids=["limited", "system"])
async def test_a_slow_player_s_kernel_queue_holds_about_kernel_unsent(kernel_unsent: int) -> None:
    """With kernel_unsent, the kernel keeps about that much of a slow player's stream not yet
    sent (TCP_NOTSENT_LOWAT): at most that, one chunk and one segment, each time the source
    is read. Without it (0, the system's setting), the kernel grows the socket's buffer by its
    own rules: on loopback to megabytes of audio the player will take minutes to read."""
    chunks = 128  # 4 MiB
    not_sent_at_read: list[int] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        sock = request.transport.get_extra_info("socket") if request.transport else None
        assert sock is not None

        async def source(_: ByteRange | None) -> AsyncIterator[bytes]:
            for n in range(chunks):
                queued = fcntl.ioctl(sock.fileno(), SIOCOUTQNSD, b"\0" * 4)
                not_sent_at_read.append(int.from_bytes(queued, sys.byteorder))
                yield bytes([n]) * CHUNK

        rep = Representation(CHUNK * chunks, "audio/flac", None, None)
        sent = await send(request, RangeDecision(200), rep, source, kernel_unsent=kernel_unsent)
        assert sent.outcome == "ok"
        return sent.response

    received = await read_slowly(handler)

    assert received > CHUNK * chunks
    assert len(not_sent_at_read) == chunks
    bound = 64 * 1024 + CHUNK + 64 * 1024  # the limit, a chunk, a loopback segment
    if kernel_unsent:
        assert max(not_sent_at_read) <= bound
        assert max(not_sent_at_read) > 0  # (the player really was the slower one)
    else:
        assert max(not_sent_at_read) > bound


async def test_a_file_s_mark_of_none_streams_over_tls(tmp_path: Path) -> None:
    """client_buffer=0 over TLS: TLS transports pause while their buffer is at or over the
    mark, so a mark of 0 would pause them for good after the first full socket (the body
    stalled after ~32 KiB, the handler holding its file). The whole body must arrive."""
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    reads = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        async def source(_: ByteRange | None) -> AsyncIterator[bytes]:
            nonlocal reads
            for n in range(CHUNKS):
                reads += 1
                yield bytes([n]) * CHUNK

        rep = Representation(CHUNK * CHUNKS, "audio/flac", None, None)
        sent = await send(request, RangeDecision(200), rep, source, client_buffer=0)
        return sent.response

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    try:
        port = runner.addresses[0][1]
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a slow player's window
        sock.connect(("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(
            sock=sock, ssl=client_ctx, server_hostname="localhost"
        )
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")

        async def read_all() -> int:
            received = 0
            while chunk := await reader.read(2048):
                received += len(chunk)
            return received

        received = await asyncio.wait_for(read_all(), 60)
        writer.close()
    finally:
        await runner.cleanup()
    assert received > CHUNK * CHUNKS
    assert reads == CHUNKS


async def test_a_client_gone_while_its_stream_waits_is_client_gone() -> None:
    """A player that stops reading (the stream waits for the transport to drain) and then
    resets its connection: the outcome is client_gone, not a failure of the source. (With
    aiohttp's handler cancellation off, the handler itself sees the reset: aiohttp's drain
    then raises a bare ConnectionError.)"""
    outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    requests: list[web.Request] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        requests.append(request)

        async def source(_: ByteRange | None) -> AsyncIterator[bytes]:
            for n in range(CHUNKS * 8):
                yield bytes([n % 256]) * CHUNK

        rep = Representation(CHUNK * CHUNKS * 8, "audio/flac", None, None)
        sent = await send(request, RangeDecision(200), rep, source, client_buffer=0)
        outcome.set_result(sent.outcome)
        return sent.response

    app = web.Application()
    app.router.add_get("/", handler)
    # (TestServer always cancels handlers; edge serve does too, and this must hold without.)
    runner = web.AppRunner(app, handler_cancellation=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        player = socket.socket()
        player.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        player.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(player, ("127.0.0.1", runner.addresses[0][1]))
        await loop.sock_sendall(player, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await eventually(  # the stream waits: the player reads nothing
            lambda: bool(requests) and requests[0].protocol.writing_paused
        )
        player.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        player.close()  # a reset, as a player skipping a track does
        assert await asyncio.wait_for(outcome, 30) == "client_gone"
    finally:
        await runner.cleanup()
