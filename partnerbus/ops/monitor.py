"""What ops watch: queue depths and consumers, dead letters, overdue and parked work.

Figures are read on demand from the broker (passive declares) and the ledger, so the
monitor is one small process beside the workers, however many there are:
`partnerbus ops status` prints them, `partnerbus ops serve` shows them on a page and as
Prometheus metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

import aio_pika
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from partnerbus.broker.topology import Topology
from partnerbus.ledger.store import ReferralRow, Store
from partnerbus.rules import AWAITING_ANSWER
from partnerbus.usecases import DEAD_LETTER_REFUSED


@dataclass(frozen=True)
class QueueFigure:
    name: str
    role: str  # intake | partner | dead-letter
    messages: int
    consumers: int


@dataclass(frozen=True)
class LedgerFigures:
    referrals_by_status: dict[str, int]
    overdue: list[ReferralRow]
    parked_needs: int
    outbox_pending: int
    outbox_failing: int = 0
    """Unsent rows whose last publish failed (an unroutable partner, the broker away)."""
    dead_letters_refused: int = 0
    """Dead-letter copies a full dead-letter queue refused, since the start of the record
    (each such message stayed in its work queue)."""


@dataclass(frozen=True)
class Snapshot:
    at: datetime
    queues: list[QueueFigure]
    ledger: LedgerFigures
    broker_error: str | None = None

    @property
    def dead_letters(self) -> int:
        return sum(q.messages for q in self.queues if q.role == "dead-letter")


class BrokerProbe:
    """One long-lived AMQP connection and one channel for the monitor's passive declares.

    A passive declare of a missing queue closes its channel: only then is a new channel
    opened; a lost connection is reopened on the next read. `connections` counts the
    connections opened (one, while the broker stays up)."""

    def __init__(self, amqp_url: str) -> None:
        self.amqp_url = amqp_url
        self.connections = 0
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None

    async def _open_channel(self) -> aio_pika.abc.AbstractChannel:
        if self._connection is None or self._connection.is_closed:
            self._channel = None
            self._connection = await aio_pika.connect(self.amqp_url)
            self.connections += 1
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._connection.channel()
        return self._channel

    async def figures(self, topology: Topology, partner_ids: list[str]) -> list[QueueFigure]:
        """Depth and consumers of every work queue and its dead-letter queue."""
        figures: list[QueueFigure] = []
        partner_prefix = topology.partner_queue_name("")
        try:
            for work in topology.all_work_queue_names(partner_ids):
                role = "partner" if work.startswith(partner_prefix) else "intake"
                for name, kind in ((work, role), (topology.dlq_name(work), "dead-letter")):
                    channel = await self._open_channel()
                    try:
                        declared = await channel.declare_queue(name, passive=True)
                    except aio_pika.exceptions.ChannelClosed:
                        self._channel = None  # closed by the broker: a missing queue
                        continue
                    result = declared.declaration_result
                    figures.append(
                        QueueFigure(
                            name,
                            kind,
                            int(result.message_count or 0),
                            int(result.consumer_count or 0),
                        )
                    )
        except (OSError, aio_pika.exceptions.AMQPError):
            await self.close()  # reopened on the next read
            raise
        return figures

    async def close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(Exception):
                await connection.close()


async def queue_figures(
    amqp_url: str, topology: Topology, partner_ids: list[str]
) -> list[QueueFigure]:
    """Depth and consumers of every work queue and its dead-letter queue (one connection,
    closed after)."""
    probe = BrokerProbe(amqp_url)
    try:
        return await probe.figures(topology, partner_ids)
    finally:
        await probe.close()


def ledger_figures(store: Store, now: datetime) -> LedgerFigures:
    counts = store.referral_counts()
    overdue = [
        r
        for r in store.referrals(statuses=AWAITING_ANSWER)
        if r.due_at is not None and r.due_at < now
    ]
    return LedgerFigures(
        referrals_by_status=counts,
        overdue=overdue,
        parked_needs=store.count("signal_needs", state="parked"),
        outbox_pending=store.pending_count(),
        outbox_failing=store.failing_count(),
        dead_letters_refused=store.count("audit", action=DEAD_LETTER_REFUSED),
    )


async def snapshot(
    amqp_url: str | BrokerProbe,
    topology: Topology,
    partner_ids: list[str],
    store: Store,
    now: datetime,
) -> Snapshot:
    """Queues (through `amqp_url`'s own short connection, or a long-lived probe) and the
    ledger's figures (read in a thread: the event loop keeps serving)."""
    try:
        if isinstance(amqp_url, BrokerProbe):
            queues = await amqp_url.figures(topology, partner_ids)
        else:
            queues = await queue_figures(amqp_url, topology, partner_ids)
        error = None
    except (OSError, aio_pika.exceptions.AMQPError) as exc:
        queues, error = [], f"{type(exc).__name__}: {exc}"
    ledger = await asyncio.to_thread(ledger_figures, store, now)
    return Snapshot(now, queues, ledger, error)


class SnapshotCache:
    """One snapshot shared by every viewer: taken at most once per `max_age_s`, by one
    caller at a time; the others wait for it and get the same one."""

    def __init__(
        self,
        take: Callable[[], Awaitable[Snapshot]],
        max_age_s: float,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._take = take
        self._max_age_s = max_age_s
        self._monotonic = monotonic
        self._lock = asyncio.Lock()
        self._snap: Snapshot | None = None
        self._taken_at = 0.0
        self.taken = 0
        """How many snapshots were taken."""

    async def get(self) -> Snapshot:
        async with self._lock:
            fresh = self._monotonic() - self._taken_at < self._max_age_s
            if self._snap is None or not fresh:
                self._snap = await self._take()
                self._taken_at = self._monotonic()
                self.taken += 1
            return self._snap


def metrics(snap: Snapshot) -> bytes:
    """The snapshot in Prometheus' text format."""
    registry = CollectorRegistry()
    depth = Gauge(
        "partnerbus_queue_messages",
        "Messages ready in a queue",
        ["queue", "role"],
        registry=registry,
    )
    consumers = Gauge(
        "partnerbus_queue_consumers", "Consumers of a queue", ["queue", "role"], registry=registry
    )
    for q in snap.queues:
        depth.labels(q.name, q.role).set(q.messages)
        consumers.labels(q.name, q.role).set(q.consumers)
    referrals = Gauge("partnerbus_referrals", "Referrals by status", ["status"], registry=registry)
    for status, count in snap.ledger.referrals_by_status.items():
        referrals.labels(status).set(count)
    Gauge(
        "partnerbus_referrals_overdue",
        "Referrals past their deadline, not yet expired",
        registry=registry,
    ).set(len(snap.ledger.overdue))
    Gauge("partnerbus_needs_parked", "Needs waiting for consent", registry=registry).set(
        snap.ledger.parked_needs
    )
    Gauge(
        "partnerbus_outbox_pending",
        "Messages committed, not yet confirmed by the broker",
        registry=registry,
    ).set(snap.ledger.outbox_pending)
    Gauge(
        "partnerbus_outbox_failing",
        "Unsent messages whose last publish failed (unroutable, refused, broker away)",
        registry=registry,
    ).set(snap.ledger.outbox_failing)
    Gauge("partnerbus_dead_letters", "Messages in dead-letter queues", registry=registry).set(
        snap.dead_letters
    )
    Counter(
        "partnerbus_dead_letter_refused",
        "Dead-letter copies refused by a full dead-letter queue (the message stayed in its "
        "work queue, dead-lettered by RabbitMQ once there is room)",
        registry=registry,
    ).inc(snap.ledger.dead_letters_refused)
    Gauge("partnerbus_broker_up", "1 when the monitor reached the broker", registry=registry).set(
        0 if snap.broker_error else 1
    )
    return generate_latest(registry)


def page(snap: Snapshot, prefix: str) -> str:
    """A plain page for people: what needs attention first."""
    e = html.escape
    attention = []
    if snap.broker_error:
        attention.append(f"broker unreachable: {e(snap.broker_error)}")
    if snap.dead_letters:
        attention.append(f"{snap.dead_letters} dead letter(s): <code>partnerbus dlq list</code>")
    if snap.ledger.dead_letters_refused:
        attention.append(
            f"{snap.ledger.dead_letters_refused} message(s) refused by a full dead-letter queue "
            "so far (they wait in their work queue): read, fix and purge the dead letters"
        )
    if snap.ledger.outbox_failing:
        attention.append(
            f"{snap.ledger.outbox_failing} message(s) the broker did not take on the last try "
            "(see the service log; a partner queue missing?)"
        )
    if snap.ledger.overdue:
        attention.append(f"{len(snap.ledger.overdue)} referral(s) past their deadline")
    idle = [q.name for q in snap.queues if q.role == "intake" and q.consumers == 0]
    if idle:
        attention.append(f"no consumer on {', '.join(map(e, idle))}: is the service running?")
    rows = "".join(
        f"<tr class='{q.role}{' warn' if q.role == 'dead-letter' and q.messages else ''}'>"
        f"<td>{e(q.name)}</td><td>{q.role}</td><td>{q.messages}</td><td>{q.consumers}</td></tr>"
        for q in snap.queues
        if q.role != "dead-letter" or q.messages
    )
    statuses = "".join(
        f"<tr><td>{e(s)}</td><td>{n}</td></tr>"
        for s, n in sorted(snap.ledger.referrals_by_status.items())
    )
    overdue = "".join(
        f"<tr><td>{e(r.referral_id)}</td><td>{e(r.partner_id)}</td><td>{e(r.status)}</td>"
        f"<td>{r.due_at:%Y-%m-%d %H:%M}</td></tr>"
        for r in snap.ledger.overdue
    )
    statuses = statuses or "<tr><td colspan='2'>no referral yet</td></tr>"
    overdue = overdue or "<tr><td colspan='4'>none</td></tr>"
    banner = (
        "".join(f"<li>{a}</li>" for a in attention) or "<li class='ok'>nothing needs attention</li>"
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="10">
<title>partnerbus — {e(prefix)}</title>
<style>
body{{font-family:system-ui,sans-serif;margin:2rem;color:#222}}
h1{{font-size:1.4rem}} table{{border-collapse:collapse;margin:.5rem 0 1.5rem}}
td,th{{border:1px solid #ccc;padding:.25rem .6rem;text-align:left}} th{{background:#f3f3f3}}
.warn td{{background:#fde2e2}} .ok{{color:#17692b}} ul.attention li{{margin:.2rem 0}}
.numbers{{display:flex;gap:2rem}} .numbers div{{font-size:1.1rem}}
</style></head><body>
<h1>partnerbus — <code>{e(prefix)}</code> at {snap.at:%Y-%m-%d %H:%M:%S} UTC</h1>
<ul class="attention">{banner}</ul>
<div class="numbers"><div>parked needs: <b>{snap.ledger.parked_needs}</b></div>
<div>outbox pending: <b>{snap.ledger.outbox_pending}</b>
(failing: <b>{snap.ledger.outbox_failing}</b>)</div>
<div>dead letters: <b>{snap.dead_letters}</b></div></div>
<h2>Referrals by status</h2><table><tr><th>status</th><th>referrals</th></tr>{statuses}</table>
<h2>Past their deadline</h2>
<table><tr><th>referral</th><th>partner</th><th>status</th><th>due</th></tr>{overdue}</table>
<h2>Queues</h2><table><tr><th>queue</th><th>role</th><th>ready</th><th>consumers</th></tr>{rows}</table>
<p><a href="/metrics">Prometheus metrics</a> · <a href="/health">health</a></p>
</body></html>"""
