"""Acks, dead letters, retries and sender checks, against the real RabbitMQ."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import pytest
from sqlalchemy.exc import OperationalError

from partnerbus.broker.dlq import peek, replay
from partnerbus.directory import Directory, load_sample
from partnerbus.entrypoints.bootstrap import create_app
from partnerbus.ledger.store import LedgerTx, Store
from partnerbus.testing import Inbox, wait_for_status

from .helpers import ARREARS, ROUBAIX, consent, new_id, publish, signal, signal_ref
from .test_flow import KINDS, consented, expected_partner, grant

pytestmark = pytest.mark.rabbitmq


class PoisonDirectory(Directory):
    """A directory that crashes on one commune: a bug the bus must survive."""

    def resolve_agency(self, commune: str, **named):  # type: ignore[no-untyped-def]
        if commune == "59009":
            msg = "simulated bug"
            raise RuntimeError(msg)
        return super().resolve_agency(commune, **named)


class FlakyStore(Store):
    """A store whose next intake transactions fail as if the database were down. Only the
    intake's thread counts: the scheduler's and the relay's transactions run beside it and
    must not use up the failures meant for the message under test."""

    failures = 0

    @contextmanager
    def begin(self) -> Iterator[LedgerTx]:
        if self.failures > 0 and threading.current_thread().name.startswith("partnerbus-intake"):
            self.failures -= 1
            raise OperationalError("BEGIN", {}, Exception("database is down"))
        with super().begin() as tx:
            yield tx


@pytest.fixture
async def poisoned_bus(settings):
    sample = load_sample()
    directory = PoisonDirectory.__new__(PoisonDirectory)
    directory.__dict__.update(sample.__dict__)
    service = create_app(settings, directory=directory)
    await service.start()
    yield service
    await service.stop()
    await service.teardown()


async def test_a_message_that_crashes_the_handler_ends_in_the_dead_letter_queue_after_the_delivery_limit(
    poisoned_bus, channel
):
    """A handler bug is retried up to the quorum queue's delivery limit, then dead-lettered by RabbitMQ; the consumer lives on."""
    bus = poisoned_bus
    t = bus.topology
    dlq = await Inbox.open(channel, t.dlq_name(t.signal_queue.name))
    poison = signal(commune="59009", message_id=new_id("poison"))
    await publish(channel, f"{t.prefix}.signals", poison, routing_key="lmh-recouvrement")
    (dead,) = await dlq.expect(1, timeout=20)
    assert dead.message_id == poison["message_id"]
    death = dead.headers["x-death"][0]
    assert death["reason"] == "delivery_limit"
    assert death["queue"] == t.signal_queue.name

    person = new_id("T")
    agency = bus.directory.agency_for(ROUBAIX).id
    await grant(bus, channel, person, agency, kinds=KINDS)
    inbox = await Inbox.open(channel, t.partner_queue_name(expected_partner(bus)))
    await publish(
        channel, f"{t.prefix}.signals", signal(person=person), routing_key="lmh-recouvrement"
    )
    await inbox.expect(1)


async def test_a_transient_database_failure_is_retried_after_a_delay_and_succeeds(
    settings, channel, tmp_path
):
    """The database down at first: the message waits in a delay queue and is processed on its return."""
    store = FlakyStore(f"sqlite:///{tmp_path / 'flaky.db'}")
    bus = create_app(settings, store=store)
    await bus.start()
    try:
        t = bus.topology
        person = new_id("T")
        agency = bus.directory.agency_for(ROUBAIX).id
        await grant(bus, channel, person, agency, kinds=KINDS)
        inbox = await Inbox.open(channel, t.partner_queue_name(expected_partner(bus)))
        store.failures = 1
        before = len(bus.verdicts)
        await publish(
            channel, f"{t.prefix}.signals", signal(person=person), routing_key="lmh-recouvrement"
        )
        verdicts = await bus.wait_verdicts(before + 2)
        assert [v.outcome for v in verdicts[before:]] == ["retried", "processed"]
        (referral,) = await inbox.expect(1)
        assert referral.body["need"] == ARREARS
    finally:
        await bus.stop()
        await bus.teardown()


async def test_an_answer_meeting_its_referral_marked_as_sent_too_long_waits_in_the_delay_queue(
    bus, channel
):
    """A partner's answer meets its referral still marked as being sent (a relay died between its publish and its record) for longer than the transaction's own re-runs last: it is neither dead-lettered nor lost, but waits in the delay queue, and is applied once the mark is gone."""
    t = bus.topology
    person, _agency, target, inbox = await consented(bus, channel)
    await publish(
        channel, f"{t.prefix}.signals", signal(person=person), routing_key="lmh-recouvrement"
    )
    (referral,) = await inbox.expect(1)
    rid = referral.body["referral_id"]
    assert await wait_for_status(bus.store, rid, "delivered") == "delivered"
    far = bus.ledger.clock() + timedelta(hours=1)
    await asyncio.to_thread(bus.store.run, lambda tx: tx.referrals.mark_sending([rid], far))
    before = len(bus.verdicts)
    body = {
        "type": "referral-status-changed",
        "message_id": new_id("st"),
        "occurred_at": "2026-11-23T10:00:00+00:00",
        "referral_id": rid,
        "partner": target,
        "status": "accepted",
    }
    await publish(channel, f"{t.prefix}.statuses", body, routing_key=target)

    (first,) = (await bus.wait_verdicts(before + 1, timeout=20))[before:]
    assert first.outcome == "retried"
    assert bus.store.referral(rid).status == "delivered"
    await asyncio.to_thread(bus.store.run, lambda tx: tx.referrals.mark_sending([rid], None))
    verdicts = await bus.wait_verdicts(before + 2, timeout=20)
    assert verdicts[before + 1].outcome == "processed"
    assert bus.store.referral(rid).status == "accepted"


