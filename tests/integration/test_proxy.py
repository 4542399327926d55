"""/play in proxy mode against real origins.

Range semantics (RFC 9110) are checked case by case against proxy mode twice: with Edge's own
local origin behind it, and with a CDN stand-in of ours (a real HTTP server) that records the
Range headers it is asked for. test_media.py runs the same cases against the local origin
itself. Misbehaving origins (refused, reset, silent, 500, dying mid-body, wrong ranges) are raw
asyncio servers; a real decoder (PyAV, i.e. FFmpeg) plays what Edge serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from email.utils import format_datetime, parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import aiohttp
import asyncpg
import av
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict, CIMultiDictProxy

from edge import keys
from edge.app import create_app
from edge.auth import issue
from edge.cli import make_runner
from edge.embedded import free_port
from edge.ingest import RenditionFile
from edge.settings import Settings
from tests.conftest import JWT_SECRET, bearer, sample

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]

# A rendition each test can name, and how a player asks /play for exactly that one.
PICKS: dict[str, tuple[str, int, str, str]] = {
    # format: (format, bitrate, tier, query)
    "mp3": ("mp3", 320, "premium", "format=mp3&bitrate=320"),
    "aac": ("aac", 256, "premium", "format=aac&bitrate=256"),
    "flac": ("flac", 0, "hifi", "format=flac"),
}


def rendition(playable: dict[str, Any], fmt: str = "mp3", track: str = "hells") -> RenditionFile:
    want_format, want_bitrate, _, _ = PICKS[fmt]
    files: list[RenditionFile] = playable["files"][track]
    for f in files:
        if f.spec.format == want_format and f.spec.bitrate_kbps == want_bitrate:
            return f
    raise LookupError(f"no {fmt} rendition of {track}")


def play_path(
    playable: dict[str, Any], fmt: str = "mp3", track: str = "hells", **extra: str
) -> str:
    query = PICKS[fmt][3] + "".join(f"&{k}={v}" for k, v in extra.items())
    return f"/play/{playable['tracks'][track]}?{query}"


def upstream_errors(client: Client, kind: str) -> float:
    return sample(client, "edge_upstream_errors_total", source="cdn", kind=kind)


def requests_done(client: Client, route: str) -> float:
    """Requests of a route whose handler has finished (the access middleware counts them)."""
    total = 0.0
    for metric in client.app[keys.METRICS].registry.collect():
        for s in metric.samples:
            if s.name == "edge_http_requests_total" and s.labels.get("route") == route:
                total += s.value
    return total


def all_upstream_errors(client: Client) -> dict[str, float]:
    registry = client.app[keys.METRICS].registry
    found: dict[str, float] = {}
    for metric in registry.collect():
        for s in metric.samples:
            if s.name == "edge_upstream_errors_total" and s.value:
                found[f"{s.labels['source']}/{s.labels['kind']}"] = s.value
    return found


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until `check()` holds (for effects Edge produces after the response is gone)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached within the timeout")
        await asyncio.sleep(0.005)


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Log records that carry a traceback (stdlib exc_info, or structlog's rendered one)."""
    found = []
    for record in caplog.records:
        rendered = isinstance(record.msg, dict) and (
            "exception" in record.msg or "exc_info" in record.msg
        )
        if record.exc_info or rendered:
            found.append(f"{record.name}: {record.getMessage()[:300]}")
    return found


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"{r.name}: {r.getMessage()[:300]}" for r in caplog.records if r.levelno >= logging.ERROR
    ]


# -- multipart/byteranges ----------------------------------------------------------------------


