"""The person's wishes on the real broker: a signal saying she wants a home visit and is
not to be contacted directly reaches the partner that visits at home (the Maison des
solidarités, which the CCAS outranks otherwise), with her wishes and no contact details."""

from __future__ import annotations

import pytest
from jsonschema import Draft202012Validator

from partnerbus.directory import match
from partnerbus.directory.match import VISITS
from partnerbus.testing import Inbox

from .helpers import ARREARS, ROUBAIX, contract_schema, new_id, publish, signal
from .test_flow import grant

pytestmark = pytest.mark.rabbitmq

SOURCE = "lmh-recouvrement"
CCAS = "ccas-roubaix"
MDS = "mds-roubaix"


async def test_a_home_visit_without_contact_reaches_the_visiting_partner_bare(bus, channel):
    # without the wish the CCAS comes first; only the MDS visits at home
    plain = [c.partner_id for c in match(bus.directory, ARREARS, ROUBAIX, sender=SOURCE)]
    assert plain.index(CCAS) < plain.index(MDS)
    assert "local-a-domicile" in bus.directory.partner(MDS).modes
    assert "local-a-domicile" not in bus.directory.partner(CCAS).modes

    agency = bus.directory.agency_for(ROUBAIX).id
    person = new_id("T")
    await grant(bus, channel, person, agency, partners=(CCAS, MDS))
    mds = await Inbox.open(channel, bus.topology.partner_queue_name(MDS))
    wishes = {"do_not_contact": True, "home_visit": True, "languages": ["ar", "fr"]}
    body = signal(person=person, preferences=wishes)
    assert body["contact"]["phone"]  # the source knows how to reach her
    await publish(channel, f"{bus.topology.prefix}.signals", body, routing_key=SOURCE)

    referral = await mds.expect_kind("referral")
    got = referral.body
    assert got["need"] == ARREARS
    assert got["contact"] is None
    assert b"+33" not in referral.raw and b"12 34 56 78" not in referral.raw
    assert got["preferences"] == {
        "through_advisor": False,
        "do_not_contact": True,
        "home_visit": True,
        "languages": ["ar", "fr"],
    }
    assert VISITS in got["why"]
    assert not list(Draft202012Validator(contract_schema("referral")).iter_errors(got))
