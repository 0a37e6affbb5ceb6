"""The referral lifecycle through the real broker: revocation, deadlines, capacity, refusal."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from partnerbus.directory import match
from partnerbus.entrypoints.bootstrap import create_app
from partnerbus.testing import FakeClock, Inbox, wait_for_status

from .helpers import ARREARS, ROUBAIX, new_id, publish, signal, status
from .test_flow import KINDS, expected_partner, grant

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
def database_url(engine_url: str) -> str:
    """These run on both engines: SQLite and PostgreSQL."""
    return engine_url


async def test_a_revoked_consent_withdraws_the_open_referral_from_the_partner(bus, channel):
    """The partner that holds the referral receives ReferralWithdrawn; the source hears it too."""
    t = bus.topology
    person = new_id("T")
    agency = bus.directory.agency_for(ROUBAIX).id
    given = await grant(bus, channel, person, agency, kinds=KINDS)
    target = expected_partner(bus)
    inbox = await Inbox.open(channel, t.partner_queue_name(target))
    source = await Inbox.open(channel, t.partner_queue_name("lmh-recouvrement"))
    await publish(
        channel, f"{t.prefix}.signals", signal(person=person), routing_key="lmh-recouvrement"
    )
    (referral,) = await inbox.expect(1)
    rid = referral.body["referral_id"]

    revocation = {
        "type": "consent-revoked",
        "message_id": new_id("rev"),
        "occurred_at": datetime.now(UTC).isoformat(),
        "consent_id": given["consent_id"],
        "revoked_by": given["collected_by"],
        "agency": agency,
        "revoked_at": datetime.now(UTC).isoformat(),
        "reason": "the tenant changed her mind",
    }
    await publish(channel, f"{t.prefix}.consents", revocation, routing_key=agency)
    withdrawn = await inbox.expect_kind("referral-withdrawn")
    assert withdrawn.body["referral_id"] == rid
    assert withdrawn.body["reason"] == "consent-revoked"
    await source.expect_kind("referral-status-changed", status="withdrawn")
    assert await wait_for_status(bus.store, rid, "withdrawn") == "withdrawn"


async def test_a_passed_deadline_reroutes_to_the_next_best_partner(settings, channel):
    """No answer: a reminder at half time, then expiry, the next-best partner's queue gets it and the advisor is told."""
    clock = FakeClock(datetime.now(UTC))
    bus = create_app(settings, clock=clock)
    await bus.start()
    try:
        t = bus.topology
        person = new_id("T")
        agency = bus.directory.agency_for(ROUBAIX).id
        await grant(bus, channel, person, agency, kinds=KINDS)
        target = expected_partner(bus)
        first_inbox = await Inbox.open(channel, t.partner_queue_name(target))
        agency_inbox = await Inbox.open(channel, t.partner_queue_name(agency))
        await publish(
            channel,
            f"{t.prefix}.signals",
            signal(person=person, urgency="asap"),
            routing_key="lmh-recouvrement",
        )
        (first,) = await first_inbox.expect(1)
        await bus.relay.wait_recorded(first.message_id)  # the deadline runs from the confirm

        clock.advance(timedelta(hours=13))  # past half of the 24 h asap deadline
        assert (await bus.tick())["reminded"] == 1
        reminder = await first_inbox.expect_kind("referral-reminder")
        assert reminder.body["referral_id"] == first.body["referral_id"]

        clock.advance(timedelta(hours=12))
        assert (await bus.tick())["expired"] == 1
        expired = await agency_inbox.expect_kind("referral-status-changed", status="expired")
        assert expired.body["status"] == "expired"
        second = bus.store.referrals()[-1]
        assert second.attempt == 2
        assert second.partner_id != target
        second_inbox = await Inbox.open(channel, t.partner_queue_name(second.partner_id))
        (rerouted,) = await second_inbox.expect(1)
        assert rerouted.body["need"] == ARREARS
        assert rerouted.body["attempt"] == 2
    finally:
        await bus.stop()
        await bus.teardown()


