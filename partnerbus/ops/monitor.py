"""What ops watch: queue depths and consumers, dead letters, overdue and parked work.

Figures are read on demand from the broker (passive declares) and the ledger, so the
monitor is one small process beside the workers, however many there are:
`partnerbus ops status` prints them, `partnerbus ops serve` shows them on a page and as
Prometheus metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

import aio_pika
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from sqlalchemy import and_, func, select

from partnerbus.broker.dlq import DeadLetter, peek, why_not_replayable
from partnerbus.broker.topology import AUTHENTICATION, Topology
from partnerbus.ledger import tables as t
from partnerbus.ledger.store import ReferralRow, Store
from partnerbus.rules import AWAITING_ANSWER
from partnerbus.usecases import DEAD_LETTER_REFUSED

SCHEDULER_PASS_FAILED = "scheduler-pass-failed"  # noqa: S105 (an audit action)
"""Audit action of a scheduler pass that failed (`subject` is `scheduler`, `why` its
error, without values): the monitor's alert reads the latest one."""
IN_QUEUE: frozenset[str] = frozenset({"requested", "delivered"})
"""A referral sent (the outbox published it) and not yet read by the partner's system:
what waits in the partner's queue. The age of the oldest is `now - sent_at`."""
DAYS_CHARTED = 14


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
class PartnerLedger:
    """One partner's figures from the ledger (a partner is a source of signals and a
    receiver of referrals; most have one role only)."""

    received: int = 0
    """Signals it sent that the bus recorded."""
    no_consent: int = 0
    """Needs of its signals waiting for consent (parked) or whose consent was refused."""
    no_partner: int = 0
    """Needs of its signals no partner could take."""
    by_status: dict[str, int] = field(default_factory=dict)
    """Referrals to it, by status."""
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    sent: int = 0
    """Referrals to it the outbox published (`sent_at` set)."""
    oldest_in_queue_at: datetime | None = None
    """`sent_at` of its oldest referral sent and not yet read (`IN_QUEUE`)."""
    answer_s: list[float] = field(default_factory=list)
    """Seconds from sent to its answer (accepted or rejected), one per answered referral."""
    accept_s: list[float] = field(default_factory=list)
    """Seconds from sent to accepted."""


@dataclass(frozen=True)
class ParkedNeed:
    """One need waiting for consent (no person reference: the signal's id and the need)."""

    signal_id: str
    need: str
    since: datetime | None
    reminded_at: datetime | None


@dataclass(frozen=True)
class ParkedLine:
    agency: str
    needs: int
    oldest_since: datetime | None
    items: list[ParkedNeed] = field(default_factory=list)
    """The oldest `PARKED_LISTED` of them, oldest first."""


PARKED_LISTED = 50


@dataclass(frozen=True)
class LetterFigure:
    """A dead letter as the snapshot counts it (no body, no headers)."""

    queue: str
    message_id: str | None
    type: str | None
    reason: str
    died_in: str
    sender: str | None
    partner: str | None
    """The partner it belongs to: the one whose queue it died in, else its sender's."""
    refusal: str | None
    died_at: datetime | None
    replay: str
    """How a replay treats it: `intake`, `outbox`, or `never (...)`."""


@dataclass(frozen=True)
class PartnerRow:
    """One line of the page: a partner's referrals flowing, or why not."""

    partner_id: str
    name: str
    kind: str
    received: int
    filtered_no_consent: int
    filtered_no_partner: int
    filtered_invalid: int
    filtered_refused_sender: int
    queue_depth: int | None
    """None when its queue does not exist (never declared) or the broker is away."""
    consumers: int | None
    oldest_age_s: float | None
    sent: int
    awaiting: int
    accepted: int
    rejected: int
    rejected_by_reason: dict[str, int]
    completed: int
    expired: int
    dead_lettered: int
    """Its messages in dead-letter queues: died in its queue, or sent by it and refused."""
    median_answer_s: float | None
    median_accept_s: float | None

    @property
    def filtered(self) -> int:
        return (
            self.filtered_no_consent
            + self.filtered_no_partner
            + self.filtered_invalid
            + self.filtered_refused_sender
        )


@dataclass(frozen=True)
class Alert:
    kind: str
    """broker, no-consumer, old-message, dead-letters-rising, outbox-failing, scheduler,
    dead-letters-refused"""
    text: str
    partner: str | None = None
    waiting: int = 0
    """Messages waiting (a queue without a consumer)."""


