"""The partner client across restarts, on the real RabbitMQ: a message it handled is not
handled again, a referral that comes after its withdrawal is not handed on."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import pytest

from partnerbus.client import PartnerClient
from partnerbus.schemas import ReferralReminder
from partnerbus.testing import Inbox, wait_until

from .helpers import ROUBAIX, new_id, publish, queue_depth, signal
from .test_flow import KINDS, expected_partner, grant

pytestmark = pytest.mark.rabbitmq


async def _into_partner_queue(channel, queue: str, body: bytes, message_id: str) -> None:
    """A copy of a message put straight into the partner's queue: what a second publish, a
    replay or a late redelivery looks like to the partner."""
    await channel.default_exchange.publish(
        aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
            user_id="guest",
        ),
        routing_key=queue,
    )


async def _emptied(channel, queue: str) -> None:
    async def empty() -> bool:
        return await queue_depth(channel, queue) == 0

    await wait_until(empty, timeout=20, what=f"{queue} empty (every message acked)")


async def _consented_partner(bus, channel) -> tuple[str, str, dict[str, Any]]:
    """A fresh person who consented: (person, the partner its referral goes to, the consent)."""
    person = new_id("T")
    agency = bus.directory.agency_for(ROUBAIX).id
    given = await grant(bus, channel, person, agency, kinds=KINDS)
    return person, expected_partner(bus), given


async def test_a_referral_handled_before_a_crash_is_not_handled_again_after_the_restart(
    bus, channel, tmp_path
):
    """The client stops after recording a referral and before its ack: the broker delivers it again to the restarted client (same store file), which acks it without calling the handler and answers `received`."""
    t = bus.topology
    url = bus.settings.amqp_url.get_secret_value()
    path = tmp_path / "client.db"
    person, target, _ = await _consented_partner(bus, channel)
    queue = t.partner_queue_name(target)
    source = await Inbox.open(channel, t.partner_queue_name("lmh-recouvrement"))
    calls: list[str] = []

    async def handler(message: Any) -> None:
        calls.append(message.message_id)

    stopped = asyncio.Event()
    async with PartnerClient(url, target, prefix=t.prefix, store=path) as first:

        async def stops_before_the_ack(raw: Any) -> bool:
            stopped.set()  # the process dies here: no ack leaves, the store has the record
            return False

        first._ack = stops_before_the_ack  # type: ignore[method-assign]
        await first.consume(handler)
        await publish(
            channel, f"{t.prefix}.signals", signal(person=person), routing_key="lmh-recouvrement"
        )
        async with asyncio.timeout(20):
            await stopped.wait()
    assert len(calls) == 1

    async with PartnerClient(url, target, prefix=t.prefix, store=path) as second:
        await second.consume(handler)
        await wait_until(lambda: second.counts.repeats == 1, timeout=20, what="the repeat")
        await _emptied(channel, queue)
        received = await source.expect_kind("referral-status-changed", status="received")
    assert len(calls) == 1, "handled once, across the restart"
    assert second.counts.handled == 0
    assert received.body["referral_id"]


async def test_a_second_copy_of_a_handled_referral_after_a_restart_is_acked_and_not_handed_on(
    bus, channel, tmp_path
):
    """The same referral message put in the queue again once the client restarted: acked without calling the handler, no second `received`."""
    t = bus.topology
    url = bus.settings.amqp_url.get_secret_value()
    path = tmp_path / "client.db"
    person, target, _ = await _consented_partner(bus, channel)
    queue = t.partner_queue_name(target)
    got: list[Any] = []

    async def handler(message: Any) -> None:
        got.append(message)

    async with PartnerClient(url, target, prefix=t.prefix, store=path) as first:
        await first.consume(handler)
        await publish(
            channel, f"{t.prefix}.signals", signal(person=person), routing_key="lmh-recouvrement"
        )
        await wait_until(lambda: first.counts.handled == 1, timeout=20, what="the referral")
    (referral,) = got
    assert referral.type == "referral"

    await _into_partner_queue(
        channel, queue, referral.model_dump_json().encode(), referral.message_id
    )
    sent: list[str] = []
    async with PartnerClient(url, target, prefix=t.prefix, store=path) as second:

        async def status(referral_id: str, value: str, **fields: Any) -> None:
            sent.append(value)

        second.send_status = status  # type: ignore[method-assign]
        await second.consume(handler)
        await wait_until(lambda: second.counts.repeats == 1, timeout=20, what="the repeat")
        await _emptied(channel, queue)
    assert got == [referral], "the handler saw it once"
    assert sent == [], "a second copy (not a redelivery) is not answered again"


async def test_a_referral_arriving_after_its_withdrawal_is_never_handed_to_the_partner(
    bus, channel, tmp_path
):
    """The withdrawal reaches the client first and is recorded in its file; after a restart, the referral itself and a reminder for it come: both acked, neither handed on, both counted."""
    t = bus.topology
    url = bus.settings.amqp_url.get_secret_value()
    path = tmp_path / "client.db"
    person, target, given = await _consented_partner(bus, channel)
    queue = t.partner_queue_name(target)

    # the referral is held back (a copy the partner will get late)
    early = await Inbox.open(channel, queue)
    await publish(
        channel, f"{t.prefix}.signals", signal(person=person), routing_key="lmh-recouvrement"
    )
    (held,) = await early.expect(1)
    await early.close()
    rid = held.body["referral_id"]

    revocation = {
        "type": "consent-revoked",
        "message_id": new_id("rev"),
        "occurred_at": datetime.now(UTC).isoformat(),
        "consent_id": given["consent_id"],
        "revoked_by": given["collected_by"],
        "agency": given["agency"],
        "revoked_at": datetime.now(UTC).isoformat(),
        "reason": "the tenant changed her mind",
    }
    await publish(channel, f"{t.prefix}.consents", revocation, routing_key=given["agency"])

    got: list[Any] = []

    async def handler(message: Any) -> None:
        got.append(message)

    async with PartnerClient(url, target, prefix=t.prefix, store=path) as first:
        await first.consume(handler)
        await wait_until(lambda: first.counts.handled == 1, timeout=20, what="the withdrawal")
    assert [(m.type, m.referral_id) for m in got] == [("referral-withdrawn", rid)]

    reminder = ReferralReminder(
        message_id=new_id("rem"),
        occurred_at=datetime.now(UTC),
        referral_id=rid,
        partner=target,
        due_by=datetime.now(UTC) + timedelta(days=1),
    )
    await _into_partner_queue(channel, queue, held.raw, str(held.message_id))
    await _into_partner_queue(
        channel, queue, reminder.model_dump_json().encode(), reminder.message_id
    )
    sent: list[str] = []
    async with PartnerClient(url, target, prefix=t.prefix, store=path) as second:

        async def status(referral_id: str, value: str, **fields: Any) -> None:
            sent.append(value)

        second.send_status = status  # type: ignore[method-assign]
        await second.consume(handler)
        await wait_until(
            lambda: second.counts.after_withdrawal == 2, timeout=20, what="both not handed on"
        )
        await _emptied(channel, queue)
    assert [m.type for m in got] == ["referral-withdrawn"], "nothing after the withdrawal"
    assert second.counts.handled == 0
    assert sent == [], "no `received` for a withdrawn referral"
