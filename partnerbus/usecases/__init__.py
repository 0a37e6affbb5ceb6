"""The use cases of the bus, one verb each: receive a signal, grant / revoke / refuse a
consent, record a status, mark a delivery, watch deadlines, apply retention.

Each runs inside one ledger transaction: it decides with the pure rules and the directory,
records the state change, the dedupe mark and the audit, and puts what must leave in the
outbox. Nothing here touches the broker; the subscribers call these and the relay sends.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial

from pydantic import TypeAdapter, ValidationError

from partnerbus.directory import Candidate, Directory, match
from partnerbus.directory.rights import advisor_ids, is_pivot
from partnerbus.errors import describe_error
from partnerbus.ledger.store import (
    Conflict,
    ConsentRow,
    LedgerTx,
    ReferralRow,
    SignalRow,
    Store,
)
from partnerbus.ops.counters import SCHEDULED_ITEM_FAILURES
from partnerbus.rules import (
    AWAITING_ANSWER,
    DURATIONS,
    OPEN,
    ConsentDecision,
    ConsentRecord,
    DeadlinePolicy,
    check_pseudonym_key,
    deadline_action,
    evaluate_consent,
    expiring_soon,
    minimise,
    pseudonym,
    referral_id,
    reroute_after_rejection,
    signal_pseudonym,
    transition,
)
from partnerbus.schemas import (
    CapacityChanged,
    ConsentExpiring,
    ConsentGranted,
    ConsentRefused,
    ConsentRequested,
    ConsentRevoked,
    NoPartnerFound,
    Partner,
    Referral,
    ReferralReminder,
    ReferralStatusChanged,
    ReferralWithdrawn,
    Signal,
    SignalClosed,
)
from partnerbus.schemas.messages import OutboundMessage

log = logging.getLogger("partnerbus.scheduler")
Clock = Callable[[], datetime]
DIRECTORY_UPDATES_KEY = "directory.updates"
"""Routing key, on the deliveries exchange, of the broadcast every worker's directory hears
(no partner id can contain a dot, so it never reaches a partner)."""
BUS = "partnerbus"
MAX_CONSENT = max(DURATIONS.values()) + timedelta(days=1)
"""The longest fixed duration, and a day's grace for time zones and clocks."""


class Refused(Exception):  # noqa: N818 - a business refusal, not a crash
    """The message cannot be processed as sent; it goes to the dead-letter queue with this
    reason (unknown commune, spoofed source, a status about someone else's referral…)."""


@dataclass(frozen=True)
class Ledger:
    """What every use case needs: the record, the directory, the clock and the policies."""

    store: Store
    directory: Directory
    clock: Clock
    pseudonym_key: bytes
    deadlines: DeadlinePolicy
    consent_notice: timedelta = timedelta(days=14)

    def __post_init__(self) -> None:
        check_pseudonym_key(self.pseudonym_key)  # a guessable key makes pseudonyms reversible


def _record(row: ConsentRow) -> ConsentRecord:
    return ConsentRecord(
        consent_id=row.consent_id,
        person_ref=row.person_ref,
        scope=row.scope,
        collected_by=row.collected_by,
        agency=row.agency,
        method=row.method,
        granted_at=row.granted_at,
        valid_until=row.valid_until,
        revoked_at=row.revoked_at,
    )


