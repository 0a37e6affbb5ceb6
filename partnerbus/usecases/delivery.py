"""The outbox's side of a referral: the last check before it leaves, the broker's
confirm (it is disclosed, its clock starts), a partner's dead letter sent again, and a
dead-letter copy a full queue refused."""

from __future__ import annotations

from pydantic import TypeAdapter, ValidationError

from partnerbus.ledger.store import LedgerTx
from partnerbus.rules import AWAITING_ANSWER, evaluate_consent, minimise, minimise_preferences
from partnerbus.rules.disclosure import (
    Role,
    disclose,
    receives,
    recipient_roles,
    visible_fields,
)
from partnerbus.schemas import (
    Referral,
    ReferralReminder,
    ReferralStatusChanged,
    ReferralWithdrawn,
    Signal,
    SignalClosed,
)
from partnerbus.schemas.messages import OutboundMessage
from partnerbus.usecases.context import BUS, Ledger, use_case
from partnerbus.usecases.lifecycle import _apply, _withdraw
from partnerbus.usecases.loop import _notify_status
from partnerbus.usecases.routing import _reroute


@use_case
def send_or_withhold(
    ledger: Ledger, tx: LedgerTx, referral_id: str, outbox_id: int, claims: int
) -> bool:
    """The relay's decision for one referral row, under the locks `clear_to_send` takes
    (held until the relay has marked the referral as being sent, in this transaction).
    True: publish it now. False: the row is deleted unsent, and a withdrawal queued for
    the referral meanwhile is settled: dropped if the referral never left (the partner
    never hears of it), kept if an earlier try may have reached the partner."""
    verdict = _check_before_sending(ledger, tx, referral_id, claims)
    if verdict == "send":
        return True
    tx.outbox.drop(outbox_id)
    if verdict == "closed":
        _settle_withdrawal(ledger, tx, referral_id, claims)
    return False


def _settle_withdrawal(ledger: Ledger, tx: LedgerTx, referral_id: str, claims: int) -> None:
    """A withdrawal queued while a relay held an untried claim on the referral (see
    `_may_have_left`) is decided here: `claims` counts the tries that may have published
    the referral, this one (which did not) included."""
    withdrawals = tx.outbox.pending_withdrawals(referral_id)
    if not withdrawals or any(sent for _, _, sent in tx.outbox.referral_rows(referral_id)):
        return  # nothing waits, or it was decided when the referral was withdrawn
    referral = tx.referrals.get(referral_id)
    assert referral is not None
    left = claims > 1
    if not left:
        for row_id in withdrawals:
            tx.outbox.drop(row_id)
    tx.audit.record(
        BUS,
        "referral-withdrawn" if left else "referral-withheld",
        referral_id,
        ledger.clock(),
        partner_id=referral.partner_id,
        why="an earlier try may have reached the partner: it is told to drop it"
        if left
        else "withdrawn before it left: the partner never received it",
    )


@use_case
def clear_to_send(ledger: Ledger, tx: LedgerTx, referral_id: str, attempts: int) -> bool:
    """The last check, just before a referral is published: True if it may leave now.
    See `_check_before_sending`; `attempts` counts the claims of the row that may have
    published it, this one included."""
    return _check_before_sending(ledger, tx, referral_id, attempts) == "send"


