"""An HTTP door for partners whose systems cannot speak AMQP.

`POST /v1/signals`, `/v1/statuses`, `/v1/consents` take the same JSON as the bus; the
partner authenticates with a bearer token (derived, like its AMQP password, from the
access secret: `partnerbus access export` and the gateway agree). The gateway validates
the body (422 with the reason, field by field, when it is wrong) and publishes it, with
publisher confirms, as the bus's own user with the partner's user in the
`partnerbus-original-user` header: the intake authenticates the claimed sender against it
exactly as for an AMQP publish. 202 means the broker has the message.
"""

import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from faststream.rabbit import Channel, RabbitBroker, RabbitExchange
from pydantic import TypeAdapter, ValidationError

from partnerbus.directory import Directory
from partnerbus.handlers.delivery import describe_validation
from partnerbus.handlers.subscribers import CONSENT, SIGNAL, STATUS
from partnerbus.schemas import Partner

from .access import derive_password
from .settings import Settings, amqp_user
from .topology import ORIGINAL_USER_HEADER, Topology

bearer = HTTPBearer(auto_error=False)


def create_gateway(settings: Settings, directory: Directory, secret: str) -> FastAPI:
    if not secret:
        msg = "the gateway needs the access secret (PARTNERBUS_ACCESS_SECRET)"
        raise ValueError(msg)
    topology = Topology(settings.prefix)
    url = settings.amqp_url.get_secret_value()
    broker = RabbitBroker(url, default_channel=Channel(on_return_raises=True), log_level=10)
    own_user = amqp_user(url)
    tokens = {derive_password(secret, p.username): p for p in directory.partners()}

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await broker.connect()
        yield
        await broker.stop()

    app = FastAPI(title="partnerbus gateway", lifespan=lifespan)

    def partner(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Partner:
        if credentials is not None:
            for token, candidate in tokens.items():
                if hmac.compare_digest(token, credentials.credentials):
                    return candidate
        raise HTTPException(
            401, "a partner's bearer token is required", {"WWW-Authenticate": "Bearer"}
        )

    async def accept(
        request: Request,
        who: Partner,
        adapter: TypeAdapter[Any],
        exchange: RabbitExchange,
        claimed: str,
    ) -> JSONResponse:
        body = await request.body()
        if len(body) > settings.max_message_bytes:
            raise HTTPException(
                413, f"message too large: {len(body)} bytes, limit {settings.max_message_bytes}"
            )
        try:
            message = adapter.validate_json(body)
        except ValidationError as exc:
            raise HTTPException(422, describe_validation(exc)) from None
        sender = getattr(message, claimed)
        if sender != who.id:
            raise HTTPException(
                403, f"claimed sender {sender!r} is not the authenticated partner {who.id!r}"
            )
        await broker.publish(
            body,
            exchange=exchange,
            routing_key=who.id,
            persist=True,
            mandatory=True,
            message_id=message.message_id,
            message_type=message.type,
            content_type="application/json",
            headers={ORIGINAL_USER_HEADER: who.username},
            user_id=own_user,
            timeout=settings.publish_timeout_s,
        )
        return JSONResponse({"accepted": message.message_id}, status_code=202)

    Who = Annotated[Partner, Depends(partner)]  # noqa: N806 - a type alias, named as one

    @app.post("/v1/signals", status_code=202)
    async def signals(request: Request, who: Who) -> JSONResponse:
        return await accept(request, who, SIGNAL, topology.signals, "source")

    @app.post("/v1/statuses", status_code=202)
    async def statuses(request: Request, who: Who) -> JSONResponse:
        return await accept(request, who, STATUS, topology.statuses, "partner")

    @app.post("/v1/consents", status_code=202)
    async def consents(request: Request, who: Who) -> JSONResponse:
        return await accept(request, who, CONSENT, topology.consents, "agency")

    return app
