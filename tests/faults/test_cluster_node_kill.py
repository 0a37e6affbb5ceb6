"""A three-node cluster with quorum queues loses the node leading the bus's queues
mid-stream: every signal still yields exactly one referral."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from partnerbus.entrypoints.bootstrap import create_app
from partnerbus.testing.cluster import ClusterError, LocalCluster

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

pytestmark = [pytest.mark.slow, pytest.mark.rabbitmq, pytest.mark.timeout(600)]


async def test_a_cluster_node_killed_mid_stream_loses_and_duplicates_no_referral(
    cluster: LocalCluster, tmp_path
) -> None:
    """N signals, the node leading the intake and partner queues SIGKILLed after a third: N referrals."""
    leader_node, bus_node, client_node = cluster.nodes
    work = Workload(f"pbf-{uuid.uuid4().hex[:8]}")
    t = work.topology
    target = t.partner_queue_name("ccas-roubaix")

    # Declared through pbc1, the quorum queues get their leaders there (client-local).
    pre = create_app(
        fault_settings(leader_node.url, work.prefix, tmp_path / "pre.db"), directory=work.directory
    )
    await pre.broker.connect()
    await pre.declare()
    await pre.broker.stop()
    pre.executor.shutdown()
    pre.store.dispose()
    for name in (t.signal_queue.name, t.consent_queue.name, target):
        info = await asyncio.to_thread(cluster.queue_info, name)
        assert info["leader"] == leader_node.nodename, info
        assert len(info["members"]) == 3, info

    # The bus speaks to pbc2 (one URL: FastStream's robust connection takes a single one),
    # partners to pbc3; pbc1, which leads every queue, is the one that dies.
    settings = fault_settings(bus_node.url, work.prefix, tmp_path / "bus.db")
    gated = GatedStore(settings.database_url)
    bus = create_app(settings, directory=work.directory, store=gated)
    await bus.start()
    killed = False
    try:
        async with Publisher(client_node.url) as publisher:
            await publisher.send(t.consents.name, work.consents, routing_key=work.agency)
            await bus.wait_verdicts(N, queue="intake.consents", timeout=60)

            began = time.monotonic()
            # A few batches, then the intake waits at the gate while the node dies: the
            # kill is mid-stream however fast the bus drains the queue.
            gated.arm(after=3)
            stream = asyncio.create_task(publisher.send(t.signals.name, work.signals, SOURCE))

            def signals_decided() -> int:
                return sum(1 for q, _ in bus.verdicts if q.endswith("intake.signals"))

            await wait_for(gated.reached.is_set, 60, "the intake held mid-stream")
            await asyncio.to_thread(cluster.kill_node, leader_node.name)
            killed = True
            down_at = signals_decided()
            gated.open()
            await stream

            async with ReferralCounter(client_node.url, work) as counter:
                await counter.wait_distinct(N, timeout=180)
                # A leaderless quorum queue reports 0 messages: count only once every
                # queue has its new leader.
                leaders = {
                    name: (await asyncio.to_thread(cluster.await_leader, name, via=bus_node.name))[
                        "leader"
                    ]
                    for name in (t.signal_queue.name, t.consent_queue.name, target)
                }
                await counter.settle(bus.store.pending_count)
            seconds = time.monotonic() - began
        tally = counter.tally
        print(
            "\n" + tally.line("cluster-leader-kill", seconds),
            f"decided-before-kill={down_at} publisher-resends={publisher.resent}",
            f"relay-failures={bus.relay.failed}",
            f"relay-channel-renewals={bus.relay.renewals}",
            f"new-leaders={leaders}",
        )
        assert 0 < down_at < N, "the node died mid-stream"
        assert tally.lost == 0, f"lost {tally.lost} of {N}"
        check_duplicates(tally, bus.store)
        assert bus.store.count("referrals") == N
        assert leader_node.nodename not in leaders.values()
    finally:
        await bus.stop()
        if killed:
            await asyncio.to_thread(cluster.restart_node, leader_node.name)
            await asyncio.to_thread(_await_catch_up, cluster, leader_node.name, target)
        await bus.teardown()


def _await_catch_up(cluster: LocalCluster, node: str, queue: str) -> None:
    """Block until the restarted node lists the cluster's queues again, so that the next
    test finds a whole cluster (each `list_queues` call is itself a blocking round trip)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            cluster.queue_info(queue, via=node)
            return
        except ClusterError:
            if time.monotonic() > deadline:
                raise
