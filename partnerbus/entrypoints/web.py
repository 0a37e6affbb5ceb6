"""`partnerbus ops serve`: the monitor's page, Prometheus metrics and a health check.

The page and `/metrics` need HTTP Basic authentication (`PARTNERBUS_OPS_USER`, default
`ops`, and `PARTNERBUS_OPS_PASSWORD`, without which the app refuses to start); `/health`
is open and says only up or down. Every viewer gets the same snapshot, taken at most once
per `PARTNERBUS_OPS_REFRESH_S` over one long-lived AMQP connection.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, status
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from prometheus_client import CONTENT_TYPE_LATEST

from partnerbus.broker.topology import Topology
from partnerbus.directory import Directory
from partnerbus.ledger.store import Store
from partnerbus.ops.monitor import BrokerProbe, Snapshot, SnapshotCache, metrics, page, snapshot
from partnerbus.schemas import utcnow
from partnerbus.settings import Settings

log = logging.getLogger("partnerbus.ops")
MIN_PASSWORD_CHARS = 16
REALM = "partnerbus ops"
BASIC = HTTPBasic(realm=REALM, auto_error=False)


def ops_credentials(settings: Settings) -> tuple[bytes, bytes]:
    """The page's user and password, as bytes; ValueError when the password is missing or
    short (the page shows the bus's state: it is never served without one)."""
    password = settings.ops_password.get_secret_value()
    if len(password) < MIN_PASSWORD_CHARS or not (password + settings.ops_user).isascii():
        msg = (
            f"the ops page needs PARTNERBUS_OPS_PASSWORD (at least {MIN_PASSWORD_CHARS} "
            "ASCII characters, e.g. `openssl rand -base64 24`)"
        )
        raise ValueError(msg)
    return settings.ops_user.encode(), password.encode()


def create_ops_app(
    settings: Settings,
    directory: Directory,
    store: Store,
    clock: Callable[[], datetime] = utcnow,
) -> FastAPI:
    user, password = ops_credentials(settings)
    topology = Topology(settings.prefix)
    partner_ids = [p.id for p in directory.partners()]
    probe = BrokerProbe(settings.amqp_url.get_secret_value())

    async def take() -> Snapshot:
        return await snapshot(probe, topology, partner_ids, store, clock())

    cache = SnapshotCache(take, settings.ops_refresh_s)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await probe.close()

    app = FastAPI(title="partnerbus ops", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.snapshots = cache
    app.state.probe = probe

    def operator(credentials: Annotated[HTTPBasicCredentials | None, Depends(BASIC)]) -> None:
        """Compared in constant time, as bytes. A malformed header (not base64, not ASCII,
        no colon) is refused with 401 by `HTTPBasic` itself."""
        if credentials is not None:
            given_user = credentials.username.encode()
            given_password = credentials.password.encode()
            user_ok = hmac.compare_digest(given_user, user)
            password_ok = hmac.compare_digest(given_password, password)
            if user_ok and password_ok:
                return
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "the ops page needs its credentials (HTTP Basic)",
            headers={"WWW-Authenticate": f'Basic realm="{REALM}"'},
        )

    guarded = [Depends(operator)]

    @app.get("/", response_class=HTMLResponse, dependencies=guarded)
    async def index() -> str:
        return page(await cache.get(), settings.prefix)

    @app.get("/metrics", dependencies=guarded)
    async def prometheus() -> Response:
        return Response(metrics(await cache.get()), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health() -> JSONResponse:
        """Open to anyone (container checks): up or down, nothing else."""
        try:
            ok = (await cache.get()).broker_error is None
        except Exception as exc:  # the ledger cannot be read
            log.warning("ops health: the ledger is unreadable (%s)", type(exc).__name__)
            ok = False
        return JSONResponse({"status": "up" if ok else "down"}, status_code=200 if ok else 503)

    return app
