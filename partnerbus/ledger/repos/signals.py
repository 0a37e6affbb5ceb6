"""Signals as received, and the state of each of their needs."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, func, select, update

from partnerbus.ledger import tables as t
from partnerbus.ledger.repos.base import Repository, row_of
from partnerbus.schemas import Signal

# Built once; the values go as execute() parameters, so each call reuses the compiled
# statement instead of building and cache-keying a new `.values(...)` construct (issue 9).
INSERT = t.signals.insert()
# The hot reads, built once with bound parameters (see INSERT).
GET = select(t.signals).where(t.signals.c.signal_id == bindparam("signal_id"))
PARKED = (
    select(t.signal_needs.c.signal_id, t.signal_needs.c.need)
    .join(t.signals, t.signals.c.signal_id == t.signal_needs.c.signal_id)
    .where(t.signals.c.person_ref == bindparam("person_ref"), t.signal_needs.c.state == "parked")
    .order_by(t.signals.c.received_at, t.signal_needs.c.signal_id, t.signal_needs.c.need)
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
        self.conn.execute(INSERT, dataclasses.asdict(row))
        return row

    def get(self, signal_id: str) -> SignalRow | None:
        row = self.conn.execute(GET, {"signal_id": signal_id}).first()
        return row_of(SignalRow, row) if row else None

    def rewrite(self, signal_id: str, **values: Any) -> None:
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
