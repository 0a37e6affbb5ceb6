"""Read-only transactions take no write lock; writing ones stay durable (synchronous=FULL)."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import DBAPIError

from partnerbus.ledger.store import LedgerTx, Store


def test_a_read_runs_while_a_writer_holds_the_lock(store: Store) -> None:
    """`Store.read()` reads while another transaction holds the write lock (SQLite) and refuses writes (PostgreSQL)."""
    holding = threading.Event()
    release = threading.Event()

    def writer() -> None:
        with store.begin() as tx:
            tx.conn.execute(text("SELECT 1"))
            holding.set()
            release.wait(10)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert holding.wait(10)
        with store.read() as tx:
            assert tx.conn.execute(text("SELECT count(*) FROM signals")).scalar_one() == 0
        with store.begin(readonly=True) as tx:
            assert tx.conn.execute(text("SELECT 1")).scalar_one() == 1
    finally:
        release.set()
        thread.join()
    if not store.is_sqlite:
        with pytest.raises(DBAPIError), store.read() as tx:
            tx.conn.execute(text("DELETE FROM signals"))


def test_sqlite_commits_are_fully_synchronous(tmp_path) -> None:
    """A SQLite ledger runs with synchronous=FULL (2): a commit survives a power cut."""
    s = Store(f"sqlite:///{tmp_path / 'sync.db'}")
    try:
        with s.begin() as tx:
            assert tx.conn.exec_driver_sql("PRAGMA synchronous").scalar_one() == 2
    finally:
        s.dispose()


def test_sqlite_writers_of_one_process_take_turns_at_the_write_gate(tmp_path) -> None:
    """Two stores on one SQLite file share a gate: a writer waits there (not in SQLite's busy handler, which sleeps up to 100 ms between tries) and starts once the other commits."""
    url = f"sqlite:///{tmp_path / 'gate.db'}"
    first, second = Store(url), Store(url)
    first.create_all()
    holding = threading.Event()
    release = threading.Event()
    began: list[str] = []

    def writer() -> None:
        with first.begin() as tx:
            tx.conn.execute(text("SELECT 1"))
            holding.set()
            release.wait(10)
            began.append("first commits")

    def other() -> None:
        with second.begin() as tx:
            began.append("second begins")
            tx.conn.execute(text("SELECT 1"))

    issued: list[str] = []
    event.listen(
        second.engine,
        "before_cursor_execute",
        lambda _conn, _cursor, statement, *_: issued.append(statement),
    )
    a = threading.Thread(target=writer)
    a.start()
    try:
        assert holding.wait(10)
        b = threading.Thread(target=other)
        b.start()
        # Held at the gate: it has not even sent its BEGIN (without the gate it would, at
        # once, and wait inside SQLite). A bounded look at something that must not happen.
        b.join(0.2)
        assert b.is_alive() and began == [] and issued == []
        release.set()
        b.join(10)
        assert began == ["first commits", "second begins"]
    finally:
        release.set()
        a.join(10)
        first.dispose()
        second.dispose()


def test_a_writer_held_at_the_gate_too_long_fails_as_transient(tmp_path, monkeypatch) -> None:
    """The gate waits as long as SQLite's busy timeout would, then fails like it: "database is locked", a transient failure (the message is retried, never dead-lettered for it)."""
    from partnerbus.handlers.delivery import is_transient
    from partnerbus.ledger import store as store_module

    monkeypatch.setattr(store_module, "WRITE_WAIT_S", 0.05)
    url = f"sqlite:///{tmp_path / 'gate.db'}"
    first, second = Store(url), Store(url)
    first.create_all()
    holding = threading.Event()
    release = threading.Event()

    def writer() -> None:
        with first.begin():
            holding.set()
            release.wait(10)

    a = threading.Thread(target=writer)
    a.start()
    try:
        assert holding.wait(10)
        with pytest.raises(DBAPIError, match="database is locked") as failed, second.begin():
            pass
        assert is_transient(failed.value)
    finally:
        release.set()
        a.join(10)
        first.dispose()
        second.dispose()


def test_a_writing_transaction_holds_the_write_lock_from_its_start(tmp_path) -> None:
    """SQLite: `Store.begin()` takes the file's write lock at BEGIN (IMMEDIATE), before it
    writes anything: another connection cannot start writing meanwhile. A read (`read()`)
    takes none, and its mark does not stay on the pooled connection: the next writing
    transaction on it takes the lock again."""
    import sqlite3

    path = tmp_path / "begin.db"
    s = Store(f"sqlite:///{path}")
    s.create_all()
    other = sqlite3.connect(path, timeout=0, isolation_level=None)

    def other_can_write() -> bool:
        try:
            other.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc):
                raise
            return False
        other.execute("ROLLBACK")
        return True

    try:
        for _ in range(2):  # the second round reuses the pooled connection
            with s.read() as tx:
                tx.conn.execute(text("SELECT count(*) FROM signals")).scalar_one()
                assert other_can_write()
            with s.begin() as tx:
                tx.conn.execute(text("SELECT 1"))
                assert not other_can_write()
            assert other_can_write()
    finally:
        other.close()
        s.dispose()


def test_a_writing_transaction_is_atomic(store: Store) -> None:
    """What a transaction wrote before it failed is rolled back whole, on both engines."""

    def fails(tx: LedgerTx) -> None:
        tx.conn.execute(
            text(
                "INSERT INTO processed_messages (message_id, queue, processed_at) "
                "VALUES ('m-atomic', 'q', CURRENT_TIMESTAMP)"
            )
        )
        raise RuntimeError("the use case failed")

    with pytest.raises(RuntimeError, match="the use case failed"):
        store.run(fails)
    with store.read() as tx:
        assert (
            tx.conn.execute(
                text("SELECT count(*) FROM processed_messages WHERE message_id = 'm-atomic'")
            ).scalar_one()
            == 0
        )


def test_a_read_only_mark_does_not_outlive_its_connection(store: Store) -> None:
    """After a read-only transaction, the pooled connection writes again (PostgreSQL:
    its next transaction is not `READ ONLY`)."""
    for _ in range(3):
        with store.read() as tx:
            tx.conn.execute(text("SELECT 1"))
        with store.begin() as tx:
            tx.conn.execute(
                text(
                    "INSERT INTO processed_messages (message_id, queue, processed_at) "
                    "VALUES (:m, 'q', CURRENT_TIMESTAMP)"
                ),
                {"m": f"m-{_}"},
            )
