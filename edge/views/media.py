"""`GET|HEAD /media/{key}`: the local origin of the zero-config default and the tests.

It behaves like the CDN it stands in for: a signed, expiring URL (HMAC with an Edge secret),
RFC 9110 ranges, strong ETags (the MD5 of the file, as S3 reports), and no way out of the media
folder: no `..`, no encoded slashes or NULs, no symlinks. Bytes the page cache holds go to the
client by sendfile(2); the rest are read without blocking the event loop (_FileRange).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import errno
import hashlib
import mimetypes
import mmap
import os
import re
import stat
import time
from collections import OrderedDict
from datetime import UTC, datetime
from email.utils import formatdate
from pathlib import Path

import structlog
from aiohttp import web

from edge import keys
from edge.errors import ApiError
from edge.ranges import ByteRange, resolve
from edge.streaming import Chunk, ClientSink, Representation, Source, head_response, send

log = structlog.get_logger(__name__)
routes = web.RouteTableDef()

_SAFE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")
_TYPES = {".mp3": "audio/mpeg", ".m4a": "audio/mp4", ".flac": "audio/flac"}


class Etags:
    """MD5 per (path, size, mtime): hashed once in a worker thread, then remembered."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._known: OrderedDict[tuple[str, int, int], str] = OrderedDict()

    async def get(self, path: Path, st: os.stat_result) -> str:
        key = (str(path), st.st_size, st.st_mtime_ns)
        found = self._known.get(key)
        if found is None:
            found = '"' + await asyncio.to_thread(_md5, path) + '"'
            self._known[key] = found
            while len(self._known) > self.size:
                self._known.popitem(last=False)
        return found


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


ETAGS = web.AppKey("media_etags", Etags)


def _safe_path(request: web.Request, root: Path) -> Path:
    raw = request.raw_path.split("?", 1)[0].lower()
    if "%2f" in raw or "%5c" in raw or "%00" in raw or "\x00" in raw:
        raise ApiError(400, "bad_key", "encoded slashes and NULs are not allowed in media keys")
    key = request.match_info["key"]
    if not _SAFE_KEY.match(key) or ".." in key.split("/"):
        raise ApiError(400, "bad_key", "not a media key")
    return root / key


class MediaFile:
    """An open media file, read at offsets (a range never moves a shared file position).

    A read is first tried in the event loop with RWF_NOWAIT, which never waits for the disk: it
    reads what the page cache holds (where a busy edge's hot tracks are) or fails at once, and
    only then goes to a worker thread. With a thousand players, per-chunk trips to the thread
    pool queued behind each other until a stream start waited past the proxy's read timeout.
    Closing waits for a read still running in its thread (a stream cancelled mid-read), so the
    descriptor is never closed under it and reused by another file."""

    __slots__ = ("_reading", "fd", "st")

    def __init__(self, fd: int, st: os.stat_result) -> None:
        self.fd = fd
        self.st = st
        self._reading: concurrent.futures.Future[bytes] | None = None

    async def read(self, size: int, offset: int) -> Chunk:
        data = _read_cached(self.fd, size, offset)
        if data is not None:
            return data
        reading = self._reading = _READERS.submit(_pread, self.fd, size, offset)
        return await asyncio.wrap_future(reading)

    def close(self) -> None:
        reading = self._reading
        if reading is not None and not reading.done():
            reading.add_done_callback(lambda _: os.close(self.fd))  # once the thread is done
        else:
            os.close(self.fd)


# Reads the page cache cannot answer at once; a pool of its own, so that they never wait
# behind other work in the default executor (stats, hashing) or it behind them.
_READERS = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="edge-media")
_nowait = hasattr(os, "RWF_NOWAIT")  # Linux 4.14+; off where a file system refuses it
_pread = os.pread  # (in a worker thread)


def _read_cached(fd: int, size: int, offset: int) -> Chunk | None:
    """What the page cache holds of [offset, offset + size), without waiting for the disk, or
    None."""
    global _nowait
    if not _nowait:
        return None
    buffer = bytearray(size)
    try:
        got = os.preadv(fd, [buffer], offset, os.RWF_NOWAIT)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            _nowait = False
            return None
        raise
    if got == size:
        return buffer
    # (0 is left to a thread's read to confirm as the end of the file.)
    return memoryview(buffer)[:got] if got else None


