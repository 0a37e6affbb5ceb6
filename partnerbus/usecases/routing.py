"""Where a need goes: a decision (`decide_routing`: the directory's match, the consent
rules over facts read beforehand, and each consented candidate's room, counted in the
ledger), then a step that records it (`record_routing`: a referral in the outbox, a need
parked for consent, or no partner)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from partnerbus.directory import Candidate, Directory, match
from partnerbus.ledger.store import LedgerTx, ReferralRow, SignalRow
from partnerbus.rules import (
    OPEN,
    ConsentDecision,
    ConsentRecord,
    evaluate_consent,
    minimise,
    minimise_preferences,
    pseudonym,
    referral_id,
    signal_pseudonym,
)
from partnerbus.schemas import ConsentRequested, NoPartnerFound, Referral, Signal, SignalClosed
from partnerbus.usecases.context import BUS, Ledger, _derived_id, send
from partnerbus.usecases.loop import _tell_source


@dataclass(frozen=True)
class SendReferral:
    """Refer the need to this candidate, under the consent that allows it."""

    need: str
    candidate: Candidate
    consent: ConsentDecision


@dataclass(frozen=True)
class AwaitConsent:
    """Candidates exist, but none the person consented to: the need waits (parked) and
    the agency's advisor is asked, with these candidates suggested."""

    need: str
    consent: ConsentDecision
    """The first candidate's refusal: why the need waits."""
    candidates: tuple[Candidate, ...]


@dataclass(frozen=True)
class NoPartner:
    """No partner can take the need (besides those already tried): it closes here."""

    need: str
    reason: str
    tried: tuple[str, ...] = ()
    """The partners tried before (the agency is told which)."""


RoutingDecision = SendReferral | AwaitConsent | NoPartner


@dataclass(frozen=True)
class Room:
    """A candidate's places as the ledger counts them: its declared capacity less the
    referrals it holds open."""

    free: bool
    """It may take one more referral."""
    reason: str
    """What the explanation says of its capacity (`capacity 1 left (2 open of 3)`,
    `full (3 open of 3)`)."""


RoomCheck = Callable[[Candidate], Room | None]
"""A candidate's `Room`, or None when it declared no limit (nothing to count)."""


def decide_routing(
    directory: Directory,
    signal: Signal,
    need: str,
    consents: Sequence[ConsentRecord],
    now: datetime,
    tried: tuple[str, ...] = (),
    room: RoomCheck | None = None,
) -> RoutingDecision:
    """Where this need of the signal goes: the best candidate of the directory (besides
    those `tried`) that one of the person's `consents` allows at `now` and that has
    `room`. The consents are read beforehand, under the person's lock; `room` is asked
    only about consented candidates, best first, until one has a place (in the use case
    it counts open referrals under the partner's lock); nothing is written. A full
    candidate is skipped and said so in the chosen one's reasons, or in the no-partner
    reason when every consented candidate is full."""
    candidates = match(
        directory,
        need,
        signal.commune,
        profile=signal.profile,
        sender=signal.source,
        exclude=frozenset(tried),
        home_visit=signal.preferences is not None and signal.preferences.home_visit,
    )
    if not candidates:
        reason = f"no partner for {need} in {signal.commune}" + (
            f" besides {', '.join(tried)}" if tried else ""
        )
        if signal.source not in directory:
            reason += f": the source {signal.source} is no longer in the directory (no agreement)"
        return NoPartner(need, reason, tried)
    first_decision: ConsentDecision | None = None
    full: list[str] = []
    waiting: list[Candidate] = []
    for candidate in candidates:
        decision = evaluate_consent(
            consents, signal.person_ref, need, candidate.partner_id, candidate.partner.kind, now
        )
        if not decision.allowed:
            first_decision = first_decision or decision
            waiting.append(candidate)
            continue
        places = room(candidate) if room is not None else None
        if places is not None and not places.free:
            full.append(f"{candidate.partner_id} skipped: {places.reason}")
            continue
        reasons = candidate.reasons
        if places is not None:
            reasons = (*reasons[:4], places.reason, *reasons[5:])
        if full or places is not None:
            candidate = replace(candidate, reasons=(*reasons, *full))
        return SendReferral(need, candidate, decision)
    if first_decision is None:
        # every candidate the person consented to is full: none can take it now
        reason = f"no partner with room for {need} in {signal.commune}: " + "; ".join(full)
        return NoPartner(need, reason, tried)
    return AwaitConsent(need, first_decision, tuple(waiting))


