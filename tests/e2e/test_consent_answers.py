"""An agency hears what became of each consent event it sent, and a signal that comes just
before its consent is not parked for nothing: on the real broker (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio

import pytest

from partnerbus.testing import Inbox
from tests.conftest import as_partner

from .helpers import ROUBAIX, consent, new_id, publish, signal, signal_ref
from .test_flow import KINDS, expected_partner

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
def database_url(engine_url: str) -> str:
    return engine_url


def revocation(given: dict, **extra: str) -> dict:
    body = {
        "type": "consent-revoked",
        "message_id": new_id("rev"),
        "occurred_at": given["occurred_at"],
        "consent_id": given["consent_id"],
        "revoked_by": given["collected_by"],
        "agency": given["agency"],
        "revoked_at": given["granted_at"],
    }
    body.update(extra)
    return body


async def answers(inbox: Inbox, until: str) -> list[dict]:
    """The consent answers the agency's inbox receives up to the one answering `until`
    (an event id): the relay sends the outbox in order, so an answer that a test says must
    not exist would have come before it."""
    got: list[dict] = []
    async with asyncio.timeout(10):
        while not got or got[-1]["event_id"] != until:
            item = await inbox.items.get()
            if item.kind in ("consent-recorded", "consent-rejected"):
                got.append(item.body)
    return got


async def test_an_agency_hears_that_its_consent_is_recorded(bus, channel):
    """Sent by the agency's own RabbitMQ user, a consent is answered on the agency's queue with a ConsentRecorded naming the event, the consent and the person; its AMQP message_id is the body's."""
    t = bus.topology
    agency = bus.directory.agency_for(ROUBAIX).id
    inbox = await Inbox.open(channel, t.partner_queue_name(agency))
    person = new_id("T")
    body = consent(person=person, agency=agency, kinds=KINDS)
    async with as_partner(bus, agency) as (user, own):
        await publish(own, f"{t.prefix}.consents", body, routing_key=agency, user_id=user)
        ack = await inbox.expect_kind("consent-recorded", event_id=body["message_id"])
    assert ack.body["event"] == "consent-granted"
    assert ack.body["consent_id"] == body["consent_id"]
    assert ack.body["person_ref"] == person
    assert ack.body["agency"] == agency
    assert ack.body["status"] == "recorded"
    assert ack.message_id == ack.body["message_id"]
    assert ack.type == "consent-recorded"


async def test_a_redelivered_consent_is_acknowledged_once(bus, channel):
    """The same consent event twice (one message_id): recorded once, deduplicated once, and one acknowledgement only."""
    t = bus.topology
    agency = bus.directory.agency_for(ROUBAIX).id
    inbox = await Inbox.open(channel, t.partner_queue_name(agency))
    body = consent(person=new_id("T"), agency=agency, kinds=KINDS)
    before = len(bus.verdicts)
    await publish(channel, f"{t.prefix}.consents", body, routing_key=agency)
    await publish(channel, f"{t.prefix}.consents", body, routing_key=agency)
    verdicts = await bus.wait_verdicts(before + 2)
    assert sorted(v.outcome for v in verdicts[before:]) == ["duplicate", "processed"]

    marker = consent(person=new_id("T"), agency=agency, kinds=KINDS)
    await publish(channel, f"{t.prefix}.consents", marker, routing_key=agency)
    got = await answers(inbox, until=marker["message_id"])
    assert [a["event_id"] for a in got] == [body["message_id"], marker["message_id"]]


async def test_a_revocation_is_acknowledged_with_what_it_withdrew(bus, channel):
    """A revocation of a consent under which a referral left: ConsentRecorded for the revocation, naming the consent and its person, saying one referral was withdrawn."""
    t = bus.topology
    agency = bus.directory.agency_for(ROUBAIX).id
    inbox = await Inbox.open(channel, t.partner_queue_name(agency))
    partner = await Inbox.open(channel, t.partner_queue_name(expected_partner(bus)))
    person = new_id("T")
    given = consent(person=person, agency=agency, kinds=KINDS)
    await publish(channel, f"{t.prefix}.consents", given, routing_key=agency)
    await inbox.expect_kind("consent-recorded", event_id=given["message_id"])
    await publish(
        channel, f"{t.prefix}.signals", signal(person=person), routing_key="lmh-recouvrement"
    )
    (referral,) = await partner.expect(1)
    await bus.relay.wait_recorded(referral.message_id)

    revoked = revocation(given, reason="the tenant changed her mind")
    await publish(channel, f"{t.prefix}.consents", revoked, routing_key=agency)
    ack = await inbox.expect_kind("consent-recorded", event_id=revoked["message_id"])
    assert ack.body["event"] == "consent-revoked"
    assert (ack.body["consent_id"], ack.body["person_ref"]) == (given["consent_id"], person)
    assert ack.body["detail"] == "1 open referral(s) withdrawn"
    await partner.expect_kind("referral-withdrawn")


