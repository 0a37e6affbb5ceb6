"""Each partner's capacity, as it last told it, and the referrals holding its places."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

from sqlalchemy import bindparam, func, select

from partnerbus.ledger import tables as t
from partnerbus.ledger.repos.base import Repository, advisory_lock

# The hot reads, built once with bound parameters (issue 9).
GET = select(t.partner_capacity.c.status, t.partner_capacity.c.remaining).where(
    t.partner_capacity.c.partner_id == bindparam("partner_id")
)
TAKEN = (
    select(func.count())
    .select_from(t.referrals)
    .where(
        t.referrals.c.partner_id == bindparam("partner_id"),
        t.referrals.c.status.in_(bindparam("statuses", expanding=True)),
    )
)


class CapacityRepository(Repository):
    """One row per partner, upserted on each capacity change; and, for the routing
    decision, the partner's places taken by its open referrals, under the partner's lock."""

    def set(self, partner_id: str, status: str, remaining: int | None, now: datetime) -> None:
        self.cache.put("capacity", partner_id, (status, remaining))
        self._upsert(
            t.partner_capacity,
            {"partner_id": partner_id},
            {"status": status, "remaining": remaining, "updated_at": now},
        )

    def get(self, partner_id: str) -> tuple[str, int | None] | None:
        """The partner's last capacity event: (status, remaining); None if it never sent
        one (the directory's declaration then stands)."""
        # Read once per transaction (a batch routes many signals to the same partners),
        # on either engine: this read is not what guards the places (`lock` and `taken`
        # are), so reading it once is as good as reading it at the transaction's start.
        cached = self.cache.entry("capacity", partner_id)
        if cached is not None:
            return cached[0]  # type: ignore[no-any-return]
        row = self.conn.execute(GET, {"partner_id": partner_id}).first()
        found = (row.status, row.remaining) if row is not None else None
        self.cache.put("capacity", partner_id, found)
        return found

    def lock(self, partner_id: str) -> None:
        """Serialise, until this transaction ends, every decision to give this partner one
        of its places: two workers routing at once never both take the last one.
        A PostgreSQL transaction-scoped advisory lock; SQLite's BEGIN IMMEDIATE already
        serialises every writer."""
        advisory_lock(self.conn, "partner-capacity", partner_id)

    def taken(self, partner_id: str, open_statuses: Collection[str]) -> int:
        """How many of the partner's referrals are in one of `open_statuses`: the places
        they hold. Read after `lock`, it counts every referral committed before. Read once
        per transaction and partner (a batch routes many signals to the same partners):
        the referrals this transaction adds or moves are counted as it writes them
        (`RowCache.count_referral`); while the lock is held no other transaction gives the
        partner a place, and one freeing a place meanwhile is seen by the next."""
        statuses = frozenset(open_statuses)
        counted = self.cache.taken(partner_id, statuses)
        if counted is not None:
            return counted
        count = int(
            self.conn.execute(
                TAKEN, {"partner_id": partner_id, "statuses": sorted(statuses)}
            ).scalar_one()
        )
        self.cache.put_taken(partner_id, statuses, count)
        return count
