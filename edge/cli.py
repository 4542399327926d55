"""`edge serve|migrate|seed|refresh`: a thin command line over the library."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import asyncpg
import structlog
from aiohttp import web

from edge import keys, logs
from edge.settings import Settings, SettingsError
from edge.signals import Stop

log = structlog.get_logger("edge.cli")


@contextlib.asynccontextmanager
async def _database(settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the configured database, or to the embedded one (started if need be)."""
    from edge.embedded import embedded_postgres
    from edge.migrations import migrate

    async with contextlib.AsyncExitStack() as stack:
        url: str | None = settings.database_url
        if url is None:
            url = await stack.enter_async_context(embedded_postgres(settings.data_dir))
        conn = await asyncpg.connect(url)
        stack.push_async_callback(conn.close)
        await migrate(conn)
        yield conn


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    from edge.app import create_app

    settings = settings.with_(
        host=args.host or settings.host,
        port=settings.port if args.port is None else args.port,
        workers=settings.workers if args.workers is None else args.workers,
        worker_dir=args.worker_dir,
        supervisor_database_url=args.supervisor_database_url,
        supervisor_redis_url=args.supervisor_redis_url,
    )
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    if settings.workers > 1:
        if settings.port == 0:
            print("edge: --workers needs a fixed port (not 0)", file=sys.stderr)
            return 2
        from edge.workers import WorkersFailing, supervise

        try:
            with contextlib.suppress(asyncio.CancelledError):
                asyncio.run(supervise(settings))
        except WorkersFailing as exc:
            print(f"edge: {exc}", file=sys.stderr)
            return 1
        return 0
    app = create_app(settings)
    with contextlib.suppress(asyncio.CancelledError):  # stopped by a signal while starting
        asyncio.run(_run(app, settings))
    return 0


def make_runner(app: web.Application) -> web.AppRunner:
    """The runner `edge serve` uses. handler_cancellation: a player that hangs up cancels its
    handler at once, so a proxied stream stops reading from the CDN instead of waiting for the
    next upstream chunk to find out."""
    return web.AppRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=10, handler_cancellation=True
    )


# Connections the kernel queues before Edge accepts them (capped by net.core.somaxconn).
# aiohttp's default, 128, overflowed when a thousand players started at once (and, proxying
# from Edge's own /media, as many origin connections to the same port): the kernel dropped
# their SYNs, and clients retried a second later or gave up (504s from proxy mode's 2 s
# connect timeout). nginx's default is 511.
LISTEN_BACKLOG = 4096


async def _run(app: web.Application, settings: Settings) -> None:
    """Start, serve until SIGINT/SIGTERM, stop. Unlike web.run_app, a start that fails or is
    interrupted half-way still leaves every started resource, in reverse order (runner.cleanup
    runs the cleanup contexts that were entered)."""
    runner = make_runner(app)
    stop = Stop()
    try:
        await runner.setup()
        if settings.worker_dir is None:
            await web.TCPSite(runner, settings.host, settings.port, backlog=LISTEN_BACKLOG).start()
        else:
            # One of `--workers N`: the port is shared with the other workers, and the socket
            # is where they ask for this worker's own metrics (see edge/workers.py).
            from edge.workers import socket_path

            site = web.TCPSite(
                runner, settings.host, settings.port, backlog=LISTEN_BACKLOG, reuse_port=True
            )
            await site.start()
            await web.UnixSite(runner, str(socket_path(settings.worker_dir, os.getpid()))).start()
        stop.started()
        log.info(
            "serving",
            url=f"http://{settings.host}:{settings.port}/",
            embedded_postgres=settings.embedded_postgres,
            embedded_redis=settings.embedded_redis,
        )
        await stop.wait()
        log.info("stopping")
    finally:
        await runner.cleanup()
        app[keys.METRICS].http.settle()  # the last requests' counts and access lines


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    async def run() -> None:
        async with _database(settings):
            log.info("migrated")

    asyncio.run(run())
    return 0


