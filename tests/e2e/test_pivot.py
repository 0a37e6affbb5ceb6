"""Two landlords in Roubaix, on the real RabbitMQ (issue 11): each landlord's signal reaches
its own agency's advisor, never the other landlord's."""

from __future__ import annotations

import pytest

from partnerbus.testing import Inbox

from .helpers import ROUBAIX, new_id, publish, signal
from .test_flow import KINDS, grant

pytestmark = pytest.mark.rabbitmq

LMH, VILOGIA = "lmh-agence-roubaix", "vilogia-agence-roubaix"


async def test_a_vilogia_signal_reaches_vilogias_agency_and_an_lmh_one_lmhs(bus, channel):
    """Both landlords have an agency in Roubaix: the consent request of Vilogia's recovery service's signal lands in Vilogia's agency's queue, LMH's in LMH's; Vilogia's advisor's consent releases Vilogia's signal, whose referral names Vilogia's agency."""
    t = bus.topology
    assert set(bus.directory.pivot_organisations(ROUBAIX)) >= {"lmh", "vilogia"}
    vilogia_inbox = await Inbox.open(channel, t.partner_queue_name(VILOGIA))
    lmh_inbox = await Inbox.open(channel, t.partner_queue_name(LMH))

    vilogia_person, lmh_person = new_id("T"), new_id("T")
    from_vilogia = signal(source="vilogia-recouvrement", person=vilogia_person)
    from_lmh = signal(source="lmh-recouvrement", person=lmh_person)
    await publish(channel, f"{t.prefix}.signals", from_vilogia, routing_key="vilogia-recouvrement")
    await publish(channel, f"{t.prefix}.signals", from_lmh, routing_key="lmh-recouvrement")

    asked_vilogia = await vilogia_inbox.expect_kind("consent-requested")
    assert asked_vilogia.body["signal_id"] == from_vilogia["message_id"]
    assert asked_vilogia.body["source"] == "vilogia-recouvrement"
    assert (asked_vilogia.body["agency"], asked_vilogia.body["advisor"]) == (VILOGIA, "k.mercier")
    asked_lmh = await lmh_inbox.expect_kind("consent-requested")
    assert asked_lmh.body["signal_id"] == from_lmh["message_id"]
    assert asked_lmh.body["agency"] == LMH
    assert all(m.body.get("person_ref") != vilogia_person for m in lmh_inbox.drain())
    assert all(m.body.get("person_ref") != lmh_person for m in vilogia_inbox.drain())

    await grant(bus, channel, vilogia_person, VILOGIA, inbox=vilogia_inbox, kinds=KINDS)
    row = bus.store.referrals()
    (referral,) = [r for r in row if r.signal_id == from_vilogia["message_id"]]
    target = await Inbox.open(channel, t.partner_queue_name(referral.partner_id))
    (sent,) = [m for m in await target.expect(1) if m.kind == "referral"]
    assert sent.body["agency"] == VILOGIA
    await target.close()
    await vilogia_inbox.close()
    await lmh_inbox.close()
