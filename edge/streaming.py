"""Writing a representation, or byte ranges of it, to a client: 200, single-part 206 and
multipart/byteranges 206, from any async source of bytes, with backpressure and exact lengths.

Shared by the local media origin (bytes from a file) and proxy mode (bytes from the CDN), so both
answer Range requests the same way. A source that ends early or fails mid-body aborts the client
connection: a client must never take a short body for a complete one.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from edge.ranges import (
    ByteRange,
    RangeDecision,
    multipart_boundary,
    multipart_content_type,
    multipart_length,
    multipart_parts,
    multipart_trailer,
)


class Pipe(Protocol):
    """A body that writes itself into a sink (edge.origin.Sink) as the sink takes it, without a
    coroutine step per chunk: proxy mode's origin responses. `close` lets go of it unread."""

    async def pipe(self, sink: ClientSink, expected: int) -> int: ...

    def close(self) -> None: ...


# A source gives the body of the whole representation (None) or of one range: chunks to write,
# or a Pipe.
Chunk = bytes | bytearray | memoryview
Source = Callable[[ByteRange | None], AsyncIterator[Chunk] | Pipe]

# Bytes a slow client may have queued in this process (beyond the chunk being written) before
# the next read from the source waits for it. A source whose reads are cheap and whose bytes
# keep (a file) may ask for 0: the next chunk is read once the kernel took the last one.
# 1000 slow players proxied from nginx held 131 MB with 16 KiB, 123 MB with 4 KiB, and fast
# proxying cost the same CPU per MiB (bench/PLAY_RESULTS.md, session 8); 0 saved more memory
# but cost 6% more CPU per MiB (the origin paused and resumed after every partial write).
CLIENT_WRITE_BUFFER = 4 * 1024

_TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", None)  # (Linux, macOS)


class SourceFailed(Exception):
    """The byte source failed, or ended early, after the response started."""

    def __init__(self, sent: int, reason: str) -> None:
        super().__init__(reason)
        self.sent = sent
        self.reason = reason


