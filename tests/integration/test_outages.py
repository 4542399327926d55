"""PostgreSQL going away and coming back, for real: Edge talks to it through a TCP relay that the
test cuts and restores. Requests get a clear 503, /readyz says which server is down, /healthz
stays up, and service resumes by itself."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from edge import keys
from edge.embedded import free_port

Client = Any


class Relay:
    """A TCP relay on a fixed local port that can be cut (listener and live connections)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in list(self.writers):
            w.transport.abort()
        await self.server.wait_closed()
        self.server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.writers -= {writer, up_writer}


@pytest.fixture
async def relay(database_url: str) -> Any:
    parts = urlsplit(database_url)
    r = Relay(parts.hostname or "127.0.0.1", parts.port or 5432)
    await r.start()
    yield r
    if r.server is not None:
        await r.cut()


def through(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


async def test_postgres_outage(
    make_client: Any,
    catalog: dict[str, Any],
    database_url: str,
    relay: Relay,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    client = await make_client(
        database_url=through(database_url, relay.port),
        db_pool_min=0,
        db_pool_acquire_timeout=2.0,
    )
    artist = catalog["artists"]["rem"]
    assert (await client.get(f"/api/v1/artists/{artist}")).status == 200

    await relay.cut()
    resp = await client.get(f"/api/v1/artists/{artist}")
    assert resp.status == 503
    body = await resp.json()
    assert body["error"]["code"] == "database_unavailable"
    assert resp.headers["Retry-After"] == "1"
    ready = await client.get("/readyz")
    assert ready.status == 503
    checks = (await ready.json())["checks"]
    assert checks["postgres"].startswith("down") and checks["redis"] == "ok"
    assert (await client.get("/healthz")).status == 200
    registry = client.app[keys.METRICS].registry
    assert registry.get_sample_value("edge_errors_total", {"code": "database_unavailable"}) >= 1
    assert any(
        isinstance(r.msg, dict) and r.msg.get("event") == "database_unavailable"
        for r in caplog.records
    )

    await relay.start()
    resp = await client.get(f"/api/v1/artists/{artist}")
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["name"] == "R.E.M."
    assert (await client.get("/readyz")).status == 200
