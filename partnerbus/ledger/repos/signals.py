"""Signals as received, and the state of each of their needs."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy import and_, bindparam, case, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from partnerbus.ledger import tables as t
from partnerbus.ledger.repos.base import Prepared, Repository, row_of
from partnerbus.schemas import Signal

# Built once and run as `Prepared` (its SQL rendered once per dialect, issue 9).
INSERT = Prepared(t.signals.insert())
# The hot reads, built once with bound parameters (see INSERT).
GET = select(t.signals).where(t.signals.c.signal_id == bindparam("signal_id"))
PARKED = (
    select(t.signal_needs.c.signal_id, t.signal_needs.c.need)
    .join(t.signals, t.signals.c.signal_id == t.signal_needs.c.signal_id)
    .where(t.signals.c.person_ref == bindparam("person_ref"), t.signal_needs.c.state == "parked")
    .order_by(t.signals.c.received_at, t.signal_needs.c.signal_id, t.signal_needs.c.need)
)


@dataclass(frozen=True)
class ParkedNeed:
    """A need waiting for the person's consent, as the parked-needs follow-up reads it."""

    signal_id: str
    need: str
    person_ref: str
    urgency: str
    agency: str | None
    parked_since: datetime
    reminded_at: datetime | None


@functools.cache
def _park_statement(dialect_name: str) -> Any:
    """Upsert of a need parked: a need already parked keeps when it began to wait and its
    reminder (a grant that routes other needs parks it again: its wait goes on); one that
    comes back to the consent gate (withdrawn, then rerouted) starts a new wait."""
    dialect = postgresql if dialect_name == "postgresql" else sqlite
    statement = dialect.insert(t.signal_needs)
    needs = t.signal_needs.c
    already = and_(needs.state == "parked", needs.parked_since.is_not(None))
    return statement.on_conflict_do_update(
        index_elements=["signal_id", "need"],
        set_={
            "state": statement.excluded.state,
            "detail": statement.excluded.detail,
            "updated_at": statement.excluded.updated_at,
            "parked_since": case(
                (already, needs.parked_since), else_=statement.excluded.updated_at
            ),
            "reminded_at": case((already, needs.reminded_at), else_=None),
        },
    )


@dataclass(frozen=True)
class SignalRow:
    signal_id: str
    source: str
    person_ref: str
    commune: str
    urgency: str
    agency: str | None
    advisor: str | None
    body: str
    received_at: datetime
    note_deleted_at: datetime | None
    anonymised_at: datetime | None

    def signal(self) -> Signal:
        return Signal.model_validate_json(self.body)


