"""What retention erases, anonymises and forgets, across signals, referrals, consents,
the journal and the audit (the outbox's own retention stays with the outbox)."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select, update

from partnerbus.ledger import tables as t
from partnerbus.ledger.repos.base import Repository, row_of
from partnerbus.ledger.repos.signals import SignalRow

FREE_TEXT_AUDIT_ACTIONS = (
    "consent-revoked",
    "dead-letter-read",
    "dead-letter-replayed",
    "dead-letter-purged",
)
"""Audit actions whose `why` holds free text (a revocation's reason, a dead letter's
reason that may quote the message): erased with the other free text."""


class RetentionRepository(Repository):
    """The reads and rewrites of the retention sweep: texts past their time, signals to
    anonymise, ended consents, people to forget."""

    def signals_with_text_before(self, cutoff: datetime) -> list[SignalRow]:
        rows = self.conn.execute(
            select(t.signals).where(
                t.signals.c.received_at < cutoff,
                t.signals.c.note_deleted_at.is_(None),
                t.signals.c.anonymised_at.is_(None),
            )
        )
        return [row_of(SignalRow, r) for r in rows]

    def delete_partner_text_before(self, cutoff: datetime, bus_actor: str) -> int:
        """Erase what partners wrote (status notes, outcomes) before `cutoff`; the codes
        (status, rejection reason) stay. Returns how many texts were erased."""
        self.cache.clear()  # it rewrites referral rows this transaction may have read
        notes = self.conn.execute(
            update(t.referral_history)
            .where(
                t.referral_history.c.at < cutoff,
                t.referral_history.c.actor != bus_actor,
                t.referral_history.c.reason.is_not(None),
            )
            .values(reason=None)
        ).rowcount
        outcomes = self.conn.execute(
            update(t.referrals)
            .where(t.referrals.c.updated_at < cutoff, t.referrals.c.outcome.is_not(None))
            .values(outcome=None)
        ).rowcount
        return int(notes) + int(outcomes)

    def signals_closed_before(self, cutoff: datetime) -> list[SignalRow]:
        """Signals not yet anonymised whose needs are all settled and whose referrals all
        closed before `cutoff` (a signal still parked or followed is kept)."""
        open_needs = select(t.signal_needs.c.signal_id).where(
            t.signal_needs.c.state.in_(("parked", "routed"))
        )
        recent = select(t.referrals.c.signal_id).where(
            or_(t.referrals.c.closed_at.is_(None), t.referrals.c.closed_at >= cutoff)
        )
        rows = self.conn.execute(
            select(t.signals).where(
                t.signals.c.anonymised_at.is_(None),
                t.signals.c.received_at < cutoff,
                t.signals.c.signal_id.not_in(open_needs),
                t.signals.c.signal_id.not_in(recent),
            )
        )
        return [row_of(SignalRow, r) for r in rows]

    def anonymise_person_records(self, signal_id: str, token: str, now: datetime) -> None:
        """Replace the person's reference by a token in the audit records of this signal and
        its referrals (not in those of the person's other, maybe still open, signals)."""
        self.cache.clear()  # it rewrites referral rows this transaction may have read
        referral_ids = select(t.referrals.c.referral_id).where(t.referrals.c.signal_id == signal_id)
        self.conn.execute(
            update(t.referrals)
            .where(t.referrals.c.signal_id == signal_id)
            .values(anonymised_at=now, outcome=None)
        )
        self.conn.execute(
            update(t.audit)
            .where(or_(t.audit.c.subject == signal_id, t.audit.c.subject.in_(referral_ids)))
            .values(person_ref=token)
        )

    def anonymise_consents_ended_before(self, cutoff: datetime) -> int:
        """Consents that ended (expired or revoked) before `cutoff` keep their scope and dates
        as proof, under a random token instead of the person's reference."""
        self.cache.clear()  # it rewrites rows this transaction may have read
        ended = self.ended_consents_before(cutoff)
        for consent_id in ended:
            self.anonymise_consent(consent_id, f"anon-{uuid.uuid4().hex[:16]}")
        return len(ended)

    def ended_consents_before(self, cutoff: datetime) -> list[str]:
        """Ids of the consents, still under the person's reference, that ended (expired or
        revoked) before `cutoff`."""
        rows = self.conn.execute(
            select(t.consents.c.consent_id)
            .where(
                ~t.consents.c.person_ref.startswith("anon-"),
                or_(t.consents.c.valid_until < cutoff, t.consents.c.revoked_at < cutoff),
            )
            .order_by(t.consents.c.consent_id)
        )
        return [r.consent_id for r in rows]

    def anonymise_consent(self, consent_id: str, token: str) -> None:
        """An ended consent keeps its scope and dates as proof, under `token` instead of the
        person's reference; its journal keeps the events without their bodies, and its audit
        records lose the revocation's free-text reason."""
        self.cache.clear()  # it rewrites rows this transaction may have read
        self.conn.execute(
            update(t.consents).where(t.consents.c.consent_id == consent_id).values(person_ref=token)
        )
        self.conn.execute(
            update(t.consent_journal)
            .where(t.consent_journal.c.consent_id == consent_id)
            .values(person_ref=token, body="{}")
        )
        self.conn.execute(
            update(t.audit).where(t.audit.c.subject == consent_id).values(person_ref=token)
        )
        self.conn.execute(
            update(t.audit)
            .where(t.audit.c.subject == consent_id, t.audit.c.action == "consent-revoked")
            .values(why=None)
        )

    def persons_to_forget(self, cutoff: datetime) -> list[str]:
        """People with traces older than `cutoff` (consent journal rows such as refusals,
        audit records such as reads of their consents) and nothing left on record under
        their reference: no signal and no consent that is not anonymised yet."""

        def on_record(person_ref: Any) -> Any:
            """A signal or a consent still carries this reference (not anonymised)."""
            return or_(
                select(t.signals.c.person_ref).where(t.signals.c.person_ref == person_ref).exists(),
                select(t.consents.c.person_ref)
                .where(t.consents.c.person_ref == person_ref)
                .exists(),
            )

        journal = select(t.consent_journal.c.person_ref).where(
            t.consent_journal.c.at < cutoff,
            ~t.consent_journal.c.person_ref.startswith("anon-"),
            ~on_record(t.consent_journal.c.person_ref),
        )
        audit = select(t.audit.c.person_ref).where(
            t.audit.c.at < cutoff,
            t.audit.c.person_ref.is_not(None),
            ~t.audit.c.person_ref.startswith("anon-"),
            ~on_record(t.audit.c.person_ref),
        )
        found = {r[0] for r in self.conn.execute(journal.distinct())}
        found |= {r[0] for r in self.conn.execute(audit.distinct())}
        return sorted(found)

    def forget_person(self, person_ref: str, token: str, cutoff: datetime) -> int:
        """Replace the person's reference by `token` in every trace older than `cutoff`:
        the consent journal (refusals included; their bodies are emptied) and the audit
        records that name her (as the person, or as the subject of a read). Returns how
        many rows changed."""
        self.cache.clear()  # it rewrites rows this transaction may have read
        journal = self.conn.execute(
            update(t.consent_journal)
            .where(t.consent_journal.c.person_ref == person_ref, t.consent_journal.c.at < cutoff)
            .values(person_ref=token, body="{}")
        ).rowcount
        named = self.conn.execute(
            update(t.audit)
            .where(t.audit.c.person_ref == person_ref, t.audit.c.at < cutoff)
            .values(person_ref=token)
        ).rowcount
        subject = self.conn.execute(
            update(t.audit)
            .where(t.audit.c.subject == person_ref, t.audit.c.at < cutoff)
            .values(subject=token)
        ).rowcount
        return int(journal) + int(named) + int(subject)

    def delete_bus_free_text_before(self, cutoff: datetime) -> int:
        """Free text the bus keeps beside the codes: a revocation's reason (in the audit and
        in its journal body) and the reasons of dead letters that ops read, replayed or
        purged (they may quote the refused message). Returns how many texts were erased."""
        audit = self.conn.execute(
            update(t.audit)
            .where(
                t.audit.c.at < cutoff,
                t.audit.c.why.is_not(None),
                t.audit.c.action.in_(FREE_TEXT_AUDIT_ACTIONS),
            )
            .values(why=None)
        ).rowcount
        revoked = self.conn.execute(
            select(t.consent_journal.c.id, t.consent_journal.c.body).where(
                t.consent_journal.c.event == "revoked",
                t.consent_journal.c.at < cutoff,
                t.consent_journal.c.body.like('%"reason":"%'),
            )
        ).all()
        for row_id, body in revoked:
            values = json.loads(body)
            values["reason"] = None
            self.conn.execute(
                update(t.consent_journal)
                .where(t.consent_journal.c.id == row_id)
                .values(body=json.dumps(values))
            )
        return int(audit) + len(revoked)
