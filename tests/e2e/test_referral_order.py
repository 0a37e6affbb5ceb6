"""Order per referral, across workers, on the real broker and both databases.

Two services (two relays) share one record. Referrals are decided and their consents
revoked at once, many times, while both relays send. Whatever the interleaving, each
partner's queue holds a referral before its withdrawal, never a withdrawal for a referral
it did not receive, and the audit says exactly what left: `referral-disclosed` for what the
partner received, `referral-withheld` for what it never did."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import aio_pika
import pytest

from partnerbus import usecases
from partnerbus.entrypoints.bootstrap import Bus, create_app
from partnerbus.ledger.store import LedgerTx
from partnerbus.schemas import ConsentGranted, ConsentRevoked, ConsentScope, Signal, utcnow
from partnerbus.settings import Settings

ARREARS = "logement-hebergement--reduire-les-impayes-de-loyer"
KINDS = ("ccas-cias", "points-conseil-budget", "cresus", "caf", "maisons-des-solidarites")
ROUNDS = 12
PER_ROUND = 3


@pytest.fixture
def database_url(engine_url: str) -> str:
    return engine_url


@pytest.fixture
async def second(settings: Settings, bus: Bus) -> AsyncIterator[Bus]:
    """Another worker on the same record and broker (its own relay and connection)."""
    other = create_app(settings)
    await other.start()
    yield other
    await other.stop()


def in_tx(bus: Bus, work: Callable[[LedgerTx], Any]) -> Any:
    return bus.store.run(work)


async def decide(bus: Bus, n: int) -> tuple[str, str]:
    """A consent and a signal for a fresh person: (the consent id, the signal id)."""
    now = utcnow()
    person = f"T-ORDER-{n}"
    grant = ConsentGranted(
        message_id=f"grant-{n}",
        occurred_at=now,
        consent_id=f"c-{n}",
        person_ref=person,
        scope=ConsentScope(needs=("logement-hebergement",), partner_kinds=KINDS),
        collected_by="s.benali",
        agency="lmh-agence-roubaix",
        method="oral",
        granted_at=now - timedelta(minutes=1),
        valid_until=now + timedelta(days=30),
    )
    signal = Signal(
        message_id=f"sig-{n}",
        occurred_at=now,
        source="lmh-recouvrement",
        person_ref=person,
        commune="59512",
        needs=(ARREARS,),
    )
    ledger = bus.ledger
    await asyncio.to_thread(in_tx, bus, lambda tx: usecases.grant_consent(ledger, tx, grant, "t"))
    await asyncio.to_thread(in_tx, bus, lambda tx: usecases.receive_signal(ledger, tx, signal, "t"))
    return grant.consent_id, signal.message_id


async def revoke(bus: Bus, consent_id: str) -> None:
    event = ConsentRevoked(
        message_id=f"revoke-{consent_id}",
        occurred_at=utcnow(),
        consent_id=consent_id,
        revoked_by="s.benali",
        agency="lmh-agence-roubaix",
        revoked_at=utcnow(),
    )
    ledger = bus.ledger
    await asyncio.to_thread(in_tx, bus, lambda tx: usecases.revoke_consent(ledger, tx, event, "t"))
    bus.relay.kick()


async def drain(channel: aio_pika.abc.AbstractChannel, queue_name: str) -> list[dict[str, Any]]:
    """Every message in the queue, in queue order (all were confirmed before this runs)."""
    import json

    queue = await channel.get_queue(queue_name, ensure=False)
    got = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        got.append(json.loads(message.body))
    return got


async def test_two_relays_keep_each_referral_before_its_withdrawal_and_audit_what_left(
    bus: Bus, second: Bus, channel: aio_pika.abc.AbstractChannel
) -> None:
    """Revocations race two relays: per partner queue no withdrawal precedes its referral, none is sent for a referral never received, and `referral-disclosed` / `referral-withheld` match what left."""
    rng = random.Random(8)
    signals: list[str] = []
    for round_ in range(ROUNDS):
        decided = [await decide(bus, round_ * PER_ROUND + i) for i in range(PER_ROUND)]
        signals += [signal_id for _, signal_id in decided]
        racers = [revoke(rng.choice((bus, second)), c) for c, _ in decided]
        racers += [bus.relay.flush(), second.relay.flush(), second.relay.flush()]
        rng.shuffle(racers)
        await asyncio.gather(*racers)

    async with asyncio.timeout(120):
        while await asyncio.to_thread(bus.store.pending_count):
            await asyncio.gather(bus.relay.flush(), second.relay.flush())

    referrals = [r for r in bus.store.referrals() if r.signal_id in signals]
    assert len(referrals) == ROUNDS * PER_ROUND
    queues: dict[str, list[dict[str, Any]]] = {}
    for partner in {r.partner_id for r in referrals}:
        queues[partner] = await drain(channel, bus.topology.partner_queue_name(partner))

    received = withheld = 0
    for referral in referrals:
        rid = referral.referral_id
        kinds = [m["type"] for m in queues[referral.partner_id] if m.get("referral_id") == rid]
        assert referral.status == "withdrawn", rid
        if "referral-withdrawn" in kinds:
            assert "referral" in kinds, f"{rid}: a withdrawal for a referral never received"
            assert kinds.index("referral") < kinds.index("referral-withdrawn"), (
                f"{rid}: the withdrawal overtook its referral: {kinds}"
            )
        actions = [a.action for a in bus.store.audit_trail(rid)]
        verdicts = [a for a in actions if a in ("referral-withdrawn", "referral-withheld")]
        if "referral" in kinds:
            received += 1
            assert "referral-withdrawn" in kinds, f"{rid}: received, never told it was withdrawn"
            assert "referral-disclosed" in actions, f"{rid}: received but not audited: {actions}"
            assert verdicts == ["referral-withdrawn"], f"{rid}: {actions}"
        else:
            withheld += 1
            assert kinds == [], f"{rid}: {kinds}"
            assert "referral-disclosed" not in actions, f"{rid}: never left: {actions}"
            assert verdicts == ["referral-withheld"], f"{rid}: {actions}"
    assert received + withheld == len(referrals)