def record_routing(
    ledger: Ledger,
    tx: LedgerTx,
    row: SignalRow,
    signal: Signal,
    attempt: int,
    decision: RoutingDecision,
    *,
    salt: str = "",
) -> AwaitConsent | None:
    """Record what `decide_routing` decided: a referral in the outbox; or the need parked,
    returned so that the caller asks for consent (once for all of a signal's needs); or
    no partner, told to the agency and the source. `salt` (a reopening's id) keeps the ids
    of what it sends apart from an earlier routing of the same attempt."""
    now = ledger.clock()
    need = decision.need
    if isinstance(decision, SendReferral):
        _send_referral(ledger, tx, row, signal, need, attempt, decision.candidate, decision.consent)
        return None
    if isinstance(decision, AwaitConsent):
        tx.signals.set_need_state(row.signal_id, need, "parked", decision.consent.detail, now)
        tx.audit.record(
            BUS,
            "signal-parked",
            row.signal_id,
            now,
            person_ref=signal.person_ref,
            why=f"{need}: {decision.consent.reason}",
        )
        return decision
    reason, tried = decision.reason, decision.tried
    tx.signals.set_need_state(row.signal_id, need, "no-partner", reason, now)
    if row.agency:
        send(
            ledger,
            tx,
            NoPartnerFound(
                message_id=_derived_id(
                    "no-partner", row.signal_id, need, str(attempt), *_salted(salt)
                ),
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
        )
        tx.audit.record(
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
            message_id=_derived_id(
                "closed", row.signal_id, need, "no-partner", str(attempt), *_salted(salt)
            ),
            occurred_at=now,
            signal_id=row.signal_id,
            need=need,
            outcome="no-partner",
            detail=reason,
        ),
    )
    return None


def _route(
    ledger: Ledger,
    tx: LedgerTx,
    row: SignalRow,
    signal: Signal,
    need: str,
    attempt: int,
    tried: tuple[str, ...],
    *,
    salt: str = "",
) -> AwaitConsent | None:
    """Send this need to the best partner the person consented to: read, decide (pure),
    record. Returns the decision when the need must wait for consent (parked)."""
    # What this person consented to and which of her needs wait for it are decided under
    # her lock: a grant committing meanwhile either is seen here or sees the need parked.
    tx.signals.lock_person(signal.person_ref)
    consents = tx.consents.of_person(signal.person_ref)
    decision = decide_routing(
        ledger.directory,
        signal,
        need,
        consents,
        ledger.clock(),
        tried,
        room=lambda candidate: _room(tx, candidate),
    )
    return record_routing(ledger, tx, row, signal, attempt, decision, salt=salt)


