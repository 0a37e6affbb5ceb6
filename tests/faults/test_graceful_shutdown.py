"""Stopping the bus while signals are in flight loses none: what it had started is finished
and acked, what it had not is redelivered to the next instance."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from partnerbus.entrypoints.bootstrap import create_app

from .stream import (
    SOURCE,
    GatedStore,
    N,
    Publisher,
    ReferralCounter,
    Workload,
    check_duplicates,
    fault_settings,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.rabbitmq, pytest.mark.timeout(300)]


async def test_a_bus_stopped_mid_stream_hands_every_signal_to_the_next_instance(
    amqp_url: str, tmp_path
) -> None:
    """N signals queued, the bus stopped after a third and a new one started: N referrals, none twice."""
    work = Workload(f"pbf-{uuid.uuid4().hex[:8]}")
    t = work.topology
    # A prefetch well below N: a graceful stop finishes and acks what it holds (all of it,
    # with the default 256), so only a small prefetch leaves work for the next instance.
    settings = fault_settings(
        amqp_url, work.prefix, tmp_path / "bus.db", prefetch=32, intake_batch_size=16
    )
    gated = GatedStore(settings.database_url)
    first = create_app(settings, directory=work.directory, store=gated)
    second = create_app(settings, directory=work.directory)
    await first.start()
    started_second = False
    try:
        async with Publisher(amqp_url) as publisher, ReferralCounter(amqp_url, work) as counter:
            await publisher.send(t.consents.name, work.consents, routing_key=work.agency)
            await first.wait_verdicts(N, queue="intake.consents", timeout=60)

            began = time.monotonic()
            # Four batches of 16 (about a third), then the intake waits at the gate.
            gated.arm(after=4)
            await publisher.send(t.signals.name, work.signals, SOURCE)  # all queued, confirmed

            def decided(bus) -> list[str]:
                return [v.outcome for q, v in bus.verdicts if q.endswith("intake.signals")]

            await wait_for(gated.reached.is_set, 60, "the intake held after a third")
            stop_began = time.monotonic()
            stopping = asyncio.create_task(first.stop())  # graceful: what is under way finishes
            await wait_for(
                lambda: not any(s.running for s in first.broker.subscribers), 30, "no new message"
            )
            gated.open()
            await stopping
            stop_s = time.monotonic() - stop_began
            by_first = decided(first)

            await second.start()
            started_second = True
            await counter.wait_distinct(N, timeout=120)
            await counter.settle(second.store.pending_count)
            seconds = time.monotonic() - began
        by_second = decided(second)
        tally = counter.tally
        print(
            "\n" + tally.line("graceful-stop", seconds),
            f"first-processed={by_first.count('processed')} stop-took={stop_s:.1f}s",
            f"second-processed={by_second.count('processed')}",
            f"second-duplicates={by_second.count('duplicate')}",
        )
        assert tally.lost == 0, f"lost {tally.lost} of {N}"
        check_duplicates(tally, second.store)
        # The stop was mid-stream: the first instance took no new signal once stopping,
        # so the second one had work left.
        assert by_first.count("processed") < N
        assert by_second.count("processed") > 0
        assert by_first.count("processed") + by_second.count("processed") == N
        assert second.store.count("referrals") == N
    finally:
        if started_second:
            await second.stop()
        else:
            await first.stop()
        await second.teardown()
