"""Dead letters and retry copies are whole messages (person reference, contact, free text):
they are purged on the retention schedule, by the bus's clock, like the outbox's copies.

A message's death time is what the broker or the bus recorded, not a partner's claim:
- a copy the bus published itself (`user_id` is the bus's user, which RabbitMQ verifies),
  refused with our reason or put in a delay queue: its AMQP `timestamp`, set from the
  ledger's clock when the copy was made;
- a message RabbitMQ dead-lettered (delivery limit, a retry's delay ended): the time of
  its latest death, `x-death[0]["time"]`, set by RabbitMQ.
A message with neither is kept and counted as undated (ops see it in `dlq list`); so is
one that claims to die in the future. Messages that are not due are left where they were:
they are taken unacked and go back when the channel closes, in their order.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from partnerbus.broker.dlq import DeadLetter, take
from partnerbus.broker.topology import ERROR_HEADER, Topology

log = logging.getLogger("partnerbus.retention")


@dataclass(frozen=True)
class Expired:
    """A message removed by retention: where it was and when it died, nothing of its body."""

    queue: str
    message_id: str | None
    died_at: datetime


@dataclass
class PurgeReport:
    removed: int = 0
    kept: int = 0
    undated: int = 0
    failed_queues: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {
            "dead-letters-expired": self.removed,
            "dead-letters-kept": self.kept,
            "dead-letters-undated": self.undated,
            "dead-letter-queues-failed": len(self.failed_queues),
        }


def _aware(value: Any) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def died_at(message: AbstractIncomingMessage, own_user: str) -> datetime | None:
    """When this dead letter or retry copy died, by the broker's or the bus's record."""
    headers: dict[str, Any] = dict(message.headers or {})
    ours = message.user_id == own_user
    if ours and ERROR_HEADER in headers:
        # Our refusal: the copy was made when it died (an x-death it carries is older, from
        # a delay queue it went through before).
        return _aware(message.timestamp)
    deaths = headers.get("x-death") or []
    if deaths and isinstance(deaths[0], dict):
        when = _aware(deaths[0].get("time"))
        if when is not None:
            return when
    return _aware(message.timestamp) if ours else None


def retention_queue_names(topology: Topology, partner_ids: Iterable[str]) -> list[str]:
    """Every dead-letter and delay queue of the prefix: where copies of messages rest."""
    names = []
    for work in topology.all_work_queue_names(partner_ids):
        names.append(topology.dlq_name(work))
        names.extend(
            topology.retry_queue_name(work, step) for step in range(len(topology.retry_delays_ms))
        )
    return names


async def _nonempty(
    connection: aio_pika.abc.AbstractConnection, queue_names: Iterable[str]
) -> list[str]:
    """The queues that exist and hold messages, probed on one channel (a missing queue
    closes it: a new one is opened), so that a daily pass over hundreds of mostly empty
    queues costs the broker little."""
    found: list[str] = []
    channel = await connection.channel()
    try:
        for name in queue_names:
            if channel.is_closed:
                channel = await connection.channel()
            try:
                queue = await channel.declare_queue(name, passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                continue  # not declared (a partner added since the last start)
            if int(queue.declaration_result.message_count or 0) > 0:
                found.append(name)
    finally:
        if not channel.is_closed:
            await channel.close()
    return found


async def purge_expired(
    connection: aio_pika.abc.AbstractConnection,
    queue_names: Iterable[str],
    cutoff: datetime,
    now: datetime,
    own_user: str,
    record: Callable[[Expired], Awaitable[None]],
) -> PurgeReport:
    """Remove from each queue the messages that died before `cutoff`; `record` (the audit)
    is awaited before each removal, so that none goes unrecorded. A queue that does not
    exist or is empty is skipped; one that fails is reported and tried again at the next
    pass."""
    report = PurgeReport()
    for name in await _nonempty(connection, queue_names):

        async def handle(
            _channel: AbstractChannel,
            message: AbstractIncomingMessage,
            _letter: DeadLetter,
            queue: str = name,
        ) -> bool:
            when = died_at(message, own_user)
            if when is None or when > now:
                report.undated += 1
                return False
            if when >= cutoff:
                report.kept += 1
                return False
            await record(Expired(queue, message.message_id, when))
            report.removed += 1
            return True

        try:
            await take(connection, name, None, handle, own_user)
        except Exception as exc:
            log.warning("dead-letter retention failed on %s (%s)", name, type(exc).__name__)
            report.failed_queues.append(name)
    if report.undated:
        log.warning(
            "%d dead letter(s) without a death time recorded by the broker or the bus are "
            "kept: see `partnerbus dlq list`",
            report.undated,
        )
    return report


__all__ = ["Expired", "PurgeReport", "died_at", "purge_expired", "retention_queue_names"]
