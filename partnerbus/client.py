"""A partner's side of the bus: publish signals and statuses, consume one's own queue.

What a partner's IT team would otherwise write by hand: JSON with our models, persistent
messages with publisher confirms, `user_id` set so the broker vouches for the sender, a
`received` status sent back when a referral has been taken, and deduplication on
`message_id` (delivery is at least once).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from pydantic import TypeAdapter

from partnerbus.broker.topology import Topology
from partnerbus.schemas import Message, ReferralStatusChanged
from partnerbus.schemas.messages import OutboundMessage

log = logging.getLogger("partnerbus.client")

OUTBOUND: TypeAdapter[Any] = TypeAdapter(OutboundMessage)
Handler = Callable[[Any], Awaitable[None]]


class PartnerClient:
    def __init__(self, amqp_url: str, partner_id: str, *, prefix: str = "partnerbus") -> None:
        self.amqp_url = amqp_url
        self.partner_id = partner_id
        self.topology = Topology(prefix)
        self.user = unquote(urlsplit(amqp_url).username or "guest")
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._seen: set[str] = set()

    async def __aenter__(self) -> PartnerClient:
        self._connection = await aio_pika.connect_robust(self.amqp_url)
        self._channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        await self._channel.set_qos(prefetch_count=8)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._connection is not None:
            await self._connection.close()

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
        Each referral taken is then answered with `received` (the status that says the
        partner's consumer acked it), when `acknowledge_receipt`. A message the handler
        fails on is given back (nack): after the queue's delivery limit, RabbitMQ moves it
        to our dead-letter queue, where it can be read and replayed."""
        queue = await self.channel.get_queue(
            self.topology.partner_queue_name(self.partner_id), ensure=False
        )

        async def on_message(raw: AbstractIncomingMessage) -> None:
            try:
                message = OUTBOUND.validate_json(raw.body)
                first = message.message_id not in self._seen  # else a redelivery: handled
                if first:
                    await handler(message)
            except Exception:
                log.exception("message %s not handled; given back to the queue", raw.message_id)
                await raw.nack(requeue=True)
                return
            self._seen.add(message.message_id)
            await raw.ack()
            if first and acknowledge_receipt and message.type == "referral":
                await self.send_status(message.referral_id, "received")

        return await queue.consume(on_message)
