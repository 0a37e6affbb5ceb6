"""The relay's windows on the real broker, SQLite and PostgreSQL: what the partner's queue
holds after windows of many referrals, two relays, an urgent referral behind a routine
backlog, and revocations racing the windows."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest

from partnerbus import usecases
from partnerbus.entrypoints.bootstrap import Bus, create_app
from partnerbus.schemas import ConsentRevoked, utcnow
from partnerbus.settings import Settings
from tests.e2e.test_referral_order import drain
from tests.integration.test_relay_windows import decide, follow_ups


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


async def sent_all(*buses: Bus) -> None:
    """Until the outbox is empty (every confirm recorded)."""
    store = buses[0].store
    async with asyncio.timeout(120):
        while await asyncio.to_thread(store.pending_count):
            await asyncio.gather(*(b.relay.flush() for b in buses))


async def partner_queue(bus: Bus, channel: aio_pika.abc.AbstractChannel) -> list[dict[str, Any]]:
    return await drain(channel, bus.topology.partner_queue_name("ccas-roubaix"))


def referral_rows(queue: list[dict[str, Any]], rid: str) -> list[str]:
    return [m["message_id"] for m in queue if m.get("referral_id") == rid]


async def test_windows_of_many_referrals_keep_each_referrals_order_in_the_queue(
    bus: Bus, second: Bus, channel: aio_pika.abc.AbstractChannel
) -> None:
    """Two relays send 100 referrals with two reminders each in windows: the partner's queue holds each referral before its reminders, each message once."""
    bus.relay.window = second.relay.window = 32  # so that both relays get windows
    async with bus.relay._lock, second.relay._lock:  # the backlog is recorded first
        rids = await asyncio.to_thread(decide, bus.ledger, 0, 100)
        await asyncio.to_thread(follow_ups, bus.ledger, rids, 2)
        # Each relay sends a window while no other relay runs; then both race for the
        # rest. (Left to race from the start, one relay can take every window: on SQLite
        # the other waits in the busy handler, whose sleeps outlast the gaps between the
        # first one's windows.)
        assert (await second.relay._flush_once()).sent > 0
        assert (await bus.relay._flush_once()).sent > 0
    await sent_all(bus, second)
    queue = await partner_queue(bus, channel)
    ids = [m["message_id"] for m in queue]
    assert len(ids) == len(set(ids)), "a message reached the partner twice"
    for rid in rids:
        assert referral_rows(queue, rid) == [rid, f"rem-{rid}-0", f"rem-{rid}-1"]
    assert bus.relay.sent > 0 and second.relay.sent > 0


async def test_an_urgent_referral_overtakes_a_routine_backlog(
    bus: Bus, channel: aio_pika.abc.AbstractChannel
) -> None:
    """An asap referral decided after 1,000 routine ones is in the partner's queue before the last routine referral (queue order, not timing)."""
    async with bus.relay._lock:
        routine = await asyncio.to_thread(decide, bus.ledger, 1000, 1000)
        (urgent,) = await asyncio.to_thread(decide, bus.ledger, 3000, 1, "asap")
    await sent_all(bus)
    queue = await partner_queue(bus, channel)
    referrals = [m["referral_id"] for m in queue if m["type"] == "referral"]
    assert set(referrals) == {*routine, urgent}
    assert referrals.index(urgent) < len(referrals) - 1 - 255, referrals.index(urgent)


async def test_revocations_racing_windows_are_wholly_before_or_after(
    bus: Bus, channel: aio_pika.abc.AbstractChannel
) -> None:
    """Half of 60 consents revoked while the relay sends them in windows: each referral either never reached the partner (withheld) or reached it before its withdrawal."""
    async with bus.relay._lock:
        rids = await asyncio.to_thread(decide, bus.ledger, 5000, 60)
    consents = {r.referral_id: r.consent_id for r in bus.store.referrals() if r.referral_id in rids}
    rng = random.Random(9)

    async def revoke(consent_id: str) -> None:
        event = ConsentRevoked(
            message_id=f"rv-{consent_id}",
            occurred_at=utcnow(),
            consent_id=consent_id,
            revoked_by="s.benali",
            agency="lmh-agence-roubaix",
            revoked_at=utcnow(),
        )
        ledger = bus.ledger
        await asyncio.to_thread(
            bus.store.run, lambda tx: usecases.revoke_consent(ledger, tx, event, "t")
        )

    racers = [revoke(consents[rid]) for rid in rng.sample(rids, 30)] + [bus.relay.flush()]
    rng.shuffle(racers)
    await asyncio.gather(*racers)
    await sent_all(bus)
    queue = await partner_queue(bus, channel)
    for rid in rids:
        kinds = [m["type"] for m in queue if m.get("referral_id") == rid]
        actions = [a.action for a in bus.store.audit_trail(rid)]
        if "referral" not in kinds:
            assert kinds == [], (rid, kinds)
            assert "referral-withheld" in actions and "referral-disclosed" not in actions
        elif "referral-withdrawn" in kinds:
            assert kinds == ["referral", "referral-withdrawn"], (rid, kinds)
            assert "referral-disclosed" in actions
