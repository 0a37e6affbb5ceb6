"""A partner's side of the bus: publish signals and statuses, consume one's own queue.

What a partner's IT team would otherwise write by hand: JSON with our models, persistent
messages with publisher confirms, `user_id` set so the broker vouches for the sender, a
`received` status sent back when a referral has been taken, and deduplication on
`message_id` (delivery is at least once) that survives a restart: the client keeps the
messages it has handled and the referrals that were withdrawn in a store the partner
chooses (`partnerbus.client_store.ClientStore`, a SQLite file usually).
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from pydantic import TypeAdapter

from partnerbus.broker.topology import Topology
from partnerbus.client_store import ClientStore
from partnerbus.schemas import (
    Message,
    NeedDirected,
    NeedReopened,
    OrientationRecorded,
    ReferralCancelled,
    ReferralStatusChanged,
    ReferralTransferred,
)
from partnerbus.schemas.messages import OutboundMessage

log = logging.getLogger("partnerbus.client")

OUTBOUND: TypeAdapter[Any] = TypeAdapter(OutboundMessage)
Handler = Callable[[Any], Awaitable[None]]
Outcome = Literal["handled", "repeat", "after-withdrawal"]

Decision = (
    ReferralCancelled | NeedDirected | ReferralTransferred | NeedReopened | OrientationRecorded
)
"""An advisor's decision, sent by her agency."""

WITHDRAWABLE = frozenset({"referral", "referral-reminder"})
"""Kinds not handed on once their referral was withdrawn."""


@dataclass
class Handling:
    """What `consume` did with the messages of our queue since this client started."""

    handled: int = 0
    """Handed to the handler, which returned: recorded in the store, then acked."""
    repeats: int = 0
    """Already handled (a redelivery after a restart, a second copy): acked, not handed on."""
    after_withdrawal: int = 0
    """A referral (or its reminder) whose withdrawal came first: acked, not handed on."""
    failed: int = 0
    """Not decoded, or the handler or the store failed: given back to the queue (nack)."""


