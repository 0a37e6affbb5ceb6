"""Read-only transactions take no write lock; writing ones stay durable (synchronous=FULL)."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import DBAPIError

from partnerbus.ledger.store import Store


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
