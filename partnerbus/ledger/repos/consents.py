"""Consents as the advisors collected them, and their revocations."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select, update

from partnerbus.ledger import tables as t
from partnerbus.ledger.repos.base import Prepared, Repository
from partnerbus.rules.consent import ConsentRecord
from partnerbus.schemas import ConsentScope

# Built once and run as `Prepared` (its SQL rendered once per dialect, issue 9).
INSERT = Prepared(t.consents.insert())
# The hot reads, built once with bound parameters (see INSERT).
GET = select(t.consents).where(t.consents.c.consent_id == bindparam("consent_id"))
GET_SHARE = GET.with_for_update(read=True)
GET_UPDATE = GET.with_for_update(read=False)
OF_PERSON = (
    select(t.consents)
    .where(t.consents.c.person_ref == bindparam("person_ref"))
    .order_by(t.consents.c.granted_at, t.consents.c.consent_id)
)


def _consent(row: Any) -> ConsentRecord:
    values = dict(row._mapping)
    values["scope"] = ConsentScope.model_validate_json(values["scope"])
    return ConsentRecord(**values)


class ConsentRepository(Repository):
    """Consent records: added once, revoked once, read with or without a lock."""

    def add(self, row: ConsentRecord) -> bool:
        if self.get(row.consent_id) is not None:
            return False
        INSERT(
            self.conn,
            {
                "consent_id": row.consent_id,
                "person_ref": row.person_ref,
                "scope": row.scope.model_dump_json(),
                "collected_by": row.collected_by,
                "agency": row.agency,
                "method": row.method,
                "granted_at": row.granted_at,
                "valid_until": row.valid_until,
                "revoked_at": row.revoked_at,
            },
        )
        return True

    def get(self, consent_id: str, *, lock: str | None = None) -> ConsentRecord | None:
        """A consent; `lock="share"` keeps it from being revoked until this transaction
        ends (the relay, while it sends under it), `lock="update"` takes it for a change."""
        cached = self.cache.get("consent", consent_id, lock=lock is not None)
        if cached is not None:
            return cached  # type: ignore[no-any-return]
        query = GET if lock is None else GET_SHARE if lock == "share" else GET_UPDATE
        row = self.conn.execute(query, {"consent_id": consent_id}).first()
        if row is None:
            return None
        consent = _consent(row)
        # only FOR UPDATE serves a later locking read on PostgreSQL (a share lock is weaker)
        self.cache.put("consent", consent_id, consent, locked=lock == "update")
        return consent

    def prefetch(self, consent_ids: Collection[str]) -> None:
        """Read these consents in one statement, for `get` to serve where it may (see
        `RowCache`: on SQLite; on PostgreSQL a locking `get` still reads)."""
        self._prefetch("consent", t.consents.c.consent_id, consent_ids, _consent)

    def of_person(self, person_ref: str) -> list[ConsentRecord]:
        rows = self.conn.execute(OF_PERSON, {"person_ref": person_ref})
        return [_consent(r) for r in rows]

    def revoke(self, consent_id: str, at: datetime, by: str) -> bool:
        """Revoke once: False if it already was (the first revocation stands)."""
        self.cache.drop("consent", consent_id)
        return bool(
            self.conn.execute(
                update(t.consents)
                .where(t.consents.c.consent_id == consent_id, t.consents.c.revoked_at.is_(None))
                .values(revoked_at=at, revoked_by=by)
            ).rowcount
        )

    def mark_expiry_notified(self, consent_id: str, at: datetime) -> None:
        self.cache.drop("consent", consent_id)
        self.conn.execute(
            update(t.consents)
            .where(t.consents.c.consent_id == consent_id)
            .values(expiry_notified_at=at)
        )

    def unnotified(self, ending_by: datetime) -> list[ConsentRecord]:
        """Consents not revoked, whose advisor was not yet told that they end, ending at or
        before `ending_by` (only those the expiry notice may concern are read)."""
        rows = self.conn.execute(
            select(t.consents).where(
                t.consents.c.revoked_at.is_(None),
                t.consents.c.expiry_notified_at.is_(None),
                t.consents.c.valid_until <= ending_by,
            )
        )
        return [_consent(r) for r in rows]
