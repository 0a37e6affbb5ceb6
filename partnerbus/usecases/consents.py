"""Consents the agencies' advisors record: granted (parked needs are released),
refused (parked needs close), revoked (open referrals are withdrawn). Each event recorded
is answered on the agency's queue (`ConsentRecorded`, in the same transaction, so a
redelivery that dedupe skips is not answered twice); one refused after the agency was
authenticated is answered too (`ConsentRejected`, `answer_refusal`)."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

from partnerbus.directory.rights import advisor_ids, is_pivot
from partnerbus.errors import Refused
from partnerbus.ledger.store import LedgerTx
from partnerbus.rules import DURATIONS, OPEN, ConsentRecord
from partnerbus.schemas import (
    ConsentGranted,
    ConsentRecorded,
    ConsentRefused,
    ConsentRejected,
    ConsentRevoked,
    Partner,
    SignalClosed,
)
from partnerbus.usecases.context import BUS, Ledger, _derived_id, intake, send, use_case
from partnerbus.usecases.lifecycle import _withdraw
from partnerbus.usecases.loop import _tell_source
from partnerbus.usecases.routing import _route, _tried

MAX_CONSENT = max(DURATIONS.values()) + timedelta(days=1)
"""The longest fixed duration, and a day's grace for time zones and clocks."""


CLOCK_SKEW = timedelta(minutes=5)
"""How far a partner's clock may run ahead of the bus's. A time a partner supplies is never
acted on as later than the bus's now: a consent granted up to this far ahead counts as
granted now; further ahead it is refused (a consent records what the person said, not what
she will say). A revocation always takes effect when the bus records it."""


def _pivot(ledger: Ledger, agency_id: str, what: str) -> Partner:
    """The agency of a consent event: it must be a pivot (a partner with advisors), the
    same rule as RabbitMQ's rights and the gateway's (`partnerbus.directory.rights`), so
    that a trusted sender (the bus's CLI, the gateway, a replay) cannot pass one off."""
    if agency_id not in ledger.directory:
        raise Refused(f"unknown agency {agency_id!r}")
    agency = ledger.directory.partner(agency_id)
    if not is_pivot(agency):
        raise Refused(
            f"{agency_id!r} has no social advisors: only a pivot (an agency with advisors) "
            f"records {what}"
        )
    return agency


def _own_advisor(agency: Partner, advisor: str, role: str) -> None:
    if advisor not in advisor_ids(agency):
        raise Refused(f"{role} {advisor!r} is not one of the advisors of {agency.id!r}")


def _not_foreign_advisor(ledger: Ledger, agency: Partner, who: str, role: str) -> None:
    """`who` may be free text (the person herself, by phone), but not another agency's
    advisor: an advisor acts only for her own agency."""
    if who in advisor_ids(agency):
        return
    for other in ledger.directory.partners():
        if who in advisor_ids(other):
            raise Refused(f"{role} {who!r} is an advisor of {other.id!r}, not of {agency.id!r}")


def check_consent(ledger: Ledger, event: ConsentGranted) -> None:
    """Refuse a consent the bus could not honour as written: not recorded by one of the
    agency's own advisors, naming partners or needs the directory does not know, granted
    in the future, or for longer than the longest fixed duration (a consent is asked
    again, not given forever)."""
    directory = ledger.directory
    agency = _pivot(ledger, event.agency, "consent")
    _own_advisor(agency, event.collected_by, "collected_by")
    unknown = [p for p in event.scope.partners if p not in directory]
    if unknown:
        raise Refused(f"unknown partner(s) {', '.join(unknown)}")
    missing = [n for n in event.scope.needs if not directory.has_need(n)]
    if missing:
        raise Refused(f"unknown need(s) {', '.join(missing)}: not in the taxonomy")
    now = ledger.clock()
    if event.granted_at > now + CLOCK_SKEW:
        raise Refused(
            f"granted_at {event.granted_at:%Y-%m-%d %H:%M} is in the future (the bus's "
            f"clock says {now:%Y-%m-%d %H:%M} UTC): record a consent once the person gave it"
        )
    if event.valid_until - event.granted_at > MAX_CONSENT:
        raise Refused(
            f"a consent lasts at most {MAX_CONSENT.days} days; this one runs "
            f"{(event.valid_until - event.granted_at).days} days: ask again when it ends"
        )