@dataclass(frozen=True)
class Charts:
    days: list[str] = field(default_factory=list)
    """The last days, oldest first (YYYY-MM-DD, UTC)."""
    referrals_per_day: dict[str, list[int]] = field(default_factory=dict)
    """Status -> referrals created that day that have this status now."""
    dead_letters_per_day: list[int] = field(default_factory=list)
    """Dead letters now in the queues, by the day they died."""


@dataclass(frozen=True)
class Snapshot:
    at: datetime
    queues: list[QueueFigure]
    ledger: LedgerFigures
    broker_error: str | None = None
    partners: list[PartnerRow] = field(default_factory=list)
    parked: list[ParkedLine] = field(default_factory=list)
    letters: list[LetterFigure] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    charts: Charts = field(default_factory=Charts)
    scheduler_failed_at: datetime | None = None

    @property
    def dead_letters(self) -> int:
        return sum(q.messages for q in self.queues if q.role == "dead-letter")

    def for_partner(self, partner_id: str) -> Snapshot:
        """What the partner's staff may see: its own row, letters and alerts; no other
        partner's queue, no global figure."""
        own_queue = f".partner.{partner_id}"
        return replace(
            self,
            queues=[q for q in self.queues if q.name.endswith((own_queue, own_queue + ".dlq"))],
            ledger=LedgerFigures({}, [], 0, 0),
            partners=[r for r in self.partners if r.partner_id == partner_id],
            parked=[p for p in self.parked if p.agency == partner_id],
            letters=[x for x in self.letters if x.partner == partner_id],
            alerts=[a for a in self.alerts if a.partner == partner_id],
            charts=Charts(),
            scheduler_failed_at=None,
        )


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
        self._letters: dict[str, tuple[int, list[DeadLetter]]] = {}
        self.letter_reads = 0
        """How many times a dead-letter queue was read (peeked)."""

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

    async def letters(
        self, queues: Iterable[QueueFigure], own_user: str, limit: int = 200
    ) -> list[DeadLetter]:
        """The dead letters of the dead-letter queues that hold any, read without removing
        them (as `partnerbus dlq list` does). A queue whose depth has not changed since the
        last read is not read again: its letters are the ones read then (a dead-letter
        queue has no consumer; only a replay, a purge, retention or a new death change
        it, and each changes its depth or is followed by another read)."""
        found: list[DeadLetter] = []
        seen: dict[str, tuple[int, list[DeadLetter]]] = {}
        for q in queues:
            if q.role != "dead-letter" or not q.messages:
                continue
            cached = self._letters.get(q.name)
            if cached is not None and cached[0] == q.messages:
                letters = cached[1]
            else:
                await self._open_channel()
                assert self._connection is not None
                letters = await peek(self._connection, q.name, own_user, limit)
                self.letter_reads += 1
            if len(letters) >= min(q.messages, limit):
                seen[q.name] = (q.messages, letters)
            # else: some were held unacked elsewhere meanwhile (a retention pass, a
            # `dlq list`): read again at the next snapshot
            found.extend(letters)
        self._letters = seen
        return found

    async def connection(self) -> aio_pika.abc.AbstractConnection:
        """The probe's connection (opened if need be), for a replay or a purge."""
        await self._open_channel()
        assert self._connection is not None
        return self._connection

    def forget_letters(self) -> None:
        """After a replay or purge: the next snapshot reads the queues again."""
        self._letters = {}

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


