"""The advisor's decisions, sent by her agency on the consents exchange (the pivot's door):
cancel a referral with a reason (`ReferralCancelled`), send a need to a partner she chose
(`NeedDirected`). Only the agency that follows the signal decides on its referrals, through
one of its own advisors; each decision runs through the state machine, is audited, and the
closed loop hears of it as of any status change."""

from __future__ import annotations

from dataclasses import replace

from partnerbus.directory import match
from partnerbus.errors import Refused
from partnerbus.ledger.store import LedgerTx, SignalRow
from partnerbus.rules import OPEN, evaluate_consent, transition
from partnerbus.schemas import NeedDirected, Partner, ReferralCancelled, ReferralWithdrawn
from partnerbus.usecases.consents import _own_advisor, _pivot
from partnerbus.usecases.context import Ledger, _derived_id, intake, send
from partnerbus.usecases.lifecycle import _apply, _may_have_left
from partnerbus.usecases.loop import _notify_status
from partnerbus.usecases.routing import _send_referral, _tried


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
    now = ledger.clock()
    referral = tx.referrals.get(event.referral_id, lock=True)
    if referral is None:
        raise Refused(f"unknown referral {event.referral_id}")
    row = tx.signals.get(referral.signal_id)
    assert row is not None
    _followed_by(ledger, row, event.agency, event.decided_by)
    verdict = transition(referral.status, "cancelled", "advisor")
    if not verdict.applied:
        raise Refused(f"referral {event.referral_id} cannot be cancelled: {verdict.reason}")
    note = f"cancelled by {event.decided_by}: {event.reason}"
    applied = _apply(ledger, tx, referral, "cancelled", "advisor", event.decided_by, note)
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
    # A code, never the advisor's words: the audit outlives the free-text retention.
    tx.audit.record(
        event.decided_by,
        "referral-cancelled",
        referral.referral_id,
        now,
        person_ref=row.person_ref,
        partner_id=referral.partner_id,
        why="by the advisor; "
        + (
            "the partner is told to drop it"
            if left
            else "it had not left: the partner never received it"
            if left is False
            else "a relay holds it: sent or withheld when the relay gets to it"
        ),
    )


@intake
def direct_need(ledger: Ledger, tx: LedgerTx, event: NeedDirected) -> None:
    """The advisor sends a need of the signal to the partner she chose. The partner must
    have an agreement covering the need in the person's commune (the directory's
    candidates); the directory's ranking becomes advice, given in the referral's `why`.
    The person's consent must cover that partner; the need must have no open referral."""
    now = ledger.clock()
    row = tx.signals.get(event.signal_id)
    if row is None:
        raise Refused(f"unknown signal {event.signal_id}")
    _followed_by(ledger, row, event.agency, event.decided_by)
    states = tx.signals.need_states(event.signal_id)
    if event.need not in states:
        raise Refused(f"signal {event.signal_id} has no need {event.need}")
    signal = row.signal()
    tx.signals.lock_person(signal.person_ref)  # consents and parked needs decided under it
    for earlier in tx.referrals.for_signal(event.signal_id, event.need):
        if earlier.status in OPEN:
            raise Refused(
                f"{event.need} of signal {event.signal_id} has an open referral "
                f"{earlier.referral_id} ({earlier.status}, to {earlier.partner_id}): cancel it "
                f"first"
            )
    if event.partner not in ledger.directory:
        raise Refused(f"unknown partner {event.partner!r}")
    candidates = match(
        ledger.directory, event.need, signal.commune, profile=signal.profile, sender=signal.source
    )
    chosen = next((c for c in candidates if c.partner_id == event.partner), None)
    if chosen is None:
        offered = ", ".join(c.partner_id for c in candidates[:5]) or "none"
        raise Refused(
            f"{event.partner!r} has no agreement covering {event.need} in {signal.commune} "
            f"for this signal; the directory's candidates: {offered}"
        )
    consent = evaluate_consent(
        tx.consents.of_person(signal.person_ref),
        signal.person_ref,
        event.need,
        chosen.partner_id,
        chosen.partner.kind,
        now,
    )
    if not consent.allowed:
        raise Refused(
            f"the person's consent does not cover {event.partner} for {event.need} "
            f"({consent.reason}): record her consent first"
        )
    best = candidates[0]
    advice = f"the directory ranked it {chosen.rank} of {len(candidates)}" + (
        f" (its first choice: {best.partner_id})" if chosen.rank != best.rank else ""
    )
    reasons = (f"chosen by the advisor {event.decided_by}", advice, *chosen.reasons)
    _, attempt = _tried(tx, event.signal_id, event.need)
    _send_referral(
        ledger, tx, row, signal, event.need, attempt, replace(chosen, reasons=reasons), consent
    )
    tx.audit.record(
        event.decided_by,
        "need-directed",
        event.signal_id,
        now,
        person_ref=signal.person_ref,
        partner_id=event.partner,
        why=f"{event.need}: chosen by the advisor; {advice}",
    )
