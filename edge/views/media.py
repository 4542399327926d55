"""`GET|HEAD /media/{key}`: the local origin of the zero-config default and the tests.

It behaves like the CDN it stands in for: a signed, expiring URL (HMAC with an Edge secret),
RFC 9110 ranges, strong ETags (the MD5 of the file, as S3 reports), and no way out of the media
folder: no `..`, no encoded slashes or NULs, no symlinks.
"""

from __future__ import annotations

import asyncio
import hashlib
import mimetypes
import os
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from email.utils import formatdate
from pathlib import Path
from typing import Any, BinaryIO

import structlog
from aiohttp import web

from edge import keys
from edge.errors import ApiError
from edge.ranges import ByteRange, resolve
from edge.streaming import Representation, Source, head_response, send

log = structlog.get_logger(__name__)
routes = web.RouteTableDef()

_SAFE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")
_CHUNK = 64 * 1024  # per read: memory per stream stays small with many slow players
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
    path = root / key
    # realpath follows every symlink: anything that is, or passes through, a link is refused.
    if os.path.realpath(path) != os.path.join(os.path.realpath(root), key):
        raise ApiError(404, "not_found", "media not found")
    return path


def _file_chunks(path: Path) -> Source:
    async def read(part: ByteRange | None) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        start, remaining = (0, -1) if part is None else (part.start, part.length)
        size = _CHUNK if remaining < 0 else min(_CHUNK, remaining)
        # Open, seek and the first read in one trip to a worker thread: with a thousand players
        # starting at once, each trip waits in the executor's queue.
        opening = loop.run_in_executor(None, _open_at, path, start, size)
        try:
            f, block = await asyncio.shield(opening)
        except asyncio.CancelledError:
            # The open goes on in its thread: close what it opens.
            opening.add_done_callback(_close_opened)
            raise
        try:
            while True:
                if not block:
                    return
                remaining -= len(block) if remaining > 0 else 0
                yield block
                if remaining == 0:
                    return
                size = _CHUNK if remaining < 0 else min(_CHUNK, remaining)
                block = await loop.run_in_executor(None, f.read, size)
        finally:
            f.close()  # closing a read-only file does not block

    return read


def _open_at(path: Path, start: int, size: int) -> tuple[BinaryIO, bytes]:
    f = path.open("rb")
    try:
        f.seek(start)
        return f, f.read(size)
    except BaseException:
        f.close()
        raise


def _close_opened(done: asyncio.Future[Any]) -> None:
    if not done.cancelled() and done.exception() is None:
        done.result()[0].close()


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
        st = await asyncio.to_thread(path.stat)
    except (FileNotFoundError, NotADirectoryError):
        raise ApiError(404, "not_found", "media not found") from None
    if not path.is_file():
        raise ApiError(404, "not_found", "media not found")
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
        request, decision, rep, _file_chunks(path), {"Cache-Control": "private, max-age=3600"}
    )
    if sent.outcome == "client_gone":
        app[keys.METRICS].client_disconnects.labels("media").inc()
        log.debug("client_gone", route="media", sent=sent.bytes)
    elif sent.outcome == "source_failed":
        app[keys.METRICS].upstream_errors.labels("media", "read").inc()
        log.error("media_read_failed", key=request.match_info["key"], reason=sent.reason)
    return sent.response


def _mtime(st: os.stat_result) -> datetime:
    return datetime.fromtimestamp(int(st.st_mtime), tz=UTC)