def partner_ledger(store: Store) -> dict[str, PartnerLedger]:
    """Every partner's figures from the ledger, in a few grouped reads."""
    r, h, sg, n = t.referrals, t.referral_history, t.signals, t.signal_needs
    figures: dict[str, dict[str, object]] = {}

    def of(pid: str) -> dict[str, object]:
        return figures.setdefault(
            pid, {"by_status": {}, "rejected_by_reason": {}, "answer_s": [], "accept_s": []}
        )

    with store.read() as tx:
        conn = tx.conn
        for source, count in conn.execute(select(sg.c.source, func.count()).group_by(sg.c.source)):
            of(source)["received"] = int(count)
        for source, state, count in conn.execute(
            select(sg.c.source, n.c.state, func.count())
            .select_from(n.join(sg, sg.c.signal_id == n.c.signal_id))
            .where(n.c.state.in_(("parked", "refused", "no-partner")))
            .group_by(sg.c.source, n.c.state)
        ):
            key = "no_partner" if state == "no-partner" else "no_consent"
            row = of(source)
            row[key] = int(row.get(key, 0)) + int(count)  # type: ignore[call-overload]
        for pid, status, count in conn.execute(
            select(r.c.partner_id, r.c.status, func.count()).group_by(r.c.partner_id, r.c.status)
        ):
            of(pid)["by_status"][status] = int(count)  # type: ignore[index]
        for pid, reason, count in conn.execute(
            select(r.c.partner_id, r.c.reason, func.count())
            .where(r.c.status == "rejected")
            .group_by(r.c.partner_id, r.c.reason)
        ):
            of(pid)["rejected_by_reason"][reason or "-"] = int(count)  # type: ignore[index]
        for pid, count in conn.execute(
            select(r.c.partner_id, func.count())
            .where(r.c.sent_at.is_not(None))
            .group_by(r.c.partner_id)
        ):
            of(pid)["sent"] = int(count)
        for pid, oldest in conn.execute(
            select(r.c.partner_id, func.min(r.c.sent_at))
            .where(r.c.status.in_(IN_QUEUE), r.c.sent_at.is_not(None))
            .group_by(r.c.partner_id)
        ):
            if oldest is not None:
                of(pid)["oldest_in_queue_at"] = t.UTCDateTime().process_result_value(oldest, None)
        # the first answer of each referral (accepted or rejected, applied)
        answered = (
            select(h.c.referral_id, h.c.to_status, func.min(h.c.at).label("at"))
            .where(h.c.to_status.in_(("accepted", "rejected")), h.c.outcome == "applied")
            .group_by(h.c.referral_id, h.c.to_status)
            .subquery()
        )
        for pid, sent_at, to_status, at in conn.execute(
            select(r.c.partner_id, r.c.sent_at, answered.c.to_status, answered.c.at)
            .select_from(r.join(answered, and_(answered.c.referral_id == r.c.referral_id)))
            .where(r.c.sent_at.is_not(None))
        ):
            sent = t.UTCDateTime().process_result_value(sent_at, None)
            done = t.UTCDateTime().process_result_value(at, None)
            if sent is None or done is None:
                continue
            seconds = max(0.0, (done - sent).total_seconds())
            of(pid)["answer_s"].append(seconds)  # type: ignore[attr-defined]
            if to_status == "accepted":
                of(pid)["accept_s"].append(seconds)  # type: ignore[attr-defined]
    return {pid: PartnerLedger(**values) for pid, values in figures.items()}  # type: ignore[arg-type]


def parked_by_agency(store: Store) -> list[ParkedLine]:
    """Needs waiting for consent, per agency (the agency that asks the person): how many,
    since when, and the oldest ones, one line each."""
    n, sg = t.signal_needs, t.signals
    joined = n.join(sg, sg.c.signal_id == n.c.signal_id)
    aware = t.UTCDateTime().process_result_value
    with store.read() as tx:
        conn = tx.conn
        totals = conn.execute(
            select(sg.c.agency, func.count(), func.min(n.c.parked_since))
            .select_from(joined)
            .where(n.c.state == "parked")
            .group_by(sg.c.agency)
            .order_by(sg.c.agency)
        ).all()
        lines = []
        for agency, count, oldest in totals:
            rows = conn.execute(
                select(n.c.signal_id, n.c.need, n.c.parked_since, n.c.reminded_at)
                .select_from(joined)
                .where(
                    n.c.state == "parked",
                    sg.c.agency.is_(None) if agency is None else sg.c.agency == agency,
                )
                .order_by(n.c.parked_since, n.c.signal_id)
                .limit(PARKED_LISTED)
            )
            items = [
                ParkedNeed(
                    r.signal_id, r.need, aware(r.parked_since, None), aware(r.reminded_at, None)
                )
                for r in rows
            ]
            lines.append(ParkedLine(agency or "-", int(count), aware(oldest, None), items))
        return lines


