"""Signals become referrals, end to end, on the real RabbitMQ."""

from __future__ import annotations

import pytest

from partnerbus.directory import match
from partnerbus.testing import Inbox, wait_for_status

from .helpers import (
    ARREARS,
    ROUBAIX,
    consent,
    new_id,
    publish,
    queue_depth,
    signal,
    signal_ref,
    status,
)

KINDS = ("ccas-cias", "points-conseil-budget", "cresus", "caf", "maisons-des-solidarites")

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
def database_url(engine_url: str) -> str:
    """These run on both engines: SQLite and PostgreSQL."""
    return engine_url


def expected_partner(
    bus, need: str = ARREARS, commune: str = ROUBAIX, source: str = "lmh-recouvrement"
) -> str:
    candidates = match(bus.directory, need, commune, sender=source)
    assert candidates, "the sample directory must cover this need here"
    return candidates[0].partner_id


async def grant(
    bus, channel, person: str, agency: str, *, inbox: Inbox | None = None, **scope
) -> dict:
    """A consent the agency grants, recorded, and its `consent-recorded` answer taken off
    the agency's queue (through `inbox` when the test reads that queue already), so that
    what a test then counts on the agency's queue is what follows the grant."""
    body = consent(person=person, agency=agency, **scope)
    before = len(bus.verdicts)
    reader = inbox or await Inbox.open(channel, bus.topology.partner_queue_name(agency))
    try:
        await publish(channel, f"{bus.topology.prefix}.consents", body, routing_key=agency)
        await bus.wait_verdicts(before + 1)
        await reader.expect_kind("consent-recorded", event_id=body["message_id"])
    finally:
        if inbox is None:
            await reader.close()
    return body


async def consented(bus, channel) -> tuple[str, str, str, Inbox]:
    """A fresh person who consented to the usual kinds: (person, agency, best partner, its inbox)."""
    person = new_id("T")
    agency = bus.directory.agency_for(ROUBAIX).id
    await grant(bus, channel, person, agency, kinds=KINDS)
    target = expected_partner(bus)
    return (
        person,
        agency,
        target,
        await Inbox.open(channel, bus.topology.partner_queue_name(target)),
    )


async def test_a_consented_signal_yields_exactly_one_referral_in_the_right_partner_queue(
    bus, channel
):
    """A signal whose person consented reaches the top-ranked partner's queue, once, and no other."""
    person, agency, target, inbox = await consented(bus, channel)

    body = signal(person=person)
    await publish(channel, f"{bus.topology.prefix}.signals", body, routing_key="lmh-recouvrement")

    (referral,) = await inbox.expect(1)
    assert referral.kind == "referral"
    assert signal_ref(referral.body, body["message_id"])
    assert referral.body["partner"] == target
    assert referral.body["need"] == ARREARS
    assert person not in referral.raw.decode(), "the partner sees a pseudonym, not our reference"
    await inbox.close()
    await bus.relay.wait_recorded(referral.message_id)
    loop = {"lmh-recouvrement", agency}  # they hear `delivered`: the closed loop
    for partner in bus.directory.partners():
        if partner.id not in (target, *loop):
            assert await queue_depth(channel, bus.topology.partner_queue_name(partner.id)) == 0, (
                partner.id
            )
    for partner_id in loop:
        notice = await Inbox.open(channel, bus.topology.partner_queue_name(partner_id))
        (delivered,) = await notice.expect(1)
        assert delivered.body["status"] == "delivered"
        assert delivered.body["referral_id"] == referral.body["referral_id"]
    assert bus.store.count("referrals", signal_id=body["message_id"]) == 1


async def test_an_unconsented_signal_waits_for_consent_then_leaves(bus, channel):
    """Without consent the advisor is asked and no partner hears of the person; the grant releases it."""
    person = new_id("T")
    agency = bus.directory.agency_for(ROUBAIX).id
    target = expected_partner(bus)
    advisor_inbox = await Inbox.open(channel, bus.topology.partner_queue_name(agency))
    partner_inbox = await Inbox.open(channel, bus.topology.partner_queue_name(target))

    body = signal(person=person)
    await publish(channel, f"{bus.topology.prefix}.signals", body, routing_key="lmh-recouvrement")
    request = await advisor_inbox.expect_kind("consent-requested")
    assert request.body["signal_id"] == body["message_id"]
    assert request.body["needs"] == [ARREARS]
    assert request.body["person_ref"] == person
    assert partner_inbox.drain() == []
    assert bus.store.count("referrals", signal_id=body["message_id"]) == 0

    kinds = (bus.directory.partner(target).kind,)
    await grant(bus, channel, person, agency, inbox=advisor_inbox, kinds=kinds)
    (referral,) = await partner_inbox.expect(1)
    assert signal_ref(referral.body, body["message_id"])


