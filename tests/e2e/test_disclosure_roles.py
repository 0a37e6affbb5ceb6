"""Disclosure by recipient role on the real broker (docs/DISCLOSURE.md): the landlord's
recovery service raises a signal; the Maison des solidarités declines or completes with a
note. The recovery service, a creditor, hears where the referral stands and never what
the MDS wrote or why it declined; the agency's advisor hears all of it."""

from __future__ import annotations

import pytest
from jsonschema import Draft202012Validator

from partnerbus.testing import Inbox

from .helpers import ARREARS, ROUBAIX, contract_schema, new_id, publish, signal, status
from .test_flow import grant

pytestmark = pytest.mark.rabbitmq

RECOVERY = "lmh-recouvrement"
MDS = "mds-roubaix"
NOTE = "Mme vit une séparation, suivie par la PMI; ne pas relancer avant janvier"
OUTCOME = "FSL accordé, plan d'apurement signé"


def valid(body: dict) -> bool:
    return not list(Draft202012Validator(contract_schema(body["type"])).iter_errors(body))


async def referred_to_the_mds(bus, channel) -> tuple[dict, str, Inbox, Inbox, Inbox]:
    """A signal of the recovery service about a person who consented to the MDS only:
    (the referral, the agency, the recovery service's, the agency's and the MDS's inboxes)."""
    assert bus.directory.is_creditor(RECOVERY)
    agency = bus.directory.agency_for(ROUBAIX).id
    assert bus.directory.partner(agency).kind == bus.directory.partner(RECOVERY).kind
    person = new_id("T")
    await grant(bus, channel, person, agency, partners=(MDS,))
    t = bus.topology
    recovery = await Inbox.open(channel, t.partner_queue_name(RECOVERY))
    advisor = await Inbox.open(channel, t.partner_queue_name(agency))
    mds = await Inbox.open(channel, t.partner_queue_name(MDS))
    await publish(channel, f"{t.prefix}.signals", signal(person=person), routing_key=RECOVERY)
    referral = await mds.expect_kind("referral")
    assert referral.body["facts"]["note"] == "talked at the door"  # the MDS's kind sees it
    return referral.body, agency, recovery, advisor, mds


async def answer(bus, channel, referral: dict, value: str, **extra) -> None:
    body = status(referral_id=referral["referral_id"], partner=MDS, value=value, **extra)
    await publish(channel, f"{bus.topology.prefix}.statuses", body, routing_key=MDS)


async def test_the_recovery_service_hears_the_completion_but_not_the_mds_note(bus, channel):
    referral, _, recovery, advisor, mds = await referred_to_the_mds(bus, channel)
    rid = referral["referral_id"]
    await answer(bus, channel, referral, "accepted", note=NOTE)
    await answer(bus, channel, referral, "completed", outcome=OUTCOME, note=NOTE)

    told = await recovery.expect_kind(
        "referral-status-changed", referral_id=rid, status="completed"
    )
    assert told.body["note"] is None and told.body["outcome"] is None
    assert told.body["need"] == ARREARS and told.body["partner"] == MDS
    accepted = [m for m in recovery.seen if m.body.get("status") == "accepted"]
    closed = await recovery.expect_kind("signal-closed", outcome="completed")
    assert closed.body["detail"] is None
    for message in (told, closed, *accepted):
        assert NOTE.encode() not in message.raw and OUTCOME.encode() not in message.raw
        assert valid(message.body)

    full = await advisor.expect_kind("referral-status-changed", referral_id=rid, status="completed")
    assert (full.body["note"], full.body["outcome"]) == (NOTE, OUTCOME)
    assert (await advisor.expect_kind("signal-closed")).body["detail"] == f"completed by {MDS}"
    assert valid(full.body)
    for inbox in (recovery, advisor, mds):
        await inbox.close()


async def test_the_recovery_service_never_learns_why_the_mds_declined(bus, channel):
    """`not-interested` is about the person: the advisor decides what next, and only she
    hears why; the recovery service hears the need was declined and closed."""
    referral, _, recovery, advisor, mds = await referred_to_the_mds(bus, channel)
    rid = referral["referral_id"]
    await answer(bus, channel, referral, "rejected", reason="not-interested", note=NOTE)

    told = await recovery.expect_kind("referral-status-changed", referral_id=rid, status="rejected")
    assert (told.body["reason"], told.body["note"]) == (None, None)
    assert valid(told.body), "the creditor's copy of a rejection is valid without its reason"
    closed = await recovery.expect_kind("signal-closed", outcome="advisor-decides")
    assert closed.body["detail"] is None
    for message in (told, closed):
        assert b"not-interested" not in message.raw

    full = await advisor.expect_kind("referral-status-changed", referral_id=rid, status="rejected")
    assert (full.body["reason"], full.body["note"]) == ("not-interested", NOTE)
    assert "not-interested" in (await advisor.expect_kind("signal-closed")).body["detail"]
    for inbox in (recovery, advisor, mds):
        await inbox.close()


async def test_a_signal_naming_the_recovery_service_as_its_agency_is_dead_lettered(bus, channel):
    """Same kind as the agency, but a creditor: it cannot make itself the advisor."""
    t = bus.topology
    dlq = await Inbox.open(channel, t.dlq_name(t.signal_queue.name))
    body = signal(agency=RECOVERY)
    await publish(channel, f"{t.prefix}.signals", body, routing_key=RECOVERY)
    (letter,) = await dlq.expect(1)
    assert letter.message_id == body["message_id"]
    assert "is a creditor" in letter.headers["partnerbus-error"]
    assert bus.store.count("signals", signal_id=body["message_id"]) == 0
    await dlq.close()
