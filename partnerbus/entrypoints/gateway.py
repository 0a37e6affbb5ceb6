"""An HTTP door for partners whose systems cannot speak AMQP.

`POST /v1/signals`, `/v1/statuses`, `/v1/consents` take the same JSON as the bus. What
guards the door, in the order it is checked:

1. a bearer token, issued per partner by `partnerbus gateway token issue` (random, shown
   once, never the AMQP password); the gateway keeps only SHA-256 digests, read from
   `PARTNERBUS_GATEWAY_TOKENS_PATH` (reloaded when the file changes, so a revoked token
   stops working at once). Anything else in `Authorization`: 401;
2. a per-partner rate limit (`limits`, moving window, `PARTNERBUS_GATEWAY_RATE_LIMIT`):
   429 with `Retry-After`;
3. the partner's rights, from the same table as its RabbitMQ permissions
   (`partnerbus.directory.rights`): a partner without advisors may not post consent
   events, exactly as it gets ACCESS_REFUSED over AMQP: 403;
4. the body's size, checked against `Content-Length` and again while it is read: 413;
5. the schema (422, field by field) and the claimed sender, which must be the token's
   partner: 403.

It then publishes, with publisher confirms, as the bus's own user with the partner's user
in the `partnerbus-original-user` header: the intake authenticates the claimed sender
against it exactly as for an AMQP publish, and the use cases apply the same rules whatever
the door. 202 means the broker has the message; 503 that it did not confirm it (or that
the token file cannot be read), so the partner sends it again.

The OpenAPI document (every route, body, answer and the bearer scheme) is served at
`/openapi.json` and committed as docs/gateway-openapi.json (`partnerbus gateway openapi`).
"""

import hashlib
import json
import logging
import math
import os
import re
import secrets
import stat
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from aiormq.exceptions import AMQPError, ChannelInvalidStateError
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Security
from fastapi.openapi.utils import get_openapi
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from faststream.rabbit import Channel, RabbitBroker, RabbitExchange
from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from partnerbus.broker.access import intake_exchange
from partnerbus.broker.topology import ORIGINAL_USER_HEADER, Topology
from partnerbus.directory import Directory
from partnerbus.directory.rights import Intake, refusal
from partnerbus.errors import ConfigError
from partnerbus.handlers.delivery import describe_validation
from partnerbus.handlers.subscribers import CONSENT, SIGNAL, STATUS
from partnerbus.schemas import Partner, Signal
from partnerbus.settings import Settings, amqp_user

MAX_TOKEN_CHARS = 256
"""Longer `Authorization` values are not tokens: refused before any hashing."""
TOKEN_SHAPE = re.compile(r"^[A-Za-z0-9_-]{20,256}$")
"""What `issue_token` makes (URL-safe base64); anything else is refused without a lookup."""
TOKENS_ENV = "PARTNERBUS_GATEWAY_TOKENS_PATH"
UNAUTHORIZED = {"WWW-Authenticate": "Bearer"}
log = logging.getLogger("partnerbus.gateway")


# tokens --------------------------------------------------------------------------------


def token_digest(token: str) -> str:
    """What the token file keeps of a token: SHA-256, hex. A token is 256 random bits, so
    a plain hash suffices (no salt or slow hash is needed against guessing)."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def load_token_hashes(path: Path) -> dict[str, str]:
    """Partner id -> token digest. Refuses a file others may read or write, or one that is
    not such a mapping."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        msg = f"{path} is readable or writable by others (mode {mode:o}): chmod 600 it"
        raise ConfigError(msg)
    text = path.read_text(encoding="utf-8").strip()
    data = json.loads(text) if text else {}
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v)
        for k, v in data.items()
    ):
        msg = f"{path} is not a JSON object of partner id -> SHA-256 hex digest"
        raise ConfigError(msg)
    return data


def _write_hashes(path: Path, hashes: dict[str, str]) -> None:
    """Replace the file atomically, created with mode 0600."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(dict(sorted(hashes.items())), out, indent=2)
        out.write("\n")
    os.replace(tmp, path)


def issue_token(path: Path, partner_id: str) -> str:
    """A new random token for the partner (replacing its previous one); only its digest is
    written. The caller shows the token once."""
    hashes = load_token_hashes(path) if path.exists() else {}
    token = secrets.token_urlsafe(32)
    hashes[partner_id] = token_digest(token)
    _write_hashes(path, hashes)
    return token


def revoke_token(path: Path, partner_id: str) -> bool:
    """Forget the partner's token; False when it had none."""
    hashes = load_token_hashes(path) if path.exists() else {}
    if hashes.pop(partner_id, None) is None:
        return False
    _write_hashes(path, hashes)
    return True


