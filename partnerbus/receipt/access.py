"""Who may read a tenant's receipt, and the audit of every reading, granted or refused.

Only an advisor of an agency that follows the person (the agency of one of her signals or
of one of her consents) reads it. The rows are read and the reading is audited in one
transaction (`receipt-read`: who, when, for whom, which format). A refused reading is
audited too (`receipt-refused`, with the reason) and then raised as `ReceiptRefused`.

What a refusal says is chosen so that the door is no oracle: an advisor of another agency
hears the same words for a person the ledger does not know and for a person it does not
follow (the audit keeps which). A reference that is not a pseudonymous reference (it might
be a name typed by mistake) is never written to the audit: only that it was refused."""

from __future__ import annotations

import re
from collections import defaultdict
from datetime import datetime

from sqlalchemy import or_, select

from partnerbus.directory import Directory
from partnerbus.directory.rights import advisor_ids
from partnerbus.errors import Refused
from partnerbus.ledger import tables as t
from partnerbus.ledger.repos.base import row_of
from partnerbus.ledger.repos.referrals import ReferralRow
from partnerbus.ledger.repos.signals import SignalRow
from partnerbus.ledger.store import AUDIT_COLUMNS, AuditRow, LedgerTx, Store
from partnerbus.receipt.build import (
    READ_WORDS,
    JournalEntry,
    NeedRow,
    PersonRecord,
    build_receipt,
)
from partnerbus.receipt.model import Receipt, Retention
from partnerbus.schemas.base import PERSON_REF_PATTERN

READ = "receipt-read"
REFUSED = "receipt-refused"
READS = tuple(READ_WORDS)
"""The audit's actions that are reads of a person's file (shown in her receipt, in words)."""
FORMATS = frozenset({"text", "html", "pdf"})
INVALID_SUBJECT = "(invalid person reference)"
ANONYMISED = "anon-"
"""The tokens retention puts in place of a person's reference (`usecases.schedule`)."""
NOT_FOLLOWED = (
    "no record of this person is followed by your agency: only an advisor of the agency "
    "that follows her reads her receipt (if her data was erased after the retention "
    "period, nothing is left to show)"
)


class ReceiptRefused(Refused):
    """A reading of a receipt the bus refused (and audited as refused)."""


def agencies_of(directory: Directory, advisor: str) -> frozenset[str]:
    """The agencies (pivots) that have `advisor` among their advisors."""
    return frozenset(p.id for p in directory.partners() if advisor in advisor_ids(p))


def load_person(tx: LedgerTx, person_ref: str) -> PersonRecord:
    """Every row under `person_ref`: her signals and their needs, their referrals and
    histories, her consents and consent journal, the reads of her file. Nothing else:
    the queries are all keyed on her reference (or on her own signals' ids)."""
    conn = tx.conn
    signals = [
        row_of(SignalRow, r)
        for r in conn.execute(
            select(t.signals)
            .where(t.signals.c.person_ref == person_ref)
            .order_by(t.signals.c.received_at, t.signals.c.signal_id)
        )
    ]
    signal_ids = [s.signal_id for s in signals]
    needs: dict[str, list[NeedRow]] = defaultdict(list)
    referrals: list[ReferralRow] = []
    history: dict[str, list[dict[str, object]]] = defaultdict(list)
    withheld: set[str] = set()
    if signal_ids:
        for r in conn.execute(
            select(t.signal_needs)
            .where(t.signal_needs.c.signal_id.in_(signal_ids))
            .order_by(t.signal_needs.c.signal_id, t.signal_needs.c.need)
        ):
            needs[r.signal_id].append(NeedRow(r.need, r.state, r.updated_at))
        referrals = [
            row_of(ReferralRow, r)
            for r in conn.execute(
                select(t.referrals)
                .where(t.referrals.c.signal_id.in_(signal_ids))
                .order_by(t.referrals.c.created_at, t.referrals.c.referral_id)
            )
        ]
    referral_ids = [r.referral_id for r in referrals]
    if referral_ids:
        for r in conn.execute(
            select(t.referral_history)
            .where(t.referral_history.c.referral_id.in_(referral_ids))
            .order_by(t.referral_history.c.id)
        ):
            history[r.referral_id].append(dict(r._mapping))
        withheld = {
            r.subject
            for r in conn.execute(
                select(t.audit.c.subject).where(
                    t.audit.c.subject.in_(referral_ids), t.audit.c.action == "referral-withheld"
                )
            )
        }
    journal = [
        JournalEntry(r.consent_id, r.event, r.by, r.at, r.body)
        for r in conn.execute(
            select(t.consent_journal)
            .where(t.consent_journal.c.person_ref == person_ref)
            .order_by(t.consent_journal.c.at, t.consent_journal.c.id)
        )
    ]
    reads = [
        row_of(AuditRow, r)
        for r in conn.execute(
            select(*AUDIT_COLUMNS)
            .where(
                or_(t.audit.c.person_ref == person_ref, t.audit.c.subject == person_ref),
                t.audit.c.action.in_(READS),
            )
            .order_by(t.audit.c.id)
        )
    ]
    return PersonRecord(
        person_ref=person_ref,
        signals=signals,
        needs=dict(needs),
        referrals=referrals,
        history=dict(history),
        withheld=frozenset(withheld),
        consents=tx.consents.of_person(person_ref),
        journal=journal,
        reads=reads,
    )


