"""The broker dies mid-stream and comes back: the bus reconnects by itself and every
signal still yields exactly one referral."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import pytest

from partnerbus.entrypoints.bootstrap import create_app
from partnerbus.testing.cluster import LocalCluster

from .conftest import build_cluster
from .stream import (
    SOURCE,
    N,
    Publisher,
    ReferralCounter,
    Workload,
    check_duplicates,
    fault_settings,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.rabbitmq, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def lone_broker() -> Iterator[LocalCluster]:
    """A dedicated single RabbitMQ node (pbr1 on 5691), so the shared broker is never touched."""
    with build_cluster(names=("pbr1",), amqp_port=5691, dist_port=25691) as node:
        yield node


@pytest.mark.parametrize("how", ["kill", "stop"])
async def test_a_broker_restart_mid_stream_loses_and_duplicates_no_referral(
    lone_broker: LocalCluster, tmp_path, how: str
) -> None:
    """N signals, the broker killed (or stopped) and restarted after a third: N referrals, none twice."""
    url = lone_broker.urls[0]
    work = Workload(f"pbf-{uuid.uuid4().hex[:8]}")
    t = work.topology
    bus = create_app(
        fault_settings(url, work.prefix, tmp_path / "bus.db"), directory=work.directory
    )
    await bus.start()
    try:
        async with Publisher(url) as publisher:
            await publisher.send(t.consents.name, work.consents, routing_key=work.agency)
            await bus.wait_verdicts(N, queue="intake.consents", timeout=60)

            began = time.monotonic()
            stream = asyncio.create_task(publisher.send(t.signals.name, work.signals, SOURCE))

            def signals_decided() -> int:
                return sum(1 for q, _ in bus.verdicts if q.endswith("intake.signals"))

            await wait_for(lambda: signals_decided() >= N // 3, 60, "a third of the stream")
            fault = lone_broker.kill_node if how == "kill" else lone_broker.stop_node
            fault_at = signals_decided()
            await asyncio.to_thread(fault, "pbr1")
            down_at = signals_decided()
            await asyncio.to_thread(lone_broker.restart_node, "pbr1")
            await stream

            async with ReferralCounter(url, work) as counter:
                await counter.wait_distinct(N, timeout=120)
                await counter.settle(bus.store.pending_count)
            seconds = time.monotonic() - began
        tally = counter.tally
        print(
            "\n" + tally.line(f"broker-{how}", seconds),
            f"decided-when-fault-began={fault_at} decided-when-down={down_at}",
            f"publisher-resends={publisher.resent}",
            f"relay-failures={bus.relay.failed}",
        )
        assert tally.lost == 0, f"lost {tally.lost} of {N}"
        check_duplicates(tally, bus.store)
        assert bus.store.count("referrals") == N
    finally:
        await bus.stop()
        await bus.teardown()
