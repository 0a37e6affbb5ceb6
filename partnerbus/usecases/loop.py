"""The closed loop: the source and the advisor's agency hear of every outcome of a
signal (a status the partner gave or the bus observed, a need closed)."""

from __future__ import annotations

from partnerbus.ledger.store import LedgerTx, ReferralRow, SignalRow
from partnerbus.schemas import ReferralStatusChanged, SignalClosed
from partnerbus.usecases.context import Ledger, _derived_id, send


def _tell_source(
    ledger: Ledger, tx: LedgerTx, row: SignalRow, message: SignalClosed | ReferralStatusChanged
) -> None:
    """The closed loop: the source and the advisor's agency hear of every outcome, each
    as its roles allow (`send`, docs/DISCLOSURE.md): what the partner wrote (a note, a
    completion's outcome) goes to the advisor only, and a creditor source learns where the
    need stands, never why a partner declined."""
    for index, target in enumerate(dict.fromkeys(p for p in (row.source, row.agency) if p)):
        copy = message.model_copy(
            update={"message_id": _derived_id("loop", message.message_id, target, str(index))}
        )
        send(ledger, tx, copy, target, source=row.source, agency=row.agency)


def _notify_status(
    ledger: Ledger, tx: LedgerTx, referral: ReferralRow, status: str, note: str
) -> SignalRow:
    """A status the bus itself observed or decided, told to the source and the advisor."""
    row = tx.signals.get(referral.signal_id)
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
            status=status,
            note=note,
            signal_id=referral.signal_id,
            need=referral.need,
        ),
    )
    return row


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
    tx.signals.set_need_state(referral.signal_id, referral.need, "closed", detail, now)
    _tell_source(
        ledger,
        tx,
        row,
        SignalClosed(
            # Past the first attempt the referral's id keeps a need closed again after
            # the advisor reopened it apart from its first closing.
            message_id=_derived_id(
                "closed",
                referral.signal_id,
                referral.need,
                outcome,
                *((referral.referral_id,) if referral.attempt > 1 else ()),
            ),
            occurred_at=now,
            signal_id=referral.signal_id,
            need=referral.need,
            outcome=outcome,
            detail=detail,
        ),
    )