async def test_a_capacity_event_changes_the_next_match(bus, channel):
    """A partner that says it is full is skipped at once: the next signal goes to the next-best partner."""
    t = bus.topology
    person = new_id("T")
    agency = bus.directory.agency_for(ROUBAIX).id
    await grant(bus, channel, person, agency, kinds=KINDS)
    full = expected_partner(bus)
    capacity = {
        "type": "capacity-changed",
        "message_id": new_id("cap"),
        "occurred_at": datetime.now(UTC).isoformat(),
        "partner": full,
        "status": "no-capacity",
        "remaining": 0,
    }
    await publish(channel, f"{t.prefix}.statuses", capacity, routing_key=full)
    await bus.wait_directory_update(capacity["message_id"])
    next_best = expected_partner(bus)
    assert next_best != full, "the directory steers around the full partner"
    inbox = await Inbox.open(channel, t.partner_queue_name(next_best))
    await publish(
        channel, f"{t.prefix}.signals", signal(person=person), routing_key="lmh-recouvrement"
    )
    (referral,) = await inbox.expect(1)
    assert referral.body["partner"] == next_best
    assert bus.store.count("referrals", partner_id=full) == 0


async def test_a_full_partner_is_skipped_until_its_referral_completes(bus, channel):
    """Capacity 1: the partner gets the first referral; the second need goes to the next-best partner, the referral saying why; once the first completes, the partner gets the next one."""
    t = bus.topology
    person = new_id("T")
    agency = bus.directory.agency_for(ROUBAIX).id
    await grant(bus, channel, person, agency, kinds=KINDS)
    best, next_best = (
        c.partner_id for c in match(bus.directory, ARREARS, ROUBAIX, sender="lmh-recouvrement")[:2]
    )
    capacity = {
        "type": "capacity-changed",
        "message_id": new_id("cap"),
        "occurred_at": datetime.now(UTC).isoformat(),
        "partner": best,
        "status": "capacity",
        "remaining": 1,
    }
    await publish(channel, f"{t.prefix}.statuses", capacity, routing_key=best)
    await bus.wait_directory_update(capacity["message_id"])
    assert expected_partner(bus) == best, "one place left: still the best"
    best_inbox = await Inbox.open(channel, t.partner_queue_name(best))
    next_inbox = await Inbox.open(channel, t.partner_queue_name(next_best))

    async def refer() -> None:
        await publish(
            channel, f"{t.prefix}.signals", signal(person=person), routing_key="lmh-recouvrement"
        )

    await refer()
    (first,) = await best_inbox.expect(1)
    assert "capacity 1 left (0 open of 1)" in first.body["why"]

    await refer()
    (second,) = await next_inbox.expect(1)
    assert second.body["partner"] == next_best
    assert f"{best} skipped: full (1 open of 1)" in second.body["why"]
    assert bus.store.count("referrals", partner_id=best) == 1

    rid = first.body["referral_id"]
    for value, extra in (("accepted", {}), ("completed", {"outcome": "plan d'apurement signé"})):
        await publish(
            channel,
            f"{t.prefix}.statuses",
            status(referral_id=rid, partner=best, value=value, **extra),
            routing_key=best,
        )
    assert await wait_for_status(bus.store, rid, "completed") == "completed"

    await refer()
    (third,) = await best_inbox.expect(1)
    assert third.body["partner"] == best
    assert third.body["referral_id"] != rid
    assert not any("skipped" in reason for reason in third.body["why"])
    assert next_inbox.drain() == []


