"""The advisor's decisions, sent by her agency on the consents exchange (the pivot's door):
cancel a referral with a reason (`ReferralCancelled`), send a need to a partner she chose
(`NeedDirected`), transfer an accepted referral to another partner (`ReferralTransferred`),
reopen a need whose road ended (`NeedReopened`), record an orientation she made outside the
bus (`OrientationRecorded`). Only the agency that follows the signal
decides on its referrals, through one of its own advisors; each decision runs through the
state machine, is audited, and the closed loop hears of it as of any status change."""

from __future__ import annotations

from dataclasses import replace

from partnerbus.directory import match
from partnerbus.errors import Refused
from partnerbus.ledger.store import LedgerTx, ReferralRow, SignalRow
from partnerbus.rules import (
    NEED_CLOSED,
    OPEN,
    Transition,
    evaluate_consent,
    referral_id,
    transfer,
    transition,
)
from partnerbus.schemas import (
    NeedDirected,
    NeedReopened,
    OrientationRecorded,
    Partner,
    ReferralCancelled,
    ReferralStatusChanged,
    ReferralTransferred,
    ReferralWithdrawn,
)
from partnerbus.usecases.consents import CLOCK_SKEW, _own_advisor, _pivot
from partnerbus.usecases.context import Ledger, _derived_id, intake, send
from partnerbus.usecases.lifecycle import _apply, _may_have_left
from partnerbus.usecases.loop import _close_need, _notify_status, _tell_source
from partnerbus.usecases.routing import _request_consent, _route, _send_referral, _tried


def _followed_by(ledger: Ledger, row: SignalRow, agency_id: str, advisor: str) -> Partner:
    """The deciding agency must be a pivot, the one that follows this signal, and the
    advisor one of its own. The reason never names the agency that does follow it."""
    agency = _pivot(ledger, agency_id, "an advisor's decision")
    if row.agency != agency_id:
        raise Refused(
            f"signal {row.signal_id} is not followed by {agency_id!r}: only its own agency "
            f"decides on its referrals"
        )
    _own_advisor(agency, advisor, "decided_by")
    return agency


@intake
def cancel_referral(ledger: Ledger, tx: LedgerTx, event: ReferralCancelled) -> None:
    """The advisor cancels an open referral, with her reason. The partner is told to drop
    it (`ReferralWithdrawn`, `signal-cancelled`) if it may have received it; one that never
    left is withheld. The need closes; the source and the agency hear `cancelled` (the
    reason goes to the agency only, as a note)."""
    referral, row = _referral_of(ledger, tx, event.referral_id, event.agency, event.decided_by)
    verdict = transition(referral.status, "cancelled", "advisor")
    note = f"cancelled by {event.decided_by}: {event.reason}"
    _cancel(ledger, tx, referral, row, verdict, event.decided_by, note, "referral-cancelled")


@intake
def transfer_referral(ledger: Ledger, tx: LedgerTx, event: ReferralTransferred) -> None:
    """The advisor moves an accepted referral to another partner she chose: the first
    closes as `cancelled` (its partner told to drop it), a new referral goes to the other
    (checked as `direct_need` checks a choice), in one transaction."""
    referral, row = _referral_of(ledger, tx, event.referral_id, event.agency, event.decided_by)
    if event.partner == referral.partner_id:
        raise Refused(f"referral {event.referral_id} is already with {event.partner}")
    verdict = transfer(referral.status)
    note = f"transferred to {event.partner} by {event.decided_by}: {event.reason}"
    _cancel(ledger, tx, referral, row, verdict, event.decided_by, note, "referral-transferred")
    _to_chosen(ledger, tx, row, referral.need, event.partner, event.decided_by)


@intake
def direct_need(ledger: Ledger, tx: LedgerTx, event: NeedDirected) -> None:
    """The advisor sends a need of the signal to the partner she chose. The partner must
    have an agreement covering the need in the person's commune (the directory's
    candidates); the directory's ranking becomes advice, given in the referral's `why`.
    The person's consent must cover that partner; the need must have no open referral."""
    row = _signal_of(ledger, tx, event.signal_id, event.need, event.agency, event.decided_by)
    _no_open_referral(tx, event.signal_id, event.need)
    _to_chosen(ledger, tx, row, event.need, event.partner, event.decided_by)


