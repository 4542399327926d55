"""structlog set up once: JSON lines in production, console output in a terminal, stdlib logs
through the same pipeline, and the request's id (and user) on every line logged while it is
handled (RequestContext)."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from contextvars import ContextVar

import orjson
import structlog
from structlog.typing import EventDict, WrappedLogger


class RequestContext:
    """What a request's log lines say about it: its id, and who asked once auth knows.

    The observe middleware makes one per request and puts it in CURRENT (each request runs in
    its own task, so it ends with the request); log lines, the access line and the response
    headers read it. One object in one ContextVar costs less per request than binding the
    fields with structlog.contextvars, and auth fills it in place.
    """

    __slots__ = ("request_id", "tier", "user_id")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.user_id: str | None = None
        self.tier: str | None = None


CURRENT: ContextVar[RequestContext | None] = ContextVar("edge_request", default=None)


def add_request_context(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """structlog processor: the current request's id (and user, tier) on every line logged
    while it is handled, ours and the libraries'."""
    ctx = CURRENT.get()
    if ctx is not None:
        event_dict.setdefault("request_id", ctx.request_id)
        if ctx.user_id is not None:
            event_dict.setdefault("user_id", ctx.user_id)
            event_dict.setdefault("tier", ctx.tier)
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


class AccessLog:
    """One line per request, written without structlog's per-event processor chain.

    The access line is the one event every request makes, and through structlog and the stdlib
    handler it costs about 25 µs: more than half of what a small request costs Edge. In JSON
    mode the line is rendered here with orjson, in the same shape and keys structlog renders
    (timestamp, level, logger, event, request_id, user_id when known), and lines are written in
    batches (every FLUSH_SECONDS, or MAX_PENDING lines) to every handler that renders JSON
    through our formatter: the same streams as every other log line, a write per batch rather
    than per request. In console mode (a terminal) lines go through structlog as usual:
    readable beats fast there.
    """

    LOGGER = "edge.access"
    # Lines are written at most this long after the request ended, or as soon as this many
    # are waiting: one write per batch instead of one per event-loop iteration.
    FLUSH_SECONDS = 0.05
    MAX_PENDING = 256

    def __init__(self) -> None:
        self.json_formatter: logging.Formatter | None = None
        self._pending: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._logger = logging.getLogger(self.LOGGER)
        self._slow = structlog.get_logger(self.LOGGER)
        self._second = -1
        self._second_text = ""

    def enabled(self) -> bool:
        return self._logger.isEnabledFor(logging.INFO)

    def _timestamp(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int((now - second) * 1e6):06d}Z"

    def request(
        self,
        request_id: str,
        user_id: str | None,
        method: str,
        route: str,
        path: str,
        status: int,
        sent: int | None,
        seconds: float,
    ) -> None:
        """The access line of one request."""
        if self.json_formatter is None:
            self._slow.info(
                "request",
                method=method,
                route=route,
                path=path,
                status=status,
                bytes=sent,
                duration_ms=round(seconds * 1000, 3),
                **({} if user_id is None else {"user_id": user_id}),
            )
            return
        # Formatted directly: the method (an HTTP token), the route name and the request id (ours,
        # or a client's that matched [A-Za-z0-9._:-]) need no escaping; the path and the user id
        # are escaped by orjson.
        user = "" if user_id is None else f',"user_id":{orjson.dumps(user_id).decode()}'
        self._queue(
            f'{{"method":"{method}","route":"{route}","path":{orjson.dumps(path).decode()},'
            f'"status":{status},"bytes":{"null" if sent is None else sent},'
            f'"duration_ms":{seconds * 1000:.3f},"event":"request","request_id":"{request_id}"'
            f'{user},"level":"info","logger":"{self.LOGGER}",'
            f'"timestamp":"{self._timestamp(time.time())}"}}\n'
        )

    def _queue(self, line: str) -> None:
        pending = self._pending
        pending.append(line)
        if len(pending) >= self.MAX_PENDING:
            self.flush()
        else:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a tool, a test): write now
                self.flush()
                return
            # (A timer left on a loop that stopped, a test's or a server's that shut down,
            # must not keep these lines waiting.)
            if self._timer is None or self._timer_loop is not loop:
                self._timer = loop.call_later(self.FLUSH_SECONDS, self.flush)
                self._timer_loop = loop

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        text = "".join(self._pending)
        self._pending.clear()
        formatter = self.json_formatter
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


access_log = AccessLog()