def referrals_per_day(store: Store, days: list[str]) -> dict[str, list[int]]:
    """Referrals created on each of `days`, by their status now."""
    start = datetime.fromisoformat(days[0] + "T00:00:00+00:00")
    r = t.referrals
    per: dict[str, list[int]] = {}
    with store.read() as tx:
        conn = tx.conn
        for created_at, status in conn.execute(
            select(r.c.created_at, r.c.status).where(r.c.created_at >= start)
        ):
            day = t.UTCDateTime().process_result_value(created_at, None)
            if day is None:
                continue
            key = f"{day:%Y-%m-%d}"
            if key in days:
                per.setdefault(status, [0] * len(days))[days.index(key)] += 1
    return dict(sorted(per.items()))


def last_scheduler_failure(store: Store) -> datetime | None:
    a = t.audit
    with store.read() as tx:
        conn = tx.conn
        at = conn.execute(
            select(func.max(a.c.at)).where(a.c.action == SCHEDULER_PASS_FAILED)
        ).scalar_one()
    return t.UTCDateTime().process_result_value(at, None)


@dataclass(frozen=True)
class LedgerReading:
    figures: LedgerFigures
    partners: dict[str, PartnerLedger]
    parked: list[ParkedLine]
    per_day: dict[str, list[int]]
    scheduler_failed_at: datetime | None


def read_ledger(store: Store, now: datetime, days: list[str]) -> LedgerReading:
    return LedgerReading(
        ledger_figures(store, now),
        partner_ledger(store),
        parked_by_agency(store),
        referrals_per_day(store, days),
        last_scheduler_failure(store),
    )


@dataclass(frozen=True)
class Thresholds:
    """When the page raises an alert (settings `ops_*`)."""

    oldest_message_s: float = 3600.0
    scheduler_failure_s: float = 3600.0
    """A failed scheduler pass is an alert for this long after it failed."""


@dataclass(frozen=True)
class PartnerInfo:
    id: str
    name: str
    kind: str
    username: str


