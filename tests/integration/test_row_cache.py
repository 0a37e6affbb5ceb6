"""The per-transaction row cache (issue 9): a transaction reads a referral, its consent and
its signal once, and never acts on a stale copy — after its own write, after a savepoint
rolled back, after retention rewrote the rows (SQLite and PostgreSQL)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import event

from partnerbus.ledger.store import Store
from partnerbus.schemas import utcnow
from tests.conftest import make_ledger
from tests.integration.test_relay_windows import decide


def counting(store: Store) -> list[str]:
    seen: list[str] = []

    @event.listens_for(store.engine, "before_cursor_execute")
    def _count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement.split()[0].upper() + " " + statement.split("FROM")[-1].split()[0])

    return seen


def test_a_referral_is_read_once_and_seen_as_written(store: Store) -> None:
    """Read three times (the last two locked): one SELECT on SQLite, where BEGIN IMMEDIATE holds everything; on PostgreSQL the first locked read goes to the database (FOR UPDATE), the reads after it do not. After the compare-and-set the cached row carries the new status."""
    ledger = make_ledger(store)
    (rid,) = decide(ledger, 100, 1)
    statements = counting(store)
    with store.begin() as tx:
        first = tx.referrals.get(rid)
        assert first is not None and first.status == "requested"
        again = tx.referrals.get(rid, lock=True)
        assert again == first
        tx.referrals.update(rid, "requested", now=utcnow(), status="delivered")
        after = tx.referrals.get(rid, lock=True)
        assert after is not None and after.status == "delivered"
    reads = [s for s in statements if s == "SELECT referrals"]
    assert len(reads) == (1 if store.is_sqlite else 2), statements


def test_a_savepoint_rolled_back_drops_what_it_read_and_wrote(store: Store) -> None:
    """A write in a savepoint that rolls back: the next read sees the row as the database has it, not the rolled-back copy."""
    ledger = make_ledger(store)
    (rid,) = decide(ledger, 200, 1)
    with store.begin() as tx:
        tx.referrals.get(rid, lock=True)

        def write_then_fail() -> None:
            with tx.savepoint():
                tx.referrals.update(rid, "requested", now=utcnow(), status="delivered")
                raise RuntimeError("rolled back")

        with pytest.raises(RuntimeError):
            write_then_fail()
        seen = tx.referrals.get(rid, lock=True)
        assert seen is not None and seen.status == "requested"


def test_a_conflict_drops_the_cached_row(store: Store) -> None:
    """A compare-and-set that finds another status drops the cached copy: a re-read sees the database's row."""
    ledger = make_ledger(store)
    (rid,) = decide(ledger, 300, 1)
    with store.begin() as tx:
        tx.referrals.get(rid, lock=True)
        with pytest.raises(Exception, match="no longer"), tx.savepoint():
            tx.referrals.update(rid, "accepted", now=utcnow(), status="completed")
        assert ("referral", rid) not in tx.cache.rows


def test_retention_rewrites_drop_the_cache(store: Store) -> None:
    """Retention anonymising a signal's referrals in the same transaction: a later read sees it."""
    ledger = make_ledger(store)
    (rid,) = decide(ledger, 400, 1)
    with store.begin() as tx:
        referral = tx.referrals.get(rid, lock=True)
        assert referral is not None and referral.anonymised_at is None
        tx.retention.anonymise_person_records(referral.signal_id, "anon-x", ledger.clock())
        again = tx.referrals.get(rid, lock=True)
        assert again is not None and again.anonymised_at is not None


def test_a_window_is_read_in_three_statements(store: Store) -> None:
    """`prefetch_referrals` for 20 referrals: three SELECTs (referrals, consents, signals); the relay's checks then read nothing more on SQLite, and on PostgreSQL only what takes a lock (each consent's share lock)."""
    ledger = make_ledger(store)
    rids = decide(ledger, 500, 20)
    statements = counting(store)
    with store.begin() as tx:
        tx.prefetch_referrals(rids)
        assert [s for s in statements if s.startswith("SELECT")] == [
            "SELECT referrals",
            "SELECT consents",
            "SELECT signals",
        ]
        for rid in rids:
            referral = tx.referrals.get(rid)
            assert referral is not None
            assert tx.signals.get(referral.signal_id) is not None
            assert tx.consents.get(referral.consent_id, lock="share") is not None
    selects = [s for s in statements if s.startswith("SELECT")]
    # on PostgreSQL each share lock on a consent is still taken by a read
    assert len(selects) == (3 if store.is_sqlite else 3 + len(rids)), selects