class SignalRepository(Repository):
    """Signals, the per-person lock, and each need's state (routed, parked, …)."""

    def add(
        self, signal: Signal, agency: str | None, advisor: str | None, now: datetime
    ) -> SignalRow:
        row = SignalRow(
            signal_id=signal.message_id,
            source=signal.source,
            person_ref=signal.person_ref,
            commune=signal.commune,
            urgency=signal.urgency,
            agency=agency,
            advisor=advisor,
            body=signal.model_dump_json(),
            received_at=now,
            note_deleted_at=None,
            anonymised_at=None,
        )
        INSERT(self.conn, vars(row))  # its fields (asdict would deep-copy each value)
        self.cache.put("signal", row.signal_id, row)
        return row

    def get(self, signal_id: str) -> SignalRow | None:
        # read once per transaction on either engine (`RowCache`); only retention rewrites
        # a signal, and it drops the cache
        cached = self.cache.get("signal", signal_id)
        if cached is not None:
            return cached  # type: ignore[no-any-return]
        row = self.conn.execute(GET, {"signal_id": signal_id}).first()
        if row is None:
            return None
        signal = row_of(SignalRow, row)
        self.cache.put("signal", signal_id, signal)
        return signal

    def prefetch(self, signal_ids: Collection[str]) -> None:
        """Read these signals in one statement, for `get` to serve (see `get`)."""
        self._prefetch("signal", t.signals.c.signal_id, signal_ids, partial(row_of, SignalRow))

    def rewrite(self, signal_id: str, **values: Any) -> None:
        self.cache.drop("signal", signal_id)
        self.conn.execute(
            update(t.signals).where(t.signals.c.signal_id == signal_id).values(**values)
        )

    def lock_person(self, person_ref: str) -> None:
        """Serialise, until this transaction ends, every decision about this person's
        consents and parked needs (a grant releasing parked needs against a signal or a
        reroute parking one: without it each could miss the other's uncommitted write).
        A PostgreSQL transaction-scoped advisory lock; SQLite's BEGIN IMMEDIATE already
        serialises every writer."""
        if self.conn.dialect.name != "postgresql":
            return
        key = int.from_bytes(
            hashlib.blake2b(person_ref.encode(), digest_size=8).digest(), "big", signed=True
        )
        self.conn.execute(select(func.pg_advisory_xact_lock(key)))

    def set_need_state(
        self, signal_id: str, need: str, state: str, detail: str | None, now: datetime
    ) -> None:
        if state == "parked":
            self.conn.execute(
                _park_statement(self.conn.dialect.name),
                {
                    "signal_id": signal_id,
                    "need": need,
                    "state": state,
                    "detail": detail,
                    "updated_at": now,
                    "parked_since": now,
                    "reminded_at": None,
                },
            )
            return
        self._upsert(
            t.signal_needs,
            {"signal_id": signal_id, "need": need},
            {"state": state, "detail": detail, "updated_at": now},
        )

    def need_state(self, signal_id: str, need: str) -> str | None:
        return self.conn.execute(
            select(t.signal_needs.c.state).where(
                t.signal_needs.c.signal_id == signal_id, t.signal_needs.c.need == need
            )
        ).scalar_one_or_none()

    def need_states(self, signal_id: str) -> dict[str, str]:
        rows = self.conn.execute(
            select(t.signal_needs.c.need, t.signal_needs.c.state).where(
                t.signal_needs.c.signal_id == signal_id
            )
        )
        return {r.need: r.state for r in rows}

    def parked_needs(self, person_ref: str) -> list[tuple[str, str]]:
        """(signal_id, need) pairs of this person waiting for consent, oldest first."""
        rows = self.conn.execute(PARKED, {"person_ref": person_ref})
        return [(r.signal_id, r.need) for r in rows]

    def parked(self, since_before: datetime) -> list[ParkedNeed]:
        """The needs waiting for consent since before `since_before`, oldest wait first
        (the follow-up's reads)."""
        needs = t.signal_needs.c
        rows = self.conn.execute(
            select(
                needs.signal_id,
                needs.need,
                t.signals.c.person_ref,
                t.signals.c.urgency,
                t.signals.c.agency,
                needs.parked_since,
                needs.reminded_at,
            )
            .join(t.signals, t.signals.c.signal_id == needs.signal_id)
            .where(needs.state == "parked", needs.parked_since < since_before)
            .order_by(needs.parked_since, needs.signal_id, needs.need)
        )
        return [row_of(ParkedNeed, r) for r in rows]

    def mark_parked_reminded(
        self, signal_id: str, need: str, since: datetime, now: datetime
    ) -> bool:
        """Record the advisor's reminder of this wait, once: False if the need is no
        longer parked since `since` or was reminded already (another pass, another worker)."""
        needs = t.signal_needs.c
        return bool(
            self.conn.execute(
                update(t.signal_needs)
                .where(
                    needs.signal_id == signal_id,
                    needs.need == need,
                    needs.state == "parked",
                    needs.parked_since == since,
                    needs.reminded_at.is_(None),
                )
                .values(reminded_at=now)
            ).rowcount
        )

    def close_parked(
        self, signal_id: str, need: str, since: datetime, state: str, detail: str, now: datetime
    ) -> bool:
        """Close a need that waited for consent since `since`, once: False if it is no
        longer parked (a consent released it, another pass or worker closed it)."""
        needs = t.signal_needs.c
        return bool(
            self.conn.execute(
                update(t.signal_needs)
                .where(
                    needs.signal_id == signal_id,
                    needs.need == need,
                    needs.state == "parked",
                    needs.parked_since == since,
                )
                .values(state=state, detail=detail, updated_at=now)
            ).rowcount
        )