def _room(tx: LedgerTx, candidate: Candidate) -> Room | None:
    """The candidate's places as the ledger has them, so that every worker agrees: its
    last capacity event (else the directory's declaration) less its open referrals,
    counted under its lock (held until commit: a worker routing to it meanwhile waits,
    then counts the referral this transaction adds). None: no limit declared."""
    partner = candidate.partner
    status, declared = tx.capacity.get(partner.id) or (partner.capacity_status, partner.capacity)
    if status == "no-capacity":
        return Room(free=False, reason="no-capacity")
    if declared is None:
        return None
    tx.capacity.lock(partner.id)
    taken = tx.capacity.taken(partner.id, OPEN)
    left = declared - taken
    counted = f"{taken} open of {declared}"
    if left <= 0:
        return Room(free=False, reason=f"full ({counted})")
    if status == "capacity":
        return Room(free=True, reason=f"capacity {left} left ({counted})")
    return Room(free=True, reason=f"{status} ({left} left, {counted})")


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
    wishes = signal.preferences
    # do-not-contact and through-the-advisor take the contact details away, for every kind
    profile, facts, contact = minimise(
        partner.kind, signal.profile, signal.facts, signal.contact, wishes
    )
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
        preferences=minimise_preferences(partner.kind, wishes),
        why=candidate.reasons,
    )
    tx.referrals.add(
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
    tx.referrals.record_transition(
        rid, "requested", "requested", "applied", BUS, decision.detail, now
    )
    tx.signals.set_need_state(
        row.signal_id, need, "routed", f"to {partner.id} (attempt {attempt})", now
    )
    # Nothing is disclosed yet: the audit records the disclosure when the broker confirms
    # the referral (`mark_delivered`), or that it was withheld if it never leaves.
    send(ledger, tx, referral, partner.id, source=row.source, agency=row.agency, referral_id=rid)


def _request_consent(
    ledger: Ledger,
    tx: LedgerTx,
    row: SignalRow,
    signal: Signal,
    parked: Sequence[AwaitConsent],
    attempt: int = 1,
    *,
    salt: str = "",
) -> None:
    """Ask the agency's advisor for the person's consent, once for all these needs."""
    now = ledger.clock()
    if row.agency is None:
        choice = ledger.directory.resolve_agency(signal.commune, source=signal.source)
        if choice.ambiguous:
            _close_unasked(ledger, tx, row, signal, parked, choice.refusal(signal.commune), attempt)
            return
        # No agency covers the commune, so no advisor to ask: the needs stay parked,
        # counted on the ops page, and the audit says why.
        for waiting in parked:
            tx.signals.set_need_state(
                row.signal_id, waiting.need, "parked", "no agency covers the commune", now
            )
        tx.audit.record(
            BUS,
            "consent-not-requested",
            row.signal_id,
            now,
            person_ref=signal.person_ref,
            why=f"no agency covers {signal.commune}: nobody to ask for consent",
        )
        return
    needs = tuple(waiting.need for waiting in parked)
    suggested: list[str] = []
    for waiting in parked:
        for c in waiting.candidates[:3]:
            if c.partner_id not in suggested:
                suggested.append(c.partner_id)
    reasons = sorted({waiting.consent.reason for waiting in parked})
    send(
        ledger,
        tx,
        ConsentRequested(
            message_id=_derived_id(
                "consent-requested", row.signal_id, str(attempt), *needs, *_salted(salt)
            ),
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
    )
    tx.audit.record(
        BUS,
        "consent-requested",
        row.signal_id,
        now,
        person_ref=signal.person_ref,
        partner_id=row.agency,
        why=f"{', '.join(needs)}: {', '.join(reasons)}",
    )


def _close_unasked(
    ledger: Ledger,
    tx: LedgerTx,
    row: SignalRow,
    signal: Signal,
    parked: Sequence[AwaitConsent],
    reason: str,
    attempt: int,
) -> None:
    """Several organisations' agencies cover the commune and the signal named none: the
    bus does not pick whose advisor asks the person, so the needs waiting for consent
    close at once (`consent-not-obtained`), and the source hears why: to send the signal
    again naming its agency or landlord."""
    now = ledger.clock()
    for waiting in parked:
        tx.signals.set_need_state(row.signal_id, waiting.need, "closed", reason, now)
        _tell_source(
            ledger,
            tx,
            row,
            SignalClosed(
                message_id=_derived_id(
                    "closed", row.signal_id, waiting.need, "no-agency", str(attempt)
                ),
                occurred_at=now,
                signal_id=row.signal_id,
                need=waiting.need,
                outcome="consent-not-obtained",
                detail=reason,
            ),
        )
    tx.audit.record(
        BUS,
        "consent-not-requested",
        row.signal_id,
        now,
        person_ref=signal.person_ref,
        why=f"{', '.join(w.need for w in parked)}: {reason}",
    )


def _tried(tx: LedgerTx, signal_id: str, need: str) -> tuple[tuple[str, ...], int]:
    """The partners already tried for this need (excluded from the next match) and the
    next attempt number. A referral withdrawn for want of consent did not try its partner:
    that partner may be chosen again once the person consents again."""
    earlier = tx.referrals.for_signal(signal_id, need)
    tried = tuple(dict.fromkeys(r.partner_id for r in earlier if r.status != "withdrawn"))
    return tried, len(earlier) + 1


def _reroute(ledger: Ledger, tx: LedgerTx, referral: ReferralRow, row: SignalRow) -> None:
    """To the next-best partner from the directory (those tried are excluded)."""
    tried, attempt = _tried(tx, referral.signal_id, referral.need)
    parked = _route(ledger, tx, row, row.signal(), referral.need, attempt, tried)
    if parked is not None:
        _request_consent(ledger, tx, row, row.signal(), [parked], attempt)


def _salted(salt: str) -> tuple[str, ...]:
    """The extra part of a derived id, none when unsalted (ids as they always were)."""
    return (salt,) if salt else ()
