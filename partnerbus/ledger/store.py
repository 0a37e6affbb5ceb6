"""The durable record: consents, signals, referrals, their history, the outbox and the audit.

One `Store` per process; `store.begin()` opens a transaction (`LedgerTx`) in which a use case
records its state change, its dedupe mark and its outgoing messages together, so that a
message is acked only after all of it is committed, and sent only after that (outbox).
SQLite file by default, PostgreSQL by URL; `Store("sqlite://")` is an in-memory store for
tests and for partners who test against us.
"""

from __future__ import annotations

import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    Engine,
    and_,
    create_engine,
    event,
    exists,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.pool import StaticPool

from partnerbus.ledger import tables as t
from partnerbus.ledger.repos import (
    AuditRepository,
    CapacityRepository,
    Conflict,
    ConsentRepository,
    JournalRepository,
    OutboxRepository,
    OutboxRow,
    ProcessedRepository,
    ReferralRepository,
    ReferralRow,
    RetentionRepository,
    SignalRepository,
    SignalRow,
    UnsentRow,
)
from partnerbus.ledger.repos.base import RowCache
from partnerbus.ledger.repos.base import row_of as _row

log = logging.getLogger("partnerbus.ledger")

T = TypeVar("T")

RETRYABLE_SQLSTATES = frozenset({"40001", "40P01", "23505"})
"""PostgreSQL errors that mean "another transaction got there first", not "this is wrong":
serialization failure, deadlock detected, and a unique key another transaction has just
inserted (a concurrent upsert or dedupe mark). Re-running the transaction settles them."""
MAX_TRIES = 8
READ_ONLY = "partnerbus_read_only"


def is_conflict(exc: BaseException) -> bool:
    """True for a failure that re-running the transaction settles."""
    if isinstance(exc, Conflict):
        return True
    if isinstance(exc, DBAPIError):
        return getattr(exc.orig, "sqlstate", None) in RETRYABLE_SQLSTATES
    return False


def rerun_on_conflict(attempt: Callable[[], T], *, tries: int = MAX_TRIES) -> T:
    """Call `attempt` (one whole transaction, begun and committed inside it); when it
    meets a concurrent change (`is_conflict`), call it again after a short random pause, up
    to `tries` times (`Store.run`, and the relay's claim, which opens its own)."""
    for n in range(1, tries + 1):
        try:
            return attempt()
        except Exception as exc:
            if n == tries or not is_conflict(exc):
                raise
            log.info(
                "transaction re-run after a concurrent change (%s, try %d)", _error_code(exc), n
            )
            backoff(n)
    raise AssertionError("unreachable")  # pragma: no cover


def backoff(attempt: int) -> None:
    """A short random pause before the next try, so that two rivals do not meet again."""
    time.sleep(random.uniform(0, 0.005 * 2**attempt))


@dataclass(frozen=True)
class AuditRow:
    at: datetime
    actor: str
    action: str
    subject: str
    person_ref: str | None
    partner_id: str | None
    why: str | None


AUDIT_COLUMNS = tuple(t.audit.c[f.name] for f in fields(AuditRow))
"""The audit's columns an `AuditRow` holds (every one but its id)."""


class LedgerTx:
    """One transaction: its connection, and the repositories that work in it. A use case
    reads and writes through them (`tx.signals.add(...)`, `tx.referrals.update(...)`,
    `tx.audit.record(...)`, `tx.outbox.enqueue(...)`), and all of it commits or rolls back
    together."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        # the rows this transaction has read, shared by the repositories that read them
        self.cache = cache = RowCache(conn)
        self.processed = ProcessedRepository(conn)
        self.signals = SignalRepository(conn, cache)
        self.consents = ConsentRepository(conn, cache)
        self.journal = JournalRepository(conn)
        self.referrals = ReferralRepository(conn, cache)
        self.capacity = CapacityRepository(conn, cache)
        self.audit = AuditRepository(conn)
        self.retention = RetentionRepository(conn, cache)
        self.outbox = OutboxRepository(conn)

    def prefetch_referrals(self, referral_ids: Collection[str]) -> None:
        """Read these referrals, their consents and their signals in three statements (the
        relay, before it checks a window), for the repositories' `get` to serve."""
        found = self.referrals.prefetch(referral_ids)
        self.consents.prefetch([r.consent_id for r in found])
        self.signals.prefetch([r.signal_id for r in found])

    # the transaction itself -------------------------------------------------------------
    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """A nested transaction: what runs inside is rolled back alone if it raises (the
        exception propagates), and the enclosing transaction goes on."""
        try:
            with self.conn.begin_nested():
                yield
        except BaseException:
            self.cache.clear()  # what it read or wrote was rolled back with it
            raise

    @property
    def usable(self) -> bool:
        """False once the connection was lost: nothing more can run in this transaction."""
        return not self.conn.invalidated


