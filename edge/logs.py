"""structlog set up once: JSON lines in production, console output in a terminal, stdlib logs
through the same pipeline, and the request's id (and user) on every line logged while it is
handled (REQUEST_ID, USER_ID)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from contextvars import ContextVar
from json.encoder import encode_basestring_ascii as _json_string  # C, from the stdlib
from typing import Any

import structlog
from structlog.typing import EventDict, WrappedLogger

# The request being handled: its id, and who asked once auth knows (their tier too). The observe
# middleware sets the id, auth the user; log lines, the access line and the response headers
# read them. Each request runs in its own task (aiohttp's, so that context variables do not
# leak between the requests of a connection), so they end with the request.
REQUEST_ID: ContextVar[str | None] = ContextVar("edge_request_id", default=None)
USER_ID: ContextVar[str | None] = ContextVar("edge_user_id", default=None)
TIER: ContextVar[str | None] = ContextVar("edge_tier", default=None)


def add_request_context(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """structlog processor: the current request's id (and user, tier) on every line logged
    while it is handled, ours and the libraries'."""
    request_id = REQUEST_ID.get()
    if request_id is not None:
        event_dict.setdefault("request_id", request_id)
        user_id = USER_ID.get()
        if user_id is not None:
            event_dict.setdefault("user_id", user_id)
            event_dict.setdefault("tier", TIER.get())
    return event_dict


def configure(level: str = "INFO", fmt: str = "auto") -> None:
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    shared: list[structlog.types.Processor] = [
        add_request_context,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # Drop events below the level before any processor runs (a filtered access line would
    # otherwise still pay for its timestamp and context merge on every request).
    first: list[structlog.types.Processor] = [structlog.stdlib.filter_by_level]
    renderer: structlog.types.Processor
    if fmt == "json":
        shared.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            *first,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    access_log.json_formatter = formatter if fmt == "json" else None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's own access log is replaced by ours (one line per request, with the request id).
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


# What the observe middleware leaves per request, for the HTTP metrics and the access line:
# method, route (request.match_info.route, named by the reader), path (as sent, without the
# query), request id, user id (None when unknown), status, bytes sent (None when unknown), and
# time.perf_counter() at start and end. One flat tuple of the values, not the request: what a
# request leaves behind until its batch is settled costs more than its allocation (holding
# the request object itself instead cost 8% of /healthz: bench/RESULTS.md, session 11).
RequestRow = tuple[str, Any, str, str, "str | None", int, "int | None", float, float]


class AccessLog:
    """One line per request, written without structlog's per-event processor chain.

    The access line is the one event every request makes, and through structlog and the stdlib
    handler it costs about 25 µs: more than half of what a small request costs Edge. The lines
    come here in batches (metrics.HttpStats.settle: at most 50 ms after their requests) and
    are written at once, in the same shape and keys structlog renders (timestamp, level,
    logger, event, request_id, user_id when known), to every handler that renders JSON through
    our formatter: the same streams as every other log line, one write per batch. A batch is
    rendered in one comprehension (an f-string a line, no Python call per line or field), and
    the level is checked once per batch. In console mode (a terminal) lines go through
    structlog: readable beats fast there.
    """

    LOGGER = "edge.access"

    def __init__(self) -> None:
        self.json_formatter: logging.Formatter | None = None
        self._logger = logging.getLogger(self.LOGGER)
        self._slow = structlog.get_logger(self.LOGGER)
        self._milliseconds = _MillisecondText()

    def enabled(self) -> bool:
        return self._logger.isEnabledFor(logging.INFO)

    def write(self, rows: list[RequestRow], routes: Mapping[Any, str]) -> None:
        """The access lines of a batch of rows; `routes` names their routes."""
        if not rows or not self.enabled():
            return
        formatter = self.json_formatter
        if formatter is None:
            for method, route, path, request_id, user_id, status, sent, started, ended in rows:
                self._slow.info(
                    "request",
                    method=method,
                    route=routes[route],
                    path=path,
                    status=status,
                    bytes=sent,
                    duration_ms=round((ended - started) * 1000, 3),
                    request_id=request_id,
                    **({} if user_id is None else {"user_id": user_id}),
                )
            return
        text = self._render(rows, routes)
        for handler in logging.getLogger().handlers:
            if handler.formatter is formatter and isinstance(handler, logging.StreamHandler):
                handler.acquire()
                try:
                    handler.stream.write(text)
                    handler.flush()
                except Exception:  # a broken log stream must not break serving
                    handler.handleError(logging.makeLogRecord({"msg": "access line"}))
                finally:
                    handler.release()

    def _render(self, rows: list[RequestRow], routes: Mapping[Any, str]) -> str:
        """The JSON lines of a batch, in the key order structlog renders. Method (an HTTP
        token), route name and request id (ours, or a client's that matched [A-Za-z0-9._:-])
        need no escaping; the path and the user id are escaped as JSON strings. One f-string a
        line: no call per field, no format string parsed per line. Times are written from
        whole microseconds with integer formatting and tables (a float formatted with :.3f or
        :06d costs twice as much: a third of the line's cost)."""
        wall = time.time() - time.perf_counter()
        stamps, digits = self._milliseconds, _THREE_DIGITS
        return "".join(
            [
                f'{{"method":"{method}","route":"{routes[route]}","path":{_json_string(path)},'
                f'"status":{status},"bytes":{"null" if sent is None else sent},"duration_ms":'
                f"{(us := int((ended - started) * 1e6 + 0.5)) // 1000}.{digits[us % 1000]},"
                f'"event":"request","request_id":"{request_id}"'
                f"{'' if user_id is None else _USER_KEY + _json_string(user_id)},"
                f'"level":"info","logger":"edge.access","timestamp":'
                f'"{stamps[(at := int((ended + wall) * 1e6)) // 1000]}{digits[at % 1000]}Z"}}\n'
                for method, route, path, request_id, user_id, status, sent, started, ended in rows
            ]
        )


_USER_KEY = ',"user_id":'
_THREE_DIGITS = [f"{n:03d}" for n in range(1000)]


class _MillisecondText(dict[int, str]):
    """A Unix millisecond -> its ISO 8601 text in UTC, as structlog's TimeStamper(fmt="iso",
    utc=True) renders it up to the millisecond (a line adds the microseconds); made once per
    millisecond, a few hundred kept."""

    def __missing__(self, millisecond: int) -> str:
        if len(self) >= 512:
            self.clear()
        second, rest = divmod(millisecond, 1000)
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)) + f".{rest:03d}"
        self[millisecond] = text
        return text


access_log = AccessLog()