@intake
def grant_consent(ledger: Ledger, tx: LedgerTx, event: ConsentGranted) -> None:
    """Record a consent as the advisor collected it (checked first: `check_consent`),
    then route every parked need of the person it now covers."""
    now = ledger.clock()
    check_consent(ledger, event)
    tx.signals.lock_person(event.person_ref)
    record = ConsentRecord.from_event(event)
    # A clock a little ahead (within CLOCK_SKEW): granted now, never later; the journal
    # keeps the stated time.
    added = tx.consents.add(dataclasses.replace(record, granted_at=min(record.granted_at, now)))
    if not added:
        raise Refused(f"consent {event.consent_id} already exists: a consent is never rewritten")
    tx.journal.record(
        event.consent_id,
        event.person_ref,
        "granted",
        event.collected_by,
        now,
        event.model_dump_json(),
    )
    tx.audit.record(
        event.collected_by,
        "consent-granted",
        event.consent_id,
        now,
        person_ref=event.person_ref,
        partner_id=event.agency,
        why=f"{event.method}; {', '.join(event.scope.needs)}; until {event.valid_until:%Y-%m-%d}",
    )
    released = release_parked(ledger, tx, event.person_ref)
    _acknowledge(
        ledger,
        tx,
        event,
        consent_id=event.consent_id,
        person_ref=event.person_ref,
        detail=f"{released} waiting need(s) of the person routed",
    )


def release_parked(ledger: Ledger, tx: LedgerTx, person_ref: str) -> int:
    """Route every parked need of this person that a consent now covers."""
    released = 0
    for signal_id, need in tx.signals.parked_needs(person_ref):
        row = tx.signals.get(signal_id)
        assert row is not None
        tried, attempt = _tried(tx, signal_id, need)
        if _route(ledger, tx, row, row.signal(), need, attempt, tried) is None:
            released += 1
    return released


@intake
def refuse_consent(ledger: Ledger, tx: LedgerTx, event: ConsentRefused) -> None:
    """The person said no: the parked needs named (all of the signal's, if none is)
    close, and the source and advisor are told."""
    now = ledger.clock()
    row = tx.signals.get(event.signal_id)
    if row is None or row.person_ref != event.person_ref:
        # the reason goes to a header and a log line: the signal's id, never the person's
        raise Refused(f"no signal {event.signal_id} about the person named in the refusal")
    agency = _pivot(ledger, event.agency, "a refusal")
    if row.agency != event.agency:
        # Not naming the agency that does follow it: this reason is answered to the sender.
        raise Refused(
            f"signal {event.signal_id} is not followed by {event.agency!r}: only its own "
            f"agency records the person's refusal"
        )
    _own_advisor(agency, event.collected_by, "collected_by")
    tx.signals.lock_person(event.person_ref)  # a grant releasing these needs meanwhile is seen
    states = tx.signals.need_states(event.signal_id)
    needs = event.needs or tuple(n for n, s in states.items() if s == "parked")
    tx.journal.record(
        None, event.person_ref, "refused", event.collected_by, now, event.model_dump_json()
    )
    closed = 0
    for need in needs:
        if states.get(need) != "parked":
            continue
        closed += 1
        tx.signals.set_need_state(
            event.signal_id, need, "refused", f"refused, told to {event.collected_by}", now
        )
        _tell_source(
            ledger,
            tx,
            row,
            SignalClosed(
                message_id=_derived_id("closed", event.signal_id, need, "consent-refused"),
                occurred_at=now,
                signal_id=event.signal_id,
                need=need,
                outcome="consent-refused",
                detail=f"the person refused; recorded by {event.collected_by}",
            ),
        )
    tx.audit.record(
        event.collected_by,
        "consent-refused",
        event.signal_id,
        now,
        person_ref=event.person_ref,
        partner_id=event.agency,
        why=", ".join(needs),
    )
    _acknowledge(
        ledger,
        tx,
        event,
        signal_id=event.signal_id,
        person_ref=event.person_ref,
        detail=f"{closed} waiting need(s) of the signal closed",
    )


