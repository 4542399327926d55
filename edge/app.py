"""`create_app(settings)`: wires settings, resources, middlewares and routes. No I/O here."""

from __future__ import annotations

from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from edge import keys
from edge.alerts import Alerts
from edge.dashboard import Sampler
from edge.jobs import jobs_ctx
from edge.metrics import Metrics
from edge.middlewares import errors_as_json, observe, response_headers
from edge.resources import embedded_ctx, postgres_ctx, redis_ctx, schema_ctx, streaming_ctx
from edge.settings import Settings
from edge.views import api, events, media, ops, pages, play

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "templates"
STATIC = ROOT / "static"


def create_app(settings: Settings) -> web.Application:
    # observe (request id, access log, HTTP metrics, JSON errors) can be switched off only to
    # measure what it costs (bench/); errors are always JSON.
    metrics = Metrics()
    alerts = Alerts(settings, metrics)
    middlewares = [observe(metrics)] if settings.observe else [errors_as_json]
    app = web.Application(middlewares=middlewares, client_max_size=settings.max_body_bytes)
    app[keys.SETTINGS] = settings
    app.on_response_prepare.append(response_headers)
    metrics.watch_pool(lambda: app.get(keys.PG_POOL))
    app[keys.METRICS] = metrics
    app[keys.ALERTS] = alerts
    app[keys.SAMPLER] = Sampler(metrics, app[keys.ALERTS])
    aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True)
    app[media.ETAGS] = media.Etags()
    app[play.TRACK_INFOS] = play.TrackInfos()
    app.cleanup_ctx.extend(
        [embedded_ctx, schema_ctx, postgres_ctx, redis_ctx, streaming_ctx, jobs_ctx]
    )
    app.router.add_routes(ops.routes)
    app.router.add_routes(api.routes)
    app.router.add_routes(play.routes)
    app.router.add_routes(events.routes)
    app.router.add_routes(media.routes)
    app.router.add_routes(pages.routes)
    app.router.add_static("/static", STATIC, name="static")
    return app
