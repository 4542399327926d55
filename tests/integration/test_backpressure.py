"""Backpressure in streaming.send: a slow player's unsent bytes stay in the kernel and in at most
about one chunk here; the source (the CDN, a file) is read only as fast as the player takes it.

A real aiohttp server and a real TCP client that reads slowly, both with small socket buffers,
so the server's transport really fills up.
"""

from __future__ import annotations

import asyncio
import fcntl
import socket
import sys
import termios
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from edge.ranges import ByteRange, RangeDecision
from edge.streaming import CLIENT_WRITE_BUFFER, Representation, send

CHUNK = 32 * 1024
CHUNKS = 48  # 1.5 MiB: far more than the socket buffers below hold


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
        while chunk := await loop.sock_recv(client, 2048):  # a slow reader: small reads
            received += len(chunk)
        client.close()

    assert received > CHUNK * CHUNKS  # the whole body (and the headers) arrived
    assert len(unsent_at_read) == CHUNKS
    # Without waiting for the transport, a slow client's unsent bytes grow to 64 KiB and more
    # before aiohttp's own write() waits.
    assert max(unsent_at_read) <= client_buffer
    # The client really was slower than the source: its backlog was in the kernel.
    assert min(kernel_at_read[CHUNKS // 2 :]) > 0
