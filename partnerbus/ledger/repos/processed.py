"""Dedupe marks: which message each queue has already processed."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import bindparam, delete, select

from partnerbus.ledger import tables as t
from partnerbus.ledger.repos.base import Repository

# Built once; the values go as execute() parameters, so each call reuses the compiled
# statement instead of building and cache-keying a new `.values(...)` construct (issue 9).
INSERT = t.processed.insert()
# The hot reads, built once with bound parameters (see INSERT).
SEEN = select(t.processed.c.message_id).where(
    t.processed.c.message_id == bindparam("message_id"), t.processed.c.queue == bindparam("queue")
)


class ProcessedRepository(Repository):
    """A message recorded once per queue, so that a redelivery changes nothing."""

    def first_time(self, message_id: str, queue: str, now: datetime) -> bool:
        """Record that this message was processed; False if it already was (a redelivery)."""
        seen = self.conn.execute(SEEN, {"message_id": message_id, "queue": queue}).first()
        if seen:
            return False
        self.conn.execute(INSERT, {"message_id": message_id, "queue": queue, "processed_at": now})
        return True

    def delete_before(self, cutoff: datetime) -> int:
        return int(
            self.conn.execute(
                delete(t.processed).where(t.processed.c.processed_at < cutoff)
            ).rowcount
        )
