"""Smoke test of the local cluster: a quorum queue survives the loss of its leader."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import aio_pika
import pytest

from partnerbus.testing.cluster import LocalCluster

COUNT = 200

pytestmark = [pytest.mark.slow, pytest.mark.rabbitmq, pytest.mark.timeout(600)]


async def test_quorum_queue_survives_leader_kill(cluster: LocalCluster) -> None:
    """200 confirmed persistent messages are all consumed from a survivor after the leader dies."""
    queue_name = f"pbt-smoke-{uuid.uuid4().hex[:8]}"
    sent = {f"m-{i}" for i in range(COUNT)}

    connection = await aio_pika.connect(cluster.nodes[0].url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.declare_queue(queue_name, durable=True, arguments={"x-queue-type": "quorum"})
        for body in sorted(sent):
            await channel.default_exchange.publish(
                aio_pika.Message(
                    body.encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=body
                ),
                routing_key=queue_name,
            )

    info = await asyncio.to_thread(cluster.queue_info, queue_name)
    assert info["type"] == "quorum"
    assert sorted(info["members"]) == sorted(n.nodename for n in cluster.nodes)
    leader = cluster.node(info["leader"])

    killed_at = time.monotonic()
    await asyncio.to_thread(cluster.kill_node, leader.name)
    survivor = next(n for n in cluster.nodes if n != leader)
    after = await asyncio.to_thread(
        cluster.await_leader, queue_name, via=survivor.name, not_on=leader.nodename
    )
    failover_s = time.monotonic() - killed_at

    received: set[str] = set()
    done = asyncio.Event()
    connection = await aio_pika.connect(survivor.url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=50)
        queue = await channel.get_queue(queue_name, ensure=True)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            received.add(message.body.decode())
            await message.ack()
            if len(received) >= COUNT:
                done.set()

        await queue.consume(on_message)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 60)
        lost = sent - received
        assert not lost, f"lost {len(lost)} of {COUNT}: {sorted(lost)[:10]}"
        await queue.delete(if_unused=False, if_empty=False)
    print(
        f"\nleader {leader.nodename} killed; new leader {after['leader']} after {failover_s:.1f}s"
    )

    began = time.monotonic()
    await asyncio.to_thread(cluster.restart_node, leader.name)
    print(f"{leader.nodename} restarted and rejoined in {time.monotonic() - began:.1f}s")
