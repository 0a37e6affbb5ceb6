"""The outbox: messages recorded in the transaction that decided them, sent by the relay
once it has committed (`handlers/outbox.py`); the relay's own claims are on `Store`."""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, select, update

from partnerbus.ledger import tables as t
from partnerbus.ledger.repos.base import Prepared, Repository, RowCache
from partnerbus.ledger.repos.base import row_of as _row
from partnerbus.rules.disclosure import Disclosed
from partnerbus.schemas import Message

# Built once and run as `Prepared` (its SQL rendered once per dialect, issue 9).
INSERT_OUTBOX = Prepared(t.outbox.insert())
INSERT_CLAIMED = Prepared(t.outbox.insert().returning(t.outbox.c.id))
"""A row the relay sends itself (claimed as it is written): its id is needed."""

URGENT_REFERRAL, ROUTINE_REFERRAL, OTHER = 0, 1, 2


def outbox_priority(message: Message) -> int:
    """Which outbox rows leave first when the relay is behind: an urgent or asap referral
    (0), then a routine referral (1), then the rest (2: notices to the source and the
    agency, reminders, withdrawals, statuses). A withdrawal or reminder still waits for its
    referral, whatever the priorities (`Store.claim_pending`)."""
    if getattr(message, "type", None) != "referral":
        return OTHER
    return (
        URGENT_REFERRAL if getattr(message, "urgency", "routine") != "routine" else ROUTINE_REFERRAL
    )


def _checked(disclosed: Disclosed[Message], routing_key: str) -> Message:
    """The message, if it may go where it is addressed: one made for the bus's own workers
    (no roles) never goes to a partner's queue (a partner id has no dot)."""
    if not disclosed.roles and "." not in routing_key:
        msg = f"a message for the bus's workers cannot go to partner {routing_key!r}"
        raise ValueError(msg)
    return disclosed.message


def _row_values(
    message: Message, routing_key: str, now: datetime, referral_id: str | None, *, attempts: int
) -> dict[str, Any]:
    """The columns of a new outbox row carrying `message`."""
    return {
        "message_id": message.message_id,
        "routing_key": routing_key,
        "message_type": getattr(message, "type", type(message).__name__),
        "body": message.model_dump_json(),
        "referral_id": referral_id,
        "created_at": now,
        "attempts": attempts,
        "priority": outbox_priority(message),
    }


@dataclass(frozen=True)
class OutboxRow:
    """A row the relay holds a claim on, to publish it."""

    id: int
    message_id: str
    routing_key: str
    message_type: str
    body: str
    referral_id: str | None
    attempts: int
    priority: int = 2


@dataclass(frozen=True)
class UnsentRow:
    """An outbox row that never left (its body is not read: retention only counts it)."""

    id: int
    message_id: str
    routing_key: str
    message_type: str
    created_at: datetime
    attempts: int