class Store:
    """The ledger's database. Nothing connects until the first use."""

    def __init__(self, url: str, *, schema: str | None = None, echo: bool = False) -> None:
        self.url = url
        self.engine = _engine(url, schema=schema, echo=echo)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self._write_gate = _write_gate(self.engine) if self.is_sqlite else None

    def create_all(self) -> None:
        """Bring the schema to this version's (Alembic's head): the same migrations as
        `partnerbus db upgrade`, one migrator at a time (`partnerbus.ledger.migrate`)."""
        from partnerbus.ledger.migrate import upgrade

        upgrade(self)

    def drop_all(self) -> None:
        """Drop every table, the migrations' record included (tests start afresh)."""
        t.metadata.drop_all(self.engine)
        with self.engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")

    def dispose(self) -> None:
        self.engine.dispose()

    @contextmanager
    def begin(self, *, readonly: bool = False) -> Iterator[LedgerTx]:
        """One transaction. A writing one takes SQLite's write lock at once (`BEGIN
        IMMEDIATE`); `readonly=True` is `read()`."""
        if readonly:
            with self.read() as tx:
                yield tx
            return
        with self._writing() as conn:
            yield LedgerTx(conn)

    @contextmanager
    def _writing(self) -> Iterator[Connection]:
        """A writing transaction's connection (every write of the ledger goes through here)."""
        if self._write_gate is None:
            with self.engine.begin() as conn:
                yield conn
            return
        # SQLite: the threads of this process take turns on the file's write lock here,
        # woken as soon as it is free, rather than in SQLite's busy handler, which sleeps
        # up to 100 ms between tries (other processes still meet that handler).
        if not self._write_gate.acquire(timeout=WRITE_WAIT_S):
            # as SQLite's own busy timeout would say (a transient failure: retried)
            msg = f"database is locked (another writer of this process held it {WRITE_WAIT_S} s)"
            raise OperationalError("BEGIN IMMEDIATE", {}, sqlite3.OperationalError(msg))
        try:
            with self.engine.begin() as conn:
                yield conn
        finally:
            self._write_gate.release()

    @contextmanager
    def read(self) -> Iterator[LedgerTx]:
        """A read-only transaction: it takes no write lock (a deferred `BEGIN` on SQLite,
        where WAL lets it read beside the writer), and PostgreSQL refuses any write in it
        (`SET TRANSACTION READ ONLY`). For checks and lookups that record nothing."""
        with self._reading() as conn, conn.begin():
            yield LedgerTx(conn)

    @contextmanager
    def _reading(self) -> Iterator[Connection]:
        """A connection for reads only: on SQLite it does not wait for the writer; on
        PostgreSQL each of its transactions is read-only."""
        with read_only_connection(self.engine) as conn:
            yield conn

    def run(self, work: Callable[[LedgerTx], T], *, tries: int = MAX_TRIES) -> T:
        """Run `work` in one transaction; when it meets a concurrent change (a `Conflict`,
        a serialization failure, a deadlock, a key another transaction just inserted), roll
        back and run the whole of it again, on fresh reads, up to `tries` times. `work`
        must have no effect outside the transaction that a second run would repeat."""

        def once() -> T:
            with self.begin() as tx:
                return work(tx)

        return rerun_on_conflict(once, tries=tries)

    # outbox relay ---------------------------------------------------------------------
    def claim_pending(
        self,
        now: datetime,
        lease: timedelta,
        limit: int = 100,
        *,
        exclude: Collection[int] = (),
        settle: Callable[[LedgerTx], None] | None = None,
        then: Callable[[LedgerTx, list[OutboxRow]], None] | None = None,
    ) -> list[OutboxRow]:
        """Claim unsent outbox rows for `lease`, so that two relays do not send the same row:
        the most pressing first (`priority`, then outbox order), at most `limit`, never one
        of `exclude` (rows this relay has just seen refused). One SELECT and one UPDATE; on
        PostgreSQL the SELECT locks its rows `FOR UPDATE SKIP LOCKED`, so two relays claiming
        at once take different rows instead of waiting on each other. `settle` runs first in
        the same transaction (the relay records what it sent since its last commit); `then`
        last, with the rows claimed (the relay checks the referrals among them before they
        leave, in this same transaction)."""
        # Messages about one referral leave in outbox order, whichever relay sends them: a
        # row waits while an earlier row of its referral is unsent (claimed or not). So a
        # claim holds at most one row per referral, and a relay may publish its whole claim
        # at once without reordering a referral. The rule reads the snapshot, not the row
        # locks: a sibling another relay is claiming right now is unsent, so it still waits.
        earlier = t.outbox.alias("earlier")
        waits = exists().where(
            earlier.c.referral_id == t.outbox.c.referral_id,
            earlier.c.sent_at.is_(None),
            earlier.c.id < t.outbox.c.id,
        )
        claimable = (
            t.outbox.c.sent_at.is_(None),
            or_(t.outbox.c.claimed_until.is_(None), t.outbox.c.claimed_until < now),
        )
        query = (
            select(t.outbox.c.id)
            .where(*claimable)
            .where(or_(t.outbox.c.referral_id.is_(None), ~waits))
            .order_by(t.outbox.c.priority, t.outbox.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True, of=t.outbox)
        )
        if exclude:
            query = query.where(t.outbox.c.id.not_in(list(exclude)))
        with self._writing() as conn:
            tx = LedgerTx(conn)
            if settle is not None:  # the relay's earlier sends, recorded in this commit
                settle(tx)
            ids = [row_id for (row_id,) in conn.execute(query).all()]
            if not ids:
                return []
            got = conn.execute(
                update(t.outbox)
                .where(t.outbox.c.id.in_(ids), *claimable)
                .values(claimed_until=now + lease, attempts=t.outbox.c.attempts + 1)
                .returning(
                    t.outbox.c.id,
                    t.outbox.c.message_id,
                    t.outbox.c.routing_key,
                    t.outbox.c.message_type,
                    t.outbox.c.body,
                    t.outbox.c.referral_id,
                    t.outbox.c.attempts,
                    t.outbox.c.priority,
                )
            ).all()
            claimed: list[OutboxRow] = [_row(OutboxRow, row) for row in got]
            claimed.sort(key=lambda row: (row.priority, row.id))
            if then is not None:
                then(tx, claimed)
        return claimed

    def release(self, outbox_id: int, error: str) -> None:
        with self._writing() as conn:
            conn.execute(
                update(t.outbox)
                .where(t.outbox.c.id == outbox_id)
                .values(claimed_until=None, last_error=error[:2000])
            )

    def release_untried(self, outbox_ids: Collection[int]) -> None:
        """Give back claimed rows that were never tried (their claim did not count)."""
        if not outbox_ids:
            return
        with self._writing() as conn:
            conn.execute(
                update(t.outbox)
                .where(t.outbox.c.id.in_(list(outbox_ids)), t.outbox.c.sent_at.is_(None))
                .values(claimed_until=None, attempts=t.outbox.c.attempts - 1)
            )

    def failing_count(self) -> int:
        """Unsent outbox rows whose last try failed (unroutable, refused, broker away)."""
        with self._reading() as conn:
            return int(
                conn.execute(
                    select(func.count())
                    .select_from(t.outbox)
                    .where(t.outbox.c.sent_at.is_(None), t.outbox.c.last_error.is_not(None))
                ).scalar_one()
            )

    def outbox(self, *, pending_only: bool = False) -> list[tuple[str, str, str]]:
        """(routing key, message type, JSON body) of the outbox, oldest first."""
        query = select(t.outbox.c.routing_key, t.outbox.c.message_type, t.outbox.c.body)
        if pending_only:
            query = query.where(t.outbox.c.sent_at.is_(None))
        with self._reading() as conn:
            return [
                (r.routing_key, r.message_type, r.body)
                for r in conn.execute(query.order_by(t.outbox.c.id))
            ]

    def pending_count(self) -> int:
        with self._reading() as conn:
            return int(
                conn.execute(
                    select(func.count()).select_from(t.outbox).where(t.outbox.c.sent_at.is_(None))
                ).scalar_one()
            )

    # reads for people and ops ---------------------------------------------------------
    def referrals(self, *, statuses: frozenset[str] | None = None) -> list[ReferralRow]:
        query = select(t.referrals)
        if statuses is not None:
            query = query.where(t.referrals.c.status.in_(statuses))
        with self._reading() as conn:
            return [
                _row(ReferralRow, r)
                for r in conn.execute(
                    query.order_by(t.referrals.c.created_at, t.referrals.c.referral_id)
                )
            ]

    def referral_counts(self) -> dict[str, int]:
        with self._reading() as conn:
            rows = conn.execute(
                select(t.referrals.c.status, func.count()).group_by(t.referrals.c.status)
            )
            return {status: int(n) for status, n in rows}

    def referral(self, referral_id: str) -> ReferralRow | None:
        with self._reading() as conn:
            return ReferralRepository(conn).get(referral_id)

    def history(self, referral_id: str) -> list[dict[str, Any]]:
        with self._reading() as conn:
            rows = conn.execute(
                select(t.referral_history)
                .where(t.referral_history.c.referral_id == referral_id)
                .order_by(t.referral_history.c.id)
            )
            return [dict(r._mapping) for r in rows]

    def audit_trail(self, subject_or_person: str) -> list[AuditRow]:
        """Every audit record about a person (by reference) or a signal or referral (by id)."""
        signal_ids = select(t.signals.c.signal_id).where(
            or_(
                t.signals.c.person_ref == subject_or_person,
                t.signals.c.signal_id == subject_or_person,
            )
        )
        referral_ids = select(t.referrals.c.referral_id).where(
            t.referrals.c.signal_id.in_(signal_ids)
        )
        with self._reading() as conn:
            rows = conn.execute(
                select(*AUDIT_COLUMNS)
                .where(
                    or_(
                        t.audit.c.subject == subject_or_person,
                        t.audit.c.person_ref == subject_or_person,
                        # a person's or a signal's trail includes what happened to the
                        # referrals made from it
                        t.audit.c.subject.in_(referral_ids),
                    )
                )
                .order_by(t.audit.c.id)
            )
            return [_row(AuditRow, r) for r in rows]

    def count(self, table: str, **where: Any) -> int:
        tbl = t.metadata.tables[table]
        conditions = [tbl.c[k] == v for k, v in where.items()]
        with self._reading() as conn:
            query = select(func.count()).select_from(tbl)
            if conditions:
                query = query.where(and_(*conditions))
            return int(conn.execute(query).scalar_one())

    def recent_answers(
        self,
        since: datetime,
        bus_actor: str,
        window: int = 20,
        *,
        answered_since: datetime | None = None,
    ) -> dict[str, list[bool]]:
        """Each partner's last `window` answers since `since` (accepted True, rejected
        False), oldest first, from the referrals' applied transitions. With
        `answered_since`, only the partners that answered at or after it (a refresh reads
        what changed, not the whole history)."""
        h = t.referral_history.c
        answers_only = (
            h.outcome == "applied",
            h.to_status.in_(("accepted", "rejected")),
            h.actor != bus_actor,
        )
        query = select(h.actor, h.to_status).where(*answers_only, h.at >= since)
        if answered_since is not None:
            changed = select(h.actor).where(*answers_only, h.at >= answered_since).distinct()
            query = query.where(h.actor.in_(changed))
        answers: dict[str, list[bool]] = {}
        with self._reading() as conn:
            for actor, status in conn.execute(query.order_by(h.id)):
                kept = answers.setdefault(actor, [])
                kept.append(status == "accepted")
                if len(kept) > window:
                    del kept[0]
        return answers

    def capacities(self) -> list[tuple[str, str, int | None]]:
        with self._reading() as conn:
            rows = conn.execute(
                select(
                    t.partner_capacity.c.partner_id,
                    t.partner_capacity.c.status,
                    t.partner_capacity.c.remaining,
                ).order_by(t.partner_capacity.c.partner_id)
            )
            return [(r.partner_id, r.status, r.remaining) for r in rows]


