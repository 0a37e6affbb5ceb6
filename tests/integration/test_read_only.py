"""Read-only transactions take no write lock; writing ones stay durable (synchronous=FULL)."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import text
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