async def test_a_refused_consent_is_answered_to_the_agency_that_sent_it(bus, channel):
    """From the agency's own user, a consent collected by another agency's advisor is dead-lettered and answered with a ConsentRejected carrying the same reason; sent again, it is not answered twice."""
    t = bus.topology
    agency = bus.directory.agency_for(ROUBAIX).id
    inbox = await Inbox.open(channel, t.partner_queue_name(agency))
    dead = await Inbox.open(channel, t.dlq_name(t.consent_queue.name))
    body = consent(person=new_id("T"), agency=agency, kinds=KINDS, by="a.martin")
    marker = consent(person=new_id("T"), agency=agency, kinds=KINDS)
    async with as_partner(bus, agency) as (user, own):
        for _ in range(2):
            await publish(own, f"{t.prefix}.consents", body, routing_key=agency, user_id=user)
        await publish(own, f"{t.prefix}.consents", marker, routing_key=agency, user_id=user)
        got = await answers(inbox, until=marker["message_id"])
    rejected, recorded = got
    assert rejected["type"] == "consent-rejected"
    assert rejected["event_id"] == body["message_id"]
    assert rejected["event"] == "consent-granted"
    assert rejected["consent_id"] == body["consent_id"]
    assert "a.martin" in rejected["reason"]
    assert recorded["type"] == "consent-recorded"
    letters = await dead.expect(2)
    assert {d.headers["partnerbus-error"] for d in letters} == {rejected["reason"]}
    assert bus.store.count("consents", consent_id=body["consent_id"]) == 0


async def test_a_refusal_is_not_answered_on_a_claim_the_agency_did_not_make(bus, channel):
    """The same refused consent sent by a trusted sender in the agency's name (the bus's own user, as the CLI does): dead-lettered, and nothing is sent to the agency about it."""
    t = bus.topology
    agency = bus.directory.agency_for(ROUBAIX).id
    inbox = await Inbox.open(channel, t.partner_queue_name(agency))
    dead = await Inbox.open(channel, t.dlq_name(t.consent_queue.name))
    body = consent(person=new_id("T"), agency=agency, kinds=KINDS, by="a.martin")
    await publish(channel, f"{t.prefix}.consents", body, routing_key=agency)
    (letter,) = await dead.expect(1)
    assert "a.martin" in letter.headers["partnerbus-error"]
    marker = consent(person=new_id("T"), agency=agency, kinds=KINDS)
    await publish(channel, f"{t.prefix}.consents", marker, routing_key=agency)
    got = await answers(inbox, until=marker["message_id"])
    assert [a["type"] for a in got] == ["consent-recorded"]


async def test_a_signal_just_before_its_consent_ends_in_a_referral(bus, channel):
    """A signal parked for consent, then the consent: the signal is resumed, one referral reaches the partner, and the agency hears of the consent with the need it released."""
    t = bus.topology
    agency = bus.directory.agency_for(ROUBAIX).id
    inbox = await Inbox.open(channel, t.partner_queue_name(agency))
    partner = await Inbox.open(channel, t.partner_queue_name(expected_partner(bus)))
    person = new_id("T")
    first = signal(person=person)
    await publish(channel, f"{t.prefix}.signals", first, routing_key="lmh-recouvrement")
    await inbox.expect_kind("consent-requested", signal_id=first["message_id"])

    given = consent(person=person, agency=agency, kinds=KINDS)
    await publish(channel, f"{t.prefix}.consents", given, routing_key=agency)
    (referral,) = await partner.expect(1)
    assert signal_ref(referral.body, first["message_id"])
    ack = await inbox.expect_kind("consent-recorded", event_id=given["message_id"])
    assert ack.body["detail"] == "1 waiting need(s) of the person routed"


@pytest.mark.parametrize("signal_first", [True, False], ids=["signal-first", "consent-first"])
async def test_a_signal_and_its_consent_sent_together_end_in_one_referral(
    bus, channel, signal_first: bool
):
    """Twenty people, each with a signal and its consent published back to back (the signals and consents queues are consumed at once, in batches): every signal ends in exactly one referral, none stays parked."""
    t = bus.topology
    agency = bus.directory.agency_for(ROUBAIX).id
    target = expected_partner(bus)
    # Capacity is enforced and the sample gives this partner a few places: as its own
    # `CapacityChanged` would, the ledger says it has room without a figure.
    with bus.store.begin() as tx:
        tx.capacity.set(target, "capacity", None, bus.ledger.clock())
    partner = await Inbox.open(channel, t.partner_queue_name(target))
    signals = []
    before = len(bus.verdicts)
    for _ in range(20):
        person = new_id("T")
        sent = signal(person=person)
        given = consent(person=person, agency=agency, kinds=KINDS)
        pair = [
            (f"{t.prefix}.signals", sent, "lmh-recouvrement"),
            (f"{t.prefix}.consents", given, agency),
        ]
        for exchange, body, key in pair if signal_first else reversed(pair):
            await publish(channel, exchange, body, routing_key=key)
        signals.append(sent["message_id"])
    verdicts = await bus.wait_verdicts(before + 40)
    assert {v.outcome for v in verdicts[before:]} == {"processed"}

    referrals = await partner.expect(20, timeout=30)
    assert sorted(next(s for s in signals if signal_ref(r.body, s)) for r in referrals) == sorted(
        signals
    )
    # a read: it takes no write lock (a write on the event loop would wait for the relay,
    # which waits for the loop to publish)
    with bus.store.read() as tx:
        states = [tx.signals.need_states(s) for s in signals]
    assert all(set(s.values()) == {"routed"} for s in states), states
    assert bus.store.count("referrals") == 20
