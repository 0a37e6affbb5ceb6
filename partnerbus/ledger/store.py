"""The durable record: consents, signals, referrals, their history, the outbox and the audit.

One `Store` per process; `store.begin()` opens a transaction (`LedgerTx`) in which a use case
records its state change, its dedupe mark and its outgoing messages together, so that a
message is acked only after all of it is committed, and sent only after that (outbox).
SQLite file by default, PostgreSQL by URL; `Store("sqlite://")` is an in-memory store for
tests and for partners who test against us.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import sqlite3
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    Engine,
    Table,
    and_,
    create_engine,
    delete,
    event,
    exists,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import StaticPool

from partnerbus.errors import PartnerbusError
from partnerbus.ledger import tables as t
from partnerbus.rules.consent import ConsentRecord
from partnerbus.schemas import ConsentScope, Message, Signal

log = logging.getLogger("partnerbus.ledger")
T = TypeVar("T")

RETRYABLE_SQLSTATES = frozenset({"40001", "40P01", "23505"})
"""PostgreSQL errors that mean "another transaction got there first", not "this is wrong":
serialization failure, deadlock detected, and a unique key another transaction has just
inserted (a concurrent upsert or dedupe mark). Re-running the transaction settles them."""
MAX_TRIES = 8
READ_ONLY = "partnerbus_read_only"


class Conflict(PartnerbusError):  # noqa: N818 - a signal to re-run, not an error
    """The row changed since this transaction read it (a compare-and-set found another
    status): the decision was made on a stale read, so the whole transaction re-runs."""


def is_conflict(exc: BaseException) -> bool:
    """True for a failure that re-running the transaction settles."""
    if isinstance(exc, Conflict):
        return True
    if isinstance(exc, DBAPIError):
        return getattr(exc.orig, "sqlstate", None) in RETRYABLE_SQLSTATES
    return False


def backoff(attempt: int) -> None:
    """A short random pause before the next try, so that two rivals do not meet again."""
    time.sleep(random.uniform(0, 0.005 * 2**attempt))


FREE_TEXT_AUDIT_ACTIONS = (
    "consent-revoked",
    "dead-letter-read",
    "dead-letter-replayed",
    "dead-letter-purged",
)
"""Audit actions whose `why` holds free text (a revocation's reason, a dead letter's
reason that may quote the message): erased with the other free text."""


@dataclass(frozen=True)
class ReferralRow:
    referral_id: str
    signal_id: str
    need: str
    attempt: int
    partner_id: str
    partner_kind: str
    consent_id: str
    status: str
    reason: str | None
    outcome: str | None
    urgency: str
    created_at: datetime
    updated_at: datetime
    sent_at: datetime | None
    due_at: datetime | None
    remind_at: datetime | None
    reminded: bool
    closed_at: datetime | None
    anonymised_at: datetime | None


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


@dataclass(frozen=True)
class OutboxRow:
    id: int
    message_id: str
    routing_key: str
    message_type: str
    body: str
    referral_id: str | None
    attempts: int
    priority: int = 2


@dataclass(frozen=True)
class UnsentRow:
    """An outbox row that never left (its body is not read: retention only counts it)."""

    id: int
    message_id: str
    routing_key: str
    message_type: str
    created_at: datetime
    attempts: int


@dataclass(frozen=True)
class AuditRow:
    at: datetime
    actor: str
    action: str
    subject: str
    person_ref: str | None
    partner_id: str | None
    why: str | None


def _row(cls: type[Any], row: Any) -> Any:
    return cls(**dict(row._mapping))


def _consent(row: Any) -> ConsentRecord:
    values = dict(row._mapping)
    values["scope"] = ConsentScope.model_validate_json(values["scope"])
    return ConsentRecord(**values)


URGENT_REFERRAL, ROUTINE_REFERRAL, OTHER = 0, 1, 2


def outbox_priority(message: Message) -> int:
    """Which outbox rows leave first when the relay is behind: an urgent or asap referral
    (0), then a routine referral (1), then the rest (2: notices to the source and the
    agency, reminders, withdrawals, statuses). A withdrawal or reminder still waits for its
    referral, whatever the priorities (`Store.claim_pending`)."""
    if getattr(message, "type", None) != "referral":
        return OTHER
    return (
        URGENT_REFERRAL if getattr(message, "urgency", "routine") != "routine" else ROUTINE_REFERRAL
    )


class LedgerTx:
    """What a use case may do inside one transaction."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    # dedupe --------------------------------------------------------------------------
    def first_time(self, message_id: str, queue: str, now: datetime) -> bool:
        """Record that this message was processed; False if it already was (a redelivery)."""
        seen = self.conn.execute(
            select(t.processed.c.message_id).where(
                t.processed.c.message_id == message_id, t.processed.c.queue == queue
            )
        ).first()
        if seen:
            return False
        self.conn.execute(
            t.processed.insert().values(message_id=message_id, queue=queue, processed_at=now)
        )
        return True

    # signals -------------------------------------------------------------------------
    def add_signal(
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
        self.conn.execute(t.signals.insert().values(**dataclasses.asdict(row)))
        return row

    def signal(self, signal_id: str) -> SignalRow | None:
        row = self.conn.execute(select(t.signals).where(t.signals.c.signal_id == signal_id)).first()
        return _row(SignalRow, row) if row else None

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
        rows = self.conn.execute(
            select(t.signal_needs.c.signal_id, t.signal_needs.c.need)
            .join(t.signals, t.signals.c.signal_id == t.signal_needs.c.signal_id)
            .where(t.signals.c.person_ref == person_ref, t.signal_needs.c.state == "parked")
            .order_by(t.signals.c.received_at, t.signal_needs.c.signal_id, t.signal_needs.c.need)
        )
        return [(r.signal_id, r.need) for r in rows]

    # consents ------------------------------------------------------------------------
    def add_consent(self, row: ConsentRecord) -> bool:
        if self.consent(row.consent_id) is not None:
            return False
        self.conn.execute(
            t.consents.insert().values(
                consent_id=row.consent_id,
                person_ref=row.person_ref,
                scope=row.scope.model_dump_json(),
                collected_by=row.collected_by,
                agency=row.agency,
                method=row.method,
                granted_at=row.granted_at,
                valid_until=row.valid_until,
                revoked_at=row.revoked_at,
            )
        )
        return True

    def consent(self, consent_id: str, *, lock: str | None = None) -> ConsentRecord | None:
        """A consent; `lock="share"` keeps it from being revoked until this transaction
        ends (the relay, while it sends under it), `lock="update"` takes it for a change."""
        query = select(t.consents).where(t.consents.c.consent_id == consent_id)
        if lock is not None:
            query = query.with_for_update(read=lock == "share")
        row = self.conn.execute(query).first()
        return _consent(row) if row else None

    def consents_of(self, person_ref: str) -> list[ConsentRecord]:
        rows = self.conn.execute(
            select(t.consents)
            .where(t.consents.c.person_ref == person_ref)
            .order_by(t.consents.c.granted_at, t.consents.c.consent_id)
        )
        return [_consent(r) for r in rows]

    def revoke_consent(self, consent_id: str, at: datetime, by: str) -> bool:
        """Revoke once: False if it already was (the first revocation stands)."""
        return bool(
            self.conn.execute(
                update(t.consents)
                .where(t.consents.c.consent_id == consent_id, t.consents.c.revoked_at.is_(None))
                .values(revoked_at=at, revoked_by=by)
            ).rowcount
        )

    def mark_expiry_notified(self, consent_id: str, at: datetime) -> None:
        self.conn.execute(
            update(t.consents)
            .where(t.consents.c.consent_id == consent_id)
            .values(expiry_notified_at=at)
        )

    def journal(
        self,
        consent_id: str | None,
        person_ref: str,
        event_name: str,
        by: str,
        at: datetime,
        body: str,
    ) -> None:
        self.conn.execute(
            t.consent_journal.insert().values(
                consent_id=consent_id,
                person_ref=person_ref,
                event=event_name,
                by=by,
                at=at,
                body=body,
            )
        )

    # referrals -----------------------------------------------------------------------
    def add_referral(self, **values: Any) -> None:
        self.conn.execute(t.referrals.insert().values(**values))

    def referral(self, referral_id: str, *, lock: bool = False) -> ReferralRow | None:
        """A referral; with `lock`, its row is held until this transaction ends
        (SELECT … FOR UPDATE on PostgreSQL; SQLite's BEGIN IMMEDIATE holds everything)."""
        query = select(t.referrals).where(t.referrals.c.referral_id == referral_id)
        if lock:
            query = query.with_for_update()
        row = self.conn.execute(query).first()
        return _row(ReferralRow, row) if row else None

    def referrals_for(self, signal_id: str, need: str | None = None) -> list[ReferralRow]:
        query = select(t.referrals).where(t.referrals.c.signal_id == signal_id)
        if need is not None:
            query = query.where(t.referrals.c.need == need)
        rows = self.conn.execute(query.order_by(t.referrals.c.need, t.referrals.c.attempt))
        return [_row(ReferralRow, r) for r in rows]

    def referrals_under_consent(
        self, consent_id: str, statuses: frozenset[str]
    ) -> list[ReferralRow]:
        rows = self.conn.execute(
            select(t.referrals)
            .where(t.referrals.c.consent_id == consent_id, t.referrals.c.status.in_(statuses))
            .order_by(t.referrals.c.referral_id)
        )
        return [_row(ReferralRow, r) for r in rows]

    def referrals_with_ended_consent(
        self, now: datetime, statuses: frozenset[str]
    ) -> list[ReferralRow]:
        """Referrals in `statuses` whose consent has run out (not revoked: revocation
        withdraws at once)."""
        rows = self.conn.execute(
            select(t.referrals)
            .join(t.consents, t.consents.c.consent_id == t.referrals.c.consent_id)
            .where(
                t.referrals.c.status.in_(statuses),
                t.consents.c.valid_until <= now,
                t.consents.c.revoked_at.is_(None),
            )
            .order_by(t.referrals.c.referral_id)
        )
        return [_row(ReferralRow, r) for r in rows]

    def waiting_referrals(self) -> list[ReferralRow]:
        """Referrals still waiting for the partner's answer, for the deadline watch."""
        rows = self.conn.execute(
            select(t.referrals)
            .where(t.referrals.c.status.in_(("requested", "delivered", "received")))
            .order_by(t.referrals.c.due_at, t.referrals.c.referral_id)
        )
        return [_row(ReferralRow, r) for r in rows]

    def unnotified_consents(self) -> list[ConsentRecord]:
        rows = self.conn.execute(
            select(t.consents).where(
                t.consents.c.revoked_at.is_(None), t.consents.c.expiry_notified_at.is_(None)
            )
        )
        return [_consent(r) for r in rows]

    def update_referral(self, referral_id: str, expected_status: str, **values: Any) -> None:
        """Compare-and-set: write only if the referral is still `expected_status` (the
        status the decision was made on); otherwise raise `Conflict` and the transaction
        re-runs on a fresh read. Every write of a referral's state goes through here."""
        changed = self.conn.execute(
            update(t.referrals)
            .where(
                t.referrals.c.referral_id == referral_id,
                t.referrals.c.status == expected_status,
            )
            .values(**values)
        ).rowcount
        if changed != 1:
            msg = f"referral {referral_id} is no longer {expected_status}"
            raise Conflict(msg)

    def record_transition(
        self,
        referral_id: str,
        from_status: str,
        to_status: str,
        outcome: str,
        actor: str,
        reason: str | None,
        at: datetime,
    ) -> None:
        self.conn.execute(
            t.referral_history.insert().values(
                referral_id=referral_id,
                from_status=from_status,
                to_status=to_status,
                outcome=outcome,
                actor=actor,
                reason=reason,
                at=at,
            )
        )

    # retention -----------------------------------------------------------------------
    def signals_with_text_before(self, cutoff: datetime) -> list[SignalRow]:
        rows = self.conn.execute(
            select(t.signals).where(
                t.signals.c.received_at < cutoff,
                t.signals.c.note_deleted_at.is_(None),
                t.signals.c.anonymised_at.is_(None),
            )
        )
        return [_row(SignalRow, r) for r in rows]

    def delete_partner_text_before(self, cutoff: datetime, bus_actor: str) -> int:
        """Erase what partners wrote (status notes, outcomes) before `cutoff`; the codes
        (status, rejection reason) stay. Returns how many texts were erased."""
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

    def rewrite_signal(self, signal_id: str, **values: Any) -> None:
        self.conn.execute(
            update(t.signals).where(t.signals.c.signal_id == signal_id).values(**values)
        )

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
        return [_row(SignalRow, r) for r in rows]

    def anonymise_person_records(self, signal_id: str, token: str, now: datetime) -> None:
        """Replace the person's reference by a token in the audit records of this signal and
        its referrals (not in those of the person's other, maybe still open, signals)."""
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

    def undeliverable_before(self, cutoff: datetime) -> list[UnsentRow]:
        """Unsent outbox rows created before `cutoff`, oldest first (without their bodies)."""
        rows = self.conn.execute(
            select(
                t.outbox.c.id,
                t.outbox.c.message_id,
                t.outbox.c.routing_key,
                t.outbox.c.message_type,
                t.outbox.c.created_at,
                t.outbox.c.attempts,
            )
            .where(t.outbox.c.sent_at.is_(None), t.outbox.c.created_at < cutoff)
            .order_by(t.outbox.c.id)
        )
        return [_row(UnsentRow, r) for r in rows]

    def expire_unsent(self, outbox_id: int, cutoff: datetime) -> bool:
        """Delete an unsent row older than `cutoff` unless a relay has sent it since; True if
        it was deleted. A relay's claim does not protect it: an undeliverable row is retried
        at every sweep, so it is claimed much of the time (a publish under way at that very
        instant may still land once; the relay's `mark_sent` then finds no row)."""
        return bool(
            self.conn.execute(
                delete(t.outbox).where(
                    t.outbox.c.id == outbox_id,
                    t.outbox.c.sent_at.is_(None),
                    t.outbox.c.created_at < cutoff,
                )
            ).rowcount
        )

    def delete_sent_outbox_before(self, cutoff: datetime) -> int:
        """Sent messages are copies of personal data: keep them only as long as needed."""
        return int(
            self.conn.execute(
                delete(t.outbox).where(t.outbox.c.sent_at.is_not(None), t.outbox.c.sent_at < cutoff)
            ).rowcount
        )

    def delete_processed_before(self, cutoff: datetime) -> int:
        return int(
            self.conn.execute(
                delete(t.processed).where(t.processed.c.processed_at < cutoff)
            ).rowcount
        )

    # outbox and audit ----------------------------------------------------------------
    def enqueue(
        self, message: Message, routing_key: str, now: datetime, referral_id: str | None = None
    ) -> None:
        """Record a message to send once this transaction commits (the outbox)."""
        self.conn.execute(
            t.outbox.insert().values(
                message_id=message.message_id,
                routing_key=routing_key,
                message_type=getattr(message, "type", type(message).__name__),
                body=message.model_dump_json(),
                referral_id=referral_id,
                created_at=now,
                attempts=0,
                priority=outbox_priority(message),
            )
        )

    def set_capacity(
        self, partner_id: str, status: str, remaining: int | None, now: datetime
    ) -> None:
        self._upsert(
            t.partner_capacity,
            {"partner_id": partner_id},
            {"status": status, "remaining": remaining, "updated_at": now},
        )

    def _upsert(self, table: Table, key: dict[str, Any], values: dict[str, Any]) -> None:
        """Insert or update in one statement (INSERT … ON CONFLICT DO UPDATE): two
        transactions writing the same key never both insert, nor lose the row."""
        dialect = postgresql if self.conn.dialect.name == "postgresql" else sqlite
        statement = dialect.insert(table).values(**key, **values)
        self.conn.execute(statement.on_conflict_do_update(index_elements=list(key), set_=values))

    def referral_rows(self, referral_id: str) -> list[tuple[int, int, bool]]:
        """The outbox rows carrying this referral itself: (id, claims, sent), oldest first.
        A row's claims count the relays' tries that may have published it (a claim given
        back untried is not counted)."""
        rows = self.conn.execute(
            select(t.outbox.c.id, t.outbox.c.attempts, t.outbox.c.sent_at)
            .where(t.outbox.c.referral_id == referral_id, t.outbox.c.message_type == "referral")
            .order_by(t.outbox.c.id)
        )
        return [(r.id, r.attempts, r.sent_at is not None) for r in rows]

    def pending_withdrawals(self, referral_id: str) -> list[int]:
        """Unsent `referral-withdrawn` rows of this referral (ids)."""
        rows = self.conn.execute(
            select(t.outbox.c.id).where(
                t.outbox.c.referral_id == referral_id,
                t.outbox.c.message_type == "referral-withdrawn",
                t.outbox.c.sent_at.is_(None),
            )
        )
        return [r.id for r in rows]

    def enqueue_again(
        self, message: Message, routing_key: str, now: datetime, referral_id: str | None = None
    ) -> None:
        """Send once more a message that left before (a replayed dead letter), after
        everything already in the outbox: the row it left in, if still kept, is replaced by
        a new one at the end. It counts as claimed once already, since it did reach the
        partner (so a withdrawal follows it if need be). Still waiting to leave: unchanged."""
        waiting = self.conn.execute(
            select(t.outbox.c.id).where(
                t.outbox.c.message_id == message.message_id, t.outbox.c.sent_at.is_(None)
            )
        ).first()
        if waiting is not None:
            return
        self.conn.execute(delete(t.outbox).where(t.outbox.c.message_id == message.message_id))
        self.conn.execute(
            t.outbox.insert().values(
                message_id=message.message_id,
                routing_key=routing_key,
                message_type=getattr(message, "type", type(message).__name__),
                body=message.model_dump_json(),
                referral_id=referral_id,
                created_at=now,
                attempts=1,
                priority=outbox_priority(message),
            )
        )

    def drop_outbox_row(self, outbox_id: int) -> None:
        """A claimed row that must not leave after all (its referral is closed, or its
        consent ran out): removed without being published."""
        self.conn.execute(delete(t.outbox).where(t.outbox.c.id == outbox_id))

    def mark_sent(self, outbox_id: int, now: datetime) -> None:
        self.mark_sent_many([outbox_id], now)

    def mark_sent_many(self, outbox_ids: Collection[int], now: datetime) -> None:
        """Record the broker's confirms of many rows in one statement."""
        if not outbox_ids:
            return
        self.conn.execute(
            update(t.outbox)
            .where(t.outbox.c.id.in_(list(outbox_ids)))
            .values(sent_at=now, claimed_until=None, last_error=None)
        )

    def release_untried(self, outbox_ids: Collection[int]) -> None:
        """Give back claimed rows that were never published (their claim did not count)."""
        if not outbox_ids:
            return
        self.conn.execute(
            update(t.outbox)
            .where(t.outbox.c.id.in_(list(outbox_ids)), t.outbox.c.sent_at.is_(None))
            .values(claimed_until=None, attempts=t.outbox.c.attempts - 1)
        )

    def release_row(self, outbox_id: int, error: str) -> None:
        """A try that failed: the row waits for the next one (its claim still counts: the
        publish may have reached the broker)."""
        self.conn.execute(
            update(t.outbox)
            .where(t.outbox.c.id == outbox_id)
            .values(claimed_until=None, last_error=error[:2000])
        )

    def audit(
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
        self.conn.execute(
            t.audit.insert().values(
                at=at,
                actor=actor,
                action=action,
                subject=subject,
                person_ref=person_ref,
                partner_id=partner_id,
                why=why,
            )
        )

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """A nested transaction: what runs inside is rolled back alone if it raises (the
        exception propagates), and the enclosing transaction goes on."""
        with self.conn.begin_nested():
            yield

    @property
    def usable(self) -> bool:
        """False once the connection was lost: nothing more can run in this transaction."""
        return not self.conn.invalidated


class Store:
    """The ledger's database. Nothing connects until the first use."""

    def __init__(self, url: str, *, schema: str | None = None, echo: bool = False) -> None:
        self.url = url
        self.engine = _engine(url, schema=schema, echo=echo)
        self.is_sqlite = self.engine.dialect.name == "sqlite"

    def create_all(self) -> None:
        """Bring the schema to this version's (Alembic's head): the same migrations as
        `partnerbus db upgrade`, one migrator at a time (`partnerbus.ledger.migrate`)."""
        from partnerbus.ledger.migrate import upgrade

        upgrade(self)

    def drop_all(self) -> None:
        """Drop every table, the migrations' record included (tests start afresh)."""
        t.metadata.drop_all(self.engine)
        with self.engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")

    def dispose(self) -> None:
        self.engine.dispose()

    @contextmanager
    def begin(self, *, readonly: bool = False) -> Iterator[LedgerTx]:
        """One transaction. A writing one takes SQLite's write lock at once (`BEGIN
        IMMEDIATE`); `readonly=True` is `read()`."""
        if readonly:
            with self.read() as tx:
                yield tx
            return
        with self.engine.begin() as conn:
            yield LedgerTx(conn)

    @contextmanager
    def read(self) -> Iterator[LedgerTx]:
        """A read-only transaction: it takes no write lock (a deferred `BEGIN` on SQLite,
        where WAL lets it read beside the writer), and PostgreSQL refuses any write in it
        (`SET TRANSACTION READ ONLY`). For checks and lookups that record nothing."""
        with self._reading() as conn, conn.begin():
            yield LedgerTx(conn)

    @contextmanager
    def _reading(self) -> Iterator[Connection]:
        """A connection for reads only: on SQLite it does not wait for the writer; on
        PostgreSQL each of its transactions is read-only."""
        with self.engine.connect() as conn:
            yield conn.execution_options(**{READ_ONLY: True})

    def run(self, work: Callable[[LedgerTx], T], *, tries: int = MAX_TRIES) -> T:
        """Run `work` in one transaction; when it meets a concurrent change (a `Conflict`,
        a serialization failure, a deadlock, a key another transaction just inserted), roll
        back and run the whole of it again, on fresh reads, up to `tries` times. `work`
        must have no effect outside the transaction that a second run would repeat."""
        for attempt in range(1, tries + 1):
            try:
                with self.begin() as tx:
                    return work(tx)
            except Exception as exc:
                if attempt == tries or not is_conflict(exc):
                    raise
                log.info(
                    "transaction re-run after a concurrent change (%s, try %d)",
                    _error_code(exc),
                    attempt,
                )
                backoff(attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    # outbox relay ---------------------------------------------------------------------
    def claim_pending(
        self,
        now: datetime,
        lease: timedelta,
        limit: int = 100,
        *,
        exclude: Collection[int] = (),
    ) -> list[OutboxRow]:
        """Claim unsent outbox rows for `lease`, so that two relays do not send the same row:
        the most pressing first (`priority`, then outbox order), at most `limit`, never one
        of `exclude` (rows this relay has just seen refused). One SELECT and one UPDATE; on
        PostgreSQL the SELECT locks its rows `FOR UPDATE SKIP LOCKED`, so two relays claiming
        at once take different rows instead of waiting on each other."""
        # Messages about one referral leave in outbox order, whichever relay sends them: a
        # row waits while an earlier row of its referral is unsent (claimed or not). So a
        # claim holds at most one row per referral, and a relay may publish its whole claim
        # at once without reordering a referral. The rule reads the snapshot, not the row
        # locks: a sibling another relay is claiming right now is unsent, so it still waits.
        earlier = t.outbox.alias("earlier")
        waits = exists().where(
            earlier.c.referral_id == t.outbox.c.referral_id,
            earlier.c.sent_at.is_(None),
            earlier.c.id < t.outbox.c.id,
        )
        claimable = (
            t.outbox.c.sent_at.is_(None),
            or_(t.outbox.c.claimed_until.is_(None), t.outbox.c.claimed_until < now),
        )
        query = (
            select(t.outbox.c.id)
            .where(*claimable)
            .where(or_(t.outbox.c.referral_id.is_(None), ~waits))
            .order_by(t.outbox.c.priority, t.outbox.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True, of=t.outbox)
        )
        if exclude:
            query = query.where(t.outbox.c.id.not_in(list(exclude)))
        with self.engine.begin() as conn:
            ids = [row_id for (row_id,) in conn.execute(query).all()]
            if not ids:
                return []
            got = conn.execute(
                update(t.outbox)
                .where(t.outbox.c.id.in_(ids), *claimable)
                .values(claimed_until=now + lease, attempts=t.outbox.c.attempts + 1)
                .returning(
                    t.outbox.c.id,
                    t.outbox.c.message_id,
                    t.outbox.c.routing_key,
                    t.outbox.c.message_type,
                    t.outbox.c.body,
                    t.outbox.c.referral_id,
                    t.outbox.c.attempts,
                    t.outbox.c.priority,
                )
            ).all()
        claimed: list[OutboxRow] = [_row(OutboxRow, row) for row in got]
        claimed.sort(key=lambda row: (row.priority, row.id))
        return claimed

    def release(self, outbox_id: int, error: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                update(t.outbox)
                .where(t.outbox.c.id == outbox_id)
                .values(claimed_until=None, last_error=error[:2000])
            )

    def release_untried(self, outbox_ids: Collection[int]) -> None:
        """Give back claimed rows that were never tried (their claim did not count)."""
        if not outbox_ids:
            return
        with self.engine.begin() as conn:
            conn.execute(
                update(t.outbox)
                .where(t.outbox.c.id.in_(list(outbox_ids)), t.outbox.c.sent_at.is_(None))
                .values(claimed_until=None, attempts=t.outbox.c.attempts - 1)
            )

    def failing_count(self) -> int:
        """Unsent outbox rows whose last try failed (unroutable, refused, broker away)."""
        with self._reading() as conn:
            return int(
                conn.execute(
                    select(func.count())
                    .select_from(t.outbox)
                    .where(t.outbox.c.sent_at.is_(None), t.outbox.c.last_error.is_not(None))
                ).scalar_one()
            )

    def outbox(self, *, pending_only: bool = False) -> list[tuple[str, str, str]]:
        """(routing key, message type, JSON body) of the outbox, oldest first."""
        query = select(t.outbox.c.routing_key, t.outbox.c.message_type, t.outbox.c.body)
        if pending_only:
            query = query.where(t.outbox.c.sent_at.is_(None))
        with self._reading() as conn:
            return [
                (r.routing_key, r.message_type, r.body)
                for r in conn.execute(query.order_by(t.outbox.c.id))
            ]

    def pending_count(self) -> int:
        with self._reading() as conn:
            return int(
                conn.execute(
                    select(func.count()).select_from(t.outbox).where(t.outbox.c.sent_at.is_(None))
                ).scalar_one()
            )

    # reads for people and ops ---------------------------------------------------------
    def referrals(self, *, statuses: frozenset[str] | None = None) -> list[ReferralRow]:
        query = select(t.referrals)
        if statuses is not None:
            query = query.where(t.referrals.c.status.in_(statuses))
        with self._reading() as conn:
            return [
                _row(ReferralRow, r)
                for r in conn.execute(
                    query.order_by(t.referrals.c.created_at, t.referrals.c.referral_id)
                )
            ]

    def referral_counts(self) -> dict[str, int]:
        with self._reading() as conn:
            rows = conn.execute(
                select(t.referrals.c.status, func.count()).group_by(t.referrals.c.status)
            )
            return {status: int(n) for status, n in rows}

    def referral(self, referral_id: str) -> ReferralRow | None:
        with self._reading() as conn:
            return LedgerTx(conn).referral(referral_id)

    def history(self, referral_id: str) -> list[dict[str, Any]]:
        with self._reading() as conn:
            rows = conn.execute(
                select(t.referral_history)
                .where(t.referral_history.c.referral_id == referral_id)
                .order_by(t.referral_history.c.id)
            )
            return [dict(r._mapping) for r in rows]

    def audit_trail(self, subject_or_person: str) -> list[AuditRow]:
        """Every audit record about a person (by reference) or a signal or referral (by id)."""
        signal_ids = select(t.signals.c.signal_id).where(
            or_(
                t.signals.c.person_ref == subject_or_person,
                t.signals.c.signal_id == subject_or_person,
            )
        )
        referral_ids = select(t.referrals.c.referral_id).where(
            t.referrals.c.signal_id.in_(signal_ids)
        )
        with self._reading() as conn:
            rows = conn.execute(
                select(
                    t.audit.c.at,
                    t.audit.c.actor,
                    t.audit.c.action,
                    t.audit.c.subject,
                    t.audit.c.person_ref,
                    t.audit.c.partner_id,
                    t.audit.c.why,
                )
                .where(
                    or_(
                        t.audit.c.subject == subject_or_person,
                        t.audit.c.person_ref == subject_or_person,
                        # a person's or a signal's trail includes what happened to the
                        # referrals made from it
                        t.audit.c.subject.in_(referral_ids),
                    )
                )
                .order_by(t.audit.c.id)
            )
            return [_row(AuditRow, r) for r in rows]

    def count(self, table: str, **where: Any) -> int:
        tbl = t.metadata.tables[table]
        conditions = [tbl.c[k] == v for k, v in where.items()]
        with self._reading() as conn:
            query = select(func.count()).select_from(tbl)
            if conditions:
                query = query.where(and_(*conditions))
            return int(conn.execute(query).scalar_one())

    def recent_answers(
        self,
        since: datetime,
        bus_actor: str,
        window: int = 20,
        *,
        answered_since: datetime | None = None,
    ) -> dict[str, list[bool]]:
        """Each partner's last `window` answers since `since` (accepted True, rejected
        False), oldest first, from the referrals' applied transitions. With
        `answered_since`, only the partners that answered at or after it (a refresh reads
        what changed, not the whole history)."""
        h = t.referral_history.c
        answers_only = (
            h.outcome == "applied",
            h.to_status.in_(("accepted", "rejected")),
            h.actor != bus_actor,
        )
        query = select(h.actor, h.to_status).where(*answers_only, h.at >= since)
        if answered_since is not None:
            changed = select(h.actor).where(*answers_only, h.at >= answered_since).distinct()
            query = query.where(h.actor.in_(changed))
        answers: dict[str, list[bool]] = {}
        with self._reading() as conn:
            for actor, status in conn.execute(query.order_by(h.id)):
                kept = answers.setdefault(actor, [])
                kept.append(status == "accepted")
                if len(kept) > window:
                    del kept[0]
        return answers

    def capacities(self) -> list[tuple[str, str, int | None]]:
        with self._reading() as conn:
            rows = conn.execute(
                select(
                    t.partner_capacity.c.partner_id,
                    t.partner_capacity.c.status,
                    t.partner_capacity.c.remaining,
                ).order_by(t.partner_capacity.c.partner_id)
            )
            return [(r.partner_id, r.status, r.remaining) for r in rows]


def _error_code(exc: BaseException) -> str:
    """What a log line may say of a database error: its class and SQLSTATE, never its
    parameters (they carry personal data)."""
    if isinstance(exc, DBAPIError):
        return f"{type(exc.orig).__name__} {getattr(exc.orig, 'sqlstate', '')}".strip()
    return type(exc).__name__


def _wal(cursor: Any, wait_s: float = 30.0) -> None:
    """Switch the file to WAL (a property of the file, kept once set). Two workers opening
    a new file at once race to switch it, and the loser gets "database is locked" at once,
    without the busy wait: it tries again until the winner's switch shows."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(random.uniform(0.01, 0.05))
        else:
            return


def _engine(url: str, *, schema: str | None, echo: bool) -> Engine:
    if url.startswith("sqlite"):
        in_memory = url in ("sqlite://", "sqlite:///:memory:")
        engine = create_engine(
            url,
            echo=echo,
            hide_parameters=True,  # bound values (a person, a phone, a note) stay out of errors
            connect_args={"check_same_thread": False, "timeout": 30},
            poolclass=StaticPool if in_memory else None,
        )

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            # pysqlite's own transaction handling is turned off so that SQLAlchemy's BEGIN
            # is the real one; WAL lets readers run beside the one writer.
            dbapi_conn.isolation_level = None
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA busy_timeout=30000")
            if not in_memory:
                _wal(cursor)
            # Every commit reaches the disk before the broker is told (an ack, a publish):
            # stated, not left to the build's default, which may be NORMAL under WAL.
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            # Take the write lock at the start: no deadlock between two upgrading readers.
            # A read-only connection (`Store._reading`) takes none: WAL lets it read beside
            # the writer (the relay holds the write lock while it publishes a referral).
            if conn.get_execution_options().get(READ_ONLY):
                conn.exec_driver_sql("BEGIN")
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    connect_args: dict[str, Any] = {}
    if schema:
        connect_args["options"] = f"-csearch_path={schema}"
    engine = create_engine(
        url, echo=echo, hide_parameters=True, pool_pre_ping=True, connect_args=connect_args
    )

    @event.listens_for(engine, "begin")
    def _read_only(conn: Any) -> None:
        # A reading connection's transactions are read-only: PostgreSQL refuses a write
        # there, and it takes no row lock a writer would wait for.
        if conn.get_execution_options().get(READ_ONLY):
            conn.exec_driver_sql("SET TRANSACTION READ ONLY")

    return engine


__all__ = [
    "AuditRow",
    "Conflict",
    "LedgerTx",
    "OutboxRow",
    "ReferralRow",
    "SignalRow",
    "Store",
    "UnsentRow",
]