class PartnerClient:
    """`async with PartnerClient(url, partner_id, store=ClientStore.sqlite(path)) as c:`.

    `store` is where the client remembers what it has handled and which referrals were
    withdrawn: a `ClientStore`, a file path (SQLite) or a database URL. Without one, it
    remembers in memory only, until the process stops (tests, one-off publishers)."""

    def __init__(
        self,
        amqp_url: str,
        partner_id: str,
        *,
        prefix: str = "partnerbus",
        store: ClientStore | str | os.PathLike[str] | None = None,
    ) -> None:
        self.amqp_url = amqp_url
        self.partner_id = partner_id
        self.topology = Topology(prefix)
        self.user = unquote(urlsplit(amqp_url).username or "guest")
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._store_given = store is not None
        self._owns_store = not isinstance(store, ClientStore)
        self.store = _store(store)
        self.counts = Handling()
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    async def __aenter__(self) -> PartnerClient:
        await asyncio.to_thread(self.store.open)
        self._connection = await aio_pika.connect_robust(self.amqp_url)
        self._channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        await self._channel.set_qos(prefetch_count=8)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._connection is not None:
            await self._connection.close()
        if self._owns_store:
            await asyncio.to_thread(self.store.close)

    @property
    def channel(self) -> aio_pika.abc.AbstractChannel:
        if self._channel is None:
            msg = "use `async with PartnerClient(...)` first"
            raise RuntimeError(msg)
        return self._channel

    async def _publish(
        self, exchange: str, message: Message, *, routing_key: str | None = None
    ) -> None:
        ex = await self.channel.get_exchange(exchange, ensure=False)
        await ex.publish(
            aio_pika.Message(
                message.model_dump_json().encode(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=message.message_id,
                type=getattr(message, "type", None),
                user_id=self.user,
            ),
            routing_key=routing_key or self.partner_id,
        )

    async def send_signal(self, signal: Message) -> None:
        """Urgent and asap signals go with the `<partner>.urgent` key, to the bus's urgent
        queue: never behind a routine backlog."""
        key = self.topology.signal_routing_key(
            self.partner_id, str(getattr(signal, "urgency", "routine"))
        )
        await self._publish(self.topology.signals.name, signal, routing_key=key)

    async def send_consent(self, event: Message) -> None:
        await self._publish(self.topology.consents.name, event)

    async def send_decision(self, decision: Decision) -> None:
        """An advisor's decision, published by her agency on the consents exchange (the
        agency's door): only the agency that follows the signal may decide on it."""
        await self._publish(self.topology.consents.name, decision)

    async def _decide(self, kind: type[Decision], **fields: Any) -> str:
        """Build the decision with its envelope (a fresh id, now, this agency), publish it,
        return its message id."""
        decision = kind(
            message_id=str(uuid.uuid4()),
            occurred_at=datetime.now(UTC),
            agency=self.partner_id,
            **fields,
        )
        await self.send_decision(decision)
        return decision.message_id

    async def cancel_referral(self, referral_id: str, *, decided_by: str, reason: str) -> str:
        """The advisor cancels this referral, with her reason (told to her agency, never to
        the partner, who is told to drop it). Returns the decision's message id."""
        return await self._decide(
            ReferralCancelled,
            referral_id=referral_id,
            decided_by=decided_by,
            reason=reason,
        )

    async def direct_need(
        self,
        signal_id: str,
        need: str,
        partner: str,
        *,
        decided_by: str,
        note: str | None = None,
    ) -> str:
        """The advisor sends this need of the signal to the partner she chose (one with an
        agreement covering it, that the person's consent covers). Returns the message id."""
        return await self._decide(
            NeedDirected,
            signal_id=signal_id,
            need=need,
            partner=partner,
            decided_by=decided_by,
            note=note,
        )

    async def transfer_referral(
        self, referral_id: str, partner: str, *, decided_by: str, reason: str
    ) -> str:
        """The advisor moves this accepted referral to another partner she chose."""
        return await self._decide(
            ReferralTransferred,
            referral_id=referral_id,
            partner=partner,
            decided_by=decided_by,
            reason=reason,
        )

    async def reopen_need(self, signal_id: str, need: str, *, decided_by: str, note: str) -> str:
        """The advisor reopens a need whose road ended; the directory routes it again."""
        return await self._decide(
            NeedReopened,
            signal_id=signal_id,
            need=need,
            decided_by=decided_by,
            note=note,
        )

    async def record_orientation(
        self,
        signal_id: str,
        need: str,
        partner: str,
        *,
        decided_by: str,
        channel: Literal["phone", "in-person", "email", "letter"] = "phone",
        oriented_at: datetime | None = None,
        note: str | None = None,
    ) -> str:
        """The advisor records an orientation she made outside the bus (nothing is sent to
        the partner; the closed loop and the figures include it)."""
        # before the decision's own instant: an orientation is never dated after it
        oriented_at = oriented_at or datetime.now(UTC)
        return await self._decide(
            OrientationRecorded,
            signal_id=signal_id,
            need=need,
            partner=partner,
            decided_by=decided_by,
            channel=channel,
            oriented_at=oriented_at,
            note=note,
        )

    async def send_status(self, referral_id: str, status: str, **fields: Any) -> None:
        await self._publish(
            self.topology.statuses.name,
            ReferralStatusChanged(
                message_id=str(uuid.uuid4()),
                occurred_at=datetime.now(UTC),
                referral_id=referral_id,
                partner=self.partner_id,
                status=status,
                **fields,
            ),
        )

    async def consume(self, handler: Handler, *, acknowledge_receipt: bool = True) -> str:
        """Call `handler` with each message of our queue (decoded); ack after it returns.

        - Handled once: the message id is recorded in the store after the handler returned
          and before the ack. A message already recorded (redelivered after a restart,
          published twice) is acked without calling the handler again.
        - Withdrawn means withdrawn: a `referral-withdrawn` is recorded before the handler
          sees it; a `referral` or `referral-reminder` of a referral withdrawn earlier is
          acked and not handed on (logged with its ids, counted in `counts`).
        - Each referral taken is answered with `received` (the status that says the
          partner's consumer acked it), when `acknowledge_receipt`; again when a referral
          already handled is redelivered (the client may have stopped before its ack, or
          before that status left; the bus ignores a repeat).
        - A message the handler (or the store) fails on is given back (nack): after the
          queue's delivery limit, RabbitMQ moves it to our dead-letter queue, where it can
          be read and replayed."""
        if not self._store_given:
            log.warning(
                "%s consumes with no store: what it handles is remembered until it stops, "
                "then handled again if redelivered (pass store=ClientStore.sqlite(path))",
                self.partner_id,
            )
        queue = await self.channel.get_queue(
            self.topology.partner_queue_name(self.partner_id), ensure=False
        )

        async def on_message(raw: AbstractIncomingMessage) -> None:
            try:
                message = OUTBOUND.validate_json(raw.body)
                # a referral, its withdrawal and its reminders one at a time, in arrival order
                async with self._one_at_a_time(getattr(message, "referral_id", raw.message_id)):
                    outcome = await self._take(message, handler)
            except Exception:
                log.exception("message %s not handled; given back to the queue", raw.message_id)
                self.counts.failed += 1
                await raw.nack(requeue=True)
                return
            if not await self._ack(raw):
                return
            receipt = acknowledge_receipt and message.type == "referral"
            if outcome == "handled":
                self.counts.handled += 1
            elif outcome == "repeat":
                self.counts.repeats += 1
                log.info("message %s already handled: acked, not handed on", message.message_id)
                receipt = receipt and bool(raw.redelivered)
            else:
                self.counts.after_withdrawal += 1
                log.info(
                    "%s %s of referral %s, withdrawn before it arrived: acked, not handed on",
                    message.type,
                    message.message_id,
                    message.referral_id,
                )
                receipt = False
            if receipt:
                await self.send_status(message.referral_id, "received")

        return await queue.consume(on_message)

    async def _take(self, message: Any, handler: Handler) -> Outcome:
        """Decide with the store, call the handler when it is the message's first time, and
        record it; an exception leaves the store without the message."""
        store = self.store
        if message.type in WITHDRAWABLE and await asyncio.to_thread(
            store.was_withdrawn, message.referral_id
        ):
            return "after-withdrawal"
        if await asyncio.to_thread(store.was_handled, message.message_id):
            return "repeat"
        if message.type == "referral-withdrawn":
            # before the handler: the consent is gone even if the partner's system fails now
            await asyncio.to_thread(store.record_withdrawn, message.referral_id)
        await handler(message)
        await asyncio.to_thread(store.mark_handled, message.message_id)
        return "handled"

    async def _ack(self, raw: AbstractIncomingMessage) -> bool:
        try:
            await raw.ack()
        except (aio_pika.exceptions.AMQPError, RuntimeError):
            # the channel closed (a restart, a lost connection): the broker delivers the
            # message again, and the store already says it was handled
            log.warning("message %s handled but not acked: it will come again", raw.message_id)
            return False
        return True

    @asynccontextmanager
    async def _one_at_a_time(self, key: str | None) -> AsyncIterator[None]:
        name = key or ""
        lock, users = self._locks.get(name, (asyncio.Lock(), 0))
        self._locks[name] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[name]
            if users == 1:
                del self._locks[name]
            else:
                self._locks[name] = (lock, users - 1)


def _store(store: ClientStore | str | os.PathLike[str] | None) -> ClientStore:
    if isinstance(store, ClientStore):
        return store
    if store is None:
        return ClientStore.memory()
    where = os.fspath(store)
    return ClientStore(where) if "://" in where else ClientStore.sqlite(where)
