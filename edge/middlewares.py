"""Request id, access log, HTTP metrics and JSON errors, around every handler."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import time
from collections.abc import Iterator

import asyncpg
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from multidict import istr

from edge import keys
from edge.catalog import DatabaseUnavailable
from edge.errors import ApiError, json_error
from edge.logs import REQUEST_ID, USER_ID
from edge.metrics import Metrics, route_label

log = structlog.get_logger("edge.access")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # (fullmatch: no newline at the end)

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
}


# PostgreSQL is down, restarting, refusing connections, or our pool waited too long (the
# catalog says so; a bare OSError here is a client gone, not a database).
_DB_UNAVAILABLE = (
    DatabaseUnavailable,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)
_CLIENT_GONE = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)


# Pages load only what Edge serves; no inline script, no framing.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "media-src 'self' blob: https:; connect-src 'self'; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'self'"
)


async def response_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare (one handler: each costs a coroutine per response): every response,
    streamed ones too, carries the request id and nosniff; HTML pages a Content-Security-Policy.
    """
    headers = response.headers
    request_id = REQUEST_ID.get()
    if request_id is not None:
        headers[_X_REQUEST_ID] = request_id
    headers.setdefault("X-Content-Type-Options", "nosniff")
    if headers.get("Content-Type", "").startswith("text/html"):
        headers.setdefault("Content-Security-Policy", CSP)
        headers.setdefault("Referrer-Policy", "same-origin")


def _request_ids() -> Iterator[str]:
    """Request ids: 128 random bits as 32 hex digits (uuid4's entropy), made 1024 at a time
    from one read of the system's random source and sliced from one string, so a request only
    takes the next one from a list's iterator (`next(_new_ids, None) or _more_ids()`: no Python
    frame per request). A counter formatted per request, as before, cost 3-4% of /healthz in
    bench/pair.sh: more than its few hundred nanoseconds in a tight loop."""
    text = secrets.token_hex(_ID_BYTES * _IDS_PER_READ)
    step = 2 * _ID_BYTES
    return iter([text[i : i + step] for i in range(0, len(text), step)])


def _more_ids() -> str:
    global _new_ids
    _new_ids = _request_ids()
    return next(_new_ids)


_ID_BYTES = 16
_IDS_PER_READ = 1024
_new_ids = _request_ids()


def _new_ids_after_fork() -> None:
    global _new_ids
    _new_ids = iter(())  # (the child's first request reads a batch of its own)


# A forked child must not hand out the parent's ids left in the current batch. (Empty, not a new
# batch: a child forked to exec another program, as subprocess's preexec_fn does, reads none.)
os.register_at_fork(after_in_child=_new_ids_after_fork)

_X_REQUEST_ID = istr("X-Request-ID")


def observe(metrics: Metrics) -> Middleware:
    """Request id, HTTP metrics, the access line, and errors as JSON (errors_as_json's work,
    done here so a request passes one middleware, not two).

    This runs around every request, so what it does per request is kept to a handful of
    operations: it sets the request's id (logs.REQUEST_ID) and leaves one row for
    metrics.HttpStats, which counts the rows and renders their access lines in batches (the
    response-time alert reads the same counts).
    """
    http = metrics.http
    rows = http.rows
    max_rows = http.MAX_ROWS
    perf_counter = time.perf_counter
    set_request_id = REQUEST_ID.set
    get_user_id = USER_ID.get

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        incoming = request.headers.get(_X_REQUEST_ID)
        if incoming and _REQUEST_ID.fullmatch(incoming):
            request_id = incoming
        else:
            request_id = next(_new_ids, None) or _more_ids()
        set_request_id(request_id)
        http.in_flight += 1
        status = 500
        sent: int | None = None
        started = perf_counter()
        try:
            try:
                response = await handler(request)
            except Exception as exc:
                response = error_response(request, exc)
            status = response.status
            # (Class checks first: isinstance against aiohttp's response classes, and
            # Response.content_length's against Payload, go through ABCMeta, which costs more
            # than the rest of this block.)
            if type(response) is web.Response:
                body = response.body
                sent = len(body) if type(body) is bytes else response.content_length
            elif isinstance(response, web.Response):
                sent = response.content_length
            else:
                sent = response.body_length
            return response
        except web.HTTPException as exc:  # a redirect raised by a handler
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client closed the connection (nginx's convention)
            raise
        finally:
            rows.append(
                (
                    request.method,
                    request.match_info.route,
                    request.rel_url.raw_path,
                    request_id,
                    get_user_id(),
                    status,
                    sent,
                    started,
                    perf_counter(),
                )
            )
            if len(rows) == 1:
                http.schedule()
            elif len(rows) >= max_rows:
                http.settle()

    return observe


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Errors as JSON, without observe (which does this itself)."""
    try:
        return await handler(request)
    except Exception as exc:
        return error_response(request, exc)


def error_response(request: web.Request, exc: Exception) -> web.StreamResponse:
    """The JSON error for what a handler raised (counted and logged); redirects and other
    non-error HTTPExceptions are raised again."""
    metrics = request.app[keys.METRICS]
    if isinstance(exc, ApiError):
        metrics.errors.labels(exc.code).inc()
        log.info("api_error", code=exc.code, status=exc.status, message=exc.message)
        return json_error(exc.status, exc.code, exc.message)
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        code = _HTTP_CODES.get(exc.status, "http_error")
        metrics.errors.labels(code).inc()
        log.info("http_error", code=code, status=exc.status)
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return json_error(exc.status, code, exc.reason, headers)
    if isinstance(exc, _CLIENT_GONE):
        # The player hung up before we could answer: nothing to send, nothing to page about.
        log.debug("client_gone", route=route_label(request.match_info.route))
        return web.Response(status=499)
    if isinstance(exc, _DB_UNAVAILABLE):
        metrics.errors.labels("database_unavailable").inc()
        metrics.db_errors.labels("unavailable").inc()
        log.error("database_unavailable", error=f"{type(exc).__name__}: {exc}")
        return json_error(
            503, "database_unavailable", "the catalog database is unreachable", {"Retry-After": "1"}
        )
    if isinstance(exc, asyncpg.QueryCanceledError):
        metrics.errors.labels("query_timeout").inc()
        metrics.db_errors.labels("timeout").inc()
        log.error("query_timeout")
        return json_error(
            503, "query_timeout", "the catalog query took too long", {"Retry-After": "1"}
        )
    metrics.errors.labels("internal").inc()
    log.error("unhandled_error", exc_info=exc)
    return json_error(500, "internal", "internal server error")