def parse_byteranges(body: bytes, content_type: str) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/byteranges body (RFC 9110 §14.6, RFC 2046 §5.1.1), strictly:
    every part has headers and content, and the close delimiter is there."""
    m = re.fullmatch(r'multipart/byteranges;\s*boundary="?([^";]+)"?', content_type)
    assert m, f"not a multipart/byteranges content type: {content_type!r}"
    delimiter = b"\r\n--" + m.group(1).encode("ascii")
    # The first delimiter may open the body without a CRLF before it (an empty preamble).
    segments = (b"\r\n" + body).split(delimiter)
    parts: list[tuple[dict[str, str], bytes]] = []
    closed = False
    for segment in segments[1:]:
        assert not closed, "bytes after the close delimiter look like another part"
        if segment.startswith(b"--"):
            closed = True
            assert segment[2:].strip(b" \t") in (b"", b"\r\n"), "junk after the close delimiter"
            continue
        head, sep, content = segment.partition(b"\r\n\r\n")
        assert sep, "a part without the blank line that ends its headers"
        assert head.startswith(b"\r\n"), "a delimiter line not ended by CRLF"
        headers: dict[str, str] = {}
        for line in head[2:].split(b"\r\n"):
            name, colon, value = line.decode("latin-1").partition(":")
            assert colon, f"bad part header line {line!r}"
            headers[name.strip().lower()] = value.strip()
        parts.append((headers, content))
    assert closed, "multipart body without its close delimiter"
    return parts


# -- range cases -------------------------------------------------------------------------------

Expect = int | Callable[[int], list[tuple[int, int]]]  # 200, 416, or the 206 parts


@dataclass(frozen=True)
class Case:
    id: str
    range: Callable[[int], str] | None
    expect: Expect
    if_range: str | None = None  # a validator kind, see `validator()`

    def parts(self, size: int) -> list[tuple[int, int]] | None:
        return None if isinstance(self.expect, int) else self.expect(size)

    def status(self, size: int) -> int:
        return self.expect if isinstance(self.expect, int) else 206


def _c(
    id: str,
    rng: Callable[[int], str] | str | None,
    expect: Expect,
    if_range: str | None = None,
) -> Case:
    if isinstance(rng, str):
        text = rng
        return Case(id, lambda n: text, expect, if_range)
    return Case(id, rng, expect, if_range)


WHOLE, UNSATISFIABLE = 200, 416

RANGE_CASES: list[Case] = [
    _c("first-byte", "bytes=0-0", lambda n: [(0, 0)]),
    _c("first-100", "bytes=0-99", lambda n: [(0, 99)]),
    _c("middle", "bytes=1000-4999", lambda n: [(1000, 4999)]),
    _c("last-byte-explicit", lambda n: f"bytes={n - 1}-{n - 1}", lambda n: [(n - 1, n - 1)]),
    _c("open-ended", "bytes=1000-", lambda n: [(1000, n - 1)]),
    _c("open-ended-from-zero", "bytes=0-", lambda n: [(0, n - 1)]),
    _c("open-ended-last-byte", lambda n: f"bytes={n - 1}-", lambda n: [(n - 1, n - 1)]),
    _c("suffix-1", "bytes=-1", lambda n: [(n - 1, n - 1)]),
    _c("suffix-500", "bytes=-500", lambda n: [(n - 500, n - 1)]),
    _c("suffix-whole-file", lambda n: f"bytes=-{n}", lambda n: [(0, n - 1)]),
    _c("suffix-longer-than-file", lambda n: f"bytes=-{n + 1000}", lambda n: [(0, n - 1)]),
    _c("clamped-past-end", lambda n: f"bytes={n - 10}-{n + 1000}", lambda n: [(n - 10, n - 1)]),
    _c("end-equals-size", lambda n: f"bytes=0-{n}", lambda n: [(0, n - 1)]),
    _c("huge-end-clamped", "bytes=100-" + "9" * 30, lambda n: [(100, n - 1)]),
    _c("leading-zeros", "bytes=000-009", lambda n: [(0, 9)]),
    _c("unit-is-case-insensitive", "Bytes=0-99", lambda n: [(0, 99)]),
    _c("ows-and-empty-elements", "bytes= 0-99 , ,\t200-299", lambda n: [(0, 99), (200, 299)]),
    _c("two-ranges", "bytes=0-99,200-299", lambda n: [(0, 99), (200, 299)]),
    _c(
        "three-ranges-with-suffix",
        "bytes=0-9,1000-1999,-100",
        lambda n: [(0, 9), (1000, 1999), (n - 100, n - 1)],
    ),
    _c("out-of-order-sorted", "bytes=5000-5099,0-99", lambda n: [(0, 99), (5000, 5099)]),
    _c("overlapping-coalesced", "bytes=0-99,50-149", lambda n: [(0, 149)]),
    _c("adjacent-coalesced", "bytes=0-99,100-199", lambda n: [(0, 199)]),
    _c("contained-coalesced", "bytes=0-999,10-20", lambda n: [(0, 999)]),
    _c(
        "overlap-with-suffix-coalesced",
        lambda n: f"bytes={n - 200}-{n - 51},-100",
        lambda n: [(n - 200, n - 1)],
    ),
    _c(
        "unsatisfiable-part-dropped", lambda n: f"bytes=0-99,{n + 10}-{n + 20}", lambda n: [(0, 99)]
    ),
    _c(
        "sixteen-ranges",
        "bytes=" + ",".join(f"{i * 1000}-{i * 1000 + 9}" for i in range(16)),
        lambda n: [(i * 1000, i * 1000 + 9) for i in range(16)],
    ),
    _c(
        "seventeen-ranges-ignored",
        "bytes=" + ",".join(f"{i * 10}-{i * 10}" for i in range(17)),
        WHOLE,
    ),
    _c("no-range", None, WHOLE),
    _c("unknown-unit", "items=0-99", WHOLE),
    _c("no-unit", "0-99", WHOLE),
    _c("suffix-zero", "bytes=-0", UNSATISFIABLE),
    _c("start-at-size", lambda n: f"bytes={n}-", UNSATISFIABLE),
    _c("start-beyond-size", lambda n: f"bytes={n + 100}-{n + 200}", UNSATISFIABLE),
    _c("no-part-satisfiable", lambda n: f"bytes={n}-,-0", UNSATISFIABLE),
    _c("huge-start", "bytes=" + "9" * 30 + "-", UNSATISFIABLE),
    _c("malformed-letters", "bytes=abc-def", WHOLE),
    _c("malformed-last-before-first", "bytes=500-100", WHOLE),
    _c("malformed-empty-set", "bytes=", WHOLE),
    _c("malformed-double-dash", "bytes=--5", WHOLE),
    _c("malformed-three-numbers", "bytes=1-2-3", WHOLE),
    _c("malformed-hex", "bytes=0x10-0x20", WHOLE),
    _c("malformed-negative-start", "bytes=-5-10", WHOLE),
    _c("malformed-one-bad-element", "bytes=0-99,x", WHOLE),
    _c("malformed-parameter", "bytes=0-99;q=1", WHOLE),
    _c("if-range-current-etag", "bytes=0-99", lambda n: [(0, 99)], "etag"),
    _c(
        "if-range-current-etag-multipart",
        "bytes=0-99,200-299",
        lambda n: [(0, 99), (200, 299)],
        "etag",
    ),
    _c("if-range-stale-etag", "bytes=0-99", WHOLE, "stale-etag"),
    _c("if-range-stale-etag-suffix", "bytes=-100", WHOLE, "stale-etag"),
    _c("if-range-stale-etag-unsatisfiable", lambda n: f"bytes={n}-", WHOLE, "stale-etag"),
    _c("if-range-weak-etag", "bytes=0-99", WHOLE, "weak-etag"),
    _c("if-range-exact-date", "bytes=0-99", lambda n: [(0, 99)], "date"),
    _c("if-range-older-date", "bytes=0-99", WHOLE, "older-date"),
    _c("if-range-newer-date", "bytes=0-99", WHOLE, "newer-date"),
    _c("if-range-garbage", "bytes=0-99", WHOLE, "garbage"),
    _c("if-range-without-range", None, WHOLE, "stale-etag"),
]


def validator(kind: str, etag: str, last_modified: str) -> str:
    moment = parsedate_to_datetime(last_modified)
    return {
        "etag": etag,
        "stale-etag": '"0123456789abcdef0123456789abcdef"',
        "weak-etag": f"W/{etag}",
        "date": last_modified,
        "older-date": format_datetime(moment - timedelta(days=1), usegmt=True),
        "newer-date": format_datetime(moment + timedelta(seconds=1), usegmt=True),
        "garbage": "yesterday-ish",
    }[kind]


@dataclass
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


@dataclass
class Target:
    """Something that serves the rendition `file` by GET/HEAD on `url` (a path on `client`)."""

    name: str
    client: Client
    url: str
    headers: dict[str, str]
    file: RenditionFile
    data: bytes
    origin: FileOrigin | None = None

    async def ask(self, method: str, extra: dict[str, str]) -> Answer:
        async with self.client.request(
            method, self.url, headers={**self.headers, **extra}, allow_redirects=False
        ) as resp:
            return Answer(resp.status, resp.headers, await resp.read())


def check_answer(target: Target, case: Case, answer: Answer, method: str = "GET") -> None:
    """Status, headers and (for GET) every byte against the file."""
    data, size = target.data, len(target.data)
    h = answer.headers
    expected_status = case.status(size)
    assert answer.status == expected_status, (answer.status, answer.body[:200])
    if method == "HEAD":
        assert answer.body == b""
    assert h.get("Accept-Ranges") == "bytes"
    assert h.get("ETag") == f'"{target.file.etag}"'
    assert parsedate_to_datetime(h["Last-Modified"]).tzinfo is not None
    if expected_status == UNSATISFIABLE:
        assert h.get("Content-Range") == f"bytes */{size}"
        assert data[:64] not in answer.body
        return
    parts = case.parts(size)
    if parts is None:  # 200, the whole representation
        assert "Content-Range" not in h
        assert h.get("Content-Type") == target.file.spec.content_type
        assert int(h["Content-Length"]) == size
        if method == "GET":
            assert answer.body == data
        return
    if len(parts) == 1:
        (start, end) = parts[0]
        assert h.get("Content-Range") == f"bytes {start}-{end}/{size}"
        assert h.get("Content-Type") == target.file.spec.content_type
        assert int(h["Content-Length"]) == end - start + 1
        if method == "GET":
            assert answer.body == data[start : end + 1]
        return
    assert "Content-Range" not in h
    assert h["Content-Type"].startswith("multipart/byteranges; boundary=")
    if method == "HEAD":
        return
    assert int(h["Content-Length"]) == len(answer.body)
    got = parse_byteranges(answer.body, h["Content-Type"])
    assert [p[0].get("content-range") for p in got] == [f"bytes {s}-{e}/{size}" for s, e in parts]
    for (part_headers, content), (start, end) in zip(got, parts, strict=True):
        assert part_headers.get("content-type") == target.file.spec.content_type
        assert content == data[start : end + 1]


def same_headers(get: Answer, head: Answer) -> None:
    """HEAD answers with the headers GET would have."""
    assert head.status == get.status
    assert head.body == b""
    # RFC 9110 §8.6: a HEAD may omit Content-Length, never send another one; players size
    # the stream from it, so a 200/206 must have it.
    if head.status in (200, 206) or "Content-Length" in head.headers:
        assert head.headers.get("Content-Length") == get.headers.get("Content-Length")
    for name in (
        "Content-Range",
        "ETag",
        "Last-Modified",
        "Accept-Ranges",
        "X-Stream-Format",
        "X-Stream-Bitrate",
    ):
        assert head.headers.get(name) == get.headers.get(name), name
    # A multipart boundary is fresh per response; everything before it must match.
    assert (
        head.headers.get("Content-Type", "").split("boundary=")[0]
        == get.headers.get("Content-Type", "").split("boundary=")[0]
    )


async def request_headers(target: Target, case: Case) -> dict[str, str]:
    extra: dict[str, str] = {}
    size = len(target.data)
    if case.range is not None:
        extra["Range"] = case.range(size)
    if case.if_range is not None:
        probe = await target.ask("GET", {"Range": "bytes=0-0"})
        assert probe.status == 206
        extra["If-Range"] = validator(
            case.if_range, probe.headers["ETag"], probe.headers["Last-Modified"]
        )
    return extra


async def run_case(target: Target, case: Case) -> Answer:
    """One range case as a GET, checked against the file (and against the origin's log)."""
    size = len(target.data)
    extra = await request_headers(target, case)
    if target.origin is not None:
        target.origin.requests.clear()
    get = await target.ask("GET", extra)
    check_answer(target, case, get)
    if target.origin is not None:
        # Exactly the bytes the client gets, one origin request per part; never the whole file
        # for a range, nothing at all for a 416.
        parts = case.parts(size)
        if parts is None:
            want: list[str | None] = [None] if get.status == 200 else []
        else:
            want = [f"bytes={s}-{e}" for s, e in parts]
        assert [r.range for r in target.origin.requests] == want
        target.origin.requests.clear()
    if target.name.startswith("proxy"):
        assert get.headers.get("X-Stream-Format") == target.file.spec.format
        assert get.headers.get("X-Stream-Bitrate") == str(target.file.bitrate_kbps)
    return get


async def run_head_case(target: Target, case: Case) -> None:
    """The same case as HEAD: the headers GET has, no body, and no trip to the origin."""
    get = await run_case(target, case)
    extra = await request_headers(target, case)
    if target.origin is not None:
        target.origin.requests.clear()
    head = await target.ask("HEAD", extra)
    check_answer(target, case, head, "HEAD")
    same_headers(get, head)
    if target.origin is not None:
        assert target.origin.requests == [], "a HEAD went to the origin"


HEAD_CASES = [
    c
    for c in RANGE_CASES
    if c.id
    in {
        "no-range",
        "first-100",
        "suffix-500",
        "open-ended",
        "two-ranges",
        "suffix-zero",
        "start-beyond-size",
        "unknown-unit",
        "if-range-current-etag",
        "if-range-stale-etag",
    }
]


# -- origins -----------------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    range: str | None
    headers: CIMultiDict[str]


class FileOrigin:
    """A CDN stand-in on a real socket: serves objects by key (GET, single byte ranges, as
    CloudFront does), records every request, and can add headers of its own."""

    def __init__(self, objects: dict[str, bytes], extra_headers: dict[str, str] | None = None):
        self.objects = objects
        self.extra_headers = extra_headers or {}
        self.requests: list[Seen] = []
        app = web.Application()
        app.router.add_route("*", "/{key:.+}", self._handle)
        self.server = TestServer(app, host="127.0.0.1")

    @property
    def url(self) -> str:
        return str(self.server.make_url("/")).rstrip("/")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(
            Seen(
                request.method,
                request.path,
                dict(request.query),
                request.headers.get("Range"),
                CIMultiDict(request.headers),
            )
        )
        data = self.objects.get(request.match_info["key"])
        if data is None:
            return web.Response(status=404, text="no such object")
        headers = {"Accept-Ranges": "bytes", "Content-Type": "audio/mpeg", **self.extra_headers}
        rng = request.headers.get("Range")
        if rng is None:
            return web.Response(body=data, headers=headers)
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", rng)
        if not m or int(m.group(2)) < int(m.group(1)):
            return web.Response(status=400, text=f"unexpected Range {rng!r}")
        start, end = int(m.group(1)), min(int(m.group(2)), len(data) - 1)
        if start >= len(data):
            return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return web.Response(status=206, body=data[start : end + 1], headers=headers)


@contextlib.asynccontextmanager
async def running(server: TestServer) -> AsyncIterator[TestServer]:
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


Behaviour = Callable[[int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawOrigin:
    """A raw TCP origin whose every connection runs `behave(connection_number, reader, writer)`:
    for origins no HTTP framework would let us write (silent, lying, dying mid-body)."""

    def __init__(self, behave: Behaviour) -> None:
        self.behave = behave
        self.accepts = 0
        self.requests: list[tuple[str, CIMultiDict[str]]] = []
        self.closed_by_peer = asyncio.Event()
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aenter__(self) -> RawOrigin:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        for w in list(self._writers):
            w.transport.abort()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepts += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            await self.behave(self.accepts, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.transport.abort()

    async def read_request(self, reader: asyncio.StreamReader) -> tuple[str, CIMultiDict[str]]:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers.add(name.strip(), value.strip())
        self.requests.append((lines[0], headers))
        return lines[0], headers

    async def wait_for_close(self, reader: asyncio.StreamReader) -> None:
        """Block until the peer (Edge) closes this connection."""
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
        self.closed_by_peer.set()


def asked_range(headers: CIMultiDict[str], size: int) -> tuple[int, int]:
    m = re.fullmatch(r"bytes=(\d+)-(\d+)", headers.get("Range", ""))
    assert m, f"origin asked without an exact range: {headers.get('Range')!r}"
    return int(m.group(1)), min(int(m.group(2)), size - 1)


def http_head(status: str, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status}"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def mp3(playable: dict[str, Any]) -> RenditionFile:
    return rendition(playable, "mp3")


async def proxy_target(
    kind: str, make_client: MakeClient, playable: dict[str, Any], fmt: str = "mp3"
) -> tuple[Target, contextlib.AsyncExitStack]:
    f = rendition(playable, fmt)
    data = f.path.read_bytes()
    stack = contextlib.AsyncExitStack()
    origin: FileOrigin | None = None
    if kind == "proxy-cdn":
        origin = FileOrigin({f.object_key: data})
        await stack.enter_async_context(running(origin.server))
        client = await make_client(cdn_url=origin.url)
    else:
        client = await make_client()
    tier = PICKS[fmt][2]
    target = Target(
        kind,
        client,
        play_path(playable, fmt, mode="proxy"),
        bearer("range-user", tier),
        f,
        data,
        origin,
    )
    return target, stack


# -- 1 + 2: range semantics, and what the origin is asked for ---------------------------------


@pytest.mark.parametrize("case", RANGE_CASES, ids=[c.id for c in RANGE_CASES])
@pytest.mark.parametrize("kind", ["proxy-local", "proxy-cdn"])
async def test_range(
    kind: str, case: Case, make_client: MakeClient, playable: dict[str, Any]
) -> None:
    target, stack = await proxy_target(kind, make_client, playable)
    async with stack:
        await run_case(target, case)


@pytest.mark.parametrize("case", HEAD_CASES, ids=[c.id for c in HEAD_CASES])
@pytest.mark.parametrize("kind", ["proxy-local", "proxy-cdn"])
async def test_head(
    kind: str, case: Case, make_client: MakeClient, playable: dict[str, Any]
) -> None:
    target, stack = await proxy_target(kind, make_client, playable)
    async with stack:
        await run_head_case(target, case)


async def test_play_mode_setting_proxies_without_query(
    make_client: MakeClient, playable: dict[str, Any], mp3: RenditionFile
) -> None:
    data = mp3.path.read_bytes()
    client = await make_client(play_mode="proxy")
    resp = await client.get(
        play_path(playable), headers={**bearer(), "Range": "bytes=10-19"}, allow_redirects=False
    )
    assert resp.status == 206
    assert resp.headers["Content-Range"] == f"bytes 10-19/{len(data)}"
    assert await resp.read() == data[10:20]


async def test_origin_requests_are_signed_for_the_object(
    make_client: MakeClient, playable: dict[str, Any], mp3: RenditionFile
) -> None:
    data = mp3.path.read_bytes()
    origin = FileOrigin({mp3.object_key: data})
    async with running(origin.server):
        client = await make_client(cdn_url=origin.url + "/")
        resp = await client.get(
            play_path(playable, mode="proxy"), headers={**bearer(), "Range": "bytes=-10"}
        )
        assert resp.status == 206
        assert await resp.read() == data[-10:]
    [seen] = origin.requests
    assert seen.method == "GET"
    assert seen.path == "/" + mp3.object_key
    assert seen.range == f"bytes={len(data) - 10}-{len(data) - 1}"
    assert seen.query["Key-Pair-Id"] == "local"
    signer = client.app[keys.LOCAL_SIGNER]
    assert (
        signer.verify(
            "/" + quote(mp3.object_key), seen.query["Expires"], seen.query["Signature"], time.time()
        )
        is None
    )
    # The player's credentials stay with Edge.
    assert "Authorization" not in seen.headers
    assert "Cookie" not in seen.headers


async def test_hop_by_hop_headers_from_origin_never_reach_the_client(
    make_client: MakeClient, playable: dict[str, Any], mp3: RenditionFile
) -> None:
    data = mp3.path.read_bytes()
    size = len(data)

    async def chunked_with_hop_by_hop(
        n: int, reader: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        while True:
            _, headers = await origin.read_request(reader)
            start, end = asked_range(headers, size)
            body = data[start : end + 1]
            w.write(
                http_head(
                    "206 Partial Content",
                    {
                        "Content-Type": "audio/mpeg",
                        "Content-Range": f"bytes {start}-{end}/{size}",
                        "Transfer-Encoding": "chunked",
                        "Connection": "keep-alive, X-Hop",
                        "Keep-Alive": "timeout=5, max=100",
                        "X-Hop": "secret",
                        "Proxy-Foo": "bar",
                        "Upgrade": "h2c",
                    },
                )
            )
            for i in range(0, len(body), 1000):
                piece = body[i : i + 1000]
                w.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            w.write(b"0\r\n\r\n")
            await w.drain()

    async with RawOrigin(chunked_with_hop_by_hop) as origin:
        client = await make_client(cdn_url=origin.url)
        for rng, want in (("bytes=100-5099", data[100:5100]), ("bytes=0-9,20-29", None)):
            resp = await client.get(
                play_path(playable, mode="proxy"), headers={**bearer(), "Range": rng}
            )
            body = await resp.read()
            assert resp.status == 206
            for name in ("Keep-Alive", "Transfer-Encoding", "Proxy-Foo", "X-Hop", "Upgrade"):
                assert name not in resp.headers, name
            assert "x-hop" not in resp.headers.get("Connection", "").lower()
            assert int(resp.headers["Content-Length"]) == len(body)
            if want is not None:
                assert body == want
            else:
                parts = parse_byteranges(body, resp.headers["Content-Type"])
                assert [c for _, c in parts] == [data[0:10], data[20:30]]
    assert [h.get("Range") for _, h in origin.requests] == [
        "bytes=100-5099",
        "bytes=0-9",
        "bytes=20-29",
    ]


# -- 3: origin faults --------------------------------------------------------------------------


def assert_json_error(status: int, body: Any, want_status: int, code: str) -> None:
    assert status == want_status, body
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


async def test_connection_refused_is_retried_once_then_502(
    make_client: MakeClient, playable: dict[str, Any]
) -> None:
    client = await make_client(cdn_url=f"http://127.0.0.1:{free_port()}")
    resp = await client.get(
        play_path(playable, mode="proxy"), headers={**bearer(), "Range": "bytes=0-99"}
    )
    assert resp.content_type == "application/json"
    assert_json_error(resp.status, await resp.json(), 502, "upstream_connect")
    # Two connect attempts, each counted: the first and its one retry.
    assert upstream_errors(client, "connect") == 2
    assert all_upstream_errors(client) == {"cdn/connect": 2}


async def test_an_origin_that_never_completes_the_connect_is_retried_once_then_502(
    make_client: MakeClient, playable: dict[str, Any]
) -> None:
    """A real listening socket whose accept queue is full: the kernel drops further SYNs, so a
    connect neither succeeds nor is refused. Past the connect timeout that is a connect failure
    (README: 502), retried once on a new connection, not an origin gone silent (504)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)  # never accepted: one connection fills the queue
    port = listener.getsockname()[1]
    fillers: list[socket.socket] = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        client = await make_client(cdn_url=f"http://127.0.0.1:{port}", upstream_connect_timeout=0.3)
        resp = await client.get(
            play_path(playable, mode="proxy"), headers={**bearer(), "Range": "bytes=0-99"}
        )
        assert resp.content_type == "application/json"
        body = await resp.json()
        assert_json_error(resp.status, body, 502, "upstream_connect")
        # (not refused: no connection within the connect timeout)
        assert "no connection to 127.0.0.1" in body["error"]["message"], body
        assert all_upstream_errors(client) == {"cdn/connect": 2}
    finally:
        for sock in fillers:
            sock.close()
        listener.close()


async def test_origin_closing_at_once_is_retried_once_then_502(
    make_client: MakeClient, playable: dict[str, Any]
) -> None:
    async def hang_up(n: int, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await origin.read_request(reader)
        w.close()  # a clean FIN before any response byte

    async with RawOrigin(hang_up) as origin:
        client = await make_client(cdn_url=origin.url)
        resp = await client.get(
            play_path(playable, mode="proxy"), headers={**bearer(), "Range": "bytes=0-99"}
        )
        assert_json_error(resp.status, await resp.json(), 502, "upstream_connect")
    # One retry in all: the origin is asked twice, never more (whoever does the retrying).
    assert origin.accepts == 2
    assert [h.get("Range") for _, h in origin.requests] == ["bytes=0-99", "bytes=0-99"]
    assert upstream_errors(client, "connect") >= 1


async def test_origin_resetting_before_any_byte_is_retried_once_then_502(
    make_client: MakeClient, playable: dict[str, Any]
) -> None:
    """A connection reset (RST) before the origin sent a single byte is a connect failure too:
    nothing reached the client yet, so Edge retries once, as for a refused connection."""

    async def reset(n: int, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await origin.read_request(reader)
        w.transport.abort()  # RST

    async with RawOrigin(reset) as origin:
        client = await make_client(cdn_url=origin.url)
        resp = await client.get(
            play_path(playable, mode="proxy"), headers={**bearer(), "Range": "bytes=0-99"}
        )
        body = await resp.json()
    assert resp.status == 502, body
    assert origin.accepts == 2, f"reset not retried: {body}"


async def test_origin_500_is_502(
    make_client: MakeClient, playable: dict[str, Any], mp3: RenditionFile
) -> None:
    async def fail(n: int, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await origin.read_request(reader)
        w.write(http_head("500 Internal Server Error", {"Content-Length": "5"}) + b"oops!")
        await w.drain()
        await origin.wait_for_close(reader)

    async with RawOrigin(fail) as origin:
        client = await make_client(cdn_url=origin.url)
        resp = await client.get(
            play_path(playable, mode="proxy"), headers={**bearer(), "Range": "bytes=0-99"}
        )
        assert_json_error(resp.status, await resp.json(), 502, "upstream_status")
        assert b"oops" not in await resp.read()
    assert origin.accepts == 1
    assert all_upstream_errors(client) == {"cdn/status": 1}


@pytest.mark.parametrize(
    "status,content_range",
    [
        ("200 OK", None),  # the whole file, for a range request
        ("206 Partial Content", "bytes 0-49/{size}"),  # a shorter range
        ("206 Partial Content", "bytes 1-100/{size}"),  # a shifted range
        ("206 Partial Content", "bytes 0-99/{bigger}"),  # a range of another representation
        ("206 Partial Content", None),  # no Content-Range at all
    ],
    ids=["200-for-range", "shorter", "shifted", "other-size", "missing"],
)
async def test_origin_answering_another_range_is_502(
    status: str,
    content_range: str | None,
    make_client: MakeClient,
    playable: dict[str, Any],
    mp3: RenditionFile,
) -> None:
    data = mp3.path.read_bytes()
    size = len(data)

    async def lie(n: int, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await origin.read_request(reader)
        headers = {"Content-Type": "audio/mpeg"}
        body = data if status.startswith("200") else data[:100]
        if content_range is not None:
            headers["Content-Range"] = content_range.format(size=size, bigger=size + 1000)
        headers["Content-Length"] = str(len(body))
        w.write(http_head(status, headers) + body)
        await w.drain()
        await origin.wait_for_close(reader)

    async with RawOrigin(lie) as origin:
        client = await make_client(cdn_url=origin.url)
        resp = await client.get(
            play_path(playable, mode="proxy"), headers={**bearer(), "Range": "bytes=0-99"}
        )
        assert resp.content_type == "application/json"
        assert_json_error(resp.status, await resp.json(), 502, "upstream_status")
    assert upstream_errors(client, "status") == 1


async def test_origin_holding_another_version_is_never_spliced(
    make_client: MakeClient, playable: dict[str, Any], mp3: RenditionFile
) -> None:
    """The origin answers the right range, of the right size, but of another version of the
    object (its strong ETag is not the catalog's, e.g. a re-upload after a tag edit). Edge labels
    the response with the catalog's ETag, so passing these bytes on would splice two versions in
    a player that resumes with If-Range: it must refuse them (or make the origin check, e.g.
    If-Match), never answer 206 with them."""
    data = mp3.path.read_bytes()
    size = len(data)
    other_version = bytes(b ^ 0xFF for b in data[:100])

    async def newer(n: int, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            _, headers = await origin.read_request(reader)
            if headers.get("If-Match") == f'"{mp3.etag}"':
                w.write(http_head("412 Precondition Failed", {"Content-Length": "0"}))
            else:
                w.write(
                    http_head(
                        "206 Partial Content",
                        {
                            "Content-Range": f"bytes 0-99/{size}",
                            "Content-Length": "100",
                            "ETag": '"ffffffffffffffffffffffffffffffff"',
                        },
                    )
                    + other_version
                )
            await w.drain()

    async with RawOrigin(newer) as origin:
        client = await make_client(cdn_url=origin.url)
        resp = await client.get(
            play_path(playable, mode="proxy"),
            headers={**bearer(), "Range": "bytes=0-99", "If-Range": f'"{mp3.etag}"'},
        )
        body = await resp.read()
        assert resp.status != 206 and other_version not in body, (
            f"{resp.status}: bytes of another version served under ETag {resp.headers['ETag']}"
        )
        assert resp.status in (502, 504), resp.status


async def test_origin_silent_before_headers_is_504(
    make_client: MakeClient, playable: dict[str, Any]
) -> None:
    async def silent(n: int, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await origin.read_request(reader)
        await origin.wait_for_close(reader)

    async with RawOrigin(silent) as origin:
        client = await make_client(cdn_url=origin.url, upstream_read_timeout=0.5)
        resp = await client.get(
            play_path(playable, mode="proxy"), headers={**bearer(), "Range": "bytes=0-99"}
        )
        assert resp.content_type == "application/json"
        assert_json_error(resp.status, await resp.json(), 504, "upstream_timeout")
        # Edge gave up on that connection rather than leaving it open.
        await asyncio.wait_for(origin.closed_by_peer.wait(), 10)
    assert origin.accepts == 1
    assert all_upstream_errors(client) == {"cdn/timeout": 1}


async def read_until_broken(resp: aiohttp.ClientResponse) -> tuple[bytes, BaseException | None]:
    got = bytearray()
    try:
        async for chunk in resp.content.iter_any():
            got += chunk
    except aiohttp.ClientPayloadError as exc:
        return bytes(got), exc
    return bytes(got), None


async def test_origin_silent_mid_body_closes_the_client_connection(
    make_client: MakeClient, playable: dict[str, Any], mp3: RenditionFile
) -> None:
    data = mp3.path.read_bytes()
    size = len(data)

    async def stall(n: int, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        _, headers = await origin.read_request(reader)
        start, end = asked_range(headers, size)
        w.write(
            http_head(
                "206 Partial Content",
                {
                    "Content-Range": f"bytes {start}-{end}/{size}",
                    "Content-Length": str(end - start + 1),
                },
            )
            + data[start : start + 1000]
        )
        await w.drain()
        await origin.wait_for_close(reader)

    async with RawOrigin(stall) as origin:
        client = await make_client(cdn_url=origin.url, upstream_read_timeout=0.5)
        resp = await client.get(
            play_path(playable, mode="proxy"), headers={**bearer(), "Range": "bytes=0-9999"}
        )
        assert resp.status == 206
        assert resp.headers["Content-Length"] == "10000"
        body, error = await read_until_broken(resp)
        assert error is not None, "a short body looked complete"
        assert len(body) < 10000
        assert body == data[: len(body)]
        await asyncio.wait_for(origin.closed_by_peer.wait(), 10)
    assert upstream_errors(client, "mid_body") == 1


async def test_origin_dying_mid_body_closes_the_client_connection(
    make_client: MakeClient, playable: dict[str, Any], mp3: RenditionFile
) -> None:
    data = mp3.path.read_bytes()
    size = len(data)

    async def die_once(n: int, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            _, headers = await origin.read_request(reader)
            start, end = asked_range(headers, size)
            length = end - start + 1
            head = http_head(
                "206 Partial Content",
                {"Content-Range": f"bytes {start}-{end}/{size}", "Content-Length": str(length)},
            )
            if n == 1:
                w.write(head + data[start : start + length // 2])
                await w.drain()
                w.close()  # dies mid-body
                return
            w.write(head + data[start : end + 1])
            await w.drain()

    async with RawOrigin(die_once) as origin:
        client = await make_client(cdn_url=origin.url)
        url = play_path(playable, mode="proxy")
        resp = await client.get(url, headers={**bearer(), "Range": "bytes=0-39999"})
        assert resp.status == 206
        assert resp.headers["Content-Length"] == "40000"
        body, error = await read_until_broken(resp)
        assert error is not None, "a short body looked complete"
        assert len(body) < 40000
        assert body == data[: len(body)]
        assert upstream_errors(client, "mid_body") == 1

        # Edge keeps serving: the next request (a fresh origin connection) is whole and right.
        again = await client.get(url, headers={**bearer(), "Range": "bytes=0-39999"})
        assert again.status == 206
        assert await again.read() == data[:40000]
    assert origin.accepts == 2


async def test_origin_ending_early_without_error_is_not_a_short_206(
    make_client: MakeClient, playable: dict[str, Any], mp3: RenditionFile
) -> None:
    """An origin that frames a short body correctly (Content-Length of what it sends) but
    sends less than the range: the client must not get a complete-looking short 206."""
    data = mp3.path.read_bytes()
    size = len(data)

    async def short(n: int, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        _, headers = await origin.read_request(reader)
        start, end = asked_range(headers, size)
        body = data[start : start + 500]
        w.write(
            http_head(
                "206 Partial Content",
                {"Content-Range": f"bytes {start}-{end}/{size}", "Content-Length": str(len(body))},
            )
            + body
        )
        await w.drain()
        await origin.wait_for_close(reader)

    async with RawOrigin(short) as origin:
        client = await make_client(cdn_url=origin.url)
        resp = await client.get(
            play_path(playable, mode="proxy"), headers={**bearer(), "Range": "bytes=0-1999"}
        )
        assert resp.status == 206
        body, error = await read_until_broken(resp)
        assert error is not None
        assert body == data[: len(body)] and len(body) < 2000
    assert upstream_errors(client, "mid_body") == 1


async def test_origin_failing_on_a_later_part_breaks_the_multipart_body(
    make_client: MakeClient, playable: dict[str, Any], mp3: RenditionFile
) -> None:
    data = mp3.path.read_bytes()
    size = len(data)

    async def second_part_fails(
        n: int, reader: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        while True:
            _, headers = await origin.read_request(reader)
            start, end = asked_range(headers, size)
            if start == 0:
                body = data[start : end + 1]
                w.write(
                    http_head(
                        "206 Partial Content",
                        {
                            "Content-Range": f"bytes {start}-{end}/{size}",
                            "Content-Length": str(len(body)),
                        },
                    )
                    + body
                )
            else:
                w.write(http_head("500 Internal Server Error", {"Content-Length": "0"}))
            await w.drain()

    async with RawOrigin(second_part_fails) as origin:
        client = await make_client(cdn_url=origin.url)
        resp = await client.get(
            play_path(playable, mode="proxy"),
            headers={**bearer(), "Range": "bytes=0-99,1000-1099"},
        )
        assert resp.status == 206
        body, error = await read_until_broken(resp)
        assert error is not None, "a multipart body missing a part looked complete"
        assert len(body) < int(resp.headers["Content-Length"])
    assert [h.get("Range") for _, h in origin.requests] == ["bytes=0-99", "bytes=1000-1099"]
    assert upstream_errors(client, "status") == 1
    assert upstream_errors(client, "mid_body") == 1


# -- 4: clients that go away -------------------------------------------------------------------

BIG = 64 * 1024 * 1024  # what the catalog says the rendition weighs: far more than any buffer
BLOCK = bytes(range(256)) * 16  # 4 KiB


class PacedOrigin:
    """Streams a big object 4 KiB per write; after `burst` bytes it waits for `resume`. Records
    whether Edge closed the response before it was complete."""

    def __init__(self, burst: int = 16 * 1024) -> None:
        self.burst = burst
        self.paused = asyncio.Event()
        self.resume = asyncio.Event()
        self.aborted = asyncio.Event()
        self.completed = asyncio.Event()
        self.sent = 0
        app = web.Application()
        app.router.add_get("/{key:.+}", self._handle)
        self.server = TestServer(app, host="127.0.0.1")

    @property
    def url(self) -> str:
        return str(self.server.make_url("/")).rstrip("/")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", request.headers.get("Range", ""))
        assert m, request.headers.get("Range")
        start, end = int(m.group(1)), int(m.group(2))
        resp = web.StreamResponse(
            status=206, headers={"Content-Range": f"bytes {start}-{end}/{BIG}"}
        )
        resp.content_length = end - start + 1
        await resp.prepare(request)
        try:
            while self.sent < end - start + 1:
                if self.sent >= self.burst and not self.resume.is_set():
                    self.paused.set()
                    await self.resume.wait()
                await resp.write(BLOCK)
                self.sent += len(BLOCK)
        except (ConnectionError, asyncio.CancelledError):
            self.aborted.set()
            raise asyncio.CancelledError from None
        self.completed.set()
        return resp


async def make_big(db: asyncpg.Connection, f: RenditionFile) -> None:
    await db.execute("UPDATE renditions SET bytes = $1 WHERE object_key = $2", BIG, f.object_key)


class EdgeAsServed:
    """Edge run the way `edge serve` runs it (the same runner, `edge.cli.make_runner`), on a
    real port, with a client session of its own."""

    def __init__(self, settings: Settings) -> None:
        self.app = create_app(settings)
        self.runner = make_runner(self.app)
        self.session: aiohttp.ClientSession | None = None
        self.base = ""

    async def __aenter__(self) -> EdgeAsServed:
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.base = f"http://127.0.0.1:{port}"
        self.session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.session is not None
        await self.session.close()
        await self.runner.cleanup()

    def get(self, path: str, **kwargs: Any) -> Any:
        assert self.session is not None
        return self.session.get(self.base + path, **kwargs)


async def _disconnect_mid_stream(
    get: Callable[..., Any],
    metrics_of: Callable[[], Any],
    path: str,
    origin: PacedOrigin,
    origin_resumes: bool,
) -> None:
    resp = await get(path, headers={**bearer(), "Range": "bytes=0-"})
    assert resp.status == 206
    assert int(resp.headers["Content-Length"]) == BIG
    # Everything the origin sent so far reaches the player: Edge is now waiting on the origin,
    # not on the player.
    await asyncio.wait_for(origin.paused.wait(), 10)
    first = await resp.content.readexactly(origin.burst)
    assert first == BLOCK * (origin.burst // len(BLOCK))
    resp.close()  # the player goes away
    if origin_resumes:
        origin.resume.set()
    try:
        # Edge closes the origin response long before its 64 MiB are through (with a silent
        # origin, on its own: upstream_read_timeout is a minute away).
        await asyncio.wait_for(origin.aborted.wait(), 10)
    finally:
        origin.resume.set()  # let a stuck Edge find out on its next write, and the test end
    assert not origin.completed.is_set()
    assert origin.sent < BIG
    registry = metrics_of()
    await eventually(
        lambda: (
            (registry.get_sample_value("edge_client_disconnects_total", {"route": "play"}) or 0)
            >= 1
        )
    )
    assert registry.get_sample_value("edge_client_disconnects_total", {"route": "play"}) == 1
    # A player hanging up is not a server error: it must not count as a 500 (error-rate alerts).
    labels = {"route": "play", "method": "GET", "status": "500"}
    assert (registry.get_sample_value("edge_http_requests_total", labels) or 0) == 0


@pytest.mark.parametrize("origin_resumes", [True, False], ids=["origin-streaming", "origin-silent"])
async def test_client_disconnect_cancels_upstream(
    origin_resumes: bool,
    make_client: MakeClient,
    playable: dict[str, Any],
    db: asyncpg.Connection,
    mp3: RenditionFile,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """aiohttp's TestServer (handler cancellation on client disconnect)."""
    await make_big(db, mp3)
    origin = PacedOrigin()
    async with running(origin.server):
        client = await make_client(cdn_url=origin.url, upstream_read_timeout=60.0)
        await _disconnect_mid_stream(
            client.get,
            lambda: client.app[keys.METRICS].registry,
            play_path(playable, mode="proxy"),
            origin,
            origin_resumes,
        )
    assert tracebacks(caplog) == []
    assert errors_logged(caplog) == []


@pytest.mark.parametrize("origin_resumes", [True, False], ids=["origin-streaming", "origin-silent"])
async def test_client_disconnect_cancels_upstream_as_served(
    origin_resumes: bool,
    settings: Settings,
    playable: dict[str, Any],
    db: asyncpg.Connection,
    mp3: RenditionFile,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same, with Edge run as `edge serve` runs it: Edge must notice the player is gone,
    even while the origin has nothing to send."""
    await make_big(db, mp3)
    origin = PacedOrigin()
    async with running(origin.server):
        async with EdgeAsServed(
            settings.with_(cdn_url=origin.url, upstream_read_timeout=60.0)
        ) as edge:
            await _disconnect_mid_stream(
                edge.get,
                lambda: edge.app[keys.METRICS].registry,
                play_path(playable, mode="proxy"),
                origin,
                origin_resumes,
            )
    assert tracebacks(caplog) == []
    assert errors_logged(caplog) == []


async def test_client_disconnect_from_local_origin_proxy(
    make_client: MakeClient,
    playable: dict[str, Any],
    mp3: RenditionFile,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Proxying Edge's own /media: a player leaving early is counted and leaves no traceback."""
    client = await make_client()
    resp = await client.get(play_path(playable, mode="proxy"), headers=bearer())
    assert resp.status == 200
    first = await resp.content.readexactly(1024)
    assert first == mp3.path.read_bytes()[:1024]
    resp.close()
    # The file is small enough to sit in socket buffers: Edge may finish before noticing. What
    # must never happen is a traceback or an error.
    await eventually(lambda: requests_done(client, "play") >= 1)
    assert tracebacks(caplog) == []
    assert errors_logged(caplog) == []
    assert upstream_errors(client, "mid_body") == 0


# -- 5: a real player decodes it ---------------------------------------------------------------


def decoded_samples(source: Any) -> tuple[int, int]:
    """(samples per channel, sample rate) that FFmpeg decodes from a path, file object or URL."""
    with av.open(source, timeout=30) as container:
        stream = container.streams.audio[0]
        total = sum(frame.samples for frame in container.decode(stream))
        return total, stream.rate


@pytest.mark.parametrize("fmt", ["mp3", "aac", "flac"])
async def test_a_real_decoder_plays_proxy_and_local_origin(
    fmt: str, make_client: MakeClient, playable: dict[str, Any]
) -> None:
    f = rendition(playable, fmt, "shoot")
    data = f.path.read_bytes()
    expected = await asyncio.to_thread(decoded_samples, str(f.path))
    assert expected[0] > 44100  # a few seconds of audio, really decoded

    client = await make_client()
    tier = PICKS[fmt][2]
    headers = bearer("listener", tier)
    proxied = await client.get(play_path(playable, fmt, "shoot", mode="proxy"), headers=headers)
    assert proxied.status == 200
    assert proxied.headers["X-Stream-Format"] == fmt
    assert proxied.headers["Content-Type"] == f.spec.content_type
    body = await proxied.read()
    assert body == data
    assert await asyncio.to_thread(decoded_samples, io.BytesIO(body)) == expected

    redirect = await client.get(
        play_path(playable, fmt, "shoot"), headers=headers, allow_redirects=False
    )
    assert redirect.status == 302
    local = await client.get(redirect.headers["Location"])
    assert local.status == 200
    assert local.headers["Content-Type"] == f.spec.content_type
    body = await local.read()
    assert body == data
    assert await asyncio.to_thread(decoded_samples, io.BytesIO(body)) == expected

    # FFmpeg's own HTTP client on live URLs: it sends its own Range requests (and, for MP4,
    # seeks), and follows the redirect to the signed local-origin URL.
    token = issue(JWT_SECRET, "ffmpeg-listener", tier)  # type: ignore[arg-type]
    base = str(client.make_url("")).rstrip("/")
    for mode in ("proxy", "redirect"):
        url = base + play_path(playable, fmt, "shoot", mode=mode, token=token)
        assert await asyncio.to_thread(decoded_samples, url) == expected, mode
        # And the ffmpeg command itself (.ci/run installs it), decoding the whole track.
        proc = await asyncio.create_subprocess_exec(
            "ffmpeg",
            "-v",
            "error",
            "-xerror",
            "-i",
            url,
            "-f",
            "s16le",
            "-",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err
        assert not err, err
        channels = len(out) // 2 // expected[0]
        assert channels in (1, 2) and len(out) == expected[0] * channels * 2, (len(out), mode)