@intake
def record_orientation(ledger: Ledger, tx: LedgerTx, event: OrientationRecorded) -> None:
    """The advisor oriented the person to a partner outside the bus: recorded as a
    referral closed `completed` at once (nothing is sent to the partner, nothing follows it
    up), under the person's consent, which must cover that partner; the source and the
    agency hear it and the need closes, as for a referral the partner completed."""
    now = ledger.clock()
    row = _signal_of(ledger, tx, event.signal_id, event.need, event.agency, event.decided_by)
    _no_open_referral(tx, event.signal_id, event.need)
    if event.partner not in ledger.directory:
        raise Refused(f"unknown partner {event.partner!r}: record an orientation to a partner")
    if event.oriented_at > now + CLOCK_SKEW:
        raise Refused(
            f"oriented_at {event.oriented_at:%Y-%m-%d %H:%M} is in the future (the bus's "
            f"clock says {now:%Y-%m-%d %H:%M} UTC): record an orientation once it is made"
        )
    partner = ledger.directory.partner(event.partner)
    signal = row.signal()
    consent = evaluate_consent(
        tx.consents.of_person(signal.person_ref),
        signal.person_ref,
        event.need,
        partner.id,
        partner.kind,
        now,
    )
    if not consent.allowed or consent.consent_id is None:
        raise Refused(
            f"the person's consent does not cover {partner.id} for {event.need} "
            f"({consent.reason}): record her consent first"
        )
    _, attempt = _tried(tx, event.signal_id, event.need)
    rid = referral_id(event.signal_id, event.need, attempt)
    outcome = (
        f"oriented outside the bus ({event.channel}) by {event.decided_by} on "
        f"{event.oriented_at:%Y-%m-%d}"
    )
    tx.referrals.add(
        referral_id=rid,
        signal_id=event.signal_id,
        need=event.need,
        attempt=attempt,
        partner_id=partner.id,
        partner_kind=partner.kind,
        consent_id=consent.consent_id,
        status="completed",
        outcome=outcome,
        urgency=signal.urgency,
        created_at=now,
        updated_at=now,
        closed_at=now,
        reminded=False,
    )
    tx.referrals.record_transition(
        rid, "requested", "completed", "applied", event.decided_by, outcome, now
    )
    referral = tx.referrals.get(rid)
    assert referral is not None
    _tell_source(
        ledger,
        tx,
        row,
        ReferralStatusChanged(
            message_id=_derived_id("status", rid, "completed"),
            occurred_at=now,
            referral_id=rid,
            partner=partner.id,
            status="completed",
            outcome=outcome,
            note=event.note,
            signal_id=event.signal_id,
            need=event.need,
        ),
    )
    _close_need(
        ledger, tx, row, referral, "completed", f"oriented to {partner.id} ({event.channel})"
    )
    tx.audit.record(
        event.decided_by,
        "orientation-recorded",
        rid,
        now,
        person_ref=signal.person_ref,
        partner_id=partner.id,
        why=f"{event.need}: outside the bus ({event.channel}); nothing sent to the partner",
    )


@intake
def reopen_need(ledger: Ledger, tx: LedgerTx, event: NeedReopened) -> None:
    """The advisor reopens a need whose road ended: routed again by the directory as a new
    attempt, every partner a candidate again (one that declined may take it now that the
    advisor has talked with the person); without consent it is parked and she is asked."""
    now = ledger.clock()
    row = _signal_of(ledger, tx, event.signal_id, event.need, event.agency, event.decided_by)
    state = tx.signals.need_state(event.signal_id, event.need)
    if state not in NEED_CLOSED:
        raise Refused(
            f"{event.need} of signal {event.signal_id} is {state}, not closed: only a need "
            f"whose road ended is reopened"
        )
    _, attempt = _tried(tx, event.signal_id, event.need)
    signal = row.signal()
    salt = event.message_id  # what it sends is not mistaken for an earlier routing's
    parked = _route(ledger, tx, row, signal, event.need, attempt, (), salt=salt)
    if parked is not None:
        _request_consent(ledger, tx, row, signal, [parked], attempt, salt=salt)
    # The need's state says where routing took it; its detail keeps the advisor's note.
    after = tx.signals.need_state(event.signal_id, event.need) or "routed"
    note = f"reopened by {event.decided_by} (was {state}): {event.note}"
    tx.signals.set_need_state(event.signal_id, event.need, after, note, now)
    tx.audit.record(
        event.decided_by,
        "need-reopened",
        event.signal_id,
        now,
        person_ref=row.person_ref,
        partner_id=event.agency,
        why=f"{event.need}: was {state}; routed again (attempt {attempt})",
    )


def _referral_of(
    ledger: Ledger, tx: LedgerTx, referral_id: str, agency: str, advisor: str
) -> tuple[ReferralRow, SignalRow]:
    referral = tx.referrals.get(referral_id, lock=True)
    if referral is None:
        raise Refused(f"unknown referral {referral_id}")
    row = tx.signals.get(referral.signal_id)
    assert row is not None
    _followed_by(ledger, row, agency, advisor)
    return referral, row


