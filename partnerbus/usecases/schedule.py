"""Time-driven work (the scheduler's passes): reminders, expiries and their reroute,
referrals whose consent ran out, consents about to expire, and retention. Each item runs
in its own savepoint: one that fails is rolled back, logged, counted and tried again."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from functools import partial

from partnerbus.errors import describe_error
from partnerbus.ledger.store import LedgerTx, ReferralRow
from partnerbus.ops.counters import SCHEDULED_ITEM_FAILURES
from partnerbus.rules import AWAITING_ANSWER, ConsentRecord, deadline_action, expiring_soon
from partnerbus.schemas import ConsentExpiring, ReferralReminder
from partnerbus.usecases.context import BUS, Ledger, _derived_id, send, use_case
from partnerbus.usecases.lifecycle import _apply, _withdraw
from partnerbus.usecases.loop import _notify_status
from partnerbus.usecases.routing import _reroute

log = logging.getLogger("partnerbus.scheduler")


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


@use_case
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

    for referral in tx.referrals.waiting():
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
    for referral in tx.referrals.with_ended_consent(now, AWAITING_ANSWER):
        tally(
            "withdrawn-consent-expired",
            _isolated(
                tx,
                "consent-ended",
                referral.referral_id,
                partial(_withdraw_consent_ended, ledger, tx, referral),
            ),
        )
    for consent in expiring_soon(tx.consents.unnotified(), now, ledger.consent_notice):
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
    tx.referrals.update(referral.referral_id, referral.status, reminded=True)
    send(
        ledger,
        tx,
        ReferralReminder(
            message_id=_derived_id("reminder", referral.referral_id),
            occurred_at=now,
            referral_id=referral.referral_id,
            partner=referral.partner_id,
            due_by=referral.due_at or now,
        ),
        referral.partner_id,
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
    tx.audit.record(
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
    signal_row = tx.signals.get(referral.signal_id)
    assert signal_row is not None
    _reroute(ledger, tx, referral, signal_row)
    return True


def _notify_consent_expiring(ledger: Ledger, tx: LedgerTx, consent: ConsentRecord) -> bool:
    now = ledger.clock()
    tx.consents.mark_expiry_notified(consent.consent_id, now)
    send(
        ledger,
        tx,
        ConsentExpiring(
            message_id=_derived_id("consent-expiring", consent.consent_id),
            occurred_at=now,
            consent_id=consent.consent_id,
            person_ref=consent.person_ref,
            agency=consent.agency,
            valid_until=consent.valid_until,
        ),
        consent.agency,
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


@use_case
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
        counts["partner-text-deleted"] = tx.retention.delete_partner_text_before(text_cutoff, BUS)
    with _retained_item(tx, "bus-text", counts):
        counts["bus-text-deleted"] = tx.retention.delete_bus_free_text_before(text_cutoff)
    for row in tx.retention.signals_with_text_before(text_cutoff):
        with _retained_item(tx, "signal-note", counts):
            body = json.loads(row.body)
            if (body.get("facts") or {}).get("note") is not None:
                body["facts"]["note"] = None
                counts["free-text-deleted"] += 1
            tx.signals.rewrite(row.signal_id, body=json.dumps(body), note_deleted_at=now)
    for unsent in tx.outbox.undeliverable_before(text_cutoff):
        with _retained_item(tx, "outbox-expiry", counts):
            if tx.outbox.expire_unsent(unsent.id, text_cutoff):
                tx.audit.record(
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
    for row in tx.retention.signals_closed_before(cutoff):
        with _retained_item(tx, "signal-anonymisation", counts):
            token = _token()
            body = json.loads(row.body)
            body.update({"person_ref": token, "facts": {}, "contact": None, "profile": {}})
            tx.signals.rewrite(
                row.signal_id, body=json.dumps(body), person_ref=token, anonymised_at=now
            )
            tx.retention.anonymise_person_records(row.signal_id, token, now)
            tx.audit.record(
                BUS,
                "anonymised",
                row.signal_id,
                now,
                person_ref=token,
                why=f"closed for {keep.days} days",
            )
            counts["anonymised"] += 1
    for consent_id in tx.retention.ended_consents_before(cutoff):
        with _retained_item(tx, "consent-anonymisation", counts):
            tx.retention.anonymise_consent(consent_id, _token())
            counts["consents-anonymised"] += 1
    for person_ref in tx.retention.persons_to_forget(cutoff):
        with _retained_item(tx, "person-erasure", counts):
            token = _token()
            tx.retention.forget_person(person_ref, token, cutoff)
            tx.audit.record(
                BUS,
                "person-forgotten",
                token,
                now,
                person_ref=token,
                why=f"no signal or consent left; traces older than {keep.days} days",
            )
            counts["persons-forgotten"] += 1
    with _retained_item(tx, "outbox-sent", counts):
        counts["outbox-deleted"] = tx.outbox.delete_sent_before(text_cutoff)
    with _retained_item(tx, "dedupe", counts):
        counts["dedupe-deleted"] = tx.processed.delete_before(text_cutoff)
    return counts