def _check_before_sending(ledger: Ledger, tx: LedgerTx, referral_id: str, attempts: int) -> str:
    """The relay marks the referral as being sent in the transaction that ran this,
    holding what this takes: the consent (shared: a revocation waits) and the referral's
    row (a status, a withdrawal, an expiry wait); from that mark until the confirm is
    recorded, they re-run instead (`ReferralRepository.update`). The referral must still
    be waiting for an answer (a referral re-sent from the dead letters may be delivered
    or received already) and a consent valid at this very moment must cover it: `send`. A referral
    closed meanwhile does not leave: `closed`. One whose consent ran out (the broker was
    down, the outbox waited) is withdrawn, and its need goes back to the consent gate,
    the advisor is asked again: `withdrawn`. Above one attempt, an earlier try may have
    reached the partner, who is then told to drop it."""
    seen = tx.referrals.get(referral_id)
    if seen is None or seen.status not in AWAITING_ANSWER:
        return "closed"
    # Locks in one order everywhere: the consent, then the referral.
    consent = tx.consents.get(seen.consent_id, lock="share")
    referral = tx.referrals.get(referral_id, lock=True)
    if referral is None or referral.status not in AWAITING_ANSWER:
        return "closed"
    row = tx.signals.get(referral.signal_id)
    assert consent is not None and row is not None
    now = ledger.clock()
    decision = evaluate_consent(
        [consent],
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


@use_case
def mark_delivered(ledger: Ledger, tx: LedgerTx, referral_id: str) -> None:
    """The broker confirmed the referral: it is disclosed (audited now, not when it was
    decided), and its clock starts now. Only `requested` moves to `delivered`: a referral
    sent again (from the dead letters) that is further along stays where it is."""
    referral = tx.referrals.get(referral_id, lock=True)
    if referral is None:
        return
    now = ledger.clock()
    first = referral.status == "requested"
    row = None
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
        # the signal row it read serves the audit below too (one read fewer per referral)
        row = _notify_status(
            ledger, tx, referral, "delivered", "in the partner's queue (the broker confirmed it)"
        )
    if row is None:
        row = tx.signals.get(referral.signal_id)
    assert row is not None
    tx.audit.record(
        BUS,
        "referral-disclosed",
        referral_id,
        now,
        person_ref=row.person_ref,
        partner_id=referral.partner_id,
        why=f"{referral.need}; consent {referral.consent_id}; "
        f"shared: {_shared(ledger, referral.partner_id, referral.partner_kind, row.signal())}"
        + ("" if first else f"; sent again while {referral.status}"),
    )


def _shared(ledger: Ledger, partner_id: str, kind: str, signal: Signal) -> str:
    """What of the person this partner receives, for the audit: its kind's share, and
    nothing if it is a creditor (docs/DISCLOSURE.md)."""
    profile, facts, contact = minimise(
        kind, signal.profile, signal.facts, signal.contact, signal.preferences
    )
    wishes = minimise_preferences(kind, signal.preferences)
    parts = (("profile", profile), ("facts", facts), ("contact", contact), ("preferences", wishes))
    roles = recipient_roles_of_partner(ledger.directory.is_creditor(partner_id))
    shown = visible_fields("referral", roles)
    return ", ".join(name for name, part in parts if part and name in shown) or "ids only"


def recipient_roles_of_partner(creditor: bool) -> frozenset[Role]:
    """The roles of a referral's partner: `partner`, and `creditor` if it is one."""
    return frozenset(("partner", "creditor") if creditor else ("partner",))


_LOOP = (ReferralStatusChanged, SignalClosed)
"""Messages of the closed loop: their recipient's roles depend on the signal's source and
agency."""
OUTBOUND: TypeAdapter[OutboundMessage] = TypeAdapter(OutboundMessage)


@use_case
def replay_to_partner(ledger: Ledger, tx: LedgerTx, partner_id: str, body: bytes) -> str | None:
    """A dead letter of a partner's queue (its system failed on the message), sent again
    through the outbox, so that it meets the same send-time check as any other message
    and leaves in the ledger's order: a referral only while it still awaits this partner's
    answer under a consent valid now (checked here, and again by the relay); a reminder
    only while it awaits the answer (a reminder of news, while the referral is still
    accepted with no news); a withdrawal whenever its referral was this
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
        referral = tx.referrals.get(rid)
        if referral is None:
            return f"referral {rid} is no longer in the ledger"
        if partner_id != referral.partner_id or partner_id != message.partner:
            return f"referral {rid} was not sent to {partner_id}"
        if isinstance(message, ReferralReminder) and message.reason == "no-news":
            if referral.status != "accepted":
                return f"referral {rid} is {referral.status}: the partner has sent news since"
        elif not isinstance(message, ReferralWithdrawn) and referral.status not in AWAITING_ANSWER:
            return f"referral {rid} is {referral.status}: it no longer awaits {partner_id}'s answer"
        if isinstance(message, Referral):
            consent = tx.consents.get(referral.consent_id)
            row = tx.signals.get(referral.signal_id)
            if consent is None or row is None:
                return f"referral {rid}: its consent or signal is no longer in the ledger"
            decision = evaluate_consent(
                [consent],
                row.person_ref,
                referral.need,
                referral.partner_id,
                referral.partner_kind,
                now,
            )
            if not decision.allowed:
                return f"referral {rid}: consent {decision.consent_id} is {decision.reason} now"
    loop_signal = message.signal_id if isinstance(message, _LOOP) else None
    row = tx.signals.get(loop_signal) if loop_signal else None
    roles = recipient_roles(
        message,
        partner_id,
        source=row.source if row else None,
        agency=row.agency if row else None,
        creditor=ledger.directory.is_creditor(partner_id),
    )
    if not receives(message.type, roles):
        return f"a {message.type} message is not for {partner_id} (docs/DISCLOSURE.md)"
    tx.outbox.enqueue_again(disclose(message, roles), partner_id, now, referral_id=rid)
    return None


@use_case
def count_refused_dead_letter(ledger: Ledger, tx: LedgerTx, message_id: str, queue: str) -> None:
    """A dead-letter queue was full and refused the bus's copy of a refused message: the
    message stays in its work queue; ops count these (the monitor's
    `partnerbus_dead_letter_refused_total`) and find each one in the audit trail."""
    tx.audit.record(
        BUS,
        DEAD_LETTER_REFUSED,
        message_id[:128],
        ledger.clock(),
        why=f"the dead-letter queue of {queue} is full: the message stays in {queue}",
    )


DEAD_LETTER_REFUSED = "dead-letter-refused"
"""Audit action of a dead-letter copy refused by a full dead-letter queue."""
