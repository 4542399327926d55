"""`edge serve` with the least work a handler could do, for `bench/pair.sh` (`B_SERVE=floor`).

The app is Edge's own (`create_app`: the same middlewares, metrics, access lines, resources),
and so is `/healthz`; two handlers are replaced by the least the contract lets them do:

- `GET /api/v1/tracks/{id}`: a dict look-up of the track's JSON and ETag (kept from Edge's own
  handler's answer to the id's first request), answered with the three headers Edge sends.
  No If-None-Match, no metrics of its own, no L1 lifetime.
- `GET /play/{id}`: the player token (Edge's Verifier, which remembers verified tokens), one
  Redis round trip (an EVALSHA of `return 1` through Edge's batched script calls, as a session
  open goes), and a 302 to a fixed URL. No track, no quality, no signature, no preload hint.
  `FLOOR_PLAY` (words, comma-separated; default `redis`) builds it up towards Edge's handler
  step by step: `yield` waits for a future the loop resolves at once instead (what any wait
  costs, without the I/O), `none` does not wait; `open` is Edge's real session open instead
  (its script and the session state it returns), `choice` adds recording the chosen rendition
  as /play does for a new track, `headers` answers with Edge's redirect headers.

What Edge's real handler costs above these floors is what better code could still take away;
what the floor costs against `/healthz` is not: a target below the floor's ratio cannot be
met by the handler. Run from the repository root, with the environment `edge serve` takes:

    A=healthz B=track B_SERVE=floor bash bench/pair.sh
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

from aiohttp import hdrs, web

from edge import auth, keys
from edge.app import create_app
from edge.cli import _run
from edge.sessions import ScriptBatch
from edge.settings import Settings
from edge.views import api
from edge.views.play import device_sid

JSON = "application/json"
CACHE_CONTROL = "public, max-age=30"
TRACKS = web.AppKey("floor_tracks", dict)
BATCH = web.AppKey("floor_batch", ScriptBatch)
STEPS = web.AppKey("floor_steps", frozenset)
STREAMS, TRACK_SECONDS = 100_000, 200.0
EDGE_HEADERS = {
    "X-Stream-Format": "mp3",
    "X-Stream-Bitrate": "128",
    "Cache-Control": "private, no-store",
    "Vary": "Accept, Downlink, Authorization, Cookie",
    "X-Stream-Session": "UlEccyAoLOluX_kAZJh8rw",
    "Location": "/media/demo/10002/mp3-128.mp3?Expires=1796676900"
    "&Signature=yVuCLE3PBuD4Mw8lWDFvkm68pyUuRBPN015c8xkJu-M_&Key-Pair-Id=local",
}


async def track(request: web.Request) -> web.Response:
    track_id = int(request.match_info["id"])
    found = request.app[TRACKS].get(track_id)
    if found is None:  # the first request of an id: Edge's own handler, kept
        edge = await api.track(request)
        assert isinstance(edge, web.Response) and isinstance(edge.body, bytes)
        found = request.app[TRACKS][track_id] = (edge.body, edge.headers[hdrs.ETAG])
    body, etag = found
    headers = {hdrs.ETAG: etag, hdrs.CACHE_CONTROL: CACHE_CONTROL, hdrs.CONTENT_TYPE: JSON}
    return web.Response(body=body, headers=headers)


async def play(request: web.Request) -> web.Response:
    app = request.app
    who = auth.principal(request, app[keys.VERIFIER], allow_anonymous=False)
    steps = app[STEPS]
    if "open" in steps:  # Edge's own session open: its script, its state, as /play calls it
        track_id = int(request.match_info["id"])
        sid = device_sid(request, who.user_id)
        state = await app[keys.SESSIONS].open(
            sid, who.user_id, track_id, limit=STREAMS, remaining_seconds=TRACK_SECONDS
        )
        if "choice" in steps:  # and the choice recorded, as /play does for a new track
            app[keys.SESSIONS].record_choice_soon(state.sid, "mp3", 128, track_id)
    elif "redis" in steps:
        answer = app[BATCH].call([f"floor:{who.user_id}"], ())
        assert answer is not None
        await answer
    elif "yield" in steps:  # what any wait for I/O costs, without the I/O
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        loop.call_soon(answer.set_result, None)
        await answer
    if "headers" in steps:  # the header set of Edge's redirect, of the same sizes
        return web.Response(status=302, headers=EDGE_HEADERS)
    return web.Response(
        status=302,
        headers={"Location": "http://127.0.0.1/media/x.mp3", "Cache-Control": "private, no-store"},
    )


async def batch_ctx(app: web.Application) -> Any:
    app[BATCH] = ScriptBatch(app[keys.REDIS], "return 1")
    yield


def main() -> None:
    settings = Settings.from_env()
    app = create_app(settings)
    app.cleanup_ctx.append(batch_ctx)
    app[TRACKS] = {}
    app[STEPS] = frozenset(os.environ.get("FLOOR_PLAY", "redis").split(","))
    unknown = app[STEPS] - {"redis", "yield", "none", "open", "choice", "headers"}
    assert not unknown, f"FLOOR_PLAY: unknown steps {unknown}"
    replaced = {"api_track": track, "play": play}
    found = set()
    for route in app.router.routes():  # (GET and HEAD of a resource share its name)
        handler = replaced.get(route.name or "")
        if handler is not None:
            route._handler = handler
            found.add(route.name)
    assert found == set(replaced), f"routes not found: {set(replaced) - found}"
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    with contextlib.suppress(asyncio.CancelledError, KeyboardInterrupt):
        asyncio.run(_run(app, settings))


if __name__ == "__main__":
    main()
