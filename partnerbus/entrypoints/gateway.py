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
the door. 202 means the broker has the message.
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

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from faststream.rabbit import Channel, RabbitBroker, RabbitExchange
from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from pydantic import TypeAdapter, ValidationError

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
        st = self.path.stat()
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._by_digest = {d: p for p, d in load_token_hashes(self.path).items()}
            self._stamp = stamp
        return self._by_digest.get(token_digest(token))


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
    topology = Topology(settings.prefix)
    url = settings.amqp_url.get_secret_value()
    broker = RabbitBroker(url, default_channel=Channel(on_return_raises=True), log_level=10)
    own_user = amqp_user(url)
    limiter = MovingWindowRateLimiter(MemoryStorage())
    limits: list[RateLimitItem] = parse_many(settings.gateway_rate_limit)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await broker.connect()
        yield
        await broker.stop()

    app = FastAPI(title="partnerbus gateway", lifespan=lifespan)

    def partner(request: Request) -> Partner:
        token = bearer_token(request.headers.get("authorization"))
        try:
            partner_id = tokens.partner_id(token) if token is not None else None
        except (OSError, ValueError) as exc:
            log.error("gateway token file unusable: %s", exc)
            raise HTTPException(503, "the gateway cannot check tokens now") from None
        if partner_id is not None and partner_id in directory:
            return directory.partner(partner_id)
        raise HTTPException(401, "a partner's bearer token is required", UNAUTHORIZED)

    def within_rate(who: Partner) -> None:
        for item in limits:
            if not limiter.hit(item, "gateway", who.id):
                reset = limiter.get_window_stats(item, "gateway", who.id).reset_time
                wait = max(1, math.ceil(reset - time.time()))
                raise HTTPException(
                    429,
                    f"rate limit {item} reached for {who.id}; retry in {wait} s",
                    {"Retry-After": str(wait)},
                )

    async def accept(
        request: Request,
        who: Partner,
        intake: Intake,
        adapter: TypeAdapter[Any],
        claimed: str,
    ) -> JSONResponse:
        within_rate(who)
        refused = refusal(who, intake, consent_writers=consent_writers)
        if refused is not None:
            raise HTTPException(403, refused)
        body = await read_bounded(request, settings.max_message_bytes)
        try:
            message = adapter.validate_json(body)
        except ValidationError as exc:
            raise HTTPException(422, describe_validation(exc)) from None
        sender = getattr(message, claimed)
        if sender != who.id:
            raise HTTPException(
                403, f"claimed sender {sender!r} is not the authenticated partner {who.id!r}"
            )
        exchange: RabbitExchange = intake_exchange(topology, intake)
        # Urgent and asap signals take the urgent queue, as a partner's own client sends them.
        urgency = message.urgency if isinstance(message, Signal) else None
        key = topology.signal_routing_key(who.id, urgency) if urgency else who.id
        await broker.publish(
            body,
            exchange=exchange,
            routing_key=key,
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
        return await accept(request, who, "signals", SIGNAL, "source")

    @app.post("/v1/statuses", status_code=202)
    async def statuses(request: Request, who: Who) -> JSONResponse:
        return await accept(request, who, "statuses", STATUS, "partner")

    @app.post("/v1/consents", status_code=202)
    async def consents(request: Request, who: Who) -> JSONResponse:
        return await accept(request, who, "consents", CONSENT, "agency")

    return app


__all__ = [
    "TokenFile",
    "bearer_token",
    "create_gateway",
    "issue_token",
    "load_token_hashes",
    "read_bounded",
    "revoke_token",
    "token_digest",
]
