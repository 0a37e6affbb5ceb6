"""A worker process is SIGKILLed mid-stream and a new one started: every signal still yields
exactly one referral (the outbox lease hands the dead worker's rows to the new one)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from partnerbus.entrypoints.bootstrap import create_app
from partnerbus.ledger.store import Store

from .stream import (
    SOURCE,
    N,
    Publisher,
    ReferralCounter,
    Worker,
    Workload,
    check_duplicates,
    fault_settings,
    pending_of,
    wait_consumers_gone,
    wait_for,
    wait_ready,
)

pytestmark = [pytest.mark.slow, pytest.mark.rabbitmq, pytest.mark.timeout(600)]


async def test_a_worker_killed_mid_stream_and_restarted_loses_and_duplicates_no_referral(
    amqp_url: str, tmp_path
) -> None:
    """N signals, the only worker SIGKILLed after a third of the referrals, a new one started: N referrals."""
    work = Workload(f"pbf-{uuid.uuid4().hex[:8]}")
    t = work.topology
    db = tmp_path / "bus.db"
    settings = fault_settings(amqp_url, work.prefix, db)
    first = Worker(settings, tmp_path, "worker-1").start()
    second = Worker(settings, tmp_path, "worker-2")
    store = Store(settings.database_url)
    try:
        await wait_ready(amqp_url, work)
        async with Publisher(amqp_url) as publisher, ReferralCounter(amqp_url, work) as counter:
            await publisher.send(t.consents.name, work.consents, routing_key=work.agency)
            await wait_for(lambda: store.count("consents") >= N, 60, "the consents recorded")

            began = time.monotonic()
            stream = asyncio.create_task(publisher.send(t.signals.name, work.signals, SOURCE))
            await counter.wait_distinct(N // 3, timeout=60)
            await asyncio.to_thread(first.kill)
            killed_at = counter.tally.distinct
            pending_at_kill = await asyncio.to_thread(pending_of(db))
            # The dead worker's consumer must be gone, or `wait_ready` could see it.
            await wait_consumers_gone(amqp_url, t.signal_queue.name)
            second.start()
            ready_s = await wait_ready(amqp_url, work)
            await stream
            await counter.wait_distinct(N, timeout=120)
            await counter.settle(pending_of(db))
            seconds = time.monotonic() - began
        tally = counter.tally
        print(
            "\n" + tally.line("worker-sigkill", seconds),
            f"referrals-before-kill={killed_at} outbox-pending-at-kill={pending_at_kill}",
            f"restart-ready={ready_s:.1f}s",
        )
        assert N // 3 <= killed_at < N, f"the kill was not mid-stream: {killed_at} of {N} out"
        assert tally.lost == 0, f"lost {tally.lost} of {N}\n{second.tail()}"
        check_duplicates(tally, store)
        assert store.count("referrals") == N
    finally:
        first.terminate()
        second.terminate()
        store.dispose()
        bus = create_app(settings, directory=work.directory)
        bus.executor.shutdown()
        await bus.teardown()
        bus.store.dispose()