@dataclass
class TokenFile:
    """The token digests, reloaded when the file changes (a revocation acts at once)."""

    path: Path
    _stamp: tuple[int, int, int] | None = None
    _by_digest: dict[str, str] = field(default_factory=dict)

    def partner_id(self, token: str) -> str | None:
        """The partner whose token this is. Looked up by digest: what a lookup's timing
        could tell is about SHA-256 outputs, of no use for finding a token."""
        return self.partner_of_digest(token_digest(token))

    def partner_of_digest(self, digest: str) -> str | None:
        """The partner whose token has this digest, while it is not revoked (the ops
        page's partner sessions keep the digest and ask again at each request)."""
        st = self.path.stat()
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._by_digest = {d: p for p, d in load_token_hashes(self.path).items()}
            self._stamp = stamp
        return self._by_digest.get(digest)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None for anything else
    (missing, empty, another scheme, too long, not the shape of our tokens)."""
    if not authorization or len(authorization) > MAX_TOKEN_CHARS + 7:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not TOKEN_SHAPE.fullmatch(token):
        return None
    return token


# the app -------------------------------------------------------------------------------


class Accepted(BaseModel):
    """The broker has the message (published with confirms)."""

    accepted: str = Field(description="The message's `message_id`.")


class Refusal(BaseModel):
    """Why the request was refused, in a sentence."""

    detail: str


async def read_bounded(request: Request, limit: int) -> bytes:
    """The body, at most `limit` bytes: a larger `Content-Length` is refused before reading,
    and a body without one (chunked) is cut off as soon as it passes the limit."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HTTPException(400, "Content-Length is not a number")
        if int(declared) > limit:
            raise HTTPException(413, f"message too large: {declared} bytes, limit {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"message too large: over {limit} bytes")
    return bytes(body)


@dataclass
class Gateway:
    """What the routes need at run time: the token file, the limiter, the rights, the broker."""

    settings: Settings
    directory: Directory
    tokens: TokenFile
    broker: RabbitBroker
    consent_writers: bool
    topology: Topology = field(init=False)
    own_user: str = field(init=False)
    limiter: MovingWindowRateLimiter = field(init=False)
    limits: list[RateLimitItem] = field(init=False)

    def __post_init__(self) -> None:
        self.topology = Topology(self.settings.prefix)
        self.own_user = amqp_user(self.settings.amqp_url.get_secret_value())
        self.limiter = MovingWindowRateLimiter(MemoryStorage())
        self.limits = parse_many(self.settings.gateway_rate_limit)

    def partner(self, authorization: str | None) -> Partner:
        token = bearer_token(authorization)
        try:
            partner_id = self.tokens.partner_id(token) if token is not None else None
        except (OSError, ValueError) as exc:
            log.error("gateway token file unusable: %s", exc)
            raise HTTPException(503, "the gateway cannot check tokens now") from None
        if partner_id is not None and partner_id in self.directory:
            return self.directory.partner(partner_id)
        raise HTTPException(401, "a partner's bearer token is required", UNAUTHORIZED)

    def within_rate(self, who: Partner) -> None:
        for item in self.limits:
            if not self.limiter.hit(item, "gateway", who.id):
                reset = self.limiter.get_window_stats(item, "gateway", who.id).reset_time
                wait = max(1, math.ceil(reset - time.time()))
                raise HTTPException(
                    429,
                    f"rate limit {item} reached for {who.id}; retry in {wait} s",
                    {"Retry-After": str(wait)},
                )

    async def accept(
        self,
        request: Request,
        who: Partner,
        intake: Intake,
        adapter: TypeAdapter[Any],
        claimed: str,
    ) -> Accepted:
        self.within_rate(who)
        refused = refusal(who, intake, consent_writers=self.consent_writers)
        if refused is not None:
            raise HTTPException(403, refused)
        body = await read_bounded(request, self.settings.max_message_bytes)
        try:
            message = adapter.validate_json(body)
        except ValidationError as exc:
            raise HTTPException(422, describe_validation(exc)) from None
        sender = getattr(message, claimed)
        if sender != who.id:
            raise HTTPException(
                403, f"claimed sender {sender!r} is not the authenticated partner {who.id!r}"
            )
        exchange: RabbitExchange = intake_exchange(self.topology, intake)
        # Urgent and asap signals take the urgent queue, as a partner's own client sends them.
        urgency = message.urgency if isinstance(message, Signal) else None
        key = self.topology.signal_routing_key(who.id, urgency) if urgency else who.id
        try:
            await self._publish(body, exchange, key, message, who)
        except (AMQPError, ChannelInvalidStateError, ConnectionError, TimeoutError) as exc:
            # Not confirmed: the partner sends it again (the bus drops a repeated message_id).
            log.error("gateway publish of %s failed: %r", message.message_id, exc)
            raise HTTPException(
                503, "the broker did not confirm the message: send it again later"
            ) from None
        return Accepted(accepted=message.message_id)

    async def _publish(
        self, body: bytes, exchange: RabbitExchange, key: str, message: Any, who: Partner
    ) -> None:
        await self.broker.publish(
            body,
            exchange=exchange,
            routing_key=key,
            persist=True,
            mandatory=True,
            message_id=message.message_id,
            message_type=message.type,
            content_type="application/json",
            headers={ORIGINAL_USER_HEADER: who.username},
            user_id=self.own_user,
            timeout=self.settings.publish_timeout_s,
        )


def create_gateway(
    settings: Settings, directory: Directory, *, consent_writers: bool = True
) -> FastAPI:
    """The gateway app. `consent_writers` must match `partnerbus access apply`'s option."""
    if settings.gateway_tokens_path is None:
        msg = (
            f"the gateway needs its token file ({TOKENS_ENV}); issue tokens with "
            "`partnerbus gateway token issue PARTNER`"
        )
        raise ConfigError(msg)
    tokens = TokenFile(settings.gateway_tokens_path)
    load_token_hashes(settings.gateway_tokens_path)  # refuse a bad file at start
    url = settings.amqp_url.get_secret_value()
    broker = RabbitBroker(url, default_channel=Channel(on_return_raises=True), log_level=10)
    gateway = Gateway(settings, directory, tokens, broker, consent_writers)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await broker.connect()
        yield
        await broker.stop()

    app = _app(lifespan)
    app.state.gateway = gateway
    return app


# the routes and their document ---------------------------------------------------------


BEARER = HTTPBearer(
    scheme_name="partnerToken",
    bearerFormat="opaque",
    description=(
        "`Authorization: Bearer <token>`: the partner's gateway token, issued by "
        "`partnerbus gateway token issue PARTNER` (random, 43 URL-safe characters; not the "
        "partner's AMQP password). A missing, malformed, unknown or revoked token is a 401."
    ),
    auto_error=False,
)


def _partner(
    request: Request,
    _bearer: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)],
) -> Partner:
    # The raw header is checked, not `_bearer`: only the shape of our own tokens is looked up.
    gateway: Gateway = request.app.state.gateway
    return gateway.partner(request.headers.get("authorization"))