def _signal_of(
    ledger: Ledger, tx: LedgerTx, signal_id: str, need: str, agency: str, advisor: str
) -> SignalRow:
    row = tx.signals.get(signal_id)
    if row is None:
        raise Refused(f"unknown signal {signal_id}")
    _followed_by(ledger, row, agency, advisor)
    if need not in tx.signals.need_states(signal_id):
        raise Refused(f"signal {signal_id} has no need {need}")
    tx.signals.lock_person(row.person_ref)  # consents and parked needs decided under it
    return row


def _cancel(
    ledger: Ledger,
    tx: LedgerTx,
    referral: ReferralRow,
    row: SignalRow,
    verdict: Transition,
    advisor: str,
    note: str,
    action: str,
) -> None:
    """Close the referral as `cancelled` by the advisor, if `verdict` (the state
    machine's) allows it: its partner told to drop it (or the referral withheld if it never
    left), the need closed, the source and the agency told, the decision audited."""
    now = ledger.clock()
    if not verdict.applied:
        what = "transferred" if action == "referral-transferred" else "cancelled"
        raise Refused(f"referral {referral.referral_id} cannot be {what}: {verdict.reason}")
    applied = _apply(ledger, tx, referral, "cancelled", "advisor", advisor, note)
    assert applied
    left = _may_have_left(tx, referral)
    if left is not False:
        send(
            ledger,
            tx,
            ReferralWithdrawn(
                message_id=_derived_id("cancelled", referral.referral_id),
                occurred_at=now,
                referral_id=referral.referral_id,
                partner=referral.partner_id,
                reason="signal-cancelled",
            ),
            referral.partner_id,
            referral_id=referral.referral_id,
        )
    tx.signals.set_need_state(referral.signal_id, referral.need, "closed", note, now)
    _notify_status(ledger, tx, referral, "cancelled", note)
    if left:
        told = "the partner is told to drop it"
    elif left is False:
        told = "it had not left: the partner never received it"
    else:
        told = "a relay holds it: sent or withheld when the relay gets to it"
    # A code, never the advisor's words: the audit outlives the free-text retention.
    tx.audit.record(
        advisor,
        action,
        referral.referral_id,
        now,
        person_ref=row.person_ref,
        partner_id=referral.partner_id,
        why=f"by the advisor; {told}",
    )


def _to_chosen(
    ledger: Ledger, tx: LedgerTx, row: SignalRow, need: str, partner: str, advisor: str
) -> None:
    """A new referral of this need to the partner the advisor chose: one of the directory's
    candidates (an agreement covering the need in the person's commune), that the
    person's consent covers; its `why` says who chose it and how the directory ranked it."""
    now = ledger.clock()
    if partner not in ledger.directory:
        raise Refused(f"unknown partner {partner!r}")
    signal = row.signal()
    candidates = match(
        ledger.directory, need, signal.commune, profile=signal.profile, sender=signal.source
    )
    chosen = next((c for c in candidates if c.partner_id == partner), None)
    if chosen is None:
        offered = ", ".join(c.partner_id for c in candidates[:5]) or "none"
        raise Refused(
            f"{partner!r} has no agreement covering {need} in {signal.commune} for this "
            f"signal; the directory's candidates: {offered}"
        )
    consent = evaluate_consent(
        tx.consents.of_person(signal.person_ref),
        signal.person_ref,
        need,
        chosen.partner_id,
        chosen.partner.kind,
        now,
    )
    if not consent.allowed:
        raise Refused(
            f"the person's consent does not cover {partner} for {need} ({consent.reason}): "
            f"record her consent first"
        )
    best = candidates[0]
    advice = f"the directory ranked it {chosen.rank} of {len(candidates)}" + (
        f" (its first choice: {best.partner_id})" if chosen.rank != best.rank else ""
    )
    reasons = (f"chosen by the advisor {advisor}", advice, *chosen.reasons)
    _, attempt = _tried(tx, row.signal_id, need)
    _send_referral(
        ledger, tx, row, signal, need, attempt, replace(chosen, reasons=reasons), consent
    )
    tx.audit.record(
        advisor,
        "need-directed",
        row.signal_id,
        now,
        person_ref=signal.person_ref,
        partner_id=partner,
        why=f"{need}: chosen by the advisor; {advice}",
    )


def _no_open_referral(tx: LedgerTx, signal_id: str, need: str) -> None:
    for earlier in tx.referrals.for_signal(signal_id, need):
        if earlier.status in OPEN:
            raise Refused(
                f"{need} of signal {signal_id} has an open referral {earlier.referral_id} "
                f"({earlier.status}, to {earlier.partner_id}): cancel it first"
            )