def _letter_figure(letter: DeadLetter, topology: Topology, by_user: dict[str, str]) -> LetterFigure:
    died_partner = topology.partner_of(letter.died_in)
    sender_partner = by_user.get(letter.sender or "")
    if died_partner:
        door = "outbox"
    elif letter.refusal:
        door = f"never ({letter.refusal})"
    else:
        door = "never" if why_not_replayable(letter) else "intake"
    return LetterFigure(
        queue=letter.queue,
        message_id=letter.message_id,
        type=letter.type,
        reason=letter.reason,
        died_in=letter.died_in,
        sender=letter.sender,
        partner=died_partner or sender_partner,
        refusal=letter.refusal,
        died_at=letter.died_at,
        replay=door,
    )


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def assemble(
    at: datetime,
    queues: list[QueueFigure],
    reading: LedgerReading,
    letters: list[LetterFigure],
    partners: list[PartnerInfo],
    topology: Topology,
    *,
    broker_error: str | None,
    previous: Snapshot | None,
    thresholds: Thresholds,
    days: list[str],
) -> Snapshot:
    """The rows, alerts and charts of one snapshot, from what was read (nothing else)."""
    by_queue = {q.name: q for q in queues}
    rows: list[PartnerRow] = []
    letters_of = Tally(x.partner for x in letters if x.partner)
    invalid_of = Tally(
        x.partner
        for x in letters
        if x.partner and not topology.partner_of(x.died_in) and x.refusal != AUTHENTICATION
    )
    refused_of = Tally(
        x.partner
        for x in letters
        if x.partner and not topology.partner_of(x.died_in) and x.refusal == AUTHENTICATION
    )
    alerts: list[Alert] = []
    if broker_error:
        alerts.append(Alert("broker", f"broker unreachable: {broker_error}"))
    for info in partners:
        led = reading.partners.get(info.id, PartnerLedger())
        queue = by_queue.get(topology.partner_queue_name(info.id))
        status = led.by_status
        oldest = (
            (at - led.oldest_in_queue_at).total_seconds()
            if led.oldest_in_queue_at is not None
            else None
        )
        row = PartnerRow(
            partner_id=info.id,
            name=info.name,
            kind=info.kind,
            received=led.received,
            filtered_no_consent=led.no_consent,
            filtered_no_partner=led.no_partner,
            filtered_invalid=invalid_of[info.id],
            filtered_refused_sender=refused_of[info.id],
            queue_depth=queue.messages if queue else None,
            consumers=queue.consumers if queue else None,
            oldest_age_s=oldest,
            sent=led.sent,
            awaiting=sum(status.get(s, 0) for s in AWAITING_ANSWER),
            accepted=sum(status.get(s, 0) for s in ("accepted", "in-progress", "on-hold")),
            rejected=status.get("rejected", 0),
            rejected_by_reason=dict(sorted(led.rejected_by_reason.items())),
            completed=status.get("completed", 0),
            expired=status.get("expired", 0),
            dead_lettered=letters_of[info.id],
            median_answer_s=_median(led.answer_s),
            median_accept_s=_median(led.accept_s),
        )
        rows.append(row)
        if queue is not None and queue.consumers == 0:
            waiting = f" ({queue.messages} message(s) waiting)" if queue.messages else ""
            alerts.append(
                Alert(
                    "no-consumer",
                    f"no consumer on {info.id}'s queue{waiting}",
                    info.id,
                    queue.messages,
                )
            )
        if oldest is not None and oldest > thresholds.oldest_message_s:
            alerts.append(
                Alert(
                    "old-message",
                    f"{info.id}: oldest referral waiting in its queue for "
                    f"{human_duration(oldest)} "
                    f"(threshold {human_duration(thresholds.oldest_message_s)})",
                    info.id,
                )
            )
    for q in queues:
        if q.role == "intake" and q.consumers == 0:
            alerts.append(Alert("no-consumer", f"no consumer on {q.name}: is the service running?"))
    total_letters = sum(q.messages for q in queues if q.role == "dead-letter")
    if previous is not None and not broker_error and total_letters > previous.dead_letters:
        alerts.append(
            Alert(
                "dead-letters-rising",
                f"dead letters rising: {previous.dead_letters} → {total_letters} since "
                f"{previous.at:%H:%M:%S}",
            )
        )
    if reading.figures.outbox_failing:
        alerts.append(
            Alert(
                "outbox-failing",
                f"{reading.figures.outbox_failing} outbox message(s) the broker did not take "
                "on the last try (see the service log; a partner queue missing?)",
            )
        )
    failed = reading.scheduler_failed_at
    if failed is not None and (at - failed).total_seconds() < thresholds.scheduler_failure_s:
        alerts.append(
            Alert("scheduler", f"a scheduler pass failed at {failed:%Y-%m-%d %H:%M:%S} UTC")
        )
    if reading.figures.dead_letters_refused:
        alerts.append(
            Alert(
                "dead-letters-refused",
                f"{reading.figures.dead_letters_refused} message(s) refused by a full "
                "dead-letter queue so far (they wait in their work queue)",
            )
        )
    per_day = [0] * len(days)
    for x in letters:
        if x.died_at is not None and f"{x.died_at:%Y-%m-%d}" in days:
            per_day[days.index(f"{x.died_at:%Y-%m-%d}")] += 1
    return Snapshot(
        at,
        queues,
        reading.figures,
        broker_error,
        partners=rows,
        parked=reading.parked,
        letters=letters,
        alerts=alerts,
        charts=Charts(days, reading.per_day, per_day),
        scheduler_failed_at=failed,
    )


def human_duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}min"
    if seconds < 2 * 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def chart_days(now: datetime, count: int = DAYS_CHARTED) -> list[str]:
    return [f"{now - timedelta(days=count - 1 - i):%Y-%m-%d}" for i in range(count)]