class ClientSink:
    """The client's connection as a pipe's sink: bytes go to the transport at once, and the
    pipe stops reading its source while the client's unsent bytes are over the transport's
    high-water mark."""

    __slots__ = ("protocol", "transport", "writer", "written")

    def __init__(self, request: web.Request, writer: AbstractStreamWriter) -> None:
        self.protocol = request.protocol
        self.transport = request.transport
        self.writer = writer
        self.written = 0

    def write(self, data: Chunk) -> bool:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client went away")
        transport.write(data)
        self.written += len(data)
        return not self.protocol.writing_paused

    def unsent(self) -> int:
        transport = self.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def socket_fd(self) -> int | None:
        """The connection's socket, for a pipe that sends bytes to it itself (sendfile, then
        `written` is its to count): None over TLS (the bytes must pass through here to be
        encrypted) or without a socket. Only while `unsent()` is 0, or the bytes would overtake
        those queued."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client went away")
        if transport.get_extra_info("ssl_object") is not None:
            return None
        sock = transport.get_extra_info("socket")
        return None if sock is None else int(sock.fileno())

    async def drain(self) -> None:
        await self.writer.drain()


@dataclass(frozen=True, slots=True)
class Sent:
    response: web.StreamResponse
    bytes: int
    outcome: str  # "ok" | "client_gone" | "source_failed"
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Representation:
    size: int
    content_type: str
    etag: str | None
    last_modified: str | None  # an HTTP-date


def head_response(decision: RangeDecision, rep: Representation) -> web.Response:
    """The headers a GET would have, without a body (HEAD, and 416)."""
    headers = _common(rep)
    if decision.status == 416:
        headers["Content-Range"] = f"bytes */{rep.size}"
        return web.Response(status=416, headers=headers)
    length, ctype = _length_and_type(decision, rep, None)
    headers["Content-Type"] = ctype
    if decision.status == 206 and not decision.is_multipart:
        headers["Content-Range"] = decision.ranges[0].content_range(rep.size)
    # aiohttp computes Content-Length from the (empty) body unless the header is given.
    headers["Content-Length"] = str(length)
    return web.Response(status=decision.status, headers=headers)


async def send(
    request: web.Request,
    decision: RangeDecision,
    rep: Representation,
    source: Source,
    extra_headers: dict[str, str] | None = None,
    client_buffer: int = CLIENT_WRITE_BUFFER,
    kernel_unsent: int = 0,
) -> Sent:
    """Stream the decided ranges of the representation. A client that goes away, or a source
    that fails mid-body (the connection is then aborted), is reported in the outcome: both are
    facts of streaming life, not errors of the handler. `client_buffer`: the client's unsent
    bytes kept here before the source waits (the transport's high-water mark);
    `kernel_unsent`: those kept in the kernel's socket buffer (see limit_kernel_unsent; 0
    leaves the system's setting)."""
    boundary = multipart_boundary() if decision.is_multipart else None
    length, ctype = _length_and_type(decision, rep, boundary)
    response = web.StreamResponse(status=decision.status, headers=_common(rep))
    if extra_headers:
        response.headers.update(extra_headers)
    response.content_type = ctype
    response.content_length = length
    if decision.status == 206 and boundary is None:
        response.headers["Content-Range"] = decision.ranges[0].content_range(rep.size)
    sent = 0
    try:
        await response.prepare(request)
        if request.transport is not None:
            # A slow player's unsent bytes wait in this process: keep at most about one chunk
            # of them (the default allows 64 KiB beyond the chunk being written). (1 for 0: TLS
            # transports pause while their buffer is >= the mark, so at 0 they never resume; TCP
            # ones pause while it is > the mark, so 1 is 0 there.)
            request.transport.set_write_buffer_limits(high=max(client_buffer, 1))
            if kernel_unsent:
                limit_kernel_unsent(request.transport, kernel_unsent)
        writer = request.writer
        sink = ClientSink(request, writer)
        if decision.status == 200:
            sent += await _pump(response, writer, source(None), rep.size, sent, sink)
        elif boundary is None:
            sent += await _pump(
                response, writer, source(decision.ranges[0]), decision.ranges[0].length, sent, sink
            )
        else:
            for header, part in multipart_parts(
                decision.ranges, rep.size, rep.content_type, boundary
            ):
                await response.write(header)
                sent += len(header)
                sent += await _pump(response, writer, source(part), part.length, sent, sink)
            trailer = multipart_trailer(boundary)
            await response.write(trailer)
            sent += len(trailer)
        await response.write_eof()
    except ConnectionError:  # (aiohttp's drain raises a bare one when the client is gone)
        return Sent(response, sent, "client_gone")
    except SourceFailed as exc:
        _abort(request)
        return Sent(response, exc.sent, "source_failed", exc.reason)
    return Sent(response, sent, "ok")


async def _pump(
    response: web.StreamResponse,
    writer: AbstractStreamWriter,
    chunks: AsyncIterator[Chunk] | Pipe,
    expected: int,
    sent_before: int,
    sink: ClientSink,
) -> int:
    if not isinstance(chunks, AsyncIterator):
        return await _pipe(writer, chunks, expected, sent_before, sink)
    got = 0
    try:
        while got < expected:
            # What the source raises is the source's failure (a ConnectionError too: its
            # upstream's); what writing raises, the client's.
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            except Exception as exc:
                raise SourceFailed(sent_before + got, f"{type(exc).__name__}: {exc}") from exc
            if got + len(chunk) > expected:
                chunk = chunk[: expected - got]
            if chunk:
                await response.write(chunk)
                # Backpressure: wait while the client's unsent bytes are over the transport's
                # high-water mark. (write() itself waits only after every 64 KiB written, so a
                # slow player would otherwise hold up to 64 KiB and a chunk here.)
                await writer.drain()
                got += len(chunk)
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
    if got < expected:
        raise SourceFailed(sent_before + got, f"source ended after {got} of {expected} bytes")
    return got


async def _pipe(
    writer: AbstractStreamWriter,
    body: Pipe,
    expected: int,
    sent_before: int,
    sink: ClientSink,
) -> int:
    before = sink.written
    try:
        # The pipe writes to the transport itself: the status line and headers go first.
        writer.send_headers()
    except BaseException:
        body.close()  # (the player is gone already)
        raise
    try:
        await body.pipe(sink, expected)
    except ConnectionError:  # (the sink's: a pipe reports its source's failures otherwise)
        raise
    except Exception as exc:
        got = sink.written - before
        raise SourceFailed(sent_before + got, f"{type(exc).__name__}: {exc}") from exc
    finally:
        writer.output_size += sink.written - before  # what aiohttp reports as the body's length
    got = sink.written - before
    if got < expected:
        raise SourceFailed(sent_before + got, f"source ended after {got} of {expected} bytes")
    return got


def limit_kernel_unsent(transport: asyncio.BaseTransport, nbytes: int) -> None:
    """Let the kernel keep about `nbytes` of the connection's bytes not yet sent, plus the write
    that crossed the mark (TCP_NOTSENT_LOWAT; what is in flight, sent and not yet
    acknowledged, is not limited, so a fast client's throughput is not). Without it the kernel
    grows a socket's send buffer by its own rules, and a slow player's buffer fills with audio
    it will take minutes to read: 1000 slow players proxied on one machine held 1 to 2 GB in
    the kernel's send queues (bench/PLAY_RESULTS.md, session 9), and every new stream cost the
    CPU of filling its megabytes before the next player got its first byte. A transport
    without a TCP socket is left as it is. (The option stays on a kept-alive connection for
    its later responses, which is harmless: small ones never reach the mark.)"""
    sock = transport.get_extra_info("socket")
    if _TCP_NOTSENT_LOWAT is None or sock is None:
        return
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, nbytes)
    except OSError:  # (a kernel without the option)
        return


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


def _common(rep: Representation) -> dict[str, str]:
    headers = {"Accept-Ranges": "bytes"}
    if rep.etag:
        headers["ETag"] = rep.etag
    if rep.last_modified:
        headers["Last-Modified"] = rep.last_modified
    return headers


def _length_and_type(
    decision: RangeDecision, rep: Representation, boundary: str | None
) -> tuple[int, str]:
    if decision.status == 200:
        return rep.size, rep.content_type
    if not decision.is_multipart:
        return decision.ranges[0].length, rep.content_type
    if boundary is None:
        boundary = multipart_boundary()
    return (
        multipart_length(decision.ranges, rep.size, rep.content_type, boundary),
        multipart_content_type(boundary),
    )