class OutboxRepository(Repository):
    """Rows to send, and what the relay, retention and replays do with them."""

    def __init__(self, conn: Connection, cache: RowCache | None = None) -> None:
        super().__init__(conn, cache)
        self._claim_until: datetime | None = None
        self._claimed: list[OutboxRow] = []

    @contextmanager
    def claiming(self, until: datetime) -> Iterator[list[OutboxRow]]:
        """The rows enqueued inside, apart from those of a referral (they keep its order,
        `Store.claim_pending`), are claimed at once until `until` for the caller, which
        publishes them once this transaction has committed: the relay sends the
        `delivered` notices of a window right after it, without another claim (issue 9).
        Yields the list they are added to."""
        self._claim_until, self._claimed = until, []
        try:
            yield self._claimed
        finally:
            self._claim_until = None

    def undeliverable_before(self, cutoff: datetime) -> list[UnsentRow]:
        """Unsent outbox rows created before `cutoff`, oldest first (without their bodies)."""
        rows = self.conn.execute(
            select(
                t.outbox.c.id,
                t.outbox.c.message_id,
                t.outbox.c.routing_key,
                t.outbox.c.message_type,
                t.outbox.c.created_at,
                t.outbox.c.attempts,
            )
            .where(t.outbox.c.sent_at.is_(None), t.outbox.c.created_at < cutoff)
            .order_by(t.outbox.c.id)
        )
        return [_row(UnsentRow, r) for r in rows]

    def expire_unsent(self, outbox_id: int, cutoff: datetime) -> bool:
        """Delete an unsent row older than `cutoff` unless a relay has sent it since; True if
        it was deleted. A relay's claim does not protect it: an undeliverable row is retried
        at every sweep, so it is claimed much of the time (a publish under way at that very
        instant may still land once; the relay's `mark_sent` then finds no row)."""
        return bool(
            self.conn.execute(
                delete(t.outbox).where(
                    t.outbox.c.id == outbox_id,
                    t.outbox.c.sent_at.is_(None),
                    t.outbox.c.created_at < cutoff,
                )
            ).rowcount
        )

    def delete_sent_before(self, cutoff: datetime) -> int:
        """Sent messages are copies of personal data: keep them only as long as needed."""
        return int(
            self.conn.execute(
                delete(t.outbox).where(t.outbox.c.sent_at.is_not(None), t.outbox.c.sent_at < cutoff)
            ).rowcount
        )

    def enqueue(
        self,
        disclosed: Disclosed[Message],
        routing_key: str,
        now: datetime,
        referral_id: str | None = None,
    ) -> None:
        """Record a message to send once this transaction commits (the outbox). It is
        `Disclosed`: cut to what its recipient's roles may see (docs/DISCLOSURE.md)."""
        message = _checked(disclosed, routing_key)
        claim = self._claim_until if referral_id is None else None
        values = _row_values(
            message, routing_key, now, referral_id, attempts=0 if claim is None else 1
        )
        if claim is None:
            INSERT_OUTBOX(self.conn, values)
        else:
            row_id = INSERT_CLAIMED(self.conn, {**values, "claimed_until": claim}).scalar_one()
            self._claimed.append(
                OutboxRow(
                    id=int(row_id),
                    message_id=message.message_id,
                    routing_key=routing_key,
                    message_type=values["message_type"],
                    body=values["body"],
                    referral_id=None,
                    attempts=1,
                    priority=values["priority"],
                )
            )

    def referral_rows(self, referral_id: str) -> list[tuple[int, int, bool]]:
        """The outbox rows carrying this referral itself: (id, claims, sent), oldest first.
        A row's claims count the relays' tries that may have published it (a claim given
        back untried is not counted)."""
        rows = self.conn.execute(
            select(t.outbox.c.id, t.outbox.c.attempts, t.outbox.c.sent_at)
            .where(t.outbox.c.referral_id == referral_id, t.outbox.c.message_type == "referral")
            .order_by(t.outbox.c.id)
        )
        return [(r.id, r.attempts, r.sent_at is not None) for r in rows]

    def pending_withdrawals(self, referral_id: str) -> list[int]:
        """Unsent `referral-withdrawn` rows of this referral (ids)."""
        rows = self.conn.execute(
            select(t.outbox.c.id).where(
                t.outbox.c.referral_id == referral_id,
                t.outbox.c.message_type == "referral-withdrawn",
                t.outbox.c.sent_at.is_(None),
            )
        )
        return [r.id for r in rows]

    def enqueue_again(
        self,
        disclosed: Disclosed[Message],
        routing_key: str,
        now: datetime,
        referral_id: str | None = None,
    ) -> None:
        """Send once more a message that left before (a replayed dead letter), after
        everything already in the outbox: the row it left in, if still kept, is replaced by
        a new one at the end. It counts as claimed once already, since it did reach the
        partner (so a withdrawal follows it if need be). Still waiting to leave: unchanged."""
        message = _checked(disclosed, routing_key)
        waiting = self.conn.execute(
            select(t.outbox.c.id).where(
                t.outbox.c.message_id == message.message_id, t.outbox.c.sent_at.is_(None)
            )
        ).first()
        if waiting is not None:
            return
        self.conn.execute(delete(t.outbox).where(t.outbox.c.message_id == message.message_id))
        INSERT_OUTBOX(self.conn, _row_values(message, routing_key, now, referral_id, attempts=1))

    def drop(self, outbox_id: int) -> None:
        """A claimed row that must not leave after all (its referral is closed, or its
        consent ran out): removed without being published."""
        self.conn.execute(delete(t.outbox).where(t.outbox.c.id == outbox_id))

    def mark_sent(self, outbox_id: int, now: datetime) -> None:
        self.mark_sent_many([outbox_id], now)

    def mark_sent_many(self, outbox_ids: Collection[int], now: datetime) -> None:
        """Record the broker's confirms of many rows in one statement."""
        if not outbox_ids:
            return
        self.conn.execute(
            update(t.outbox)
            .where(t.outbox.c.id.in_(list(outbox_ids)))
            .values(sent_at=now, claimed_until=None, last_error=None)
        )

    def release_untried(self, outbox_ids: Collection[int]) -> None:
        """Give back claimed rows that were never published (their claim did not count)."""
        if not outbox_ids:
            return
        self.conn.execute(
            update(t.outbox)
            .where(t.outbox.c.id.in_(list(outbox_ids)), t.outbox.c.sent_at.is_(None))
            .values(claimed_until=None, attempts=t.outbox.c.attempts - 1)
        )

    def release_row(self, outbox_id: int, error: str) -> None:
        """A try that failed: the row waits for the next one (its claim still counts: the
        publish may have reached the broker)."""
        self.conn.execute(
            update(t.outbox)
            .where(t.outbox.c.id == outbox_id)
            .values(claimed_until=None, last_error=error[:2000])
        )
