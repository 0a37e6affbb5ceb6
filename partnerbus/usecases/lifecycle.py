"""A referral's state changes, shared by every verb that moves one: the state machine
applied under a compare-and-set, and a withdrawal for want of consent."""

from __future__ import annotations

from partnerbus.ledger.store import Conflict, LedgerTx, ReferralRow
from partnerbus.rules import OPEN, transition
from partnerbus.schemas import ReferralWithdrawn
from partnerbus.usecases.context import Ledger, _derived_id, send
from partnerbus.usecases.loop import _notify_status


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
    current = tx.referrals.get(referral.referral_id, lock=True)
    if current is None or current.status != referral.status:
        msg = f"referral {referral.referral_id} changed since it was read"
        raise Conflict(msg)
    result = transition(referral.status, new, actor_kind)  # type: ignore[arg-type]
    tx.referrals.record_transition(
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
            tx.audit.record(
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
    tx.referrals.update(referral.referral_id, referral.status, now=now, **values, **(also or {}))
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
        send(
            ledger,
            tx,
            ReferralWithdrawn(
                message_id=_derived_id("withdrawn", referral.referral_id),
                occurred_at=now,
                referral_id=referral.referral_id,
                partner=referral.partner_id,
                reason=reason,
            ),
            referral.partner_id,
            referral_id=referral.referral_id,
        )
    tx.signals.set_need_state(referral.signal_id, referral.need, "withdrawn", why, now)
    _notify_status(ledger, tx, referral, "withdrawn", why)
    if left is None:
        # A relay holds a claim on the referral and has not tried it yet: it settles the
        # matter when it gets to it (`send_or_withhold`); the audit says then which.
        return True
    tx.audit.record(
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
    rows = tx.outbox.referral_rows(referral.referral_id)
    if any(sent for _, _, sent in rows):
        return True
    if all(claims == 0 for _, claims, _ in rows):
        for outbox_id, _, _ in rows:
            tx.outbox.drop(outbox_id)
        return False
    return None
