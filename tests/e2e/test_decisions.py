"""The advisor's decisions through the real broker: published by her agency's own RabbitMQ
user on the consents exchange, a cancellation reaches the partner and the closed loop, a
need goes to the partner she chose; a decision from anyone else is dead-lettered with its
reason (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from partnerbus.directory import match
from partnerbus.testing import Inbox, wait_for_status
from tests.conftest import as_partner

from .helpers import ARREARS, ROUBAIX, new_id, publish, signal, status
from .test_flow import KINDS, expected_partner, grant

pytestmark = pytest.mark.rabbitmq

SOURCE = "lmh-recouvrement"


@pytest.fixture
def database_url(engine_url: str) -> str:
    return engine_url


def cancellation(referral_id: str, agency: str, by: str) -> dict:
    return {
        "type": "referral-cancelled",
        "message_id": new_id("cancel"),
        "occurred_at": datetime.now(UTC).isoformat(),
        "referral_id": referral_id,
        "agency": agency,
        "decided_by": by,
        "reason": "the person moved to Lille",
    }


async def _accepted_referral(bus, channel) -> tuple[str, str, Inbox, str]:
    """A referral sent under consent and accepted by its partner: (agency, the advisor,
    the partner's inbox, the referral id)."""
    t = bus.topology
    person = new_id("T")
    agency = bus.directory.agency_for(ROUBAIX).id
    given = await grant(bus, channel, person, agency, kinds=KINDS)
    target = expected_partner(bus)
    inbox = await Inbox.open(channel, t.partner_queue_name(target))
    await publish(channel, f"{t.prefix}.signals", signal(person=person), routing_key=SOURCE)
    (referral,) = await inbox.expect(1)
    rid = referral.body["referral_id"]
    await publish(
        channel,
        f"{t.prefix}.statuses",
        status(referral_id=rid, partner=target, value="accepted"),
        routing_key=target,
    )
    assert await wait_for_status(bus.store, rid, "accepted") == "accepted"
    return agency, given["collected_by"], inbox, rid


async def test_the_advisor_cancels_then_sends_the_need_to_the_partner_she_chose(bus, channel):
    """From the agency's own user: the partner receives ReferralWithdrawn (signal-cancelled), the source hears `cancelled`; then the need goes to the second candidate, its `why` saying who chose it and how the directory ranked it."""
    t = bus.topology
    agency, advisor, first_inbox, rid = await _accepted_referral(bus, channel)
    source = await Inbox.open(channel, t.partner_queue_name(SOURCE))
    async with as_partner(bus, agency) as (user, own):
        await publish(
            own,
            f"{t.prefix}.consents",
            cancellation(rid, agency, advisor),
            routing_key=agency,
            user_id=user,
        )
        withdrawn = await first_inbox.expect_kind("referral-withdrawn", referral_id=rid)
        assert withdrawn.body["reason"] == "signal-cancelled"
        told = await source.expect_kind("referral-status-changed", status="cancelled")
        assert "Lille" not in str(told.body)
        assert await wait_for_status(bus.store, rid, "cancelled") == "cancelled"

        chosen = match(bus.directory, ARREARS, ROUBAIX, sender=SOURCE)[1].partner_id
        chosen_inbox = await Inbox.open(channel, t.partner_queue_name(chosen))
        row = bus.store.referral(rid)
        decision = {
            "type": "need-directed",
            "message_id": new_id("direct"),
            "occurred_at": datetime.now(UTC).isoformat(),
            "signal_id": row.signal_id,
            "need": ARREARS,
            "partner": chosen,
            "agency": agency,
            "decided_by": advisor,
        }
        await publish(own, f"{t.prefix}.consents", decision, routing_key=agency, user_id=user)
        referral = await chosen_inbox.expect_kind("referral")
    assert referral.body["partner"] == chosen
    assert referral.body["attempt"] == 2
    assert referral.body["why"][0] == f"chosen by the advisor {advisor}"
    assert "ranked it 2" in referral.body["why"][1]


async def test_a_decision_from_another_agency_is_dead_lettered(bus, channel):
    """Another agency, as itself: refused (it does not follow the signal); posing as the right agency: refused as a forged sender. Both dead-lettered with their reason; the referral stays accepted and its partner hears nothing."""
    t = bus.topology
    agency, advisor, _, rid = await _accepted_referral(bus, channel)
    dead = await Inbox.open(channel, t.dlq_name(t.consent_queue.name))
    other = "lmh-agence-lille-sud"
    async with as_partner(bus, other) as (user, own):
        await publish(
            own,
            f"{t.prefix}.consents",
            cancellation(rid, other, "a.martin"),
            routing_key=other,
            user_id=user,
        )
        await publish(
            own,
            f"{t.prefix}.consents",
            cancellation(rid, agency, advisor),
            routing_key=other,
            user_id=user,
        )
        letters = await dead.expect(2)
    reasons = sorted(d.headers["partnerbus-error"] for d in letters)
    assert any("not followed by 'lmh-agence-lille-sud'" in r for r in reasons), reasons
    assert any("does not match" in r for r in reasons), reasons
    assert bus.store.referral(rid).status == "accepted"


async def test_the_advisor_decides_from_the_command_line(cli_env, channel):
    """`referrals cancel` then `referrals send`: published as the agency's decisions, the partner drops the first referral and the chosen one receives the need; the ranking is printed as advice; a referral of another agency is refused before anything is published."""
    from typer.testing import CliRunner

    from partnerbus.entrypoints.cli import _mount_optional, app

    _mount_optional()
    runner = CliRunner()

    async def invoke(*args: str):
        return await asyncio.to_thread(runner.invoke, app, list(args))

    bus = cli_env
    t = bus.topology
    agency, advisor, first_inbox, rid = await _accepted_referral(bus, channel)
    not_hers = await invoke(
        "referrals",
        "cancel",
        rid,
        "--agency",
        "lmh-agence-lille-sud",
        "--by",
        "a.martin",
        "--reason",
        "not mine",
    )
    assert not_hers.exit_code == 2
    assert "not followed by lmh-agence-lille-sud" in not_hers.output
    cancelled = await invoke(
        "referrals", "cancel", rid, "--agency", agency, "--by", advisor, "--reason", "moved away"
    )
    assert cancelled.exit_code == 0, cancelled.output
    await first_inbox.expect_kind("referral-withdrawn", referral_id=rid)
    assert await wait_for_status(bus.store, rid, "cancelled") == "cancelled"

    chosen = match(bus.directory, ARREARS, ROUBAIX, sender=SOURCE)[1].partner_id
    chosen_inbox = await Inbox.open(channel, t.partner_queue_name(chosen))
    signal_id = bus.store.referral(rid).signal_id
    sent = await invoke(
        "referrals",
        "send",
        signal_id,
        "--need",
        ARREARS,
        "--partner",
        chosen,
        "--agency",
        agency,
        "--by",
        advisor,
    )
    assert sent.exit_code == 0, sent.output
    assert "(chosen)" in sent.output
    referral = await chosen_inbox.expect_kind("referral")
    assert referral.body["why"][0] == f"chosen by the advisor {advisor}"


async def test_transfer_reopen_and_an_orientation_outside_the_bus_through_the_client(bus, channel):
    """PartnerClient as the agency: the accepted referral moves to the partner she chose (the first drops it); declined there as unreachable, she reopens the need and the directory routes it again; declined again, she records an orientation made by phone: the source hears `completed`, nothing reaches the partner, the ledger counts a completed referral."""
    from partnerbus.client import PartnerClient

    t = bus.topology
    agency, advisor, first_inbox, rid = await _accepted_referral(bus, channel)
    first = bus.store.referral(rid)
    other = match(bus.directory, ARREARS, ROUBAIX, sender=SOURCE)[1].partner_id
    other_inbox = await Inbox.open(channel, t.partner_queue_name(other))
    source = await Inbox.open(channel, t.partner_queue_name(SOURCE))
    url = bus.settings.amqp_url.get_secret_value()

    async def decline(inbox: Inbox, partner: str) -> str:
        referral = await inbox.expect_kind("referral")
        await publish(
            channel,
            f"{t.prefix}.statuses",
            status(
                referral_id=referral.body["referral_id"],
                partner=partner,
                value="rejected",
                reason="unreachable",
            ),
            routing_key=partner,
        )
        await source.expect_kind("signal-closed", outcome="advisor-decides")
        return referral.body["referral_id"]

    async with PartnerClient(url, agency, prefix=t.prefix) as client:
        await client.transfer_referral(rid, other, decided_by=advisor, reason="closer to her")
        await first_inbox.expect_kind("referral-withdrawn", referral_id=rid)
        await decline(other_inbox, other)

        await client.reopen_need(
            first.signal_id, ARREARS, decided_by=advisor, note="reached her by phone"
        )
        third = await decline(first_inbox, first.partner_id)
        assert bus.store.referral(third).attempt == 3

        await client.record_orientation(
            first.signal_id, ARREARS, other, decided_by=advisor, note="appointment Tuesday"
        )
        done = await source.expect_kind("referral-status-changed", status="completed")
    assert done.body["partner"] == other
    assert "Tuesday" not in str(done.body)
    oriented = bus.store.referral(done.body["referral_id"])
    assert (oriented.status, oriented.attempt) == ("completed", 4)
    assert bus.store.referral_counts().get("completed") == 1
    to_other = [1 for key, kind, _ in bus.store.outbox() if (key, kind) == (other, "referral")]
    assert len(to_other) == 1, "the orientation sent the partner nothing"


async def test_transfer_reopen_and_orientation_from_the_command_line(cli_env, channel):
    """`referrals transfer`, `referrals reopen`, `referrals oriented`, each published as the agency's decision and each taking effect: a transferred referral completed, its need reopened and routed again, that referral cancelled and an orientation in person recorded in its place."""
    from typer.testing import CliRunner

    from partnerbus.entrypoints.cli import _mount_optional, app

    _mount_optional()
    runner = CliRunner()

    async def invoke(*args: str):
        result = await asyncio.to_thread(runner.invoke, app, list(args))
        assert result.exit_code == 0, result.output
        return result

    bus = cli_env
    t = bus.topology
    agency, advisor, first_inbox, rid = await _accepted_referral(bus, channel)
    signal_id = bus.store.referral(rid).signal_id
    other = match(bus.directory, ARREARS, ROUBAIX, sender=SOURCE)[1].partner_id
    other_inbox = await Inbox.open(channel, t.partner_queue_name(other))
    who = ("--agency", agency, "--by", advisor)
    await invoke("referrals", "transfer", rid, "--partner", other, *who, "--reason", "closer")
    await first_inbox.expect_kind("referral-withdrawn", referral_id=rid)
    moved = await other_inbox.expect_kind("referral")
    await publish(
        channel,
        f"{t.prefix}.statuses",
        status(
            referral_id=moved.body["referral_id"],
            partner=other,
            value="completed",
            outcome="plan signed",
        ),
        routing_key=other,
    )
    assert await wait_for_status(bus.store, moved.body["referral_id"], "completed")
    await invoke("referrals", "reopen", signal_id, "--need", ARREARS, *who, "--note", "again")
    again = await first_inbox.expect_kind("referral")
    assert again.body["attempt"] == 3
    await invoke(
        "referrals", "cancel", again.body["referral_id"], *who, "--reason", "done by phone"
    )
    assert await wait_for_status(bus.store, again.body["referral_id"], "cancelled")
    await invoke(
        "referrals",
        "oriented",
        signal_id,
        "--need",
        ARREARS,
        "--partner",
        other,
        *who,
        "--channel",
        "in-person",
    )
    oriented = referral_id_of_attempt(bus, signal_id, 4)
    assert await wait_for_status(bus.store, oriented, "completed") == "completed"


def referral_id_of_attempt(bus, signal_id: str, attempt: int) -> str:
    from partnerbus.rules import referral_id

    return referral_id(signal_id, ARREARS, attempt)