Who = Annotated[Partner, Depends(_partner)]


def _refusal(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"model": Refusal, "description": description} | (
        {"headers": headers} if headers else {}
    )


REFUSALS: dict[int | str, dict[str, Any]] = {
    400: _refusal("`Content-Length` is not a number."),
    401: _refusal(
        "No valid token: missing, malformed, another scheme, unknown or revoked.",
        {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}},
    ),
    403: _refusal(
        "The partner has not the right to this route (as over AMQP), or the message claims "
        "another sender than the token's partner."
    ),
    413: _refusal("The body (declared or as read) is larger than the bus's message limit."),
    422: _refusal("Not a valid message of this route: the reason, field by field."),
    429: _refusal(
        "The partner's rate limit is reached.",
        {
            "Retry-After": {
                "description": "Seconds to wait before the next request.",
                "schema": {"type": "integer", "minimum": 1},
            }
        },
    ),
    503: _refusal(
        "The gateway cannot check tokens now, or the broker did not confirm the message: "
        "send it again later (a repeated `message_id` is dropped by the bus)."
    ),
}


def _message_body(name: str, what: str) -> dict[str, Any]:
    """The request body as documented: the body is read by hand (to bound its size while it
    is read), so FastAPI does not see it; its schema is one of `MESSAGE_SCHEMAS`."""
    return {
        "requestBody": {
            "required": True,
            "description": what,
            "content": {"application/json": {"schema": {"$ref": f"{REF}{name}"}}},
        }
    }


