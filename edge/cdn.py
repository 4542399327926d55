"""The CDN side of /play: signed URLs for redirects (cached per object and expiry window), and
the pooled client that fetches byte ranges from the CDN (or the local origin) for proxy mode.

Proxy requests carry exactly the range the client asked for (never the whole file for a range);
a connect failure before any byte is retried once, then answered 502; an origin that stays
silent past the read timeout is 504.
"""

from __future__ import annotations

import time
from urllib.parse import quote

import structlog

from edge.metrics import Metrics
from edge.origin import OriginError, OriginPool, OriginResponse
from edge.ranges import ByteRange
from edge.signing import SignedUrlCache

log = structlog.get_logger(__name__)


class UpstreamError(Exception):
    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status  # 502 or 504
        self.kind = kind  # connect | timeout | status | protocol
        self.message = message


class Cdn:
    def __init__(
        self,
        base: str,
        urls: SignedUrlCache,
        origins: OriginPool,
        metrics: Metrics,
    ) -> None:
        self.base = base.rstrip("/")  # "" means Edge's own /media (resolved per request)
        self.urls = urls
        self.origins = origins
        self.metrics = metrics

    def signed_url(self, object_key: str, base: str | None = None) -> str:
        """The signed URL of an object. Served from the cache within an expiry window."""
        before = self.urls.signatures
        url, _expires = self.urls.get(self.object_url(object_key, base), time.time())
        self.metrics.signatures.labels(
            "signed" if self.urls.signatures > before else "cached"
        ).inc()
        return url

    def object_url(self, object_key: str, base: str | None = None) -> str:
        """On the CDN: {CDN base}/{key}. On the local origin: {base}/media/{key}, where base is
        "" for a redirect (same host) or Edge's own address for proxying."""
        if self.base:
            return f"{self.base}/{quote(object_key)}"
        return f"{base or ''}/media/{quote(object_key)}"

    async def fetch(
        self,
        object_key: str,
        part: ByteRange | None,
        base: str | None = None,
        *,
        size: int | None = None,
        etag: str | None = None,
    ) -> OriginResponse:
        """Open a GET for the object (or one byte range of it). `size` and `etag` are what the
        catalog knows: an origin holding another version of the object is refused, so bytes of
        two versions are never spliced into one response."""
        url = self.signed_url(object_key, base)
        headers = {"Range": f"bytes={part.start}-{part.end}"} if part is not None else {}
        expected = 206 if part is not None else 200
        for attempt in (1, 2):
            started = time.perf_counter()
            try:
                # The retry never reuses a pooled connection: it may be the one that failed.
                response = await self.origins.get(url, headers, fresh=attempt > 1)
            except OriginError as exc:
                kind = exc.kind if exc.kind in ("connect", "timeout") else "protocol"
                self.metrics.upstream_errors.labels("cdn", kind).inc()
                if kind == "connect":
                    if attempt == 1:
                        log.warning("upstream_retry", error=exc.message)
                        continue
                    raise UpstreamError(502, "connect", f"origin unreachable: {exc}") from None
                if kind == "timeout":
                    raise UpstreamError(
                        504, "timeout", f"origin did not answer in time: {exc}"
                    ) from None
                raise UpstreamError(502, "protocol", f"origin error: {exc}") from None
            self.metrics.upstream_duration.labels(f"{response.status // 100}xx").observe(
                time.perf_counter() - started
            )
            problem = self._problem(response, expected, part, size, etag)
            if problem is not None:
                response.close()
                self.metrics.upstream_errors.labels("cdn", "status").inc()
                log.error("upstream_inconsistent", key=object_key, problem=problem)
                raise UpstreamError(502, "status", f"origin answer refused: {problem}")
            return response
        raise AssertionError("unreachable")

    @staticmethod
    def _problem(
        response: OriginResponse,
        expected: int,
        part: ByteRange | None,
        size: int | None,
        etag: str | None,
    ) -> str | None:
        """Why the origin's answer is not exactly the bytes asked for, or None."""
        if response.status != expected:
            return f"status {response.status}, expected {expected}"
        origin_etag = response.headers.get("ETag")
        if etag is not None and origin_etag is not None and origin_etag.strip() != etag:
            return f"ETag {origin_etag} is not the catalog's {etag}"
        if part is None:
            length = response.headers.get("Content-Length")
            if size is not None and length is not None and length != str(size):
                return f"Content-Length {length}, catalog size {size}"
            return None
        total = "*" if size is None else str(size)
        content_range = response.headers.get("Content-Range", "")
        if size is None:
            ok = content_range.startswith(f"bytes {part.start}-{part.end}/")
        else:
            ok = content_range == f"bytes {part.start}-{part.end}/{total}"
        return None if ok else f"Content-Range {content_range!r} for bytes {part.start}-{part.end}"
