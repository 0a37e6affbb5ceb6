"""The scheduler's follow-ups through the real broker, driven by the service's own pass with
a fake clock (issue 11): a parked need reminds the advisor, then closes for the source; an
accepted referral with no news reminds the partner, then the advisor is told. What reaches
each queue validates against the published schemas."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from jsonschema import Draft202012Validator

from partnerbus.entrypoints.bootstrap import create_app
from partnerbus.testing import FakeClock, Inbox, wait_for_status

from .helpers import ARREARS, ROUBAIX, contract_schema, new_id, publish, signal, status
from .test_flow import KINDS, expected_partner, grant

pytestmark = pytest.mark.rabbitmq

SOURCE = "lmh-recouvrement"
DAY = timedelta(days=1)


@pytest.fixture
def database_url(engine_url: str) -> str:
    """These run on both engines: SQLite and PostgreSQL."""
    return engine_url


def conforms(body: dict) -> None:
    Draft202012Validator(contract_schema(body["type"])).validate(body)


async def test_a_parked_need_reminds_the_advisor_then_closes_for_the_source(settings, channel):
    """An urgent signal without consent: the advisor is asked; after 3 days the pass sends the agency a reminder of the request (once); after 14 days the source and the agency receive SignalClosed(consent-not-obtained)."""
    clock = FakeClock(datetime.now(UTC))
    bus = create_app(settings, clock=clock)
    await bus.start()
    try:
        t = bus.topology
        agency = bus.directory.agency_for(ROUBAIX).id
        advisor = await Inbox.open(channel, t.partner_queue_name(agency))
        source = await Inbox.open(channel, t.partner_queue_name(SOURCE))
        body = signal(person=new_id("T"), urgency="urgent")
        await publish(channel, f"{t.prefix}.signals", body, routing_key=SOURCE)
        request = await advisor.expect_kind("consent-requested")
        assert request.body["reminder"] is False

        clock.advance(3 * DAY)
        assert (await bus.tick())["parked-reminded"] == 1
        reminder = await advisor.expect_kind("consent-requested", reminder=True)
        conforms(reminder.body)
        assert reminder.body["signal_id"] == body["message_id"]
        assert reminder.body["needs"] == [ARREARS]
        assert reminder.body["closes_at"] is not None
        assert (await bus.tick())["parked-reminded"] == 0

        clock.advance(11 * DAY)
        assert (await bus.tick())["parked-closed"] == 1
        for inbox in (source, advisor):
            closed = await inbox.expect_kind("signal-closed", outcome="consent-not-obtained")
            conforms(closed.body)
            assert (closed.body["signal_id"], closed.body["need"]) == (body["message_id"], ARREARS)
        assert (await bus.tick())["parked-closed"] == 0
    finally:
        await bus.stop()
        await bus.teardown()


async def test_an_accepted_referral_with_no_news_reminds_the_partner_then_tells_the_advisor(
    settings, channel
):
    """The partner accepts, then says nothing: after 14 days (urgent) it receives a news reminder; after 21 days the advisor's agency receives ReferralStalled; each once."""
    clock = FakeClock(datetime.now(UTC))
    bus = create_app(settings, clock=clock)
    await bus.start()
    try:
        t = bus.topology
        person = new_id("T")
        agency = bus.directory.agency_for(ROUBAIX).id
        await grant(bus, channel, person, agency, kinds=KINDS, days=60)
        target = expected_partner(bus)
        partner = await Inbox.open(channel, t.partner_queue_name(target))
        advisor = await Inbox.open(channel, t.partner_queue_name(agency))
        await publish(
            channel,
            f"{t.prefix}.signals",
            signal(person=person, urgency="urgent"),
            routing_key=SOURCE,
        )
        (referral,) = await partner.expect(1)
        rid = referral.body["referral_id"]
        await publish(
            channel,
            f"{t.prefix}.statuses",
            status(referral_id=rid, partner=target, value="accepted"),
            routing_key=target,
        )
        assert await wait_for_status(bus.store, rid, "accepted") == "accepted"

        clock.advance(14 * DAY)
        assert (await bus.tick())["stalled-reminded"] == 1
        reminder = await partner.expect_kind("referral-reminder", reason="no-news")
        conforms(reminder.body)
        assert reminder.body["referral_id"] == rid
        assert reminder.body["last_news_at"] is not None
        assert (await bus.tick())["stalled-reminded"] == 0

        clock.advance(7 * DAY)
        assert (await bus.tick())["stalled-reported"] == 1
        stalled = await advisor.expect_kind("referral-stalled")
        conforms(stalled.body)
        assert (stalled.body["referral_id"], stalled.body["partner"]) == (rid, target)
        assert (stalled.body["need"], stalled.body["status"]) == (ARREARS, "accepted")
        assert (await bus.tick())["stalled-reported"] == 0
    finally:
        await bus.stop()
        await bus.teardown()
