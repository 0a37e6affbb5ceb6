"""Sender authentication with a real partner user: the claimed source must be the AMQP user."""

from __future__ import annotations

import asyncio
import json

import aio_pika
import pytest

from partnerbus.broker.dlq import peek, replay
from partnerbus.testing import Inbox
from tests.conftest import as_partner

from .helpers import signal
from .test_dead_letter_doors import settled

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
async def proximity_team(bus):
    """The proximity team's own RabbitMQ user, with the rights derived from the directory."""
    async with as_partner(bus, "lmh-proximite") as user_and_channel:
        yield user_and_channel


async def publish_as(channel, user: str, exchange: str, body: dict, headers=None) -> None:
    ex = await channel.get_exchange(exchange, ensure=False)
    await ex.publish(
        aio_pika.Message(
            json.dumps(body).encode(),
            message_id=body["message_id"],
            user_id=user,
            headers=headers,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        ),
        routing_key="lmh-proximite",
    )


async def test_a_partner_claiming_another_source_is_refused_to_the_dead_letter_queue(
    bus, channel, proximity_team
):
    """Authenticated as the proximity team, a signal claiming the recovery service as source is dead-lettered with that reason; its own signal flows."""
    user, partner_channel = proximity_team
    t = bus.topology
    dlq = await Inbox.open(channel, t.dlq_name(t.signal_queue.name))
    spoofed = signal(source="lmh-recouvrement")
    await publish_as(partner_channel, user, t.signals.name, spoofed)
    (dead,) = await dlq.expect(1)
    assert dead.message_id == spoofed["message_id"]
    assert dead.headers["partnerbus-error"] == (
        f"claimed sender 'lmh-recouvrement' does not match the authenticated AMQP user '{user}'"
    )
    assert dead.headers["partnerbus-original-user"] == user

    before = len(bus.verdicts)
    own = signal(source="lmh-proximite")
    await publish_as(partner_channel, user, t.signals.name, own)
    (verdict,) = (await bus.wait_verdicts(before + 1))[before:]
    assert verdict.outcome == "processed"
    assert bus.store.count("signals", signal_id=own["message_id"]) == 1
    assert bus.store.count("signals", signal_id=spoofed["message_id"]) == 0


async def test_a_partner_forging_the_bus_sender_header_is_refused_and_its_dead_letter_never_replayed(
    bus, channel, connection, proximity_team
):
    """A partner that sets the bus's own first-sender header to another partner is judged by its own AMQP user: refused, listed under its own name, and (an authentication refusal) never replayed: ops get the reason, the letter stays."""
    user, partner_channel = proximity_team
    t = bus.topology
    dlq_name = t.dlq_name(t.signal_queue.name)
    forged = signal(source="lmh-recouvrement")
    headers = {
        "partnerbus-original-user": "pb-lmh-recouvrement",
        "partnerbus-original-exchange": "elsewhere",
        "partnerbus-attempt": 99,
    }
    before = len(bus.verdicts)
    await publish_as(partner_channel, user, t.signals.name, forged, headers=headers)
    (verdict,) = (await bus.wait_verdicts(before + 1))[before:]
    assert verdict.outcome == "refused"
    assert f"the authenticated AMQP user {user!r}" in str(verdict.reason)

    (letter,) = await settled(connection, dlq_name, 1)
    assert letter.sender == user
    assert letter.exchange == t.signals.name
    assert letter.headers["partnerbus-original-user"] == user

    outcome = await replay(connection, dlq_name, None, "guest", "ops.tester", topology=t)
    assert outcome.replayed == []
    ((refused, why),) = outcome.refused
    assert refused.message_id == forged["message_id"]
    assert "refused for authentication" in why
    assert len(bus.verdicts) == before + 1
    async with asyncio.timeout(30):  # a refused letter goes back to the queue asynchronously
        while not (left := await peek(connection, dlq_name, "guest")):  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    assert [x.message_id for x in left] == [forged["message_id"]]
    assert bus.store.count("signals", signal_id=forged["message_id"]) == 0
