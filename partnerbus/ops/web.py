"""`partnerbus ops serve`: the monitor's page, Prometheus metrics and a health check."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from partnerbus.broker.settings import Settings
from partnerbus.broker.topology import Topology
from partnerbus.directory import Directory
from partnerbus.ledger.store import Store
from partnerbus.schemas import utcnow

from .monitor import Snapshot, metrics, page, snapshot


def create_ops_app(
    settings: Settings,
    directory: Directory,
    store: Store,
    clock: Callable[[], datetime] = utcnow,
) -> FastAPI:
    topology = Topology(settings.prefix)
    partner_ids = [p.id for p in directory.partners()]
    app = FastAPI(title="partnerbus ops", docs_url=None, redoc_url=None)

    async def take() -> Snapshot:
        return await snapshot(
            settings.amqp_url.get_secret_value(), topology, partner_ids, store, clock()
        )

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page(await take(), settings.prefix)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics(await take()), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health() -> JSONResponse:
        snap = await take()
        ok = snap.broker_error is None
        body = {"broker": "up" if ok else snap.broker_error, "database": "up"}
        return JSONResponse(body, status_code=200 if ok else 503)

    return app