def _error_code(exc: BaseException) -> str:
    """What a log line may say of a database error: its class and SQLSTATE, never its
    parameters (they carry personal data)."""
    if isinstance(exc, DBAPIError):
        return f"{type(exc.orig).__name__} {getattr(exc.orig, 'sqlstate', '')}".strip()
    return type(exc).__name__


WRITE_WAIT_S = 30
"""How long a writer waits for the file's write lock: at the gate, then in SQLite's busy
handler (`busy_timeout`), as long as before the gate."""

_GATES: dict[str, threading.RLock] = {}
_GATES_LOCK = threading.Lock()


def _write_gate(engine: Engine) -> threading.RLock:
    """One lock per SQLite file in this process, shared by every `Store` on it (an
    in-memory database has its own)."""
    database = engine.url.database
    if not database or database == ":memory:":
        return threading.RLock()
    key = os.path.realpath(database)
    with _GATES_LOCK:
        return _GATES.setdefault(key, threading.RLock())


def _wal(cursor: Any, wait_s: float = 30.0) -> None:
    """Switch the file to WAL (a property of the file, kept once set). Two workers opening
    a new file at once race to switch it, and the loser gets "database is locked" at once,
    without the busy wait: it tries again until the winner's switch shows."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(random.uniform(0.01, 0.05))
        else:
            return


@contextmanager
def read_only_connection(engine: Engine) -> Iterator[Connection]:
    """A connection whose transactions only read (`READ_ONLY`, read by the engine's
    `begin` listener): on SQLite a deferred `BEGIN`, which takes no write lock (WAL lets
    it read beside the writer); on PostgreSQL `SET TRANSACTION READ ONLY`, which refuses
    any write and takes no row lock. The store's reads, the migrations' and the insights'
    all open theirs here."""
    with engine.connect() as conn:
        yield conn.execution_options(**{READ_ONLY: True})


def _engine(url: str, *, schema: str | None, echo: bool) -> Engine:
    if url.startswith("sqlite"):
        in_memory = url in ("sqlite://", "sqlite:///:memory:")
        engine = create_engine(
            url,
            echo=echo,
            hide_parameters=True,  # bound values (a person, a phone, a note) stay out of errors
            connect_args={"check_same_thread": False, "timeout": WRITE_WAIT_S},
            poolclass=StaticPool if in_memory else None,
        )

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            # pysqlite's own transaction handling is turned off so that SQLAlchemy's BEGIN
            # is the real one; WAL lets readers run beside the one writer.
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            cursor.execute(f"PRAGMA busy_timeout={WRITE_WAIT_S * 1000}")
            if not in_memory:
                _wal(cursor)
            # Every commit reaches the disk before the broker is told (an ack, a publish):
            # stated, not left to the build's default, which may be NORMAL under WAL.
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            # Take the write lock at the start: no deadlock between two upgrading readers.
            # A read-only connection (`read_only_connection`) takes none: WAL lets it read
            # beside the writer.
            if conn.get_execution_options().get(READ_ONLY):
                conn.exec_driver_sql("BEGIN")
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    connect_args: dict[str, Any] = {}
    if schema:
        connect_args["options"] = f"-csearch_path={schema}"
    engine = create_engine(
        url, echo=echo, hide_parameters=True, pool_pre_ping=True, connect_args=connect_args
    )

    @event.listens_for(engine, "begin")
    def _read_only(conn: Any) -> None:
        # A reading connection's transactions are read-only: PostgreSQL refuses a write
        # there, and it takes no row lock a writer would wait for.
        if conn.get_execution_options().get(READ_ONLY):
            conn.exec_driver_sql("SET TRANSACTION READ ONLY")

    return engine


__all__ = [
    "AuditRow",
    "Conflict",
    "LedgerTx",
    "OutboxRow",
    "ReferralRow",
    "SignalRow",
    "Store",
    "UnsentRow",
]
