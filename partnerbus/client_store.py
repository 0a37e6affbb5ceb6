"""What a partner's client remembers across restarts: the messages it has handled and the
referrals that were withdrawn.

Delivery is at least once: a message the client handled can come again (the client stopped
between its record and its ack, or the message was published twice), and a referral can
reach the partner after its withdrawal (a redelivery, a replay). The client asks this store
before it calls the partner's handler, so neither is acted on twice.

Two tables, nothing personal in them (ids and instants only):

- `partnerbus_client_handled (message_id, handled_at)`: written after the partner's handler
  returned and before the ack, committed to disk (SQLite `synchronous=FULL`);
- `partnerbus_client_withdrawn (referral_id, withdrawn_at)`: written when a
  `referral-withdrawn` arrives, before the partner's handler sees it.

Retention: handled ids are kept `keep_handled`, 90 days by default: a redelivery comes
within minutes or hours, and no copy of a message outlives 90 days on the bus (its dead
letters and its own dedupe marks are kept that long), so an older id can only be forgotten.
Withdrawn referral ids are kept `keep_withdrawn`, 365 days by default: a withdrawn referral
must stay refused as long as a copy of it could still come, with a wide margin. Older rows
are pruned when the store opens and then at most once an hour, as the client records.

SQLAlchemy rather than the stdlib `sqlite3`: it is already a dependency, and it lets a
partner put these two tables in its own PostgreSQL (`ClientStore(url)`) when its consumer
runs on several hosts or its files are not backed up; the SQLite file stays the default.
The tables are created when missing; they have no migrations (two tables, no foreign keys).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    Engine,
    MetaData,
    String,
    Table,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import StaticPool

KEEP_HANDLED = timedelta(days=90)
KEEP_WITHDRAWN = timedelta(days=365)
PRUNE_EVERY = timedelta(hours=1)

metadata = MetaData()
handled = Table(
    "partnerbus_client_handled",
    metadata,
    Column("message_id", String(200), primary_key=True),
    Column("handled_at", DateTime(timezone=True), nullable=False, index=True),
)
withdrawn = Table(
    "partnerbus_client_withdrawn",
    metadata,
    Column("referral_id", String(200), primary_key=True),
    Column("withdrawn_at", DateTime(timezone=True), nullable=False, index=True),
)


def _utcnow() -> datetime:
    return datetime.now(UTC)


class ClientStore:
    """The client's durable memory. `ClientStore.sqlite(path)` for a file (the usual choice),
    `ClientStore(url)` for any SQLAlchemy URL (`postgresql+psycopg://…`),
    `ClientStore.memory()` for tests only: it forgets everything when the process stops.

    Blocking calls: the client runs them in a thread. Each write is one committed
    transaction."""

    def __init__(
        self,
        url: str,
        *,
        keep_handled: timedelta = KEEP_HANDLED,
        keep_withdrawn: timedelta = KEEP_WITHDRAWN,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        if keep_handled <= timedelta(0) or keep_withdrawn <= timedelta(0):
            msg = "keep_handled and keep_withdrawn must be positive durations"
            raise ValueError(msg)
        self.url = url
        self.keep_handled = keep_handled
        self.keep_withdrawn = keep_withdrawn
        self.clock = clock
        self.engine = _engine(url)
        self.in_memory = url in ("sqlite://", "sqlite:///:memory:")
        # In memory, the client's threads share one connection (`_engine`): one at a time,
        # or two transactions interleave on it ("cannot start a transaction within a
        # transaction", even a crash of the driver).
        self._serial: AbstractContextManager[Any] = (
            threading.Lock() if self.in_memory else contextlib.nullcontext()
        )
        self._pruned_at: datetime | None = None

    @classmethod
    def sqlite(cls, path: str | os.PathLike[str], **options: Any) -> ClientStore:
        """A SQLite file at `path` (created with its tables when missing)."""
        return cls(f"sqlite:///{os.fspath(path)}", **options)

    @classmethod
    def memory(cls, **options: Any) -> ClientStore:
        """In memory, for tests: nothing survives the process."""
        return cls("sqlite://", **options)

    def open(self) -> None:
        """Create the tables when missing and prune what is past retention."""
        with self._serial:
            metadata.create_all(self.engine)
        self.prune()

    def close(self) -> None:
        self.engine.dispose()

    # reads -----------------------------------------------------------------------------
    def was_handled(self, message_id: str) -> bool:
        with self._serial, self.engine.connect() as conn:
            row = conn.execute(
                select(handled.c.message_id).where(handled.c.message_id == message_id)
            ).first()
        return row is not None

    def was_withdrawn(self, referral_id: str) -> bool:
        with self._serial, self.engine.connect() as conn:
            row = conn.execute(
                select(withdrawn.c.referral_id).where(withdrawn.c.referral_id == referral_id)
            ).first()
        return row is not None

    # writes ----------------------------------------------------------------------------
    def mark_handled(self, message_id: str) -> None:
        """The partner's handler returned for this message: remember it (committed when
        this returns). Marking it again changes nothing."""
        self._insert_once(handled, message_id=message_id, handled_at=self._now())
        self._prune_now_and_then()

    def record_withdrawn(self, referral_id: str) -> None:
        """This referral was withdrawn: a copy of it arriving later is not handed on."""
        self._insert_once(withdrawn, referral_id=referral_id, withdrawn_at=self._now())

    def prune(self) -> tuple[int, int]:
        """Forget handled messages older than `keep_handled` and withdrawals older than
        `keep_withdrawn`: (handled rows removed, withdrawn rows removed)."""
        now = self._now()
        with self._serial, self.engine.begin() as conn:
            gone_handled = conn.execute(
                delete(handled).where(handled.c.handled_at < now - self.keep_handled)
            ).rowcount
            gone_withdrawn = conn.execute(
                delete(withdrawn).where(withdrawn.c.withdrawn_at < now - self.keep_withdrawn)
            ).rowcount
        self._pruned_at = now
        return gone_handled, gone_withdrawn

    def counts(self) -> tuple[int, int]:
        """(handled messages remembered, withdrawn referrals remembered)."""
        with self._serial, self.engine.connect() as conn:
            return (
                conn.execute(select(func.count()).select_from(handled)).scalar_one(),
                conn.execute(select(func.count()).select_from(withdrawn)).scalar_one(),
            )

    def _now(self) -> datetime:
        # in UTC: SQLite keeps the wall time without its offset, and compares it as text
        return self.clock().astimezone(UTC)

    def _insert_once(self, table: Table, **row: Any) -> None:
        try:
            with self._serial, self.engine.begin() as conn:
                conn.execute(insert(table).values(**row))
        except IntegrityError:
            pass  # already there: a repeat, which is the point of remembering

    def _prune_now_and_then(self) -> None:
        if self._pruned_at is None or self._now() - self._pruned_at >= PRUNE_EVERY:
            self.prune()


def _engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
        return create_engine(url, hide_parameters=True, pool_pre_ping=True)
    in_memory = url in ("sqlite://", "sqlite:///:memory:")
    engine = create_engine(
        url,
        hide_parameters=True,
        connect_args={"check_same_thread": False, "timeout": 30},
        # one connection shared by the client's threads: else each thread has its own
        # empty in-memory database
        poolclass=StaticPool if in_memory else None,
    )

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA busy_timeout=30000")
        # A record is on disk before the broker hears the ack: stated, not left to the
        # build's default.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()

    return engine


__all__ = ["KEEP_HANDLED", "KEEP_WITHDRAWN", "ClientStore"]
