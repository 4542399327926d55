"""The local media origin, `GET|HEAD /media/{key}`: the same RFC 9110 range cases as proxy mode
(shared with test_proxy.py), and its security: signed and expiring URLs, and no way out of the
media folder (dot segments, encoded slashes and dots, NULs, absolute paths, symlinks).

Path attacks go over a raw socket, so the request target reaches Edge exactly as written (an
HTTP client library would normalise `..` away before sending). Each one carries a valid
signature for its exact path: the folder check itself must hold, not just the signature.
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import hmac
import os
import socket
import sys
import termios
import threading
import time
from collections.abc import Iterator
from hashlib import sha256
from pathlib import Path
from typing import Any

import orjson
import pytest

from edge import keys
from edge.ingest import RenditionFile
from edge.settings import Settings
from edge.signing import LocalSigner, cloudfront_b64encode
from edge.views import media as media_view
from tests.conftest import bearer
from tests.integration.test_proxy import (
    HEAD_CASES,
    RANGE_CASES,
    Case,
    Client,
    MakeClient,
    Target,
    eventually,
    play_path,
    rendition,
    run_case,
    run_head_case,
    sample,
    tracebacks,
)

SECRET = b"TOP-SECRET: not audio, and not under the media folder\n" * 4


async def media_target(make_client: MakeClient, playable: dict[str, Any]) -> Target:
    """The local origin, at the signed URL a redirect-mode /play hands out."""
    f = rendition(playable, "mp3")
    client = await make_client()
    resp = await client.get(play_path(playable), headers=bearer(), allow_redirects=False)
    assert resp.status == 302
    location = resp.headers["Location"]
    assert location.startswith("/media/" + f.object_key + "?")
    return Target("media", client, location, {}, f, f.path.read_bytes())


@pytest.mark.parametrize("case", RANGE_CASES, ids=[c.id for c in RANGE_CASES])
async def test_range(case: Case, make_client: MakeClient, playable: dict[str, Any]) -> None:
    await run_case(await media_target(make_client, playable), case)


@pytest.mark.parametrize("case", HEAD_CASES, ids=[c.id for c in HEAD_CASES])
async def test_head(case: Case, make_client: MakeClient, playable: dict[str, Any]) -> None:
    await run_head_case(await media_target(make_client, playable), case)


# -- raw requests ------------------------------------------------------------------------------


class Raw:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def error_code(self) -> str:
        assert self.headers.get("content-type", "").startswith("application/json"), self.headers
        doc = orjson.loads(self.body)
        assert set(doc) == {"error"} and isinstance(doc["error"]["message"], str)
        return str(doc["error"]["code"])


async def raw_request(client: Client, target: str, method: str = "GET", **headers: str) -> Raw:
    """One HTTP/1.1 request with the request target sent byte for byte as given."""
    host, port = "127.0.0.1", client.server.port
    reader, writer = await asyncio.open_connection(host, port)
    try:
        lines = [f"{method} {target} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
        lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    if "content-length" in parsed and method != "HEAD":
        assert len(body) == int(parsed["content-length"])
    return Raw(int(status_line.split(" ")[1]), parsed, body)


def sign(client: Client, raw_path: str, expires: int | None = None) -> str:
    """A valid signature for exactly this raw path, from Edge's own local signer; for paths
    it will not sign (raw characters a URL must not carry), the same HMAC computed here."""
    expires = int(time.time()) + 600 if expires is None else expires
    try:
        return client.app[keys.LOCAL_SIGNER].sign(raw_path, expires)
    except ValueError:
        secret = str(client.app[keys.SETTINGS].media_secret).encode()
        mac = hmac.new(secret, f"{raw_path}\n{expires}".encode(), sha256).digest()
        return (
            f"{raw_path}?Expires={expires}&Signature={cloudfront_b64encode(mac)}&Key-Pair-Id=local"
        )


def assert_refused(resp: Raw, *forbidden: bytes) -> None:
    assert 400 <= resp.status < 500, (resp.status, resp.body[:200])
    for content in forbidden:
        assert content[:64] not in resp.body


@pytest.fixture
def outside(settings: Settings) -> Path:
    """A file next to (not in) the media folder: data/secret.mp3 beside data/media/. It really
    is there, so a refusal is never just a 404 by luck."""
    settings.media_root.mkdir(parents=True, exist_ok=True)
    path = settings.media_root.parent / "secret.mp3"
    path.write_bytes(SECRET)
    return path


@pytest.fixture
def mp3(playable: dict[str, Any]) -> RenditionFile:
    return rendition(playable, "mp3")


# -- signatures --------------------------------------------------------------------------------


async def test_signed_url_serves_the_file(
    make_client: MakeClient, playable: dict[str, Any], mp3: RenditionFile
) -> None:
    client = await make_client()
    resp = await raw_request(client, sign(client, f"/media/{mp3.object_key}"))
    assert resp.status == 200
    assert resp.body == mp3.path.read_bytes()
    assert resp.headers["content-type"] == "audio/mpeg"
    assert resp.headers["etag"] == f'"{mp3.etag}"'


@pytest.mark.parametrize(
    "query",
    ["", "?Expires=9999999999", "?Signature=abc", "?Expires=&Signature=&Key-Pair-Id=local"],
    ids=["none", "expires-only", "signature-only", "empty"],
)
async def test_unsigned_is_403(
    query: str, make_client: MakeClient, playable: dict[str, Any], mp3: RenditionFile
) -> None:
    client = await make_client()
    for method in ("GET", "HEAD"):
        resp = await raw_request(client, f"/media/{mp3.object_key}{query}", method)
        assert resp.status == 403
        if method == "GET":
            assert resp.error_code() == "bad_signature"
            assert mp3.path.read_bytes()[:64] not in resp.body
    assert sample(client, "edge_errors_total", code="bad_signature") >= 1


async def test_expired_signature_is_403(
    make_client: MakeClient, playable: dict[str, Any], mp3: RenditionFile
) -> None:
    client = await make_client()
    resp = await raw_request(client, sign(client, f"/media/{mp3.object_key}", int(time.time()) - 1))
    assert resp.status == 403
    assert resp.error_code() == "bad_signature"
    assert "expired" in orjson.loads(resp.body)["error"]["message"]


async def test_tampered_urls_are_403(
    make_client: MakeClient, playable: dict[str, Any], mp3: RenditionFile
) -> None:
    client = await make_client()
    other = rendition(playable, "aac")
    good = sign(client, f"/media/{mp3.object_key}")
    _, _, query = good.partition("?")
    params = dict(p.split("=", 1) for p in query.split("&"))
    signature, expires = params["Signature"], params["Expires"]
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    attempts = {
        "other-key": f"/media/{other.object_key}?{query}",
        "key-prefix": f"/media/{mp3.object_key}x?{query}",
        "later-expiry": good.replace(f"Expires={expires}", f"Expires={int(expires) + 3600}"),
        "signature-changed": good.replace(signature, flipped),
        "signature-truncated": good.replace(signature, signature[:-2]),
        "upper-cased-key": f"/media/{mp3.object_key.upper()}?{query}",
        "other-secret": LocalSigner(b"someone-else-entirely-0123456789").sign(
            f"/media/{mp3.object_key}", int(expires)
        ),
    }
    for name, url in attempts.items():
        resp = await raw_request(client, url)
        assert resp.status == 403, name
        assert resp.error_code() == "bad_signature", name
    assert (await raw_request(client, good)).status == 200


async def test_unknown_key_with_a_valid_signature_is_404(
    make_client: MakeClient, playable: dict[str, Any], mp3: RenditionFile
) -> None:
    client = await make_client()
    directory = mp3.object_key.rsplit("/", 1)[0]
    for key in (f"{directory}/nothing-here.mp3", "nope/nope.mp3", directory):
        resp = await raw_request(client, sign(client, f"/media/{key}"))
        assert resp.status == 404, key
        assert resp.error_code() == "not_found"


async def test_head_works(
    make_client: MakeClient, playable: dict[str, Any], mp3: RenditionFile
) -> None:
    client = await make_client()
    url = sign(client, f"/media/{mp3.object_key}")
    get = await raw_request(client, url)
    head = await raw_request(client, url, "HEAD")
    assert head.status == 200, head.body
    assert head.body == b""
    for name in ("content-length", "content-type", "etag", "last-modified", "accept-ranges"):
        assert head.headers.get(name) == get.headers.get(name), name
    assert head.headers["content-length"] == str(mp3.bytes)
    ranged = await raw_request(client, url, "HEAD", Range="bytes=10-19")
    assert ranged.status == 206
    assert ranged.headers["content-range"] == f"bytes 10-19/{mp3.bytes}"
    assert ranged.headers["content-length"] == "10"
    assert ranged.body == b""


# -- no way out of the folder ------------------------------------------------------------------

ESCAPES = [
    # (id, raw path) relative to the server root; data/secret.mp3 sits beside data/media/
    ("dot-dot", "/media/../secret.mp3"),
    ("dot-dot-nested", "/media/t/0/../../../secret.mp3"),
    ("dot-dot-inside", "/media/t/../t/0/mp3-320.mp3"),
    ("encoded-dot-dot", "/media/%2e%2e/secret.mp3"),
    ("encoded-dot-dot-upper", "/media/%2E%2E/secret.mp3"),
    ("half-encoded-dot-dot", "/media/.%2e/secret.mp3"),
    ("double-encoded-dot-dot", "/media/%252e%252e/secret.mp3"),
    ("overlong-utf8-dot-dot", "/media/%c0%ae%c0%ae/secret.mp3"),
    ("encoded-slash", "/media/..%2fsecret.mp3"),
    ("encoded-slash-upper", "/media/..%2Fsecret.mp3"),
    ("encoded-slash-inside", "/media/t%2F0%2Fmp3-320.mp3"),
    ("encoded-backslash", "/media/..%5csecret.mp3"),
    ("backslash", "/media/..\\secret.mp3"),
    ("nul", "/media/t/0/mp3-320.mp3%00"),
    ("nul-then-suffix", "/media/t/0/mp3-320.mp3%00.txt"),
    ("nul-in-dir", "/media/t%00/0/mp3-320.mp3"),
    ("absolute", "/media//etc/passwd"),
    ("absolute-to-secret", "/media/{secret_abs}"),  # "/media/" + "/abs/path/secret.mp3"
    ("absolute-encoded", "/media/%2Fetc%2Fpasswd"),
    ("home-tilde", "/media/~/secret.mp3"),
    ("dot-segment", "/media/./t/0/mp3-320.mp3"),
    ("trailing-dot-dot", "/media/t/0/mp3-320.mp3/.."),
]


@pytest.mark.parametrize("raw_path", [p for _, p in ESCAPES], ids=[i for i, _ in ESCAPES])
async def test_path_escapes_are_refused(
    raw_path: str,
    make_client: MakeClient,
    playable: dict[str, Any],
    outside: Path,
    mp3: RenditionFile,
) -> None:
    client = await make_client()
    raw_path = raw_path.replace("{secret_abs}", str(outside))
    # Attacks on files inside the folder too: the key must be the object key, nothing else.
    for method in ("GET", "HEAD"):
        resp = await raw_request(client, sign(client, raw_path), method)
        assert_refused(resp, SECRET, mp3.path.read_bytes(), b"root:x:0:0")


async def test_raw_nul_in_request_target_is_refused(
    make_client: MakeClient, playable: dict[str, Any], mp3: RenditionFile
) -> None:
    client = await make_client()
    resp = await raw_request(client, f"/media/{mp3.object_key}\x00.txt")
    assert_refused(resp, mp3.path.read_bytes())


@pytest.mark.parametrize("where", ["outside-file", "outside-dir", "inside-file", "inside-dir"])
async def test_symlinks_are_refused(
    where: str,
    make_client: MakeClient,
    playable: dict[str, Any],
    settings: Settings,
    outside: Path,
    mp3: RenditionFile,
) -> None:
    root = settings.media_root
    real_dir = mp3.path.parent
    inside = root / mp3.object_key
    if where == "outside-file":
        (root / "evil.mp3").symlink_to(outside)
        key, content = "evil.mp3", SECRET
    elif where == "outside-dir":
        (root / "evil").symlink_to(outside.parent)
        key, content = "evil/secret.mp3", SECRET
    elif where == "inside-file":
        (root / "alias.mp3").symlink_to(inside)
        key, content = "alias.mp3", inside.read_bytes()
    else:
        (root / "alias").symlink_to(inside.parent)
        key, content = f"alias/{inside.name}", inside.read_bytes()
    assert (root / key).read_bytes() == content  # the link works on the file system
    assert real_dir.exists()
    client = await make_client()
    for method in ("GET", "HEAD"):
        resp = await raw_request(client, sign(client, f"/media/{key}"), method)
        assert_refused(resp, content)
    # The real object is still served.
    assert (await raw_request(client, sign(client, f"/media/{mp3.object_key}"))).status == 200


def test_a_directory_swapped_for_a_link_during_the_open_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race a check before the open would lose: the real file system, changed at the last
    moment before open(2) runs."""
    root, outside = tmp_path / "media", tmp_path / "outside"
    (root / "album").mkdir(parents=True)
    (root / "album" / "t.mp3").write_bytes(b"inside")
    outside.mkdir()
    (outside / "t.mp3").write_bytes(SECRET)
    real_open = os.open

    def racing_open(path: Any, flags: int, *args: Any) -> int:
        if str(path) == str(root / "album" / "t.mp3"):  # the check, if any, has been made
            (root / "album").rename(tmp_path / "moved")
            (root / "album").symlink_to(outside)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", racing_open)
    with pytest.raises(FileNotFoundError):
        media_view._open_regular(root, root / "album" / "t.mp3")
    monkeypatch.undo()
    assert (root / "album" / "t.mp3").read_bytes() == SECRET  # the link did lead outside
    assert open_fds_to(outside / "t.mp3") == 0  # and what was opened is closed