async def open_media(root: Path, path: Path) -> MediaFile:
    """Open a regular file under root (the symlink check, open and fstat in one worker-thread
    trip). FileNotFoundError for anything else: missing, a directory, a FIFO, a device, or a
    path that is, or passes through, a symlink."""
    opening = asyncio.get_running_loop().run_in_executor(None, _open_regular, root, path)
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        # The open goes on in its thread: close what it opens.
        opening.add_done_callback(_close_opened)
        raise


def _open_regular(root: Path, path: Path) -> MediaFile:
    if not _PROC_FD:
        return _open_checked_first(root, path)
    # A handle that opens nothing (O_PATH: no side effect of opening a device or a FIFO out
    # there), checked, then reopened for reading through /proc: the file checked is the file
    # read, and a folder swapped for a link between a check and the open cannot slip through.
    try:
        handle = os.open(path, os.O_PATH | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise _not_found(exc, path) from None
    try:
        # (A symlink as the last part opens as the link itself, and is not a regular file.)
        st = _regular_file(handle, path)
        # The path the handle was really reached by: anything that passes through a symlink
        # reads as another path. (The folder is looked at after the handle was opened: if its
        # own link was moved to another release before, both agree on the new one.)
        opened = os.readlink(f"/proc/self/fd/{handle}")
        if opened != os.path.join(_real_root(str(root)), path.relative_to(root)):
            raise FileNotFoundError(str(path))
        fd = os.open(f"/proc/self/fd/{handle}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(handle)
    return MediaFile(fd, st)


def _open_checked_first(root: Path, path: Path) -> MediaFile:
    """Without /proc: the path's resolution checked before the open (a folder swapped for a
    link in between is not caught here), O_NOFOLLOW for the last part."""
    if os.path.realpath(path) != os.path.join(os.path.realpath(root), path.relative_to(root)):
        raise FileNotFoundError(str(path))
    try:
        # O_NONBLOCK: opening a FIFO does not wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError as exc:
        raise _not_found(exc, path) from None
    try:
        st = _regular_file(fd, path)
        os.set_blocking(fd, True)  # (a file system that honours O_NONBLOCK must not refuse reads)
    except BaseException:
        os.close(fd)
        raise
    return MediaFile(fd, st)


def _regular_file(fd: int, path: Path) -> os.stat_result:
    """The descriptor's stat, if it is a regular file; FileNotFoundError for anything else."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise FileNotFoundError(str(path))
    return st


def _not_found(exc: OSError, path: Path) -> OSError:
    """What an open's error means here: missing, or not a file we serve (a directory, a link
    in the way, a FIFO without a writer, a name too long) is FileNotFoundError; anything else
    as it was."""
    if isinstance(exc, FileNotFoundError) or exc.errno in (
        errno.ENOTDIR,
        errno.EISDIR,
        errno.ELOOP,
        errno.ENXIO,
        errno.ENAMETOOLONG,  # (no such file can exist)
    ):
        return FileNotFoundError(str(path))
    return exc


# Linux's /proc/self/fd and O_PATH (elsewhere the check is made before the open).
_PROC_FD = hasattr(os, "O_PATH") and os.path.isdir("/proc/self/fd")


def _real_root(root: str) -> str:
    """The media folder with its own links resolved (it may live behind one, such as a
    `current` link to a release: the operator's choice, not a way out). Resolved again whenever
    the folder it leads to is another one (its device and inode, one stat per open): a path
    into the old release must not match a stale answer."""
    st = os.stat(root)
    known = _real_roots.get(root)
    if known is None or known[1:] != (st.st_dev, st.st_ino):
        if len(_real_roots) >= 8:
            _real_roots.clear()
        known = _real_roots[root] = (os.path.realpath(root), st.st_dev, st.st_ino)
    return known[0]


_real_roots: dict[str, tuple[str, int, int]] = {}


def _close_opened(done: asyncio.Future[MediaFile]) -> None:
    if not done.cancelled() and done.exception() is None:
        done.result().close()


# Bytes asked of the file per read (where sendfile cannot: the socket is full, the page cache
# does not hold them, or TLS), and so at most held per stream: the next read waits until
# the kernel took the last one (streaming.send's client_buffer=0), as the file keeps what the
# client has not taken yet. Reads from the page cache cost a system call, no thread trip, so
# small reads are cheap. Measured (bench/PLAY_RESULTS.md, sessions 7 and 8): 16 KiB reads here
# cost 14% less CPU per MiB than 64 KiB reads through the thread pool did, and 1000 slow
# players proxied from this origin held 201 MB, against 321 MB. Waiting for the kernel instead
# of queueing up to 16 KiB more per stream: ~13 MB less for those 1000, the same CPU per MiB.
CHUNK = 16 * 1024


# Bytes per sendfile(2) call at most: then other connections get their turn in the loop (a
# fast client's socket could take a whole file at once). 1 MiB ranges by sendfile cost 0.42x
# the CPU of 16 KiB chunks (bench/PLAY_RESULTS.md, session 8). With EDGE_STREAM_KERNEL_UNSENT
# a call stops once the kernel holds about that much unsent (a client whose window is full):
# then one chunk goes through the transport, which waits for the socket to drain, and the
# next call follows (13% more CPU per MiB for fast loopback readers, session 9).
SENDFILE_MAX = 1 << 20


_LOWEST_BIT = bytes(i & 1 for i in range(256))


class _PageCache:
    """How much of a file's range the page cache holds: mincore(2) on a mapping of the range,
    which reads nothing. sendfile(2) from there does not wait for the disk in the event loop
    (unless the kernel evicts those pages in the microseconds between the two calls)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._mmap = libc.mmap
        self._mmap.restype = ctypes.c_void_p
        self._mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int64,
        ]
        self._mincore = libc.mincore
        self._mincore.restype = ctypes.c_int
        self._mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        self._munmap = libc.munmap
        self._munmap.restype = ctypes.c_int
        self._munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self._failed = ctypes.c_void_p(-1).value  # MAP_FAILED

    def held(self, fd: int, offset: int, count: int) -> int:
        """The bytes from `offset` (at most `count`, count > 0) that are in the page cache."""
        start = offset - offset % mmap.PAGESIZE
        length = offset + count - start
        address = self._mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
        if address is None or address == self._failed:
            return 0
        pages = -(-length // mmap.PAGESIZE)
        resident = ctypes.create_string_buffer(pages)
        try:
            if self._mincore(address, length, resident) != 0:
                return 0
        finally:
            self._munmap(address, length)
        # The lowest bit of each page's byte says whether it is in memory (the others are
        # reserved).
        missing = resident.raw.translate(_LOWEST_BIT).find(b"\0")
        if missing < 0:
            return count
        return max(0, start + missing * mmap.PAGESIZE - offset)


try:  # (64-bit only: the mapping's offset is passed as a 64-bit off_t)
    _page_cache: _PageCache | None = (
        _PageCache() if hasattr(os, "sendfile") and ctypes.sizeof(ctypes.c_void_p) == 8 else None
    )
except (OSError, AttributeError):  # no libc with mmap and mincore: no sendfile
    _page_cache = None

# What sendfile(2) reports of the client's connection, not of the file: the client is gone.
_SOCKET_ERRNOS = frozenset(
    (errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.ENOTCONN)
)


def _send_cached(out: int, fd: int, offset: int, count: int) -> int:
    """sendfile(2) of what the page cache holds of [offset, offset + count) to a non-blocking
    socket: the bytes sent; 0 when the socket is full, nothing is cached, or the file ended."""
    global _page_cache
    cache = _page_cache
    if cache is None:
        return 0
    count = cache.held(fd, offset, count)
    if not count:
        return 0
    try:
        return os.sendfile(out, fd, offset, count)
    except BlockingIOError:
        return 0
    except ConnectionError:
        raise
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            _page_cache = None  # this file system or socket cannot: chunks from now on
            return 0
        if exc.errno in _SOCKET_ERRNOS:
            raise ConnectionResetError(exc.errno, f"the client's connection failed: {exc}") from exc
        raise


class _FileRange:
    """A range of an open media file that writes itself into the client's connection (a
    streaming.Pipe). While the connection has taken everything before, the bytes the page
    cache holds go by sendfile(2), never through this process; when the socket is full or the
    page cache does not hold the next bytes, one chunk is read (MediaFile.read: the page cache,
    else a worker thread) and written, and the next waits until the kernel has taken it."""

    __slots__ = ("media", "offset")

    def __init__(self, media: MediaFile, offset: int) -> None:
        self.media = media
        self.offset = offset

    async def pipe(self, sink: ClientSink, expected: int) -> int:
        media, offset = self.media, self.offset
        end = offset + expected
        full = False  # the last sendfile found the socket full
        while offset < end:
            out = None if full or _page_cache is None else sink.socket_fd()
            if out is not None and not sink.unsent():
                want = min(end - offset, SENDFILE_MAX)
                sent = _send_cached(out, media.fd, offset, want)
                if sent:
                    offset += sent
                    sink.written += sent
                    full = sent < want
                    await asyncio.sleep(0)  # (the others' turn)
                    continue
            full = False
            block = await media.read(min(CHUNK, end - offset), offset)
            if not block:
                break  # the file got shorter: the stream reports a short body
            offset += len(block)
            if not sink.write(block):
                await sink.drain()
            else:
                await asyncio.sleep(0)  # (the others' turn, when the kernel takes it all)
        return offset - self.offset

    def close(self) -> None:
        """(The file is the handler's to close.)"""


def _file_body(media: MediaFile) -> Source:
    def body(part: ByteRange | None) -> _FileRange:
        return _FileRange(media, 0 if part is None else part.start)

    return body


@routes.route("GET", "/media/{key:.+}", name="media")
@routes.route("HEAD", "/media/{key:.+}", name="media_head")
async def media(request: web.Request) -> web.StreamResponse:
    app = request.app
    signer = app[keys.LOCAL_SIGNER]
    reason = signer.verify(
        request.url.raw_path,
        request.query.get("Expires"),
        request.query.get("Signature"),
        time.time(),
    )
    if reason is not None:
        app[keys.METRICS].errors.labels("bad_signature").inc()
        raise ApiError(403, "bad_signature", f"media URL signature: {reason}")
    root = app[keys.SETTINGS].media_root
    path = _safe_path(request, root)
    try:
        media = await open_media(root, path)
    except FileNotFoundError:
        raise ApiError(404, "not_found", "media not found") from None
    try:
        st = media.st
        rep = Representation(
            size=st.st_size,
            content_type=_TYPES.get(path.suffix)
            or mimetypes.guess_type(path.name)[0]
            or "application/octet-stream",
            etag=await app[ETAGS].get(path, st),
            last_modified=formatdate(st.st_mtime, usegmt=True),
        )
        decision = resolve(
            request.headers.get("Range"),
            rep.size,
            if_range=request.headers.get("If-Range"),
            etag=rep.etag,
            last_modified=_mtime(st),
        )
        if request.method == "HEAD" or decision.status == 416:
            return head_response(decision, rep)
        sent = await send(
            request,
            decision,
            rep,
            _file_body(media),
            {"Cache-Control": "private, max-age=3600"},
            client_buffer=0,
            kernel_unsent=app[keys.SETTINGS].stream_kernel_unsent,
        )
    finally:
        media.close()
    if sent.outcome == "client_gone":
        app[keys.METRICS].client_disconnects.labels("media").inc()
        log.debug("client_gone", route="media", sent=sent.bytes)
    elif sent.outcome == "source_failed":
        app[keys.METRICS].upstream_errors.labels("media", "read").inc()
        log.error("media_read_failed", key=request.match_info["key"], reason=sent.reason)
    return sent.response


def _mtime(st: os.stat_result) -> datetime:
    return datetime.fromtimestamp(int(st.st_mtime), tz=UTC)