async def test_a_malformed_message_is_dead_lettered_with_its_reason_and_the_next_flows(
    bus, channel
):
    """Broken JSON and a schema error land in the dead-letter queue with the reason; a good signal after them still flows."""
    t = bus.topology
    dlq = await Inbox.open(channel, t.dlq_name(t.signal_queue.name))
    person, _agency, _target, inbox = await consented(bus, channel)

    await publish(
        channel,
        f"{t.prefix}.signals",
        b'{"message_id": "x", oops',
        routing_key="lmh-recouvrement",
        message_id="broken-1",
    )
    bad = signal(person=person, commune="7501")
    await publish(channel, f"{t.prefix}.signals", bad, routing_key="lmh-recouvrement")
    good = signal(person=person)
    await publish(channel, f"{t.prefix}.signals", good, routing_key="lmh-recouvrement")

    dead = await dlq.expect(2)
    reasons = {d.message_id: d.headers["partnerbus-error"] for d in dead}
    assert reasons["broken-1"].startswith("not JSON")
    assert "commune" in reasons[bad["message_id"]]
    assert all(d.headers["partnerbus-error-queue"] == t.signal_queue.name for d in dead)
    (referral,) = await inbox.expect(1)
    assert signal_ref(referral.body, good["message_id"])


async def test_a_duplicate_signal_yields_no_second_referral(bus, channel):
    """The same message_id twice is recorded once and referred once."""
    person, _agency, _target, inbox = await consented(bus, channel)
    body = signal(person=person)
    before = len(bus.verdicts)
    await publish(channel, f"{bus.topology.prefix}.signals", body, routing_key="lmh-recouvrement")
    await publish(channel, f"{bus.topology.prefix}.signals", body, routing_key="lmh-recouvrement")

    verdicts = await bus.wait_verdicts(before + 2)
    assert sorted(v.outcome for v in verdicts[before:]) == ["duplicate", "processed"]
    await inbox.expect(1)
    assert inbox.drain() == []
    assert bus.store.count("referrals", signal_id=body["message_id"]) == 1
    assert bus.store.count("signals", signal_id=body["message_id"]) == 1


async def test_a_partner_status_reaches_the_source_and_the_advisor(bus, channel):
    """The closed loop: a partner's acceptance is forwarded to the signal's source and to the tenant's agency."""
    person = new_id("T")
    agency = bus.directory.agency_for(ROUBAIX).id
    await grant(
        bus,
        channel,
        person,
        agency,
        kinds=("ccas-cias", "points-conseil-budget", "cresus", "caf", "maisons-des-solidarites"),
    )
    target = expected_partner(bus)
    t = bus.topology
    inbox = await Inbox.open(channel, t.partner_queue_name(target))
    source_inbox = await Inbox.open(channel, t.partner_queue_name("lmh-recouvrement"))
    agency_inbox = await Inbox.open(channel, t.partner_queue_name(agency))

    body = signal(person=person)
    await publish(channel, f"{t.prefix}.signals", body, routing_key="lmh-recouvrement")
    (referral,) = await inbox.expect(1)
    rid = referral.body["referral_id"]
    await publish(
        channel,
        f"{t.prefix}.statuses",
        status(referral_id=rid, partner=target, value="accepted"),
        routing_key=target,
    )

    forwarded = await source_inbox.expect_kind("referral-status-changed", status="accepted")
    assert forwarded.body["referral_id"] == rid
    assert forwarded.body["status"] == "accepted"
    assert forwarded.body["signal_id"] == body["message_id"]
    assert forwarded.body["need"] == ARREARS
    told = await agency_inbox.expect_kind("referral-status-changed", status="accepted")
    assert told.body["status"] == "accepted"
    assert await wait_for_status(bus.store, rid, "accepted") == "accepted"


async def test_a_need_no_partner_covers_tells_the_advisor_and_closes_for_the_source(bus, channel):
    """A need nobody covers in the commune: NoPartnerFound to the tenant's agency, SignalClosed(no-partner) to the source, no referral, an audit record of the disclosure."""
    t = bus.topology
    uncovered = "sante--sante-mentale"
    assert not match(bus.directory, uncovered, ROUBAIX, sender="lmh-recouvrement")
    agency = bus.directory.agency_for(ROUBAIX).id
    agency_inbox = await Inbox.open(channel, t.partner_queue_name(agency))
    source_inbox = await Inbox.open(channel, t.partner_queue_name("lmh-recouvrement"))
    body = signal(needs=(uncovered,))
    await publish(channel, f"{t.prefix}.signals", body, routing_key="lmh-recouvrement")

    told = await agency_inbox.expect_kind("no-partner-found")
    assert told.body["signal_id"] == body["message_id"]
    assert told.body["need"] == uncovered
    assert told.body["person_ref"] == body["person_ref"]
    assert "no partner for sante--sante-mentale in 59512" in told.body["reason"]
    closed = await source_inbox.expect_kind("signal-closed")
    assert closed.body["outcome"] == "no-partner"
    assert bus.store.count("referrals", signal_id=body["message_id"]) == 0
    actions = [a.action for a in bus.store.audit_trail(body["message_id"])]
    assert "no-partner-disclosed" in actions
