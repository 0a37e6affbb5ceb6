"""The hot writes run with `exec_driver_sql` (`Prepared`, issue 9) store exactly what
SQLAlchemy's `execute` stores, and fail as it fails (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import bindparam, event, select, update
from sqlalchemy.exc import IntegrityError

from partnerbus.ledger import tables as t
from partnerbus.ledger.repos.base import Prepared
from partnerbus.ledger.store import Store, is_conflict

PARIS = timezone(timedelta(hours=1))


def _outbox_values(message_id: str, at: datetime) -> dict[str, Any]:
    return {
        "message_id": message_id,
        "routing_key": "ccas-roubaix",
        "message_type": "referral",
        "body": '{"a": "é"}',
        "referral_id": None,
        "created_at": at,
    }


def test_a_prepared_insert_stores_what_execute_stores(store: Store) -> None:
    """Same row through both paths: an aware time in another zone comes back the same instant in UTC, text as given, the columns left out at their defaults (attempts 0, priority 2), the key from RETURNING."""
    at = datetime(2026, 11, 28, 13, 30, 15, 123456, tzinfo=PARIS)
    prepared = Prepared(t.outbox.insert().returning(t.outbox.c.id))
    with store.begin() as tx:
        tx.conn.execute(t.outbox.insert(), _outbox_values("m-core", at))
        row_id = prepared(tx.conn, _outbox_values("m-prepared", at)).scalar_one()
    with store.read() as tx:
        rows = {
            r.message_id: r for r in tx.conn.execute(select(t.outbox).order_by(t.outbox.c.id)).all()
        }
    core, fast = rows["m-core"], rows["m-prepared"]
    assert fast.id == row_id
    assert fast.created_at == at == core.created_at
    assert fast.created_at.tzinfo is not None and fast.created_at.utcoffset() == timedelta(0)
    assert (fast.body, fast.attempts, fast.priority) == ('{"a": "é"}', 0, 2)
    assert {k: v for k, v in fast._mapping.items() if k not in ("id", "message_id")} == {
        k: v for k, v in core._mapping.items() if k not in ("id", "message_id")
    }
    # as stored, not only as read back: SQLite keeps times as text, compared as text
    with store.read() as tx:
        stored = dict(
            tx.conn.exec_driver_sql("SELECT message_id, CAST(created_at AS TEXT) FROM outbox").all()
        )
    assert stored["m-prepared"] == stored["m-core"]


def test_a_prepared_update_sets_what_it_is_given_and_counts_its_rows(store: Store) -> None:
    """An UPDATE with named keys: the columns given are set, the rowcount says whether the key matched (the compare-and-set reads it)."""
    at = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    mark = Prepared(update(t.outbox).where(t.outbox.c.message_id == bindparam("where_message_id")))
    with store.begin() as tx:
        tx.conn.execute(t.outbox.insert(), _outbox_values("m-1", at))
        hit = mark(tx.conn, {"sent_at": at + timedelta(seconds=1), "where_message_id": "m-1"})
        miss = mark(tx.conn, {"sent_at": at, "where_message_id": "m-nobody"})
        assert (hit.rowcount, miss.rowcount) == (1, 0)
    with store.read() as tx:
        sent = tx.conn.execute(select(t.outbox.c.sent_at)).scalar_one()
    assert sent == at + timedelta(seconds=1)


def test_a_prepared_write_fails_as_execute_fails(store: Store) -> None:
    """A duplicate key is SQLAlchemy's IntegrityError, as through `execute` (on PostgreSQL the unique violation a re-run settles, `is_conflict`); a naive time is refused before anything is written; statement events still see it."""
    at = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    insert = Prepared(t.processed.insert())
    seen: list[str] = []
    event.listen(store.engine, "before_cursor_execute", lambda _c, _cur, sql, *_: seen.append(sql))
    with store.begin() as tx:
        insert(tx.conn, {"message_id": "m", "queue": "q", "processed_at": at})
    assert any(s.startswith("INSERT INTO processed_messages") for s in seen)
    with pytest.raises(IntegrityError) as raised, store.begin() as tx:
        insert(tx.conn, {"message_id": "m", "queue": "q", "processed_at": at})
    assert is_conflict(raised.value) == (not store.is_sqlite)
    with pytest.raises(ValueError, match="naive datetime refused"), store.begin() as tx:
        insert(tx.conn, {"message_id": "m2", "queue": "q", "processed_at": datetime(2026, 1, 1)})


def test_what_cannot_be_prepared_is_refused_when_first_run(store: Store) -> None:
    """An IN list (expanding) and a column left out that has no default are refused with their name, not run wrong."""
    expanding = Prepared(
        update(t.outbox)
        .where(t.outbox.c.id.in_(bindparam("ids", expanding=True)))
        .values(sent_at=bindparam("now"))
    )
    without = Prepared(update(t.outbox).where(t.outbox.c.id == bindparam("where_id")))
    at = datetime(2026, 11, 28, tzinfo=UTC)
    with store.begin() as tx:
        with pytest.raises(ValueError, match="ids: an expanding parameter"):
            expanding(tx.conn, {"ids": [1, 2], "now": at})
        with pytest.raises(ValueError, match="where_id: neither given"):
            without(tx.conn, {"sent_at": at})