async def test_a_refused_consent_closes_the_signal_for_the_source(bus, channel):
    """The person says no: the parked signal closes, the source is told why, and the agency that the refusal is recorded."""
    t = bus.topology
    agency = bus.directory.agency_for(ROUBAIX).id
    advisor = await Inbox.open(channel, t.partner_queue_name(agency))
    source = await Inbox.open(channel, t.partner_queue_name("lmh-recouvrement"))
    body = signal()
    await publish(channel, f"{t.prefix}.signals", body, routing_key="lmh-recouvrement")
    request = await advisor.expect_kind("consent-requested")
    refusal = {
        "type": "consent-refused",
        "message_id": new_id("ref"),
        "occurred_at": datetime.now(UTC).isoformat(),
        "signal_id": request.body["signal_id"],
        "person_ref": request.body["person_ref"],
        "collected_by": "s.benali",
        "agency": agency,
    }
    await publish(channel, f"{t.prefix}.consents", refusal, routing_key=agency)
    closed = await source.expect_kind("signal-closed")
    assert closed.body["outcome"] == "consent-refused"
    assert closed.body["signal_id"] == body["message_id"]
    ack = await advisor.expect_kind("consent-recorded", event_id=refusal["message_id"])
    assert (ack.body["event"], ack.body["signal_id"]) == ("consent-refused", body["message_id"])


async def test_the_partner_client_answers_received_and_the_status_moves(bus, channel):
    """A partner using the shipped client acknowledges receipt; the referral becomes `received`."""
    from partnerbus.client import PartnerClient

    t = bus.topology
    person = new_id("T")
    agency = bus.directory.agency_for(ROUBAIX).id
    await grant(bus, channel, person, agency, kinds=KINDS)
    target = expected_partner(bus)
    got = []
    source = await Inbox.open(channel, t.partner_queue_name("lmh-recouvrement"))
    async with PartnerClient(
        bus.settings.amqp_url.get_secret_value(), target, prefix=t.prefix
    ) as client:

        async def handler(message):
            got.append(message)

        await client.consume(handler)
        await publish(
            channel, f"{t.prefix}.signals", signal(person=person), routing_key="lmh-recouvrement"
        )
        await source.expect_kind("referral-status-changed", status="received")
    assert got and got[0].type == "referral"
    assert await wait_for_status(bus.store, got[0].referral_id, "received") == "received"


async def test_a_referral_the_partner_client_fails_on_ends_in_its_dead_letters_unreceived(
    bus, channel
):
    """The shipped client gives back a message its handler fails on; after the delivery limit it is in the partner's dead-letter queue, and no `received` was claimed."""
    from partnerbus.client import PartnerClient

    t = bus.topology
    person = new_id("T")
    agency = bus.directory.agency_for(ROUBAIX).id
    await grant(bus, channel, person, agency, kinds=KINDS)
    target = expected_partner(bus)
    dead = await Inbox.open(channel, t.dlq_name(t.partner_queue_name(target)))
    tries = []
    async with PartnerClient(
        bus.settings.amqp_url.get_secret_value(), target, prefix=t.prefix
    ) as client:

        async def handler(message):
            tries.append(message.message_id)
            msg = "the partner's system is broken"
            raise RuntimeError(msg)

        await client.consume(handler)
        await publish(
            channel, f"{t.prefix}.signals", signal(person=person), routing_key="lmh-recouvrement"
        )
        (letter,) = await dead.expect(1, timeout=20)
    assert letter.kind == "referral"
    assert letter.headers["x-death"][0]["reason"] == "delivery_limit"
    assert len(tries) == bus.settings.delivery_limit + 1
    # The partner can dead-letter the referral before the relay has recorded the broker's
    # confirm: wait for the state (it must reach `delivered`, never `received`).
    assert await wait_for_status(bus.store, letter.body["referral_id"], "delivered") == (
        "delivered"
    )


async def test_the_dead_letter_outcome_holds_when_the_relay_records_its_confirm_late(
    bus, channel, monkeypatch
):
    """A loaded host: the broker's confirm of the referral is recorded after the partner has already dead-lettered it. The state is waited for, not assumed."""
    import time

    from partnerbus.handlers import outbox as relay_module

    real = relay_module.mark_delivered

    def late(ledger, tx, referral_id):
        time.sleep(1.5)  # in the relay's database thread: the recording is late
        return real(ledger, tx, referral_id)

    monkeypatch.setattr(relay_module, "mark_delivered", late)
    await test_a_referral_the_partner_client_fails_on_ends_in_its_dead_letters_unreceived(
        bus, channel
    )