@intake
def revoke_consent(ledger: Ledger, tx: LedgerTx, event: ConsentRevoked) -> None:
    """Withdraw every open referral made under the consent; parked signals stay parked."""
    now = ledger.clock()
    # Taken for update: a relay checking a referral under this consent holds it (shared)
    # until it has marked the referral as being sent; from then until the confirm is
    # recorded, withdrawing it re-runs this transaction (`ReferralRepository.update`), so
    # the revocation comes wholly before or after that send.
    consent = tx.consents.get(event.consent_id, lock="update")
    if consent is None:
        raise Refused(f"unknown consent {event.consent_id}")
    agency = _pivot(ledger, event.agency, "a revocation")
    if consent.agency != event.agency:
        raise Refused(f"consent {event.consent_id} was collected by another agency")
    _not_foreign_advisor(ledger, agency, event.revoked_by, "revoked_by")
    # A revocation takes effect when the bus records it, whatever time the partner states
    # (kept in the journal's body): a revocation dated later must not leave referrals
    # open until then, and one dated earlier cannot rewrite what was sent meanwhile.
    tx.consents.revoke(event.consent_id, now, event.revoked_by)
    tx.journal.record(
        event.consent_id,
        consent.person_ref,
        "revoked",
        event.revoked_by,
        now,
        event.model_dump_json(),
    )
    tx.audit.record(
        event.revoked_by,
        "consent-revoked",
        event.consent_id,
        now,
        person_ref=consent.person_ref,
        partner_id=event.agency,
        why=event.reason,
    )
    withdrawn = 0
    for referral in tx.referrals.under_consent(event.consent_id, OPEN):
        _withdraw(ledger, tx, referral, "consent-revoked", event.revoked_by)
        withdrawn += 1
    _acknowledge(
        ledger,
        tx,
        event,
        consent_id=event.consent_id,
        person_ref=consent.person_ref,
        detail=f"{withdrawn} open referral(s) withdrawn",
    )


ConsentEventMessage = ConsentGranted | ConsentRevoked | ConsentRefused


def _acknowledge(
    ledger: Ledger,
    tx: LedgerTx,
    event: ConsentEventMessage,
    *,
    person_ref: str,
    detail: str,
    consent_id: str | None = None,
    signal_id: str | None = None,
) -> None:
    """The agency hears that its event is recorded, through the outbox (it leaves only if
    the record commits). Its id derives from the event's: one answer per event."""
    now = ledger.clock()
    send(
        ledger,
        tx,
        ConsentRecorded(
            message_id=_derived_id("consent-recorded", event.message_id),
            occurred_at=now,
            event_id=event.message_id,
            event=event.type,
            consent_id=consent_id,
            signal_id=signal_id,
            person_ref=person_ref,
            agency=event.agency,
            detail=detail,
        ),
        event.agency,
    )


ANSWERED = "consent-answers"
"""The dedupe key (`processed_messages.queue`) of a refused event already answered: its own,
so that the event itself stays unmarked (a corrected event under the same id is recorded)."""


@use_case
def answer_refusal(ledger: Ledger, tx: LedgerTx, event: ConsentEventMessage, reason: str) -> bool:
    """A consent event the use case refused (its own changes rolled back), from a sender
    the intake authenticated as `event.agency`: the agency hears why, once per event (a
    redelivered or replayed refusal is not answered again). False when nothing is sent:
    answered already, or the agency is not in the directory (it has no queue; the dead
    letter alone keeps the refusal). Call it only for an authenticated sender: the answer
    goes to the queue the event names."""
    if event.agency not in ledger.directory:
        return False
    now = ledger.clock()
    if not tx.processed.first_time(event.message_id, ANSWERED, now):
        return False
    consent_id = event.consent_id if not isinstance(event, ConsentRefused) else None
    signal_id = event.signal_id if isinstance(event, ConsentRefused) else None
    person_ref = event.person_ref if not isinstance(event, ConsentRevoked) else None
    send(
        ledger,
        tx,
        ConsentRejected(
            message_id=_derived_id("consent-rejected", event.message_id),
            occurred_at=now,
            event_id=event.message_id,
            event=event.type,
            consent_id=consent_id,
            signal_id=signal_id,
            person_ref=person_ref,
            agency=event.agency,
            reason=reason[:2000],
        ),
        event.agency,
    )
    tx.audit.record(
        BUS,
        "consent-event-rejected",
        consent_id or signal_id or event.message_id,
        now,
        person_ref=person_ref,
        partner_id=event.agency,
        why=f"{event.type} {event.message_id} refused; the agency is told why",
    )
    return True
