"""Erasure on the real broker: a marker person planted everywhere is found nowhere once the
clock has moved past retention, neither in the database nor in any queue of the prefix."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import pytest
from typer.testing import CliRunner

from partnerbus.broker.dlq import peek
from partnerbus.broker.retention import Expired, purge_expired, retention_queue_names
from partnerbus.broker.topology import ERROR_HEADER
from partnerbus.entrypoints.bootstrap import create_app
from partnerbus.entrypoints.cli import _mount_optional, app
from partnerbus.testing import FakeClock, Inbox
from tests.integration.test_erasure import dump_database

from .helpers import RIGHTS, ROUBAIX, consent, new_id, publish, signal, status
from .test_flow import KINDS, expected_partner

pytestmark = pytest.mark.rabbitmq

_mount_optional()
runner = CliRunner()


async def _publish_raw(
    channel: aio_pika.abc.AbstractChannel, queue: str, message_id: str, **properties: Any
) -> None:
    await channel.default_exchange.publish(
        aio_pika.Message(
            json.dumps({"message_id": message_id}).encode(),
            message_id=message_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            **properties,
        ),
        routing_key=queue,
    )


async def test_a_dead_letter_the_bus_writes_carries_the_time_it_died(settings, channel):
    """The bus's own dead-letter copy is stamped with the ledger's clock (AMQP timestamp), so retention can tell its age."""
    clock = FakeClock(datetime.now(UTC).replace(microsecond=0) - timedelta(days=3))
    bus = create_app(settings, clock=clock)
    await bus.start()
    try:
        t = bus.topology
        before = len(bus.verdicts)
        await publish(
            channel,
            f"{t.prefix}.signals",
            signal(commune="99999"),
            routing_key="lmh-recouvrement",
        )
        (verdict,) = (await bus.wait_verdicts(before + 1))[before:]
        assert verdict.outcome == "refused"
        dlq = await channel.declare_queue(t.dlq_name(t.signal_queue.name), passive=True)
        message = await dlq.get(no_ack=False, timeout=10)
        assert message.timestamp == clock.now
        await message.nack(requeue=True)
    finally:
        await bus.stop()
        await bus.teardown()


async def test_dead_letters_older_than_the_period_are_purged_and_the_younger_stay_in_order(
    prefix, channel, connection
):
    """Old dead letters (ours by timestamp, RabbitMQ's by x-death) are removed and recorded; younger and undated ones stay, in their order."""
    name = f"{prefix}.intake.signals.dlq"
    await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
    now = datetime.now(UTC).replace(microsecond=0)
    cutoff = now - timedelta(days=90)
    old, young = now - timedelta(days=91), now - timedelta(days=89)
    ours = {"user_id": "guest", "headers": {ERROR_HEADER: "refused"}}
    await _publish_raw(channel, name, "old-ours", timestamp=old, **ours)
    await _publish_raw(channel, name, "young-1", timestamp=young, **ours)
    death = {"queue": f"{prefix}.intake.signals", "reason": "delivery_limit", "time": old}
    await _publish_raw(channel, name, "old-rabbit", headers={"x-death": [death]})
    await _publish_raw(channel, name, "young-2", timestamp=young, **ours)
    await _publish_raw(channel, name, "undated", headers={"note": "no time at all"})
    await _publish_raw(channel, name, "future", timestamp=now + timedelta(days=9), **ours)

    recorded: list[Expired] = []

    async def record(expired: Expired) -> None:
        recorded.append(expired)

    report = await purge_expired(
        connection, [name, "no-such-queue.dlq"], cutoff, now, "guest", record
    )

    assert [(e.message_id, e.died_at) for e in recorded] == [("old-ours", old), ("old-rabbit", old)]
    assert (report.removed, report.kept, report.undated) == (2, 2, 2)
    assert report.failed_queues == []
    left = [letter.message_id for letter in await peek(connection, name, "guest")]
    assert left == ["young-1", "young-2", "undated", "future"]
    await channel.queue_delete(name)


def test_every_dead_letter_and_delay_queue_is_swept(settings):
    """Dead-letter and delay queues of every intake and partner queue are in the sweep."""
    bus = create_app(settings)
    names = retention_queue_names(bus.topology, [p.id for p in bus.directory.partners()])
    t = bus.topology
    assert t.dlq_name(t.signal_queue.name) in names
    assert t.retry_queue_name(t.consent_queue.name, 0) in names
    assert t.dlq_name(t.partner_queue_name("lmh-agence-roubaix")) in names


# the marker person ------------------------------------------------------------------------
def _queues_of(bus) -> list[str]:
    """Every queue the bus declares under its prefix: intake and partner queues, their
    dead-letter and delay queues (each worker's exclusive directory-update queue holds
    capacity events only, and no other connection may read it)."""
    partners = [p.id for p in bus.directory.partners()]
    work = bus.topology.all_work_queue_names(partners)
    return work + retention_queue_names(bus.topology, partners)


async def _read_every_queue(connection: aio_pika.abc.AbstractConnection, names: list[str]) -> str:
    """Every message of these queues (bodies and headers as text), taken unacked and put
    back when the channel closes; a queue that does not exist is skipped."""
    seen: list[str] = []
    for name in names:
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(name, passive=True)
            while (message := await queue.get(no_ack=False, fail=False)) is not None:
                seen.append(f"{name}: {message.body!r} {message.headers!r}")
        except aio_pika.exceptions.ChannelNotFoundEntity:
            continue
        finally:
            if not channel.is_closed:
                await channel.close()
    return "\n".join(seen)


async def _until_depth(connection: aio_pika.abc.AbstractConnection, name: str) -> None:
    """Wait (on a consumer, not a sleep) until a message sits in `name`, and leave it there."""
    watch = await connection.channel()
    inbox = await Inbox.open(watch, name, ack=False)
    await inbox.expect(1, timeout=60)
    await watch.close()  # unacked: it goes back


@pytest.fixture
def database_url(engine_url: str) -> str:
    """The marker test runs on both engines."""
    return engine_url


async def test_after_retention_the_marker_person_is_nowhere(
    settings, channel, connection, monkeypatch
):
    """A person planted in every place the bus keeps data (referral, refusal, read, dead letters, an undeliverable message) is found in no table and no queue once the clock has moved past retention."""
    clock = FakeClock(datetime.now(UTC))
    bus = create_app(settings, clock=clock)
    await bus.start()
    try:
        t = bus.topology
        marker = f"MARKER-{uuid.uuid4().hex[:12]}"
        phone = "07" + "".join(random.choices("0123456789", k=8))
        markers = (marker, phone)
        agency = bus.directory.agency_for(ROUBAIX).id
        target = expected_partner(bus)
        assert target != agency

        # The agency's system is gone: what the bus sends it is unroutable, kept unsent.
        await channel.queue_delete(t.partner_queue_name(agency))

        # A consent, and a signal that becomes a referral the partner's client fails on
        # until RabbitMQ dead-letters it (x-death).
        given = consent(person=marker, agency=agency, kinds=KINDS)
        before = len(bus.verdicts)
        await publish(channel, f"{t.prefix}.consents", given, routing_key=agency)
        await bus.wait_verdicts(before + 1)
        failing = await connection.channel()
        partner_queue = await failing.declare_queue(t.partner_queue_name(target), passive=True)

        async def fail(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.nack(requeue=True)

        await partner_queue.consume(fail)
        first = signal(
            person=marker,
            contact={"phone": phone},
            facts={"arrears_eur": 900, "note": f"door code of {marker}"},
        )
        await publish(channel, f"{t.prefix}.signals", first, routing_key="lmh-recouvrement")
        await _until_depth(connection, t.dlq_name(t.partner_queue_name(target)))
        await failing.close()
        (referral,) = bus.store.referrals()
        assert referral.partner_id == target

        # The partner answers anyway, with a free-text outcome naming her.
        for value, extra in (("accepted", {}), ("completed", {"outcome": f"plan for {marker}"})):
            before = len(bus.verdicts)
            answer = status(referral_id=referral.referral_id, partner=target, value=value, **extra)
            await publish(channel, f"{t.prefix}.statuses", answer, routing_key=target)
            await bus.wait_verdicts(before + 1)

        # A second signal outside the consent's scope: parked, then refused by her.
        second = signal(person=marker, needs=(RIGHTS,))
        before = len(bus.verdicts)
        await publish(channel, f"{t.prefix}.signals", second, routing_key="lmh-recouvrement")
        await bus.wait_verdicts(before + 1)
        refusal = {
            "type": "consent-refused",
            "message_id": new_id("refusal"),
            "occurred_at": datetime.now(UTC).isoformat(),
            "signal_id": second["message_id"],
            "person_ref": marker,
            "collected_by": "s.benali",
            "agency": agency,
        }
        before = len(bus.verdicts)
        await publish(channel, f"{t.prefix}.consents", refusal, routing_key=agency)
        await bus.wait_verdicts(before + 1)

        # A bad message about her, refused by the bus into its dead letters.
        bad = signal(person=marker, commune="99999", contact={"phone": phone})
        before = len(bus.verdicts)
        await publish(channel, f"{t.prefix}.signals", bad, routing_key="lmh-recouvrement")
        (verdict,) = (await bus.wait_verdicts(before + 1))[before:]
        assert verdict.outcome == "refused"

        # The advisor reads her consents and her timeline (both audited).
        monkeypatch.setenv("PARTNERBUS_AMQP_URL", bus.settings.amqp_url.get_secret_value())
        monkeypatch.setenv("PARTNERBUS_PREFIX", bus.settings.prefix)
        monkeypatch.setenv("PARTNERBUS_DATABASE_URL", bus.settings.database_url)
        monkeypatch.setenv("PARTNERBUS_PSEUDONYM_KEY", "test-key")
        for args in (
            ["consent", "list", "--person", marker, "--by", "a.martin"],
            ["referrals", "timeline", marker, "--by", "a.martin"],
        ):
            result = await asyncio.to_thread(runner.invoke, app, args)
            assert result.exit_code == 0, result.output

        await bus.relay.flush()
        assert bus.store.failing_count() > 0, "what goes to the agency is unroutable"
        assert bus.store.referral(referral.referral_id).status == "completed"
        dump = dump_database(bus.store)
        queues = await _read_every_queue(connection, _queues_of(bus))
        for planted in markers:
            assert planted in dump, f"the test planted {planted} in the record"
        assert marker in queues and phone in queues, "and in the dead letters"

        # Past every retention period (the consent ran 30 days, then 730 days of keeping).
        clock.advance(timedelta(days=30 + 730 + 2))
        counts = await bus.tick()
        assert counts.get("retention-failed", 0) == 0
        await bus.relay.flush()

        dump = dump_database(bus.store)
        queues = await _read_every_queue(connection, _queues_of(bus))
        for planted in markers:
            assert planted not in dump, [line for line in dump.splitlines() if planted in line]
            assert planted not in queues, [q for q in queues.splitlines() if planted in q]
        assert counts["dead-letters-expired"] >= 2
        assert counts["outbox-expired"] >= 1
        assert counts["persons-forgotten"] == 1
        actions = {r.action for r in bus.store.audit_trail(referral.referral_id)}
        assert "referral-completed" in actions, "the facts stay, under a token"
        (purged,) = bus.store.audit_trail(bad["message_id"])
        assert purged.action == "dead-letter-expired", "each purge is audited, by id only"
        assert (
            bus.store.count("audit", action="dead-letter-expired") == counts["dead-letters-expired"]
        )
    finally:
        await bus.stop()
        await bus.teardown()