def _seed(settings: Settings, args: argparse.Namespace) -> int:
    from edge.seed import seed_synthetic

    async def run() -> None:
        async with _database(settings) as conn:
            report = await seed_synthetic(
                conn, args.tracks, audio=args.audio, media_root=settings.media_root
            )
            print(
                f"seeded {report.tracks} tracks, {report.artists} artists, {report.albums} albums,"
                f" {report.renditions} renditions in {report.seconds:.1f} s"
            )

    asyncio.run(run())
    return 0


def _refresh(settings: Settings, args: argparse.Namespace) -> int:
    from edge.catalog import RECOUNT_SEARCH_WORDS_SQL, REFRESH_POPULAR_SQL

    async def run() -> None:
        async with _database(settings) as conn:
            await conn.execute(REFRESH_POPULAR_SQL)
            await conn.execute(RECOUNT_SEARCH_WORDS_SQL)
            print("popular_tracks_mv refreshed, search word counts recounted")

    asyncio.run(run())
    return 0


def _token(settings: Settings, args: argparse.Namespace) -> int:
    """A token `edge serve` with the same settings accepts: HS256 with EDGE_JWT_SECRET, or the
    zero-config default's own key. Where Edge only holds a public key, or accepts no tokens at
    all, there is nothing it could sign: say so, print nothing."""
    from edge.auth import issue, local_secret

    secret = str(settings.jwt_secret)
    if settings.jwt_public_key:  # (it wins over a secret: edge serve then verifies with it)
        print(
            "edge token: EDGE_JWT_PUBLIC_KEY is set, so this Edge verifies RS256/ES256 tokens "
            "signed elsewhere with its private key; it cannot make one",
            file=sys.stderr,
        )
        return 2
    if not secret and not settings.embedded_postgres:
        print(
            "edge token: no EDGE_JWT_SECRET, so this Edge accepts no tokens (only the zero-config "
            "default has a key of its own)",
            file=sys.stderr,
        )
        return 2
    secret = secret or local_secret(settings.data_dir, "jwt")
    print(issue(secret, args.user, args.tier, args.ttl))
    return 0


def _positive(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return number


def _workers(value: str) -> int:
    number = int(value)
    if not 1 <= number <= 64:
        raise argparse.ArgumentTypeError("must be between 1 and 64")
    return number


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge", description="The streaming edge of a music platform.")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve", help="run the HTTP server (embedded PostgreSQL/Redis when none is configured)"
    )
    serve.add_argument("--host", help="address to listen on (EDGE_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (EDGE_PORT, default 8080)")
    serve.add_argument(
        "--workers",
        type=_workers,
        help="worker processes sharing the port, one per core (EDGE_WORKERS, default 1)",
    )
    # Set by the supervisor of --workers N for its workers.
    serve.add_argument("--worker-dir", type=Path, help=argparse.SUPPRESS)
    serve.add_argument("--supervisor-database-url", help=argparse.SUPPRESS)
    serve.add_argument("--supervisor-redis-url", help=argparse.SUPPRESS)
    serve.set_defaults(run=_serve)
    sub.add_parser("migrate", help="apply database migrations").set_defaults(run=_migrate)
    seed = sub.add_parser("seed", help="append a synthetic catalog (COPY)")
    seed.add_argument("--tracks", type=_positive, required=True, help="number of tracks")
    seed.add_argument(
        "--audio",
        type=_positive,
        default=0,
        help="sets of real audio renditions shared by the tracks (default 0)",
    )
    seed.set_defaults(run=_seed)
    sub.add_parser("refresh", help="refresh popular_tracks_mv now").set_defaults(run=_refresh)
    token = sub.add_parser(
        "token", help="print a player token (HS256 with EDGE_JWT_SECRET, or the zero-config key)"
    )
    token.add_argument("--user", required=True, help="user id (the sub claim)")
    token.add_argument("--tier", required=True, choices=("free", "premium", "hifi"))
    token.add_argument("--ttl", type=_positive, default=3600, help="seconds (default 3600)")
    token.set_defaults(run=_token)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"edge: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    run: Callable[[Settings, argparse.Namespace], int] = args.run
    try:
        return run(settings, args)
    except KeyboardInterrupt:
        return 130
