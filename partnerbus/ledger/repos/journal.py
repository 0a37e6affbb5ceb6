"""The consent journal: every grant, refusal and revocation as it came, with its body."""

from __future__ import annotations

from datetime import datetime

from partnerbus.ledger import tables as t
from partnerbus.ledger.repos.base import Prepared, Repository

# Built once and run as `Prepared` (its SQL rendered once per dialect, issue 9).
INSERT = Prepared(t.consent_journal.insert())


class JournalRepository(Repository):
    """Appends to the consent journal (only retention rewrites it)."""

    def record(
        self,
        consent_id: str | None,
        person_ref: str,
        event_name: str,
        by: str,
        at: datetime,
        body: str,
    ) -> None:
        INSERT(
            self.conn,
            {
                "consent_id": consent_id,
                "person_ref": person_ref,
                "event": event_name,
                "by": by,
                "at": at,
                "body": body,
            },
        )