def _actor(advisor: str) -> str:
    """The audit's actor for what was typed as the advisor: 80 characters at most (the
    column's size), control characters as `?` (PostgreSQL refuses a NUL in text)."""
    if not advisor.strip():
        return "(empty)"
    return "".join(c if c.isprintable() else "?" for c in advisor[:80])


def read_receipt(
    store: Store,
    directory: Directory,
    person_ref: str,
    advisor: str,
    *,
    output: str = "text",
    now: datetime,
    retention: Retention | None = None,
) -> Receipt:
    """The receipt of `person_ref` for `advisor`, the reading audited in the same
    transaction as the reads; a refused reading is audited, then `ReceiptRefused` raised.

    `output` names what the reading produces (`text`, `html`, `pdf`, or several joined
    by `+`), recorded in the audit."""
    formats = set(output.split("+"))
    if not formats or not formats <= FORMATS:
        msg = f"unknown output {output!r}: {', '.join(sorted(FORMATS))}"
        raise ValueError(msg)
    refusal: tuple[str, str] | None = None  # (what the reader hears, what the audit keeps)
    valid_ref = re.fullmatch(PERSON_REF_PATTERN, person_ref) is not None
    anonymised = person_ref.startswith(ANONYMISED)
    own = agencies_of(directory, advisor) if advisor.strip() else frozenset()
    if not own:
        refusal = (
            f"{advisor!r} is not an advisor of any agency in the directory: only an advisor "
            "of the person's agency reads her receipt",
            "unknown advisor",
        )
    elif not valid_ref:
        refusal = (
            "not a pseudonymous person reference (4 to 64 letters, digits or . _ : -, "
            "starting with a letter or digit): a receipt is asked for by the reference the "
            "ledger stores, never by a name",
            f"invalid person reference ({len(person_ref)} characters, not recorded)",
        )
    elif anonymised:
        refusal = (
            "an anonymised token stands for nobody: a receipt is for a person, by her reference",
            "anonymised token",
        )
    receipt: Receipt | None = None
    with store.begin() as tx:
        if refusal is None:
            record = load_person(tx, person_ref)
            followers = record.agencies()
            if record.empty:
                refusal = (NOT_FOLLOWED, "unknown person: nothing on record")
            elif not own & followers:
                refusal = (
                    NOT_FOLLOWED,
                    f"advisor of {', '.join(sorted(own))}; the person is followed by "
                    f"{', '.join(sorted(followers))}",
                )
            else:
                agency = min(own & followers)
                receipt = build_receipt(
                    record,
                    directory,
                    now=now,
                    produced_by=advisor,
                    agency_id=agency,
                    retention=retention,
                )
                tx.audit.record(
                    advisor,
                    READ,
                    person_ref,
                    now,
                    person_ref=person_ref,
                    partner_id=agency,
                    why=f"partnerbus referrals receipt, format {output}",
                )
        if refusal is not None:
            tx.audit.record(
                _actor(advisor),
                REFUSED,
                person_ref if valid_ref else INVALID_SUBJECT,
                now,
                person_ref=person_ref if valid_ref else None,
                partner_id=min(own) if own else None,
                why=f"format {output}: {refusal[1]}",
            )
    if refusal is not None:
        raise ReceiptRefused(refusal[0])
    assert receipt is not None
    return receipt