async def snapshot(
    amqp_url: str | BrokerProbe,
    topology: Topology,
    partner_ids: list[str] | list[PartnerInfo],
    store: Store,
    now: datetime,
    *,
    own_user: str = "",
    previous: Snapshot | None = None,
    thresholds: Thresholds = Thresholds(),
) -> Snapshot:
    """Queues (through `amqp_url`'s own short connection, or a long-lived probe), the
    dead letters (with a probe: read when their queue's depth changed) and the ledger's
    figures (read in a thread: the event loop keeps serving); then the per-partner rows,
    the alerts (against `previous`, the last snapshot) and the charts."""
    infos = [
        p if isinstance(p, PartnerInfo) else PartnerInfo(p, p, "", f"pb-{p}") for p in partner_ids
    ]
    ids = [p.id for p in infos]
    found: list[DeadLetter] = []
    try:
        if isinstance(amqp_url, BrokerProbe):
            queues = await amqp_url.figures(topology, ids)
            found = await amqp_url.letters(queues, own_user)
        else:
            queues = await queue_figures(amqp_url, topology, ids)
        error = None
    except (OSError, aio_pika.exceptions.AMQPError) as exc:
        queues, error = [], f"{type(exc).__name__}: {exc}"
    days = chart_days(now)
    reading = await asyncio.to_thread(read_ledger, store, now, days)
    by_user = {p.username: p.id for p in infos}
    letters = [_letter_figure(x, topology, by_user) for x in found]
    return assemble(
        now,
        queues,
        reading,
        letters,
        infos,
        topology,
        broker_error=error,
        previous=previous,
        thresholds=thresholds,
        days=days,
    )


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

    def expire(self) -> None:
        """The next `get` takes a new snapshot (after a replay or a purge)."""
        self._taken_at = float("-inf")

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
    _partner_metrics(snap, registry)
    return generate_latest(registry)


def _partner_metrics(snap: Snapshot, registry: CollectorRegistry) -> None:
    """The page's per-partner rows and its alerts, labelled by partner."""
    label = ["partner"]
    received = Gauge(
        "partnerbus_partner_signals_received",
        "Signals a partner sent, recorded",
        label,
        registry=registry,
    )
    filtered = Gauge(
        "partnerbus_partner_filtered",
        "A partner's needs or messages that went no further, by why (no-consent, "
        "no-partner, invalid, refused-sender)",
        ["partner", "why"],
        registry=registry,
    )
    queued = Gauge(
        "partnerbus_partner_queue_messages",
        "Messages ready in a partner's queue",
        label,
        registry=registry,
    )
    consumers = Gauge(
        "partnerbus_partner_queue_consumers",
        "Consumers of a partner's queue",
        label,
        registry=registry,
    )
    oldest = Gauge(
        "partnerbus_partner_oldest_message_age_seconds",
        "Age of a partner's oldest referral sent and not yet read by its system",
        label,
        registry=registry,
    )
    referrals = Gauge(
        "partnerbus_partner_referrals",
        "A partner's referrals by status (sent: published by the outbox, any status now)",
        ["partner", "status"],
        registry=registry,
    )
    rejected = Gauge(
        "partnerbus_partner_rejected",
        "A partner's rejected referrals by reason",
        ["partner", "reason"],
        registry=registry,
    )
    dead = Gauge(
        "partnerbus_partner_dead_letters",
        "A partner's messages in dead-letter queues (died in its queue, or sent by it)",
        label,
        registry=registry,
    )
    answer = Gauge(
        "partnerbus_partner_answer_seconds_median",
        "Median seconds from sent to a partner's first answer (accepted or rejected)",
        label,
        registry=registry,
    )
    for r in snap.partners:
        received.labels(r.partner_id).set(r.received)
        for why, n in (
            ("no-consent", r.filtered_no_consent),
            ("no-partner", r.filtered_no_partner),
            ("invalid", r.filtered_invalid),
            ("refused-sender", r.filtered_refused_sender),
        ):
            filtered.labels(r.partner_id, why).set(n)
        if r.queue_depth is not None:
            queued.labels(r.partner_id).set(r.queue_depth)
        if r.consumers is not None:
            consumers.labels(r.partner_id).set(r.consumers)
        if r.oldest_age_s is not None:
            oldest.labels(r.partner_id).set(r.oldest_age_s)
        for status, n in (
            ("sent", r.sent),
            ("awaiting", r.awaiting),
            ("accepted", r.accepted),
            ("rejected", r.rejected),
            ("completed", r.completed),
            ("expired", r.expired),
        ):
            referrals.labels(r.partner_id, status).set(n)
        for reason, n in r.rejected_by_reason.items():
            rejected.labels(r.partner_id, reason).set(n)
        dead.labels(r.partner_id).set(r.dead_lettered)
        if r.median_answer_s is not None:
            answer.labels(r.partner_id).set(r.median_answer_s)
    alerts = Gauge(
        "partnerbus_alerts", "Alerts the ops page shows, by kind", ["kind"], registry=registry
    )
    for kind, n in Tally(a.kind for a in snap.alerts).items():
        alerts.labels(kind).set(n)
