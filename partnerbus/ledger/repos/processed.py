"""Dedupe marks: which message each queue has already processed."""

from __future__ import annotations

import functools
from datetime import datetime

from sqlalchemy import delete
from sqlalchemy.dialects import postgresql, sqlite

from partnerbus.ledger import tables as t
from partnerbus.ledger.repos.base import Prepared, Repository


@functools.cache
def _mark_statement(dialect_name: str) -> Prepared:
    """The dedupe mark, inserted unless it is there (built once per dialect)."""
    dialect = postgresql if dialect_name == "postgresql" else sqlite
    # RETURNING tells whether it inserted: psycopg's rowcount is -1 here
    return Prepared(
        dialect.insert(t.processed)
        .on_conflict_do_nothing(index_elements=["message_id", "queue"])
        .returning(t.processed.c.message_id)
    )


class ProcessedRepository(Repository):
    """A message recorded once per queue, so that a redelivery changes nothing."""

    def first_time(self, message_id: str, queue: str, now: datetime) -> bool:
        """Record that this message was processed; False if it already was (a redelivery).
        One statement (INSERT … ON CONFLICT DO NOTHING): on PostgreSQL a redelivery racing
        the first delivery's uncommitted mark waits for it and then finds it."""
        inserted = _mark_statement(self.conn.dialect.name)(
            self.conn, {"message_id": message_id, "queue": queue, "processed_at": now}
        ).first()
        return inserted is not None

    def delete_before(self, cutoff: datetime) -> int:
        return int(
            self.conn.execute(
                delete(t.processed).where(t.processed.c.processed_at < cutoff)
            ).rowcount
        )