REF = "#/components/schemas/"
ROUTE: dict[str, Any] = {
    "status_code": 202,
    "response_model": Accepted,
    "response_description": "The broker has the message.",
    "responses": REFUSALS,
}
router = APIRouter(prefix="/v1", tags=["intake"])


@router.post(
    "/signals",
    summary="Send a signal",
    openapi_extra=_message_body("Signal", "A signal; `source` is the token's partner."),
    **ROUTE,
)
async def signals(request: Request, who: Who) -> Accepted:
    gateway: Gateway = request.app.state.gateway
    return await gateway.accept(request, who, "signals", SIGNAL, "source")


@router.post(
    "/statuses",
    summary="Send a referral status or a capacity change",
    openapi_extra=_message_body(
        "StatusMessage", "A status or capacity event; `partner` is the token's partner."
    ),
    **ROUTE,
)
async def statuses(request: Request, who: Who) -> Accepted:
    gateway: Gateway = request.app.state.gateway
    return await gateway.accept(request, who, "statuses", STATUS, "partner")


@router.post(
    "/consents",
    summary=(
        "Record a consent granted, refused or revoked, or an advisor's decision on a "
        "referral (partners with advisors only)"
    ),
    openapi_extra=_message_body(
        "ConsentMessage",
        "A consent event or an advisor's decision (a referral cancelled or transferred, a "
        "need sent to the partner she chose or reopened, an orientation made outside the "
        "bus); `agency` is the token's partner.",
    ),
    **ROUTE,
)
async def consents(request: Request, who: Who) -> Accepted:
    gateway: Gateway = request.app.state.gateway
    return await gateway.accept(request, who, "consents", CONSENT, "agency")


def message_schemas() -> dict[str, Any]:
    """The JSON schemas of the three bodies and of everything they refer to, by name."""
    named = {"Signal": SIGNAL, "StatusMessage": STATUS, "ConsentMessage": CONSENT}
    tops, defs = TypeAdapter.json_schemas(
        [(name, "validation", adapter) for name, adapter in named.items()],
        ref_template=REF + "{model}",
    )
    schemas: dict[str, Any] = dict(defs.get("$defs", {}))
    for (name, _mode), schema in tops.items():
        if schema != {"$ref": REF + name}:  # a union is named here; a model is already
            schemas[name] = schema
        # In a union, `type` picks the member, so it must be sent (pydantic refuses a body
        # without it) although each member alone has it as a default.
        for ref in schema.get("discriminator", {}).get("mapping", {}).values():
            required = schemas[ref.removeprefix(REF)].setdefault("required", [])
            if "type" not in required:
                required.append("type")
    return dict(sorted(schemas.items()))


DESCRIPTION = """\
The HTTP door of partnerbus for partners whose systems cannot speak AMQP: the same JSON
messages as on the bus, with the partner's gateway token and exactly the partner's AMQP
rights. Checked in this order: the token (401), the partner's rate limit (429), the
partner's right to the route (403), the body's size (413), the schema (422), the claimed
sender (403). 202 means the broker has the message; the bus then handles it as any other.
"""


def _app(lifespan: Any = None) -> FastAPI:
    """The routes and their OpenAPI document; `create_gateway` adds what they run on."""
    # The document is served at /openapi.json (and kept in docs/gateway-openapi.json); the
    # Swagger and ReDoc pages are not, as they load their scripts from a public CDN.
    app = FastAPI(
        title="partnerbus gateway",
        version="1",
        description=DESCRIPTION,
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.include_router(router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            document.setdefault("components", {}).setdefault("schemas", {}).update(
                message_schemas()
            )
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's way to extend it
    return app


def openapi_document() -> str:
    """The gateway's OpenAPI document as committed in docs/gateway-openapi.json."""
    return json.dumps(_app().openapi(), indent=2) + "\n"


__all__ = [
    "Accepted",
    "Gateway",
    "Refusal",
    "TokenFile",
    "bearer_token",
    "create_gateway",
    "issue_token",
    "load_token_hashes",
    "openapi_document",
    "read_bounded",
    "revoke_token",
    "token_digest",
]
