"""Territories as they are, on the real RabbitMQ (issue 11): a tenant of Saint-Denis, a
commune of Seine-Saint-Denis (93) in the Métropole du Grand Paris, whose EPCI the INSEE file
lists first under Paris (75), is referred to the CAF of 93, never to the CAF of Paris."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from partnerbus.directory import load_directory
from partnerbus.entrypoints.bootstrap import Bus, create_app
from partnerbus.testing import Inbox
from tests.unit.directory.test_directory_territories import (
    RIGHTS,
    SAINT_DENIS,
    document,
    write,
)

from .helpers import consent, new_id, publish, signal, signal_ref

pytestmark = pytest.mark.rabbitmq

AGENCY = "bailleur-agence-93"


@pytest.fixture
async def grand_paris(settings, tmp_path) -> AsyncIterator[Bus]:
    """The bus on the Grand Paris directory of the territory tests (a CAF per département,
    a landlord agency in 93 and one in Paris)."""
    directory = load_directory(write(tmp_path, document()))
    service = create_app(settings, directory=directory)
    await service.start()
    yield service
    await service.stop()
    await service.teardown()


async def test_a_saint_denis_tenant_reaches_the_caf_of_93_not_the_caf_of_paris(
    grand_paris, channel
) -> None:
    """The agency of 93 signals an access-to-rights need for a tenant of Saint-Denis and records her consent: the referral lands in caf-93's queue, and caf-75's stays empty."""
    bus = grand_paris
    t = bus.topology
    assert bus.directory.departements_of(SAINT_DENIS) == ("93",)
    caf_93 = await Inbox.open(channel, t.partner_queue_name("caf-93"))
    caf_75 = await Inbox.open(channel, t.partner_queue_name("caf-75"))
    person = new_id("T")
    given = consent(person=person, agency=AGENCY, needs=(RIGHTS,), kinds=("caf",), by="a.diallo")
    before = len(bus.verdicts)
    await publish(channel, f"{t.prefix}.consents", given, routing_key=AGENCY)
    await bus.wait_verdicts(before + 1)
    sent = signal(source=AGENCY, person=person, commune=SAINT_DENIS, needs=(RIGHTS,))
    await publish(channel, f"{t.prefix}.signals", sent, routing_key=AGENCY)

    (referral,) = [m for m in await caf_93.expect(1) if m.kind == "referral"]
    assert signal_ref(referral.body, sent["message_id"])
    assert referral.body["why"][0].startswith("covers 93 (departement")
    assert [r.partner_id for r in bus.store.referrals()] == ["caf-93"]
    assert caf_75.drain() == []
    await caf_93.close()
    await caf_75.close()
