"""The audit: who did what to which person, signal, referral or consent, and why."""

from __future__ import annotations

from datetime import datetime

from partnerbus.ledger import tables as t
from partnerbus.ledger.repos.base import Prepared, Repository

# Built once and run as `Prepared` (its SQL rendered once per dialect, issue 9).
INSERT = Prepared(t.audit.insert())


class AuditRepository(Repository):
    """Appends audit records (only retention rewrites them; `Store.audit_trail` reads)."""

    def record(
        self,
        actor: str,
        action: str,
        subject: str,
        at: datetime,
        *,
        person_ref: str | None = None,
        partner_id: str | None = None,
        why: str | None = None,
    ) -> None:
        INSERT(
            self.conn,
            {
                "at": at,
                "actor": actor,
                "action": action,
                "subject": subject,
                "person_ref": person_ref,
                "partner_id": partner_id,
                "why": why,
            },
        )
