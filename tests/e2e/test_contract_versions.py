"""The contract's versions on the real broker: a partner written against an older
compatible version keeps working; an unknown version is dead-lettered with the versions
this bus reads."""

from __future__ import annotations

import pytest

from partnerbus.schemas.base import ACCEPTED_SCHEMA_VERSIONS

from .helpers import publish, signal, signal_ref
from .test_flow import consented

pytestmark = pytest.mark.rabbitmq


async def test_a_signal_of_contract_version_1_still_ends_in_a_referral(bus, channel):
    """Version 1 partners send what version 2 reads: their signal is routed as any other."""
    person, _agency, _target, inbox = await consented(bus, channel)
    body = signal(person=person)
    body["schema_version"] = 1
    await publish(channel, f"{bus.topology.prefix}.signals", body, routing_key="lmh-recouvrement")
    (referral,) = await inbox.expect(1)
    assert signal_ref(referral.body, body["message_id"])
    assert referral.body["schema_version"] == 2  # the bus writes the current version


@pytest.mark.parametrize("version", [0, 3, "2"])
async def test_a_signal_of_an_unknown_contract_version_is_dead_lettered_naming_the_versions_read(
    bus, channel, version
):
    t = bus.topology
    from partnerbus.testing import Inbox

    dlq = await Inbox.open(channel, t.dlq_name(t.signal_queue.name))
    body = signal()
    body["schema_version"] = version
    await publish(channel, f"{t.prefix}.signals", body, routing_key="lmh-recouvrement")
    (dead,) = await dlq.expect(1)
    assert dead.message_id == body["message_id"]
    reason = dead.headers["partnerbus-error"]
    assert "schema_version" in reason
    if version != "2":
        accepted = ", ".join(map(str, ACCEPTED_SCHEMA_VERSIONS))
        assert f"it accepts {accepted}" in reason, reason
