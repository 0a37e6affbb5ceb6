"""What every intake subscriber does around its use case, in one place (the middleware of
this bus): size and JSON checks, schema validation, sender authentication, dead-lettering
with a reason, delayed retries of transient failures.

Outcomes of one delivery:
- processed, or a business outcome (a duplicate, a refused consent): acked;
- refused (bad input, spoofed sender, unknown reference): a copy goes to `<queue>.dlq`
  with the reason in the `partnerbus-error` header, then the original is acked; a refusal
  for authentication is marked on the copy (`partnerbus-refusal`), and never replayed;
- held: the dead-letter queue is full and refused the copy: the original is rejected, and
  RabbitMQ keeps it in the work queue until the dead-letter queue has room (at-least-once
  dead-lettering); the refusal is logged and counted, nothing is dropped;
- transient failure (the database is down, a concurrent change that outlasted the
  transaction's re-runs): a copy goes to a delay queue with our attempt header, then the
  original is acked; past the last delay it is refused as above;
- anything else: the exception propagates, FastStream nacks with requeue, and RabbitMQ's
  delivery limit moves the message to the dead-letter queue after a few tries (x-death).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from aio_pika import IncomingMessage
from aio_pika.exceptions import DeliveryError
from pydantic import TypeAdapter, ValidationError
from sqlalchemy.exc import DBAPIError, OperationalError

from partnerbus.broker.topology import (
    ATTEMPT_HEADER,
    AUTHENTICATION,
    ERROR_HEADER,
    ERROR_QUEUE_HEADER,
    LAST_ERROR_HEADER,
    ORIGINAL_EXCHANGE_HEADER,
    ORIGINAL_KEY_HEADER,
    ORIGINAL_USER_HEADER,
    REFUSAL_HEADER,
    Topology,
)
from partnerbus.directory import Directory
from partnerbus.errors import PartnerbusError, StoreError, describe_error, is_database_error
from partnerbus.ledger.store import is_conflict
from partnerbus.usecases import Refused

log = logging.getLogger("partnerbus.delivery")

T = TypeVar("T")
Publish = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class Verdict:
    outcome: str  # processed | duplicate | refused | retried | held
    reason: str | None = None


class NotAuthenticated(Refused):
    """The sender is unknown, or not the partner it claims to be: refused, and its dead
    letter may never be replayed (a replay would have to vouch for a sender nobody knows)."""


class RetryRefused(PartnerbusError):  # noqa: N818 - what the broker did, not a crash
    """The delay queue refused the retry copy (full): the message goes to its dead letters."""


class DeadLetterRefused(PartnerbusError):  # noqa: N818 - what the broker did, not a crash
    """The dead-letter queue refused the bus's copy (full): the original must stay."""


Held = Callable[[IncomingMessage, str], Awaitable[None]]
"""Told when a dead-letter copy is refused: count it where ops see it."""


async def ignore_held(_raw: IncomingMessage, _queue: str) -> None:
    return None


def describe_validation(error: ValidationError) -> str:
    """A short, readable account of what is wrong, field by field."""
    parts = []
    for item in error.errors(include_url=False)[:8]:
        where = ".".join(str(p) for p in item["loc"]) or "message"
        parts.append(f"{where}: {item['msg']}")
    more = error.error_count() - len(parts)
    return "invalid message: " + "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


def is_transient(exc: BaseException) -> bool:
    """Failures that another try later may not meet: the database unreachable or locked,
    or a concurrent change that the transaction's own re-runs did not outlast (a referral
    a relay took longer than they did to publish and record, `mark_sending`)."""
    if isinstance(exc, OperationalError) or is_conflict(exc):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


