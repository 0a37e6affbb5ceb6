"""Each partner's capacity, as it last told it."""

from __future__ import annotations

from datetime import datetime

from partnerbus.ledger import tables as t
from partnerbus.ledger.repos.base import Repository


class CapacityRepository(Repository):
    """One row per partner, upserted on each capacity change."""

    def set(self, partner_id: str, status: str, remaining: int | None, now: datetime) -> None:
        self._upsert(
            t.partner_capacity,
            {"partner_id": partner_id},
            {"status": status, "remaining": remaining, "updated_at": now},
        )
