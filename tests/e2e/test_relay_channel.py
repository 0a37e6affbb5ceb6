"""The relay's own channel on the real broker: confirmed publishes with the properties
FastStream gave them, a nack and a return raised as `DeliveryError`, and a renewal that
opens a new channel (the fault suite's node kill is where renewal is needed)."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import pytest
from aio_pika.exceptions import DeliveryError
from faststream.rabbit import ExchangeType, RabbitExchange

from partnerbus.broker.publisher import NotConnectedError, RelayChannel

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
async def place(connection):
    """A direct exchange with a queue bound on `to-queue` and one of length 1 on `full`."""
    name = f"pb-relay-channel-{uuid.uuid4().hex[:8]}"
    setup = await connection.channel()
    exchange = await setup.declare_exchange(name, aio_pika.ExchangeType.DIRECT, auto_delete=True)
    queue = await setup.declare_queue(f"{name}.q", auto_delete=True)
    full = await setup.declare_queue(
        f"{name}.full",
        auto_delete=True,
        arguments={"x-max-length": 1, "x-overflow": "reject-publish"},
    )
    await queue.bind(exchange, "to-queue")
    await full.bind(exchange, "full")
    yield RabbitExchange(name, type=ExchangeType.DIRECT), queue
    await queue.delete(if_unused=False, if_empty=False)
    await full.delete(if_unused=False, if_empty=False)
    await setup.close()


async def test_a_publish_is_confirmed_and_carries_the_bus_properties(connection, place) -> None:
    """The message arrives persistent, with its id, type, content type, a correlation id and a timestamp."""
    exchange, queue = place
    relay = RelayChannel(lambda: connection)
    await relay.publish(
        b'{"type": "referral"}',
        exchange=exchange,
        routing_key="to-queue",
        persist=True,
        message_id="m-1",
        message_type="referral",
        content_type="application/json",
        timeout=5,
    )
    got = await queue.get(timeout=5)
    assert got is not None
    await got.ack()
    assert got.body == b'{"type": "referral"}'
    assert got.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert (got.message_id, got.type, got.content_type) == ("m-1", "referral", "application/json")
    assert got.correlation_id and got.timestamp is not None
    await relay.close()


async def test_a_return_and_a_nack_raise_delivery_errors(connection, place) -> None:
    """Unroutable (returned) and refused by a full queue (nacked): both `DeliveryError`, which the relay counts as refused."""
    exchange, _queue = place
    relay = RelayChannel(lambda: connection)
    with pytest.raises(DeliveryError):
        await relay.publish(b"{}", exchange=exchange, routing_key="nowhere", timeout=5)
    await relay.publish(b"{}", exchange=exchange, routing_key="full", timeout=5)
    with pytest.raises(DeliveryError, match="Nack"):
        await relay.publish(b"{}", exchange=exchange, routing_key="full", timeout=5)
    await relay.close()


async def test_a_renewal_opens_a_new_channel_that_publishes(connection, place) -> None:
    """After `renew`, the next publish goes through a new AMQP channel and is confirmed."""
    exchange, queue = place
    relay = RelayChannel(lambda: connection)
    await relay.publish(b"1", exchange=exchange, routing_key="to-queue", timeout=5)
    before = relay._channel
    assert before is not None
    await relay.renew()
    assert before.is_closed
    await relay.publish(b"2", exchange=exchange, routing_key="to-queue", timeout=5)
    assert relay._channel is not None and relay._channel is not before
    bodies = []
    for _ in range(2):
        got = await queue.get(timeout=5)
        assert got is not None
        bodies.append(got.body)
        await got.ack()
    assert bodies == [b"1", b"2"]
    await relay.close()


async def test_without_a_connection_a_publish_fails_as_unreachable(place) -> None:
    """No connection yet: `NotConnectedError` (a connection error: the relay keeps the row and tries later)."""
    exchange, _queue = place
    relay = RelayChannel(lambda: None)
    with pytest.raises(NotConnectedError):
        await asyncio.wait_for(
            relay.publish(b"{}", exchange=exchange, routing_key="to-queue", timeout=5), 5
        )
