"""The outbox relay's handling of a publish that fails, with a fake publish and an in-memory
ledger (the real-broker behaviour is in tests/e2e and tests/faults)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from aio_pika.exceptions import DeliveryError, PublishError
from pamqp.commands import Basic
from sqlalchemy import select

from partnerbus.broker.topology import Topology
from partnerbus.handlers.outbox import Relay
from partnerbus.ledger import tables
from partnerbus.ledger.store import Store
from partnerbus.rules import disclose
from partnerbus.schemas import ReferralReminder
from partnerbus.usecases import Ledger
from tests.conftest import make_ledger


@pytest.fixture
def ledger():
    store = Store("sqlite://")
    store.create_all()
    yield make_ledger(store)
    store.dispose()


def enqueue(ledger: Ledger, count: int) -> None:
    now = ledger.clock()
    with ledger.store.begin() as tx:
        for i in range(count):
            tx.outbox.enqueue(
                disclose(
                    ReferralReminder(
                        message_id=f"rem-{i}",
                        occurred_at=now,
                        referral_id=f"ref-{i}",
                        partner="ccas-roubaix",
                        due_by=now + timedelta(days=1),
                    ),
                    {"partner"},
                ),
                "ccas-roubaix",
                now,
            )


def attempts(ledger: Ledger) -> list[int]:
    with ledger.store.engine.connect() as conn:
        rows = conn.execute(select(tables.outbox.c.attempts).order_by(tables.outbox.c.id))
        return [a for (a,) in rows]


async def flush_with(ledger: Ledger, publish: Any) -> Relay:
    with ThreadPoolExecutor(1) as executor:
        relay = Relay(ledger, Topology("p"), publish, executor, timeout_s=1)
        await relay.flush(rounds=1)
    return relay


async def test_a_broker_gone_stops_the_batch_and_gives_the_rest_back_untried(ledger) -> None:
    """A publish that times out (no confirm) keeps its row, counted as failing; the rows after it are released untried, their claim not counted."""
    enqueue(ledger, 3)
    tried: list[str] = []

    async def publish(body: bytes, **options: Any) -> None:
        tried.append(options["message_id"])
        raise TimeoutError

    relay = await flush_with(ledger, publish)
    assert tried == ["rem-0"]
    assert relay.failed == 1
    assert ledger.store.pending_count() == 3
    assert ledger.store.failing_count() == 1
    assert attempts(ledger) == [1, 0, 0]
    assert ledger.store.claim_pending(ledger.clock(), timedelta(minutes=1)), "all claimable"


async def test_a_message_the_broker_refuses_does_not_hold_back_the_others(ledger) -> None:
    """An unroutable (returned) message stays pending with its error; the next rows are sent."""
    enqueue(ledger, 3)
    sent: list[str] = []

    async def publish(body: bytes, **options: Any) -> None:
        assert options["mandatory"] is True
        assert options["persist"] is True
        assert options["timeout"] == 1
        if options["message_id"] == "rem-0":
            returned = Basic.Return(reply_code=312, reply_text="NO_ROUTE", routing_key="x")
            raise PublishError(SimpleNamespace(delivery=returned), returned)  # type: ignore[arg-type]
        sent.append(options["message_id"])

    relay = await flush_with(ledger, publish)
    assert sent == ["rem-1", "rem-2"]
    assert relay.sent == 2
    assert ledger.store.pending_count() == 1
    assert ledger.store.failing_count() == 1


def nack() -> DeliveryError:
    return DeliveryError(None, Basic.Nack(delivery_tag=1, multiple=True))


async def flush_renewing(ledger: Ledger, publish: Any) -> tuple[Relay, list[int]]:
    renewed: list[int] = []

    async def renew() -> None:
        renewed.append(1)

    with ThreadPoolExecutor(1) as executor:
        relay = Relay(ledger, Topology("p"), publish, executor, timeout_s=1, renew=renew)
        await relay.flush()
    return relay, renewed


async def test_a_window_the_broker_refuses_whole_makes_the_relay_renew_its_channel(
    ledger,
) -> None:
    """Every publish of a window nacked: the relay asks for a new channel (a RabbitMQ channel can keep nacking a quorum queue whose leader died); the rows stay pending."""
    enqueue(ledger, 3)

    async def publish(body: bytes, **options: Any) -> None:
        raise nack()

    relay, renewed = await flush_renewing(ledger, publish)
    assert renewed == [1]
    assert relay.renewals == 1
    assert relay.sent == 0
    assert ledger.store.pending_count() == 3


async def test_a_window_partly_confirmed_keeps_the_channel(ledger) -> None:
    """One row nacked, the others confirmed: the channel works, it is kept."""
    enqueue(ledger, 3)

    async def publish(body: bytes, **options: Any) -> None:
        if options["message_id"] == "rem-1":
            raise nack()

    relay, renewed = await flush_renewing(ledger, publish)
    assert renewed == []
    assert relay.sent == 2
