"""Only a pivot records consent, whatever the door, and a partner's clock never delays a
revocation: on the real broker (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from partnerbus.testing import Inbox

from .gateway_fixtures import Door, gateway_fixture  # noqa: F401 - the `gateway` fixture
from .helpers import ROUBAIX, consent, new_id, publish, queue_depth, signal
from .test_flow import KINDS, expected_partner, grant

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
def database_url(engine_url: str) -> str:
    return engine_url


def need_states(bus, signal_id: str) -> dict[str, str]:
    with bus.store.read() as tx:  # no write lock: the relay may hold it, waiting for the loop
        return tx.signals.need_states(signal_id)


async def test_a_ccas_without_advisors_cannot_release_a_parked_signal_by_any_door(
    bus, channel, gateway: Door
):
    """The CCAS names itself as the agency of a consent: the gateway answers 403; sent by a trusted sender (the bus's own user, as `partnerbus consent grant` does) it is dead-lettered with the reason; the signal stays parked and no referral reaches any partner."""
    t = bus.topology
    person = new_id("T")
    agency = bus.directory.agency_for(ROUBAIX).id
    advisor = await Inbox.open(channel, t.partner_queue_name(agency))
    dead = await Inbox.open(channel, t.dlq_name(t.consent_queue.name))
    parked = signal(person=person)
    await publish(channel, f"{t.prefix}.signals", parked, routing_key="lmh-recouvrement")
    await advisor.expect_kind("consent-requested")
    target = expected_partner(bus)

    body = consent(person=person, agency="ccas-roubaix", kinds=KINDS)
    body["collected_by"] = "ccas-roubaix"
    answer = await gateway.post("/v1/consents", json=body, headers=gateway.auth("ccas-roubaix"))
    assert answer.status_code == 403, answer.text

    before = len(bus.verdicts)
    await publish(channel, f"{t.prefix}.consents", body, routing_key="ccas-roubaix")
    (verdict,) = (await bus.wait_verdicts(before + 1))[before:]
    assert verdict.outcome == "refused"
    assert "advisors" in (verdict.reason or "")
    (letter,) = await dead.expect(1)
    assert "advisors" in letter.headers["partnerbus-error"]
    assert need_states(bus, parked["message_id"]) == {parked["needs"][0]: "parked"}
    assert bus.store.count("referrals") == 0
    assert await queue_depth(channel, t.partner_queue_name(target)) == 0


async def test_a_consent_collected_by_someone_else_s_advisor_is_dead_lettered(bus, channel):
    """The agency is a pivot but `collected_by` is another agency's advisor: refused with the reason, nothing released."""
    t = bus.topology
    person = new_id("T")
    agency = bus.directory.agency_for(ROUBAIX).id
    parked = signal(person=person)
    await publish(channel, f"{t.prefix}.signals", parked, routing_key="lmh-recouvrement")
    await bus.wait_verdicts(1)
    body = consent(person=person, agency=agency, kinds=KINDS)
    body["collected_by"] = "a.martin"  # an advisor of lmh-agence-lille-sud
    await publish(channel, f"{t.prefix}.consents", body, routing_key=agency)
    (_, verdict) = (await bus.wait_verdicts(2))[0:2]
    assert verdict.outcome == "refused"
    assert "a.martin" in (verdict.reason or "")
    assert bus.store.count("referrals") == 0


async def test_a_revocation_dated_in_the_future_takes_effect_at_once(bus, channel, gateway: Door):
    """`revoked_at` a year ahead, posted through the gateway: the open referral is withdrawn now, and a later signal of the person is parked, not sent."""
    t = bus.topology
    person = new_id("T")
    agency = bus.directory.agency_for(ROUBAIX).id
    given = await grant(bus, channel, person, agency, kinds=KINDS)
    target = expected_partner(bus)
    inbox = await Inbox.open(channel, t.partner_queue_name(target))
    advisor = await Inbox.open(channel, t.partner_queue_name(agency))
    await publish(
        channel, f"{t.prefix}.signals", signal(person=person), routing_key="lmh-recouvrement"
    )
    (referral,) = await inbox.expect(1)
    await bus.relay.wait_recorded(referral.message_id)

    later = datetime.now(UTC) + timedelta(days=365)
    revocation = {
        "type": "consent-revoked",
        "message_id": new_id("rev"),
        "occurred_at": later.isoformat(),
        "consent_id": given["consent_id"],
        "revoked_by": given["collected_by"],
        "agency": agency,
        "revoked_at": later.isoformat(),
        "reason": "the tenant changed her mind",
    }
    answer = await gateway.post("/v1/consents", json=revocation, headers=gateway.auth(agency))
    assert answer.status_code == 202, answer.text
    withdrawn = await inbox.expect_kind("referral-withdrawn")
    assert withdrawn.body["referral_id"] == referral.body["referral_id"]
    with bus.store.read() as tx:
        stored = tx.consents.get(given["consent_id"])
    assert stored.revoked_at <= datetime.now(UTC)

    second = signal(person=person)
    await publish(channel, f"{t.prefix}.signals", second, routing_key="lmh-recouvrement")
    request = await advisor.expect_kind("consent-requested", signal_id=second["message_id"])
    assert "revoked" in request.body["reason"]
    assert need_states(bus, second["message_id"]) == {second["needs"][0]: "parked"}
    assert inbox.drain() == []


async def test_a_consent_granted_in_the_future_is_refused_not_kept_for_later(
    bus, channel, gateway: Door
):
    """`granted_at` a month ahead: dead-lettered with the reason; the parked signal stays parked."""
    t = bus.topology
    person = new_id("T")
    agency = bus.directory.agency_for(ROUBAIX).id
    parked = signal(person=person)
    await publish(channel, f"{t.prefix}.signals", parked, routing_key="lmh-recouvrement")
    await bus.wait_verdicts(1)
    body = consent(
        person=person,
        agency=agency,
        kinds=KINDS,
        granted_at=datetime.now(UTC) + timedelta(days=30),
    )
    answer = await gateway.post("/v1/consents", json=body, headers=gateway.auth(agency))
    assert answer.status_code == 202, answer.text
    (_, verdict) = (await bus.wait_verdicts(2))[0:2]
    assert verdict.outcome == "refused"
    assert "future" in (verdict.reason or "")
    assert need_states(bus, parked["message_id"]) == {parked["needs"][0]: "parked"}
    assert bus.store.count("referrals") == 0