class Intake:
    """Decode, authenticate and run one use case for one work queue."""

    def __init__(
        self,
        *,
        queue: str,
        topology: Topology,
        directory: Directory,
        publish: Publish,
        trusted_senders: tuple[str, ...],
        max_bytes: int,
        own_user: str,
        publish_timeout_s: float = 10.0,
        on_held: Held = ignore_held,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.queue = queue
        self.clock = clock
        self.publish_timeout_s = publish_timeout_s
        self.topology = topology
        self.directory = directory
        self.publish = publish
        self.own_user = own_user
        self.trusted = frozenset((*trusted_senders, own_user))
        self.max_bytes = max_bytes
        self.on_held = on_held

    def decode(self, body: bytes, adapter: TypeAdapter[T]) -> T:
        if len(body) > self.max_bytes:
            raise Refused(f"message too large: {len(body)} bytes, limit {self.max_bytes}")
        try:
            return adapter.validate_json(body)  # one parse: syntax and schema together
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            if first["type"] == "json_invalid":
                raise Refused(f"not JSON: {first['msg']}") from None
            raise Refused(describe_validation(exc)) from None

    def from_bus(self, raw: IncomingMessage) -> bool:
        """Published by the bus itself (a delay queue, a replay, the HTTP gateway)?
        RabbitMQ refuses a `user_id` that is not the connection's, so this is proof."""
        return raw.user_id == self.own_user

    def vouched_sender(self, raw: IncomingMessage) -> str | None:
        """The AMQP user that first sent this message. Our header naming the first sender
        is honoured only on the bus's own messages: a partner that sets it itself is
        ignored, so it cannot pass for another partner, now or after a replay."""
        headers = raw.headers or {}
        if self.from_bus(raw) and ORIGINAL_USER_HEADER in headers:
            # Present but empty: the bus carried a message whose sender nobody knows (a
            # replay, a retry). Unknown, never the bus itself.
            return str(headers[ORIGINAL_USER_HEADER] or "") or None
        return raw.user_id

    def _origin_headers(self, raw: IncomingMessage) -> dict[str, Any]:
        """The message's headers, with our origin headers set to what the bus vouches for."""
        headers: dict[str, Any] = dict(raw.headers or {})
        ours = self.from_bus(raw)
        headers[ORIGINAL_USER_HEADER] = self.vouched_sender(raw) or ""
        headers[ORIGINAL_EXCHANGE_HEADER] = (
            (ours and headers.get(ORIGINAL_EXCHANGE_HEADER)) or raw.exchange or ""
        )
        headers[ORIGINAL_KEY_HEADER] = (
            (ours and headers.get(ORIGINAL_KEY_HEADER)) or raw.routing_key or ""
        )
        return headers

    def authenticate(self, raw: IncomingMessage, claimed_partner: str) -> None:
        """The claimed partner must be the AMQP user RabbitMQ authenticated."""
        user = self.vouched_sender(raw)
        if user is None:
            raise NotAuthenticated(
                "no user_id property: publish with user_id set to your AMQP user name, "
                "so that the broker vouches for the sender"
            )
        if user in self.trusted:
            return
        if claimed_partner not in self.directory:
            raise NotAuthenticated(f"unknown partner {claimed_partner!r}")
        expected = self.directory.partner(claimed_partner).username
        if user != expected:
            raise NotAuthenticated(
                f"claimed sender {claimed_partner!r} does not match the authenticated AMQP "
                f"user {user!r}"
            )

    async def _publish_copy(
        self, raw: IncomingMessage, headers: dict[str, Any], **where: Any
    ) -> None:
        """A persistent, confirmed copy published as the bus (so that our headers on it are
        trusted later); unroutable raised, bounded by the publish timeout. Its AMQP
        `timestamp` is when the copy was made, by the ledger's clock: retention purges dead
        letters and retry copies by it."""
        if self.clock is not None:
            where.setdefault("timestamp", self.clock())
        await self.publish(
            raw.body,
            headers=headers,
            message_id=raw.message_id,
            message_type=raw.type,
            content_type=raw.content_type,
            user_id=self.own_user,
            persist=True,
            mandatory=True,
            timeout=self.publish_timeout_s,
            **where,
        )

    async def dead_letter(
        self, raw: IncomingMessage, reason: str, *, refusal: str | None = None
    ) -> None:
        """Keep the message where ops can see it, with the reason and its original headers
        (`refusal`: why it may never be replayed). Raises DeadLetterRefused when the
        dead-letter queue is full: the caller must not ack the original."""
        headers = self._origin_headers(raw)
        headers[ERROR_HEADER] = reason[:4000]
        headers[ERROR_QUEUE_HEADER] = self.queue
        headers.pop(REFUSAL_HEADER, None)
        if refusal is not None:
            headers[REFUSAL_HEADER] = refusal
        try:
            await self._publish_copy(
                raw, headers, exchange=self.topology.dead_letters, routing_key=self.queue
            )
        except DeliveryError as exc:  # nacked (the bounded queue is full) or returned
            returned = type(exc.frame).__name__ == "Return"  # pamqp's Basic.Return
            how = "returned: no queue bound" if returned else "full"
            raise DeadLetterRefused(how) from None
        log.warning("dead-lettered %s from %s: %s", raw.message_id, self.queue, reason)

    async def retry_later(self, raw: IncomingMessage, error: BaseException) -> bool:
        """Put a copy in the next delay queue; False when no delay is left; RetryRefused
        when the delay queue is full."""
        headers = self._origin_headers(raw)
        attempt = int(headers.get(ATTEMPT_HEADER, 0) or 0) if self.from_bus(raw) else 0
        if attempt >= len(self.topology.retry_delays_ms):
            return False
        headers[ATTEMPT_HEADER] = attempt + 1
        headers[LAST_ERROR_HEADER] = describe_error(error)[:2000]
        try:
            await self._publish_copy(
                raw,
                headers,
                exchange=self.topology.retries,
                routing_key=self.topology.retry_queue_name(self.queue, attempt),
            )
        except DeliveryError:  # nacked: the bounded delay queue is full
            raise RetryRefused from None
        log.warning(
            "retry %d of %s in %s: %s",
            attempt + 1,
            raw.message_id,
            self.queue,
            headers[LAST_ERROR_HEADER],
        )
        return True

    async def run(
        self,
        raw: IncomingMessage,
        body: bytes,
        adapter: TypeAdapter[T],
        sender_of: Callable[[T], str],
        work: Callable[[T], Awaitable[bool]],
    ) -> Verdict:
        try:
            try:
                message = self.decode(body, adapter)
                self.authenticate(raw, sender_of(message))
                done = await work(message)
            except Refused as refusal:
                kind = AUTHENTICATION if isinstance(refusal, NotAuthenticated) else None
                await self.dead_letter(raw, str(refusal), refusal=kind)
                return Verdict("refused", str(refusal))
            except Exception as exc:
                if not is_transient(exc):
                    if is_database_error(exc):
                        # propagated (nack, then the delivery limit), but its text carries
                        # values
                        raise StoreError(describe_error(exc)) from None
                    raise
                said = describe_error(exc)
                try:
                    if await self.retry_later(raw, exc):
                        return Verdict("retried", said)
                    reason = f"gave up after {len(self.topology.retry_delays_ms)} retries: {said}"
                except RetryRefused:
                    reason = f"delay queue full after a transient failure ({type(exc).__name__})"
                await self.dead_letter(raw, reason)
                return Verdict("refused", reason)
        except DeadLetterRefused as refused:
            return await self._held(raw, str(refused))
        return Verdict("processed" if done else "duplicate")

    async def _held(self, raw: IncomingMessage, how: str) -> Verdict:
        """The dead-letter queue is full: the caller rejects the original, which RabbitMQ
        then keeps in this work queue, dead-lettered but not delivered, and moves to the
        dead-letter queue once it has room (at-least-once dead-lettering). Logged and
        counted; the message is never acked away."""
        log.error(
            "the dead-letter queue of %s refused the copy of %s (%s): the message stays in %s "
            "until there is room (see partnerbus dlq list)",
            self.queue,
            raw.message_id,
            how,
            self.queue,
        )
        try:
            await self.on_held(raw, self.queue)
        except Exception as exc:  # the count is for ops; the message is safe either way
            log.warning(
                "could not count the refused dead letter %s: %s", raw.message_id, type(exc).__name__
            )
        return Verdict("held", f"dead-letter queue of {self.queue} refused the copy ({how})")