@pytest.mark.parametrize("proc_fd", [True, False], ids=["proc-fd", "checked-first"])
def test_the_opener_serves_regular_files_under_the_folder_only(
    proc_fd: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both ways of opening (Linux's, through /proc; elsewhere, the check before the open)
    refuse the same things."""
    monkeypatch.setattr(media_view, "_PROC_FD", proc_fd)
    root, outside = tmp_path / "media", tmp_path / "outside"
    (root / "album").mkdir(parents=True)
    outside.mkdir()
    (root / "album" / "t.mp3").write_bytes(b"inside")
    (outside / "t.mp3").write_bytes(SECRET)
    (root / "file-link.mp3").symlink_to(outside / "t.mp3")
    (root / "dir-link").symlink_to(outside)
    (root / "inside-link.mp3").symlink_to(root / "album" / "t.mp3")
    os.mkfifo(root / "fifo.mp3")
    (root / "dir.mp3").mkdir()
    media = media_view._open_regular(root, root / "album" / "t.mp3")
    assert os.pread(media.fd, 100, 0) == b"inside" and media.st.st_size == 6
    media.close()
    for name in (
        "file-link.mp3",
        "dir-link/t.mp3",
        "inside-link.mp3",
        "fifo.mp3",
        "dir.mp3",
        "missing.mp3",
        "album/t.mp3/x",
        "x" * 300 + ".mp3",  # longer than a file name can be
    ):
        with pytest.raises(FileNotFoundError):
            media_view._open_regular(root, root / name)
    assert open_fds_to(outside / "t.mp3") == 0 and open_fds_to(root / "album" / "t.mp3") == 0


def test_a_media_folder_behind_a_link_that_moves_to_another_release(tmp_path: Path) -> None:
    releases = [tmp_path / "r1", tmp_path / "r2"]
    for n, release in enumerate(releases):
        release.mkdir()
        (release / "t.mp3").write_bytes(f"release {n}".encode())
    current = tmp_path / "current"
    current.symlink_to(releases[0])
    media = media_view._open_regular(current, current / "t.mp3")
    assert os.pread(media.fd, 100, 0) == b"release 0"
    media.close()
    # The new release links back into the old one; the first request after the move goes
    # through that link, and must not match what the folder was before.
    (releases[1] / "album").symlink_to(releases[0] / "album")
    (releases[0] / "album").mkdir()
    (releases[0] / "album" / "old.mp3").write_bytes(b"old release")
    swap = tmp_path / "current.new"  # (moved as a deployment does: a new link renamed over)
    swap.symlink_to(releases[1])
    swap.rename(current)
    with pytest.raises(FileNotFoundError):
        media_view._open_regular(current, current / "album" / "old.mp3")
    media = media_view._open_regular(current, current / "t.mp3")
    assert os.pread(media.fd, 100, 0) == b"release 1"
    media.close()


# -- clients that go away ----------------------------------------------------------------------


def open_fds_to(path: Path) -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                count += 1
        except OSError:
            continue
    return count


class ReadPath:
    def __init__(self, name: str) -> None:
        self.name = name
        self.thread_reads = 0
        self.sendfile_bytes = 0


@pytest.fixture(params=["sendfile", "page-cache", "threads"])
def read_path(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ReadPath]:
    """The three ways /media sends a file: sendfile(2) of what the page cache holds; reads in
    the event loop from the page cache (RWF_NOWAIT), written as chunks, where sendfile is off;
    and reads in worker threads, which is where every read goes when the page cache is
    refused. Bytes sent by sendfile and reads in threads are counted; the files the tests have
    just written are in the page cache."""
    path = ReadPath(str(request.param))
    if path.name != "sendfile":
        monkeypatch.setattr(media_view, "_page_cache", None)
    if path.name == "threads":
        monkeypatch.setattr(media_view, "_nowait", False)
    pread, send_cached = media_view._pread, media_view._send_cached

    def counted(fd: int, size: int, offset: int) -> bytes:
        path.thread_reads += 1
        return pread(fd, size, offset)

    def counted_sendfile(out: int, fd: int, offset: int, count: int) -> int:
        sent = send_cached(out, fd, offset, count)
        path.sendfile_bytes += sent
        return sent

    monkeypatch.setattr(media_view, "_pread", counted)
    monkeypatch.setattr(media_view, "_send_cached", counted_sendfile)
    yield path
    if path.name == "sendfile":
        assert media_view._page_cache is not None, "sendfile was refused here: it is untested"
        assert path.sendfile_bytes > 0
    elif path.name == "page-cache":
        assert media_view._nowait, "RWF_NOWAIT was refused here: the page-cache path is untested"
        assert path.sendfile_bytes == 0
    else:
        assert path.thread_reads > 0 and path.sendfile_bytes == 0


async def test_clients_leaving_early_leave_no_open_files(
    read_path: ReadPath,
    make_client: MakeClient,
    playable: dict[str, Any],
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Players that hang up at any moment (right after the headers, or a few KiB in) must not
    leave a file open behind them, nor a traceback. With reads in threads, a read still
    running when its player leaves closes the file once it is done."""
    big = settings.media_root / "big" / "long.flac"
    big.parent.mkdir(parents=True)
    big.write_bytes(os.urandom(1 << 20) * 16)  # 16 MiB: far more than socket buffers hold
    client = await make_client()
    url = sign(client, "/media/big/long.flac")
    rounds = 300
    for n in range(rounds):
        reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
        writer.write(f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
        if n % 10 == 9:
            await reader.readexactly(4096)
        writer.transport.abort()  # hang up (RST), as a player skipping a track does

    def requests() -> float:
        return sum(
            sample(client, "edge_http_requests_total", route="media", method="GET", status=s)
            for s in ("200", "499", "500")
        )

    await eventually(lambda: requests() >= rounds)
    # A player hanging up is 499 (client closed), never a server error.
    assert (
        sample(client, "edge_http_requests_total", route="media", method="GET", status="500") == 0
    )
    # A player gone is counted as one, never as a failed read of the file.
    assert sample(client, "edge_upstream_errors_total", source="media", kind="read") == 0
    await eventually(lambda: open_fds_to(big) == 0)  # (a read in a thread closes when done)
    gc.collect()  # a file object dropped unclosed would warn here (ResourceWarning -> error)
    assert open_fds_to(big) == 0
    assert tracebacks(caplog) == []


async def test_every_read_path_serves_the_exact_bytes(
    read_path: ReadPath, make_client: MakeClient, settings: Settings
) -> None:
    """Whole files, single ranges and several ranges, read in the event loop or in threads,
    across many read-sized pieces and their edges."""
    data = os.urandom(5 * media_view.CHUNK + 123)
    path = settings.media_root / "exact" / "bytes.mp3"
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    client = await make_client()
    url = sign(client, "/media/exact/bytes.mp3")
    assert (await raw_request(client, url)).body == data
    for first, last in ((0, 0), (1, media_view.CHUNK), (media_view.CHUNK - 1, len(data) - 1)):
        resp = await raw_request(client, url, Range=f"bytes={first}-{last}")
        assert resp.status == 206 and resp.body == data[first : last + 1]
    resp = await raw_request(client, url, Range="bytes=0-9,70000-70009")
    assert resp.status == 206 and data[:10] in resp.body and data[70000:70010] in resp.body
    if read_path.name != "threads":
        assert read_path.thread_reads == 0  # a file just written is all in the page cache


@pytest.mark.parametrize("sendfile", [True, False], ids=["sendfile", "chunks"])
async def test_a_slow_player_s_backlog_waits_in_the_kernel_not_here(
    sendfile: bool, make_client: MakeClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/media sends a file's next bytes (by sendfile or as a chunk read) only once the kernel
    has taken the last ones: the file keeps what the player has not taken, so a slow player's
    stream holds no unsent bytes in this process when it goes on (a thousand of them held
    16 KiB each before, bench/PLAY_RESULTS.md)."""
    if not sendfile:
        monkeypatch.setattr(media_view, "_page_cache", None)
    big = settings.media_root / "slow" / "long.flac"
    big.parent.mkdir(parents=True)
    big.write_bytes(os.urandom(1 << 20) * 4)
    client = await make_client()
    server = client.server.runner.server
    assert server is not None
    unsent: list[int] = []  # the players' unsent bytes in Edge, each time the stream goes on
    queued: list[int] = []  # and those in the kernel's socket buffers
    sendfiles = reads = 0

    def record() -> None:
        for handler in server.connections:
            transport = handler.transport
            if transport is not None:
                unsent.append(transport.get_write_buffer_size())
                sock = transport.get_extra_info("socket")
                outq = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4)
                queued.append(int.from_bytes(outq, sys.byteorder))

    read_cached, send_cached = media_view._read_cached, media_view._send_cached

    def recorded_read(fd: int, size: int, offset: int) -> Any:
        nonlocal reads
        reads += 1
        record()
        return read_cached(fd, size, offset)

    def recorded_sendfile(out: int, fd: int, offset: int, count: int) -> int:
        nonlocal sendfiles
        sendfiles += 1
        record()
        return send_cached(out, fd, offset, count)

    monkeypatch.setattr(media_view, "_read_cached", recorded_read)
    monkeypatch.setattr(media_view, "_send_cached", recorded_sendfile)
    player = socket.socket()
    player.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    player.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(player, ("127.0.0.1", client.server.port))
    url = sign(client, "/media/slow/long.flac")
    await loop.sock_sendall(player, f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    received = 0
    while received < (4 << 20) and (chunk := await loop.sock_recv(player, 2048)):
        received += len(chunk)
    player.close()
    assert received >= 4 << 20
    assert (sendfiles > 0) is sendfile
    # Chunks carry the stream where sendfile cannot, and with sendfile on they are what waits
    # for a full socket to drain: each is read only once nothing is left unsent. (Sendfile
    # itself is tried only then, by construction.)
    assert reads > 0
    assert max(unsent) == 0
    assert max(queued) >= media_view.CHUNK  # the player really was slower than the file


async def test_a_file_is_closed_only_after_the_read_running_in_its_thread(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A stream cancelled while its read runs in a worker thread: the descriptor stays open
    until that read returns (closed under it, its number could be reused by another file and
    the read would return that file's bytes), and is closed right after."""
    monkeypatch.setattr(media_view, "_nowait", False)
    in_read, release = threading.Event(), threading.Event()
    pread = media_view._pread

    def slow_pread(fd: int, size: int, offset: int) -> bytes:
        in_read.set()
        release.wait(10)
        return pread(fd, size, offset)

    monkeypatch.setattr(media_view, "_pread", slow_pread)
    path = tmp_path / "track.mp3"
    path.write_bytes(os.urandom(100_000))
    media = await media_view.open_media(tmp_path, path)
    reading = asyncio.ensure_future(media.read(media_view.CHUNK, 0))
    assert await asyncio.to_thread(in_read.wait, 10)
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    media.close()
    assert open_fds_to(path) == 1  # still open: the thread is reading from it
    release.set()
    await eventually(lambda: open_fds_to(path) == 0)


async def test_what_is_not_a_regular_file_is_404_at_once(
    make_client: MakeClient, settings: Settings
) -> None:
    """A FIFO (whose open would wait for a writer), a socket and a directory in the media
    folder are not media: 404, and the process goes on serving."""
    folder = settings.media_root / "odd"
    folder.mkdir(parents=True)
    os.mkfifo(folder / "fifo.mp3")
    server = await asyncio.start_unix_server(lambda r, w: None, path=str(folder / "sock.mp3"))
    (folder / "dir.mp3").mkdir()
    client = await make_client()
    try:
        for name in ("fifo.mp3", "sock.mp3", "dir.mp3"):
            resp = await raw_request(client, sign(client, f"/media/odd/{name}"))
            assert resp.status == 404, name
            assert resp.error_code() == "not_found"
    finally:
        server.close()
        await server.wait_closed()
    assert (await client.get("/healthz")).status == 200


@pytest.mark.parametrize("route", ["media", "proxy"])
@pytest.mark.parametrize("kernel_unsent", [96 * 1024, 0], ids=["set", "system"])
async def test_streams_ask_the_kernel_to_keep_little_unsent(
    route: str, kernel_unsent: int, make_client: MakeClient, playable: dict[str, Any]
) -> None:
    """/media and proxy mode's /play set EDGE_STREAM_KERNEL_UNSENT on the connection they
    stream to (TCP_NOTSENT_LOWAT; streaming.send's effect is tested in test_backpressure);
    0 leaves the system's setting. In proxy mode from the own origin, both of Edge's ends of
    the stream (the player's connection and /media's) have it."""
    client = await make_client(stream_kernel_unsent=kernel_unsent)
    server = client.server.runner.server
    assert server is not None
    if route == "media":
        url = sign(client, "/media/" + rendition(playable, "mp3").object_key)
        resp = await client.get(url)
    else:
        resp = await client.get(play_path(playable, mode="proxy"), headers=bearer())
    assert resp.status == 200
    assert await resp.read() == rendition(playable, "mp3").path.read_bytes()
    connections = list(server.connections)  # (kept alive: the player's, and the proxy's)
    assert len(connections) == (1 if route == "media" else 2)
    for handler in connections:
        assert handler.transport is not None
        sock = handler.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == kernel_unsent
