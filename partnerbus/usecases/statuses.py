"""What partners tell the bus: a referral's status (the state machine, the closed loop,
a reroute), and their capacity (broadcast to every worker's directory)."""

from __future__ import annotations

from partnerbus.errors import Refused
from partnerbus.ledger.store import LedgerTx
from partnerbus.rules import internal, reroute_after_rejection
from partnerbus.schemas import CapacityChanged, ReferralStatusChanged
from partnerbus.usecases.context import DIRECTORY_UPDATES_KEY, Ledger, intake
from partnerbus.usecases.lifecycle import _apply
from partnerbus.usecases.loop import _close_need, _tell_source
from partnerbus.usecases.routing import _reroute


@intake
def record_status(ledger: Ledger, tx: LedgerTx, event: ReferralStatusChanged) -> None:
    """A partner's answer about its own referral: the state machine (an illegal move is
    recorded and refused), the closed loop, then a reroute or the need closed."""
    now = ledger.clock()
    referral = tx.referrals.get(event.referral_id, lock=True)
    if referral is None:
        raise Refused(f"unknown referral {event.referral_id}")
    if referral.partner_id != event.partner:
        raise Refused(f"referral {event.referral_id} was not sent to {event.partner}")
    if event.status == "rejected" and event.reason is None:
        # the schema lets only the bus's copy to a creditor (`signal_id` set) go without one
        raise Refused(
            "a rejection carries a reason: unreachable, not-eligible, not-interested, "
            "full, duplicate or other"
        )
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
        return
    if event.status in ("accepted", "rejected"):
        ledger.directory.record_answer(event.partner, accepted=event.status == "accepted")
    row = tx.signals.get(referral.signal_id)
    assert row is not None
    _tell_source(
        ledger,
        tx,
        row,
        event.model_copy(update={"signal_id": referral.signal_id, "need": referral.need}),
    )
    tx.audit.record(
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


@intake
def record_capacity(ledger: Ledger, tx: LedgerTx, event: CapacityChanged) -> None:
    """Keep the partner's capacity and tell every worker's directory (a broadcast)."""
    now = ledger.clock()
    if event.partner not in ledger.directory:
        raise Refused(f"unknown partner {event.partner!r}")
    tx.capacity.set(event.partner, event.status, event.remaining, now)
    tx.outbox.enqueue(internal(event), DIRECTORY_UPDATES_KEY, now)
    tx.audit.record(
        event.partner,
        "capacity-changed",
        event.partner,
        now,
        why=f"{event.status} {event.remaining}",
    )