def _derived_id(*parts: str) -> str:
    """A deterministic message id for what the bus emits: a relayed row sent twice, or a
    use case run again after a rollback, keeps one id that partners can deduplicate on."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "partnerbus:" + "|".join(parts)))


# signals -------------------------------------------------------------------------------
def check_signal(ledger: Ledger, signal: Signal) -> None:
    """Refuse what the directory does not know: the message is bad, not the bus."""
    directory = ledger.directory
    if not directory.has_commune(signal.commune):
        raise Refused(f"unknown commune {signal.commune!r}: not an INSEE code of the territory")
    unknown = [n for n in signal.needs if not directory.has_need(n)]
    if unknown:
        raise Refused(f"unknown need(s) {', '.join(unknown)}: not in the taxonomy")
    try:
        directory.partner(signal.source)
    except KeyError:
        raise Refused(f"unknown source partner {signal.source!r}") from None
    if signal.agency is not None:
        try:
            agency = directory.partner(signal.agency)
        except KeyError:
            raise Refused(f"unknown agency {signal.agency!r}") from None
        if agency.kind != "bailleur-social":
            raise Refused(f"{signal.agency!r} is not a landlord's agency")


def receive_signal(ledger: Ledger, tx: LedgerTx, signal: Signal, queue: str) -> bool:
    """Record a signal once and route each of its needs. False for a duplicate."""
    now = ledger.clock()
    if not tx.first_time(signal.message_id, queue, now):
        return False
    agency = (
        ledger.directory.partner(signal.agency)
        if signal.agency
        else ledger.directory.agency_for(signal.commune)
    )
    advisor = ledger.directory.advisor_for(agency.id, signal.commune) if agency else None
    row = tx.add_signal(signal, agency.id if agency else None, advisor.id if advisor else None, now)
    tx.audit(
        signal.source,
        "signal-received",
        signal.message_id,
        now,
        person_ref=signal.person_ref,
        why=f"needs {', '.join(signal.needs)} in {signal.commune}",
    )
    parked: list[tuple[str, ConsentDecision, list[Candidate]]] = []
    for need in signal.needs:
        result = _route(ledger, tx, row, signal, need, attempt=1, tried=())
        if result is not None:
            parked.append((need, *result))
    if parked:
        _request_consent(ledger, tx, row, signal, parked)
    return True


def _route(
    ledger: Ledger,
    tx: LedgerTx,
    row: SignalRow,
    signal: Signal,
    need: str,
    attempt: int,
    tried: tuple[str, ...],
) -> tuple[ConsentDecision, list[Candidate]] | None:
    """Send this need to the best partner the person consented to. Returns the consent
    decision and the candidates when the need must wait for consent (parked)."""
    now = ledger.clock()
    # What this person consented to and which of her needs wait for it are decided under
    # her lock: a grant committing meanwhile either is seen here or sees the need parked.
    tx.lock_person(signal.person_ref)
    candidates = match(
        ledger.directory,
        need,
        signal.commune,
        profile=signal.profile,
        sender=signal.source,
        exclude=frozenset(tried),
    )
    if not candidates:
        reason = f"no partner for {need} in {signal.commune}" + (
            f" besides {', '.join(tried)}" if tried else ""
        )
        if signal.source not in ledger.directory:
            reason += f": the source {signal.source} is no longer in the directory (no agreement)"
        tx.set_need_state(row.signal_id, need, "no-partner", reason, now)
        if row.agency:
            tx.enqueue(
                NoPartnerFound(
                    message_id=_derived_id("no-partner", row.signal_id, need, str(attempt)),
                    occurred_at=now,
                    signal_id=row.signal_id,
                    need=need,
                    commune=signal.commune,
                    person_ref=signal.person_ref,
                    agency=row.agency,
                    tried=tried,
                    reason=reason,
                ),
                row.agency,
                now,
            )
            tx.audit(
                BUS,
                "no-partner-disclosed",
                row.signal_id,
                now,
                person_ref=signal.person_ref,
                partner_id=row.agency,
                why=f"{reason}; the agency is told, with the person's reference",
            )
        _tell_source(
            ledger,
            tx,
            row,
            SignalClosed(
                message_id=_derived_id("closed", row.signal_id, need, "no-partner", str(attempt)),
                occurred_at=now,
                signal_id=row.signal_id,
                need=need,
                outcome="no-partner",
                detail=reason,
            ),
        )
        return None
    consents = [_record(c) for c in tx.consents_of(signal.person_ref)]
    first_decision: ConsentDecision | None = None
    for candidate in candidates:
        decision = evaluate_consent(
            consents, signal.person_ref, need, candidate.partner_id, candidate.partner.kind, now
        )
        if decision.allowed:
            _send_referral(ledger, tx, row, signal, need, attempt, candidate, decision)
            return None
        first_decision = first_decision or decision
    assert first_decision is not None
    tx.set_need_state(row.signal_id, need, "parked", first_decision.detail, now)
    tx.audit(
        BUS,
        "signal-parked",
        row.signal_id,
        now,
        person_ref=signal.person_ref,
        why=f"{need}: {first_decision.reason}",
    )
    return first_decision, candidates


def _send_referral(
    ledger: Ledger,
    tx: LedgerTx,
    row: SignalRow,
    signal: Signal,
    need: str,
    attempt: int,
    candidate: Candidate,
    decision: ConsentDecision,
) -> None:
    now = ledger.clock()
    partner = candidate.partner
    rid = referral_id(row.signal_id, need, attempt)
    due_by = ledger.deadlines.due_by(signal.urgency, now)
    profile, facts, contact = minimise(partner.kind, signal.profile, signal.facts, signal.contact)
    referral = Referral(
        message_id=rid,
        occurred_at=now,
        referral_id=rid,
        signal_ref=signal_pseudonym(ledger.pseudonym_key, partner.id, row.signal_id),
        attempt=attempt,
        partner=partner.id,
        need=need,
        person=pseudonym(ledger.pseudonym_key, partner.id, signal.person_ref),
        commune=signal.commune,
        urgency=signal.urgency,
        due_by=due_by,
        agency=row.agency or signal.source,
        advisor=row.advisor,
        profile=profile,
        facts=facts,
        contact=contact,
        why=candidate.reasons,
    )
    tx.add_referral(
        referral_id=rid,
        signal_id=row.signal_id,
        need=need,
        attempt=attempt,
        partner_id=partner.id,
        partner_kind=partner.kind,
        consent_id=decision.consent_id,
        status="requested",
        urgency=signal.urgency,
        created_at=now,
        updated_at=now,
        due_at=due_by,
        remind_at=ledger.deadlines.remind_at(signal.urgency, now),
        reminded=False,
    )
    tx.record_transition(rid, "requested", "requested", "applied", BUS, decision.detail, now)
    tx.set_need_state(row.signal_id, need, "routed", f"to {partner.id} (attempt {attempt})", now)
    # Nothing is disclosed yet: the audit records the disclosure when the broker confirms
    # the referral (`mark_delivered`), or that it was withheld if it never leaves.
    tx.enqueue(referral, partner.id, now, referral_id=rid)


def _shared(kind: str, signal: Signal) -> str:
    """What of the person a partner of this kind receives, for the audit."""
    profile, facts, contact = minimise(kind, signal.profile, signal.facts, signal.contact)
    parts = (("profile", profile), ("facts", facts), ("contact", contact))
    return ", ".join(name for name, part in parts if part) or "ids only"


def _request_consent(
    ledger: Ledger,
    tx: LedgerTx,
    row: SignalRow,
    signal: Signal,
    parked: list[tuple[str, ConsentDecision, list[Candidate]]],
    attempt: int = 1,
) -> None:
    now = ledger.clock()
    if row.agency is None:
        # No landlord's agency covers the commune, so no advisor to ask: the needs stay
        # parked, counted on the ops page, and the audit says why.
        for need, _decision, _candidates in parked:
            tx.set_need_state(row.signal_id, need, "parked", "no agency covers the commune", now)
        tx.audit(
            BUS,
            "consent-not-requested",
            row.signal_id,
            now,
            person_ref=signal.person_ref,
            why=f"no agency covers {signal.commune}: nobody to ask for consent",
        )
        return
    needs = tuple(need for need, _, _ in parked)
    suggested: list[str] = []
    for _, _, candidates in parked:
        for c in candidates[:3]:
            if c.partner_id not in suggested:
                suggested.append(c.partner_id)
    reasons = sorted({d.reason for _, d, _ in parked})
    tx.enqueue(
        ConsentRequested(
            message_id=_derived_id("consent-requested", row.signal_id, str(attempt), *needs),
            occurred_at=now,
            signal_id=row.signal_id,
            source=signal.source,
            person_ref=signal.person_ref,
            commune=signal.commune,
            needs=needs,
            agency=row.agency,
            advisor=row.advisor,
            reason=", ".join(reasons),
            suggested_partners=tuple(suggested),
        ),
        row.agency,
        now,
    )
    tx.audit(
        BUS,
        "consent-requested",
        row.signal_id,
        now,
        person_ref=signal.person_ref,
        partner_id=row.agency,
        why=f"{', '.join(needs)}: {', '.join(reasons)}",
    )


def _tell_source(
    ledger: Ledger, tx: LedgerTx, row: SignalRow, message: SignalClosed | ReferralStatusChanged
) -> None:
    """The closed loop: the source and the advisor's agency hear of every outcome. What
    the partner wrote (a note, a completion's outcome) goes to the advisor only: the
    source learns where the referral stands, not what the partner learnt of the person."""
    now = ledger.clock()
    for index, target in enumerate(dict.fromkeys(p for p in (row.source, row.agency) if p)):
        update: dict[str, object] = {
            "message_id": _derived_id("loop", message.message_id, target, str(index))
        }
        if isinstance(message, ReferralStatusChanged) and target != row.agency:
            update |= {"note": None, "outcome": None}
        tx.enqueue(message.model_copy(update=update), target, now)


def _notify_status(
    ledger: Ledger, tx: LedgerTx, referral: ReferralRow, status: str, note: str
) -> SignalRow:
    """A status the bus itself observed or decided, told to the source and the advisor."""
    row = tx.signal(referral.signal_id)
    assert row is not None
    _tell_source(
        ledger,
        tx,
        row,
        ReferralStatusChanged(
            message_id=_derived_id("status", referral.referral_id, status),
            occurred_at=ledger.clock(),
            referral_id=referral.referral_id,
            partner=referral.partner_id,
            status=status,  # type: ignore[arg-type]
            note=note,
            signal_id=referral.signal_id,
            need=referral.need,
        ),
    )
    return row


# consents ------------------------------------------------------------------------------
CLOCK_SKEW = timedelta(minutes=5)
"""How far a partner's clock may run ahead of the bus's. A time a partner supplies is never
acted on as later than the bus's now: a consent granted up to this far ahead counts as
granted now; further ahead it is refused (a consent records what the person said, not what
she will say). A revocation always takes effect when the bus records it."""


def _pivot(ledger: Ledger, agency_id: str, what: str) -> Partner:
    """The agency of a consent event: it must be a pivot (a partner with advisors), the
    same rule as RabbitMQ's rights and the gateway's (`partnerbus.directory.rights`), so
    that a trusted sender (the bus's CLI, the gateway, a replay) cannot pass one off."""
    try:
        agency = ledger.directory.partner(agency_id)
    except KeyError:
        raise Refused(f"unknown agency {agency_id!r}") from None
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


def grant_consent(ledger: Ledger, tx: LedgerTx, event: ConsentGranted, queue: str) -> bool:
    now = ledger.clock()
    if not tx.first_time(event.message_id, queue, now):
        return False
    check_consent(ledger, event)
    tx.lock_person(event.person_ref)
    record = ConsentRecord.from_event(event)
    added = tx.add_consent(
        ConsentRow(
            consent_id=record.consent_id,
            person_ref=record.person_ref,
            scope=record.scope,
            collected_by=record.collected_by,
            agency=record.agency,
            method=record.method,
            # A clock a little ahead (within CLOCK_SKEW): granted now, never later; the
            # journal keeps the stated time.
            granted_at=min(record.granted_at, now),
            valid_until=record.valid_until,
            revoked_at=None,
        )
    )
    if not added:
        raise Refused(f"consent {event.consent_id} already exists: a consent is never rewritten")
    tx.journal(
        event.consent_id,
        event.person_ref,
        "granted",
        event.collected_by,
        now,
        event.model_dump_json(),
    )
    tx.audit(
        event.collected_by,
        "consent-granted",
        event.consent_id,
        now,
        person_ref=event.person_ref,
        partner_id=event.agency,
        why=f"{event.method}; {', '.join(event.scope.needs)}; until {event.valid_until:%Y-%m-%d}",
    )
    release_parked(ledger, tx, event.person_ref)
    return True


def _tried(tx: LedgerTx, signal_id: str, need: str) -> tuple[tuple[str, ...], int]:
    """The partners already tried for this need (excluded from the next match) and the
    next attempt number. A referral withdrawn for want of consent did not try its partner:
    that partner may be chosen again once the person consents again."""
    earlier = tx.referrals_for(signal_id, need)
    tried = tuple(dict.fromkeys(r.partner_id for r in earlier if r.status != "withdrawn"))
    return tried, len(earlier) + 1


def release_parked(ledger: Ledger, tx: LedgerTx, person_ref: str) -> int:
    """Route every parked need of this person that a consent now covers."""
    released = 0
    for signal_id, need in tx.parked_needs(person_ref):
        row = tx.signal(signal_id)
        assert row is not None
        tried, attempt = _tried(tx, signal_id, need)
        if _route(ledger, tx, row, row.signal(), need, attempt, tried) is None:
            released += 1
    return released


def refuse_consent(ledger: Ledger, tx: LedgerTx, event: ConsentRefused, queue: str) -> bool:
    now = ledger.clock()
    if not tx.first_time(event.message_id, queue, now):
        return False
    row = tx.signal(event.signal_id)
    if row is None or row.person_ref != event.person_ref:
        # the reason goes to a header and a log line: the signal's id, never the person's
        raise Refused(f"no signal {event.signal_id} about the person named in the refusal")
    agency = _pivot(ledger, event.agency, "a refusal")
    if row.agency != event.agency:
        raise Refused(
            f"signal {event.signal_id} is followed by {row.agency or 'no agency'}, "
            f"not {event.agency!r}: only its own agency records the person's refusal"
        )
    _own_advisor(agency, event.collected_by, "collected_by")
    tx.lock_person(event.person_ref)  # a grant releasing these needs meanwhile is seen
    states = tx.need_states(event.signal_id)
    needs = event.needs or tuple(n for n, s in states.items() if s == "parked")
    tx.journal(None, event.person_ref, "refused", event.collected_by, now, event.model_dump_json())
    for need in needs:
        if states.get(need) != "parked":
            continue
        tx.set_need_state(
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
    tx.audit(
        event.collected_by,
        "consent-refused",
        event.signal_id,
        now,
        person_ref=event.person_ref,
        partner_id=event.agency,
        why=", ".join(needs),
    )
    return True


def revoke_consent(ledger: Ledger, tx: LedgerTx, event: ConsentRevoked, queue: str) -> bool:
    """Withdraw every open referral made under the consent; parked signals stay parked."""
    now = ledger.clock()
    if not tx.first_time(event.message_id, queue, now):
        return False
    # Taken for update: a relay sending under this consent holds it (shared) until its
    # referral is confirmed, so the revocation comes wholly before or after that send.
    consent = tx.consent(event.consent_id, lock="update")
    if consent is None:
        raise Refused(f"unknown consent {event.consent_id}")
    agency = _pivot(ledger, event.agency, "a revocation")
    if consent.agency != event.agency:
        raise Refused(f"consent {event.consent_id} was collected by another agency")
    _not_foreign_advisor(ledger, agency, event.revoked_by, "revoked_by")
    # A revocation takes effect when the bus records it, whatever time the partner states
    # (kept in the journal's body): a revocation dated later must not leave referrals
    # open until then, and one dated earlier cannot rewrite what was sent meanwhile.
    tx.revoke_consent(event.consent_id, now, event.revoked_by)
    tx.journal(
        event.consent_id,
        consent.person_ref,
        "revoked",
        event.revoked_by,
        now,
        event.model_dump_json(),
    )
    tx.audit(
        event.revoked_by,
        "consent-revoked",
        event.consent_id,
        now,
        person_ref=consent.person_ref,
        partner_id=event.agency,
        why=event.reason,
    )
    for referral in tx.referrals_under_consent(event.consent_id, OPEN):
        _withdraw(ledger, tx, referral, "consent-revoked", event.revoked_by)
    return True


def _withdraw(
    ledger: Ledger,
    tx: LedgerTx,
    referral: ReferralRow,
    why: str,
    actor: str,
    *,
    reason: str = "consent-revoked",
    may_have_left: bool | None = None,
) -> bool:
    """Close an open referral for want of consent. If it may have reached the partner, the
    partner is told to drop the data (`ReferralWithdrawn`, after the referral: the relay
    keeps one referral's messages in order); if it never left, it is withheld: its outbox
    row is deleted and the partner hears nothing. `may_have_left` None: the outbox says.
    False if the referral had closed meanwhile (nothing done)."""
    now = ledger.clock()
    if not _apply(ledger, tx, referral, "withdrawn", "bus", actor, why):
        return False
    left = _may_have_left(tx, referral) if may_have_left is None else may_have_left
    if left is not False:
        tx.enqueue(
            ReferralWithdrawn(
                message_id=_derived_id("withdrawn", referral.referral_id),
                occurred_at=now,
                referral_id=referral.referral_id,
                partner=referral.partner_id,
                reason=reason,  # type: ignore[arg-type]
            ),
            referral.partner_id,
            now,
            referral_id=referral.referral_id,
        )
    tx.set_need_state(referral.signal_id, referral.need, "withdrawn", why, now)
    _notify_status(ledger, tx, referral, "withdrawn", why)
    if left is None:
        # A relay holds a claim on the referral and has not tried it yet: it settles the
        # matter when it gets to it (`send_or_withhold`); the audit says then which.
        return True
    tx.audit(
        actor,
        "referral-withdrawn" if left else "referral-withheld",
        referral.referral_id,
        now,
        partner_id=referral.partner_id,
        why=why if left else f"{why}; it had not left: the partner never received it",
    )
    return True


def _may_have_left(tx: LedgerTx, referral: ReferralRow) -> bool | None:
    """Whether the referral may have reached its partner, from what the relays did: True
    once sent or tried; False if it never was, and then its outbox row is deleted so that
    it never will be; None while a relay holds the only claims on it, untried (that relay
    decides, under the referral's lock, in `send_or_withhold`)."""
    if referral.status != "requested" or referral.sent_at is not None:
        return True
    rows = tx.referral_rows(referral.referral_id)
    if any(sent for _, _, sent in rows):
        return True
    if all(claims == 0 for _, claims, _ in rows):
        for outbox_id, _, _ in rows:
            tx.drop_outbox_row(outbox_id)
        return False
    return None


def send_or_withhold(
    ledger: Ledger, tx: LedgerTx, referral_id: str, outbox_id: int, claims: int
) -> bool:
    """The relay's decision for one referral row, under the locks `clear_to_send` takes
    (held until the relay has published and recorded the confirm in this transaction).
    True: publish it now. False: the row is deleted unsent, and a withdrawal queued for
    the referral meanwhile is settled: dropped if the referral never left (the partner
    never hears of it), kept if an earlier try may have reached the partner."""
    verdict = _check_before_sending(ledger, tx, referral_id, claims)
    if verdict == "send":
        return True
    tx.drop_outbox_row(outbox_id)
    if verdict == "closed":
        _settle_withdrawal(ledger, tx, referral_id, claims)
    return False


def _settle_withdrawal(ledger: Ledger, tx: LedgerTx, referral_id: str, claims: int) -> None:
    """A withdrawal queued while a relay held an untried claim on the referral (see
    `_may_have_left`) is decided here: `claims` counts the tries that may have published
    the referral, this one (which did not) included."""
    withdrawals = tx.pending_withdrawals(referral_id)
    if not withdrawals or any(sent for _, _, sent in tx.referral_rows(referral_id)):
        return  # nothing waits, or it was decided when the referral was withdrawn
    referral = tx.referral(referral_id)
    assert referral is not None
    left = claims > 1
    if not left:
        for row_id in withdrawals:
            tx.drop_outbox_row(row_id)
    tx.audit(
        BUS,
        "referral-withdrawn" if left else "referral-withheld",
        referral_id,
        ledger.clock(),
        partner_id=referral.partner_id,
        why="an earlier try may have reached the partner: it is told to drop it"
        if left
        else "withdrawn before it left: the partner never received it",
    )


def clear_to_send(ledger: Ledger, tx: LedgerTx, referral_id: str, attempts: int) -> bool:
    """The last check, just before a referral is published: True if it may leave now.
    See `_check_before_sending`; `attempts` counts the claims of the row that may have
    published it, this one included."""
    return _check_before_sending(ledger, tx, referral_id, attempts) == "send"


def _check_before_sending(ledger: Ledger, tx: LedgerTx, referral_id: str, attempts: int) -> str:
    """The relay publishes and records the confirm in the transaction that ran this,
    holding what this takes: the consent (shared: a revocation waits) and the referral's
    row (a status, a withdrawal, an expiry wait). The referral must still be waiting for
    an answer (a referral re-sent from the dead letters may be delivered or received
    already) and a consent valid at this very moment must cover it: `send`. A referral
    closed meanwhile does not leave: `closed`. One whose consent ran out (the broker was
    down, the outbox waited) is withdrawn, and its need goes back to the consent gate,
    the advisor is asked again: `withdrawn`. Above one attempt, an earlier try may have
    reached the partner, who is then told to drop it."""
    seen = tx.referral(referral_id)
    if seen is None or seen.status not in AWAITING_ANSWER:
        return "closed"
    # Locks in one order everywhere: the consent, then the referral.
    consent = tx.consent(seen.consent_id, lock="share")
    referral = tx.referral(referral_id, lock=True)
    if referral is None or referral.status not in AWAITING_ANSWER:
        return "closed"
    row = tx.signal(referral.signal_id)
    assert consent is not None and row is not None
    now = ledger.clock()
    decision = evaluate_consent(
        [_record(consent)],
        row.person_ref,
        referral.need,
        referral.partner_id,
        referral.partner_kind,
        now,
    )
    if decision.allowed:
        return "send"
    _withdraw(
        ledger,
        tx,
        referral,
        f"not sent: {decision.detail}",
        BUS,
        reason="consent-expired",
        may_have_left=attempts > 1 or referral.status != "requested",
    )
    _reroute(ledger, tx, referral, row)
    return "withdrawn"


# statuses ------------------------------------------------------------------------------
def _apply(
    ledger: Ledger,
    tx: LedgerTx,
    referral: ReferralRow,
    new: str,
    actor_kind: str,
    actor: str,
    note: str | None,
    *,
    reason: str | None = None,
    outcome: str | None = None,
    also: dict[str, object] | None = None,
) -> bool:
    """Run the state machine; record the attempt whatever its outcome. True if applied.

    The decision is made on `referral` as the caller read it, so the row is locked and
    must still say the same; the write is a compare-and-set on that status. Otherwise a
    `Conflict` re-runs the whole transaction on fresh reads: no transition is decided on
    a stale status, and none overwrites another. `also`: more columns written with it."""
    now = ledger.clock()
    current = tx.referral(referral.referral_id, lock=True)
    if current is None or current.status != referral.status:
        msg = f"referral {referral.referral_id} changed since it was read"
        raise Conflict(msg)
    result = transition(referral.status, new, actor_kind)  # type: ignore[arg-type]
    tx.record_transition(
        referral.referral_id,
        referral.status,
        new,
        result.outcome,
        actor,
        note or result.reason,
        now,
    )
    if result.outcome != "applied":
        if result.outcome == "refused":
            tx.audit(
                actor,
                "transition-refused",
                referral.referral_id,
                now,
                partner_id=referral.partner_id,
                why=result.reason,
            )
        return False
    values: dict[str, object] = {"status": new, "updated_at": now}
    if reason is not None:
        values["reason"] = reason
    if outcome is not None:
        values["outcome"] = outcome
    if new not in OPEN:
        values["closed_at"] = now
    tx.update_referral(referral.referral_id, referral.status, **values, **(also or {}))
    return True


def record_status(ledger: Ledger, tx: LedgerTx, event: ReferralStatusChanged, queue: str) -> bool:
    now = ledger.clock()
    if not tx.first_time(event.message_id, queue, now):
        return False
    referral = tx.referral(event.referral_id, lock=True)
    if referral is None:
        raise Refused(f"unknown referral {event.referral_id}")
    if referral.partner_id != event.partner:
        raise Refused(f"referral {event.referral_id} was not sent to {event.partner}")
    if event.status == "completed" and not event.outcome:
        # the schema lets only the bus's forwarded copy (`signal_id` set) go without one
        raise Refused("a completion carries its outcome: what was done for the person")
    if not _apply(
        ledger,
        tx,
        referral,
        event.status,
        "partner",
        event.partner,
        event.note,
        reason=event.reason,
        outcome=event.outcome,
    ):
        return True
    if event.status in ("accepted", "rejected"):
        ledger.directory.record_answer(event.partner, accepted=event.status == "accepted")
    row = tx.signal(referral.signal_id)
    assert row is not None
    _tell_source(
        ledger,
        tx,
        row,
        event.model_copy(update={"signal_id": referral.signal_id, "need": referral.need}),
    )
    tx.audit(
        event.partner,
        f"referral-{event.status}",
        referral.referral_id,
        now,
        partner_id=event.partner,
        # A code, never the partner's free text (an outcome, a note): the audit outlives the
        # free-text retention period.
        why=event.reason or ("with an outcome" if event.outcome else None),
    )
    if event.status == "completed":
        _close_need(ledger, tx, row, referral, "completed", f"completed by {event.partner}")
    if event.status == "rejected":
        assert event.reason is not None
        if reroute_after_rejection(event.reason):
            _reroute(ledger, tx, referral, row)
        else:
            # The person is the problem (unreachable, not interested): rerouting would not
            # help. The advisor, who knows her, decides: she may talk with her and send a
            # new signal.
            _close_need(
                ledger,
                tx,
                row,
                referral,
                "advisor-decides",
                f"{event.partner} rejected it ({event.reason}); the advisor decides what next",
            )
    return True


def _close_need(
    ledger: Ledger,
    tx: LedgerTx,
    row: SignalRow,
    referral: ReferralRow,
    outcome: str,
    detail: str,
) -> None:
    """The need of this signal ends here: recorded, and the source and advisor are told."""
    now = ledger.clock()
    tx.set_need_state(referral.signal_id, referral.need, "closed", detail, now)
    _tell_source(
        ledger,
        tx,
        row,
        SignalClosed(
            message_id=_derived_id("closed", referral.signal_id, referral.need, outcome),
            occurred_at=now,
            signal_id=referral.signal_id,
            need=referral.need,
            outcome=outcome,  # type: ignore[arg-type]
            detail=detail,
        ),
    )


def _reroute(ledger: Ledger, tx: LedgerTx, referral: ReferralRow, row: SignalRow) -> None:
    """To the next-best partner from the directory (those tried are excluded)."""
    tried, attempt = _tried(tx, referral.signal_id, referral.need)
    parked = _route(ledger, tx, row, row.signal(), referral.need, attempt, tried)
    if parked is not None:
        _request_consent(ledger, tx, row, row.signal(), [(referral.need, *parked)], attempt)


def mark_delivered(ledger: Ledger, tx: LedgerTx, referral_id: str) -> None:
    """The broker confirmed the referral: it is disclosed (audited now, not when it was
    decided), and its clock starts now. Only `requested` moves to `delivered`: a referral
    sent again (from the dead letters) that is further along stays where it is."""
    referral = tx.referral(referral_id, lock=True)
    if referral is None:
        return
    now = ledger.clock()
    first = referral.status == "requested"
    if first and _apply(
        ledger,
        tx,
        referral,
        "delivered",
        "bus",
        BUS,
        "publisher confirm",
        also={
            "sent_at": now,
            "due_at": ledger.deadlines.due_by(referral.urgency, now),
            "remind_at": ledger.deadlines.remind_at(referral.urgency, now),
        },
    ):
        _notify_status(
            ledger, tx, referral, "delivered", "in the partner's queue (the broker confirmed it)"
        )
    row = tx.signal(referral.signal_id)
    assert row is not None
    tx.audit(
        BUS,
        "referral-disclosed",
        referral_id,
        now,
        person_ref=row.person_ref,
        partner_id=referral.partner_id,
        why=f"{referral.need}; consent {referral.consent_id}; "
        f"shared: {_shared(referral.partner_kind, row.signal())}"
        + ("" if first else f"; sent again while {referral.status}"),
    )


def record_capacity(ledger: Ledger, tx: LedgerTx, event: CapacityChanged, queue: str) -> bool:
    """Keep the partner's capacity and tell every worker's directory (a broadcast)."""
    now = ledger.clock()
    if not tx.first_time(event.message_id, queue, now):
        return False
    try:
        ledger.directory.partner(event.partner)
    except KeyError:
        raise Refused(f"unknown partner {event.partner!r}") from None
    tx.set_capacity(event.partner, event.status, event.remaining, now)
    tx.enqueue(event, DIRECTORY_UPDATES_KEY, now)
    tx.audit(
        event.partner,
        "capacity-changed",
        event.partner,
        now,
        why=f"{event.status} {event.remaining}",
    )
    return True


# time-driven work ----------------------------------------------------------------------
def scheduled_item_failed(task: str, item: str, exc: BaseException) -> None:
    """Log (the item's id and the error's kind, no personal data) and count an item of a
    scheduled pass that failed; nothing marks it done, so the next pass tries it again."""
    SCHEDULED_ITEM_FAILURES.labels(task).inc()
    log.error(
        "scheduled %s of %s failed, rolled back, tried again at the next pass: %s",
        task,
        item,
        describe_error(exc),
    )


def _isolated(tx: LedgerTx, task: str, item: str, work: Callable[[], bool]) -> bool | None:
    """Run one item of a scheduled pass in its own savepoint: if it raises, only its own
    changes are rolled back, the failure is logged and counted, and the pass goes on
    (None). A lost connection ends the pass: nothing else could run."""
    try:
        with tx.savepoint():
            return work()
    except Exception as exc:
        if not tx.usable:
            raise
        scheduled_item_failed(task, item, exc)
        return None


def watch_deadlines(ledger: Ledger, tx: LedgerTx) -> dict[str, int]:
    """Remind partners that have not answered; past the deadline, expire and reroute;
    withdraw what a partner has not taken up when its consent runs out; tell the advisor
    of consents about to expire. Each item runs alone (`_isolated`): one that fails (a
    partner gone from the directory, a row that cannot be written) is rolled back, logged,
    counted and tried again at the next pass; the others are done."""
    now = ledger.clock()
    counts = {
        "reminded": 0,
        "expired": 0,
        "withdrawn-consent-expired": 0,
        "consents-expiring": 0,
        "failed": 0,
    }

    def tally(key: str, done: bool | None) -> None:
        if done is None:
            counts["failed"] += 1
        elif done:
            counts[key] += 1

    for referral in tx.waiting_referrals():
        action = deadline_action(
            referral.status,
            referral.urgency,
            referral.sent_at or referral.created_at,
            referral.reminded,
            now,
            ledger.deadlines,
        )
        if action.kind == "remind":
            tally(
                "reminded",
                _isolated(
                    tx, "remind", referral.referral_id, partial(_remind, ledger, tx, referral)
                ),
            )
        elif action.kind == "expire":
            tally(
                "expired",
                _isolated(
                    tx, "expire", referral.referral_id, partial(_expire, ledger, tx, referral)
                ),
            )
    for referral in tx.referrals_with_ended_consent(now, AWAITING_ANSWER):
        tally(
            "withdrawn-consent-expired",
            _isolated(
                tx,
                "consent-ended",
                referral.referral_id,
                partial(_withdraw_consent_ended, ledger, tx, referral),
            ),
        )
    for consent in expiring_soon(
        [_record(c) for c in tx.unnotified_consents()], now, ledger.consent_notice
    ):
        tally(
            "consents-expiring",
            _isolated(
                tx,
                "consent-expiring",
                consent.consent_id,
                partial(_notify_consent_expiring, ledger, tx, consent),
            ),
        )
    return counts


def _remind(ledger: Ledger, tx: LedgerTx, referral: ReferralRow) -> bool:
    now = ledger.clock()
    tx.update_referral(referral.referral_id, referral.status, reminded=True)
    tx.enqueue(
        ReferralReminder(
            message_id=_derived_id("reminder", referral.referral_id),
            occurred_at=now,
            referral_id=referral.referral_id,
            partner=referral.partner_id,
            due_by=referral.due_at or now,
        ),
        referral.partner_id,
        now,
        referral_id=referral.referral_id,
    )
    return True


def _expire(ledger: Ledger, tx: LedgerTx, referral: ReferralRow) -> bool:
    """Past the deadline: expired, the source and advisor told, rerouted."""
    if not _apply(ledger, tx, referral, "expired", "bus", BUS, "deadline passed"):
        return False
    row = _notify_status(
        ledger,
        tx,
        referral,
        "expired",
        "no answer before the deadline; sent to the next-best partner",
    )
    tx.audit(
        BUS,
        "referral-expired",
        referral.referral_id,
        ledger.clock(),
        partner_id=referral.partner_id,
    )
    _reroute(ledger, tx, referral, row)
    return True


def _withdraw_consent_ended(ledger: Ledger, tx: LedgerTx, referral: ReferralRow) -> bool:
    """The partner has not taken it up, and may no longer contact the person: withdrawn,
    and the need goes back to the consent gate (the advisor is asked again)."""
    _withdraw(
        ledger,
        tx,
        referral,
        "the consent ran out before the partner took it up",
        BUS,
        reason="consent-expired",
    )
    signal_row = tx.signal(referral.signal_id)
    assert signal_row is not None
    _reroute(ledger, tx, referral, signal_row)
    return True


def _notify_consent_expiring(ledger: Ledger, tx: LedgerTx, consent: ConsentRecord) -> bool:
    now = ledger.clock()
    tx.mark_expiry_notified(consent.consent_id, now)
    tx.enqueue(
        ConsentExpiring(
            message_id=_derived_id("consent-expiring", consent.consent_id),
            occurred_at=now,
            consent_id=consent.consent_id,
            person_ref=consent.person_ref,
            agency=consent.agency,
            valid_until=consent.valid_until,
        ),
        consent.agency,
        now,
    )
    return True


@contextmanager
def _retained_item(tx: LedgerTx, step: str, counts: dict[str, int]) -> Iterator[None]:
    """One item of a retention pass in its own savepoint: a failure undoes that item only,
    is logged and counted like any failed scheduled item (`scheduled_item_failed`); the
    next pass tries it again."""
    try:
        with tx.savepoint():
            yield
    except Exception as exc:  # one bad row must not stop the others
        scheduled_item_failed("retention", f"one {step} item", exc)
        counts["retention-failed"] = counts.get("retention-failed", 0) + 1


def _token() -> str:
    return f"anon-{uuid.uuid4().hex[:16]}"


def apply_retention(
    ledger: Ledger, tx: LedgerTx, *, keep: timedelta, keep_free_text: timedelta
) -> dict[str, int]:
    """Delete free text after `keep_free_text`; anonymise what is closed after `keep`;
    then forget the person everywhere once nothing about her is kept any more.

    Free text goes first: the signal's note, what partners wrote (their notes on each
    status, a completion's outcome), a revocation's reason, the reasons of dead letters
    read by ops. Whole copies of messages go with it: sent copies in the outbox, copies
    that could not be delivered for that long (deleted unsent, audited by type and
    partner), old dedupe marks. Then, once every referral of a signal has been closed for
    `keep`, the person's reference is replaced by a random token in the signal, its
    referrals and the audit trail, and the facts, contact and profile are dropped; a
    consent that ended `keep` ago keeps its scope and dates under a token. Last, a person
    with no signal and no consent left under her reference loses her remaining traces
    older than `keep`: refusals in the consent journal, reads of her consents and
    timeline in the audit (`forget_person`). Each item runs in its own savepoint.
    """
    now = ledger.clock()
    text_cutoff = now - keep_free_text
    cutoff = now - keep
    counts = {
        "free-text-deleted": 0,
        "anonymised": 0,
        "consents-anonymised": 0,
        "persons-forgotten": 0,
        "outbox-expired": 0,
        "partner-text-deleted": 0,
        "bus-text-deleted": 0,
        "outbox-deleted": 0,
        "dedupe-deleted": 0,
        "retention-failed": 0,
    }
    with _retained_item(tx, "partner-text", counts):
        counts["partner-text-deleted"] = tx.delete_partner_text_before(text_cutoff, BUS)
    with _retained_item(tx, "bus-text", counts):
        counts["bus-text-deleted"] = tx.delete_bus_free_text_before(text_cutoff)
    for row in tx.signals_with_text_before(text_cutoff):
        with _retained_item(tx, "signal-note", counts):
            body = json.loads(row.body)
            if (body.get("facts") or {}).get("note") is not None:
                body["facts"]["note"] = None
                counts["free-text-deleted"] += 1
            tx.rewrite_signal(row.signal_id, body=json.dumps(body), note_deleted_at=now)
    for unsent in tx.undeliverable_before(text_cutoff):
        with _retained_item(tx, "outbox-expiry", counts):
            if tx.expire_unsent(unsent.id, text_cutoff):
                tx.audit(
                    BUS,
                    "outbox-expired",
                    unsent.message_id,
                    now,
                    partner_id=unsent.routing_key[:64],
                    why=(
                        f"{unsent.message_type} undelivered since "
                        f"{unsent.created_at:%Y-%m-%d} after {unsent.attempts} tries: deleted"
                    ),
                )
                counts["outbox-expired"] += 1
    for row in tx.signals_closed_before(cutoff):
        with _retained_item(tx, "signal-anonymisation", counts):
            token = _token()
            body = json.loads(row.body)
            body.update({"person_ref": token, "facts": {}, "contact": None, "profile": {}})
            tx.rewrite_signal(
                row.signal_id, body=json.dumps(body), person_ref=token, anonymised_at=now
            )
            tx.anonymise_person_records(row.signal_id, token, now)
            tx.audit(
                BUS,
                "anonymised",
                row.signal_id,
                now,
                person_ref=token,
                why=f"closed for {keep.days} days",
            )
            counts["anonymised"] += 1
    for consent_id in tx.ended_consents_before(cutoff):
        with _retained_item(tx, "consent-anonymisation", counts):
            tx.anonymise_consent(consent_id, _token())
            counts["consents-anonymised"] += 1
    for person_ref in tx.persons_to_forget(cutoff):
        with _retained_item(tx, "person-erasure", counts):
            token = _token()
            tx.forget_person(person_ref, token, cutoff)
            tx.audit(
                BUS,
                "person-forgotten",
                token,
                now,
                person_ref=token,
                why=f"no signal or consent left; traces older than {keep.days} days",
            )
            counts["persons-forgotten"] += 1
    with _retained_item(tx, "outbox-sent", counts):
        counts["outbox-deleted"] = tx.delete_sent_outbox_before(text_cutoff)
    with _retained_item(tx, "dedupe", counts):
        counts["dedupe-deleted"] = tx.delete_processed_before(text_cutoff)
    return counts


# dead letters -------------------------------------------------------------------------
OUTBOUND: TypeAdapter[OutboundMessage] = TypeAdapter(OutboundMessage)


def replay_to_partner(ledger: Ledger, tx: LedgerTx, partner_id: str, body: bytes) -> str | None:
    """A dead letter of a partner's queue (its system failed on the message), sent again
    through the outbox, so that it meets the same send-time check as any other message
    and leaves in the ledger's order: a referral only while it still awaits this partner's
    answer under a consent valid now (checked here, and again by the relay); a reminder
    only while it awaits the answer; a withdrawal whenever its referral was this
    partner's. Returns why it is refused (ids and states, no personal data), or None once
    it is in the outbox."""
    try:
        message = OUTBOUND.validate_json(body)
    except ValidationError as exc:
        return f"not a message the bus sends ({exc.error_count()} error(s))"
    now = ledger.clock()
    rid = None
    if isinstance(message, Referral | ReferralWithdrawn | ReferralReminder):
        rid = message.referral_id
        referral = tx.referral(rid)
        if referral is None:
            return f"referral {rid} is no longer in the ledger"
        if partner_id != referral.partner_id or partner_id != message.partner:
            return f"referral {rid} was not sent to {partner_id}"
        if not isinstance(message, ReferralWithdrawn) and referral.status not in AWAITING_ANSWER:
            return f"referral {rid} is {referral.status}: it no longer awaits {partner_id}'s answer"
        if isinstance(message, Referral):
            consent = tx.consent(referral.consent_id)
            row = tx.signal(referral.signal_id)
            if consent is None or row is None:
                return f"referral {rid}: its consent or signal is no longer in the ledger"
            decision = evaluate_consent(
                [_record(consent)],
                row.person_ref,
                referral.need,
                referral.partner_id,
                referral.partner_kind,
                now,
            )
            if not decision.allowed:
                return f"referral {rid}: consent {decision.consent_id} is {decision.reason} now"
    tx.enqueue_again(message, partner_id, now, referral_id=rid)
    return None


def count_refused_dead_letter(ledger: Ledger, tx: LedgerTx, message_id: str, queue: str) -> None:
    """A dead-letter queue was full and refused the bus's copy of a refused message: the
    message stays in its work queue; ops count these (the monitor's
    `partnerbus_dead_letter_refused_total`) and find each one in the audit trail."""
    tx.audit(
        BUS,
        DEAD_LETTER_REFUSED,
        message_id[:128],
        ledger.clock(),
        why=f"the dead-letter queue of {queue} is full: the message stays in {queue}",
    )


DEAD_LETTER_REFUSED = "dead-letter-refused"
"""Audit action of a dead-letter copy refused by a full dead-letter queue."""
