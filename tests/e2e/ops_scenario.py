"""A scripted run for the ops console's tests, and the independent count it is checked
against: queue depths read straight from the broker, ledger figures by plain SQL."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aio_pika
import uvicorn
from sqlalchemy import text

from partnerbus.testing import Inbox, wait_for_status, wait_until

from .helpers import ROUBAIX, new_id, publish, signal, status
from .test_flow import KINDS, expected_partner, grant


@asynccontextmanager
async def serving(web) -> AsyncIterator[str]:  # type: ignore[no-untyped-def]
    """The app on a loopback port; the socket listens before the server starts, so the
    test needs no readiness poll."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(web, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


async def broker_figures(bus, name: str) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """(ready messages, consumers) of a queue, by a passive declare on a plain connection
    of its own (a robust channel answers a passive declare from its cache: stale)."""
    connection = await aio_pika.connect(bus.settings.amqp_url.get_secret_value())
    try:
        channel = await connection.channel()
        declared = await channel.declare_queue(name, passive=True)
        result = declared.declaration_result
        return int(result.message_count or 0), int(result.consumer_count or 0)
    finally:
        await connection.close()


async def depth(bus, name: str) -> int:  # type: ignore[no-untyped-def]
    return (await broker_figures(bus, name))[0]


@dataclass
class Run:
    target: str
    """The partner the referrals go to: its queue has no consumer."""
    agency: str
    """The agency asked for consent: its queue has a consumer (the test's inbox)."""
    accepted: str
    rejected: str
    bad_message_id: str
    agency_inbox: Inbox
    parked_signal: str
    """The signal whose need waits for consent."""


async def scripted_run(bus, channel) -> Run:  # type: ignore[no-untyped-def]
    """Three consented signals become three referrals to one partner; it accepts one and
    rejects one (the rejected need goes on to the next partner); one signal waits for
    consent; one broken message is dead-lettered. The target partner's queue has no
    consumer; the agency's has one."""
    t = bus.topology
    agency = bus.directory.agency_for(ROUBAIX).id
    target = expected_partner(bus)
    agency_inbox = await Inbox.open(channel, t.partner_queue_name(agency))
    signal_ids = []
    for _ in range(3):
        person = new_id("T")
        await grant(bus, channel, person, agency, inbox=agency_inbox, kinds=KINDS)
        body = signal(person=person)
        signal_ids.append(body["message_id"])
        await publish(channel, f"{t.prefix}.signals", body, routing_key="lmh-recouvrement")
    parked = signal()
    await publish(channel, f"{t.prefix}.signals", parked, routing_key="lmh-recouvrement")
    await agency_inbox.expect_kind("consent-requested")

    def referral_ids() -> list[str]:
        return [r.referral_id for r in bus.store.referrals() if r.partner_id == target]

    await wait_until(lambda: len(referral_ids()) == 3, timeout=30)
    ids = sorted(referral_ids())
    for rid in ids:
        await wait_for_status(bus.store, rid, "delivered")
    accepted, rejected = ids[0], ids[1]
    await publish(
        channel,
        f"{t.prefix}.statuses",
        status(referral_id=accepted, partner=target, value="accepted"),
        routing_key=target,
    )
    await publish(
        channel,
        f"{t.prefix}.statuses",
        status(referral_id=rejected, partner=target, value="rejected", reason="full"),
        routing_key=target,
    )
    await wait_for_status(bus.store, accepted, "accepted")
    await wait_for_status(bus.store, rejected, "rejected")
    bad = new_id("bad")
    await publish(channel, t.signals.name, b"{not json", routing_key="x", message_id=bad)
    dlq = t.dlq_name(t.signal_queue.name)

    async def dead_lettered() -> bool:
        return await depth(bus, dlq) == 1

    await wait_until(dead_lettered, timeout=20, what="the broken message dead-lettered")
    return Run(target, agency, accepted, rejected, bad, agency_inbox, parked["message_id"])


@dataclass(frozen=True)
class Count:
    """A partner's figures counted without the monitor's code."""

    received: int
    queued: int
    consumers: int
    accepted: int
    rejected: int
    awaiting: int
    sent: int


async def independent_count(bus, channel, partner: str) -> Count:  # type: ignore[no-untyped-def]
    queued, consumers = await broker_figures(bus, bus.topology.partner_queue_name(partner))
    with bus.store.engine.connect() as conn:

        def one(sql: str) -> int:
            return int(conn.execute(text(sql), {"p": partner}).scalar_one())

        received = one("SELECT count(*) FROM signals WHERE source = :p")
        accepted = one(
            "SELECT count(*) FROM referrals WHERE partner_id = :p"
            " AND status IN ('accepted', 'in-progress', 'on-hold')"
        )
        rejected = one(
            "SELECT count(*) FROM referrals WHERE partner_id = :p AND status = 'rejected'"
        )
        awaiting = one(
            "SELECT count(*) FROM referrals WHERE partner_id = :p"
            " AND status IN ('requested', 'delivered', 'received')"
        )
        sent = one("SELECT count(*) FROM referrals WHERE partner_id = :p AND sent_at IS NOT NULL")
    return Count(
        received,
        queued,
        consumers,
        accepted,
        rejected,
        awaiting,
        sent,
    )