async def test_a_signal_without_user_id_is_refused_with_the_reason(bus, channel):
    """The broker can only vouch for a sender that sets user_id; without it the signal is refused."""
    t = bus.topology
    dlq = await Inbox.open(channel, t.dlq_name(t.signal_queue.name))
    body = signal()
    await publish(
        channel, f"{t.prefix}.signals", body, routing_key="lmh-recouvrement", user_id=None
    )
    (dead,) = await dlq.expect(1)
    assert "user_id" in dead.headers["partnerbus-error"]


async def test_a_status_from_another_partner_is_refused(bus, channel):
    """A status about a referral the sender never received goes to the dead-letter queue."""
    t = bus.topology
    dlq = await Inbox.open(channel, t.dlq_name(t.status_queue.name))
    person, _agency, _target, inbox = await consented(bus, channel)
    await publish(
        channel, f"{t.prefix}.signals", signal(person=person), routing_key="lmh-recouvrement"
    )
    (referral,) = await inbox.expect(1)
    body = {
        "type": "referral-status-changed",
        "message_id": new_id("st"),
        "occurred_at": "2026-11-23T10:00:00+00:00",
        "referral_id": referral.body["referral_id"],
        "partner": "siao-nord",
        "status": "accepted",
    }
    await publish(channel, f"{t.prefix}.statuses", body, routing_key="siao-nord")
    (dead,) = await dlq.expect(1)
    assert "was not sent to siao-nord" in dead.headers["partnerbus-error"]
    # the relay records the confirm after the partner may already hold the referral
    assert await wait_for_status(bus.store, referral.body["referral_id"], "delivered") == (
        "delivered"
    )


async def test_a_consent_with_an_inverted_period_is_refused(bus, channel):
    """valid_until before granted_at is a schema error, dead-lettered with the field named."""
    t = bus.topology
    dlq = await Inbox.open(channel, t.dlq_name(t.consent_queue.name))
    body = consent(person="T-bad-period", agency="lmh-agence-roubaix", kinds=("caf",), days=-3)
    await publish(channel, f"{t.prefix}.consents", body, routing_key="lmh-agence-roubaix")
    (dead,) = await dlq.expect(1)
    assert "valid_until must be after granted_at" in dead.headers["partnerbus-error"]


async def test_a_message_dead_lettered_after_its_retries_is_replayed_after_the_fix(
    settings, channel, connection, tmp_path
):
    """The database down past every delay: dead letter with the reason; replayed once it is back, it is processed as its first sender."""
    store = FlakyStore(f"sqlite:///{tmp_path / 'flaky.db'}")
    bus = create_app(settings, store=store)
    await bus.start()
    try:
        t = bus.topology
        person = new_id("T")
        agency = bus.directory.agency_for(ROUBAIX).id
        await grant(bus, channel, person, agency, kinds=KINDS)
        inbox = await Inbox.open(channel, t.partner_queue_name(expected_partner(bus)))
        store.failures = 2  # the first try and the one retry
        before = len(bus.verdicts)
        body = signal(person=person)
        await publish(channel, f"{t.prefix}.signals", body, routing_key="lmh-recouvrement")
        verdicts = await bus.wait_verdicts(before + 2)
        assert [v.outcome for v in verdicts[before:]] == ["retried", "refused"]
        assert "gave up after 1 retries" in verdicts[-1].reason

        dlq_name = t.dlq_name(t.signal_queue.name)
        (letter,) = await peek(connection, dlq_name, "guest")
        assert letter.message_id == body["message_id"]
        assert letter.sender == "guest"
        # the error's kind only: a database error's text may carry the values it was given
        assert "OperationalError" in letter.reason
        assert "database is down" not in letter.reason

        replayed = await replay(
            connection, dlq_name, {body["message_id"]}, "guest", "ops.tester", topology=t
        )
        assert [r.message_id for r in replayed.replayed] == [body["message_id"]]
        (referral,) = await inbox.expect(1)
        assert signal_ref(referral.body, body["message_id"])
        assert await peek(connection, dlq_name, "guest") == []
    finally:
        await bus.stop()
        await bus.teardown()


async def test_an_unroutable_message_stays_in_the_outbox_until_its_queue_exists(bus, channel):
    """The broker refuses a message no queue is bound for (mandatory publish): the relay keeps it, counted as failing, and sends it once the partner's queue exists."""
    from datetime import timedelta

    from partnerbus.rules import disclose
    from partnerbus.schemas import ReferralReminder

    t = bus.topology
    now = bus.ledger.clock()
    reminder = ReferralReminder(
        message_id=new_id("rem"),
        occurred_at=now,
        referral_id=new_id("ref"),
        partner="ghost-partner",
        due_by=now + timedelta(days=1),
    )

    def enqueue(tx: LedgerTx) -> None:
        tx.outbox.enqueue(disclose(reminder, {"partner"}), "ghost-partner", now)

    # off the event loop: the relay may hold the write lock while it waits for the loop
    await asyncio.to_thread(bus.store.run, enqueue)
    await bus.relay.flush()  # waits for any sweep under way: the row has been tried once
    assert bus.store.pending_count() == 1
    assert bus.store.failing_count() == 1

    queue = await channel.declare_queue(f"{t.prefix}.ghost", exclusive=True)
    await queue.bind(t.deliveries.name, routing_key="ghost-partner")
    inbox = await Inbox.open(channel, queue.name)
    bus.relay.kick()
    (got,) = await inbox.expect(1)
    assert got.message_id == reminder.message_id
    await bus.relay.flush()  # the send that delivered it has recorded its confirm
    assert bus.store.pending_count() == 0
    assert bus.store.failing_count() == 0
