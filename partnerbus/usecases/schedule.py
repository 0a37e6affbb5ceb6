"""Time-driven work (the scheduler's passes): reminders, expiries and their reroute,
referrals whose consent ran out, consents about to expire, needs parked for consent too
long, accepted referrals with no news, and retention. Each item runs in its own
savepoint: one that fails is rolled back, logged, counted and tried again."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from functools import partial

from partnerbus.errors import describe_error
from partnerbus.ledger.repos.signals import ParkedNeed
from partnerbus.ledger.store import LedgerTx, ReferralRow
from partnerbus.ops.counters import SCHEDULED_ITEM_FAILURES
from partnerbus.rules import (
    AWAITING_ANSWER,
    ConsentRecord,
    deadline_action,
    expiring_soon,
    follow_up_action,
)
from partnerbus.schemas import (
    ConsentExpiring,
    ConsentRequested,
    ReferralReminder,
    ReferralStalled,
    SignalClosed,
)
from partnerbus.usecases.context import BUS, Ledger, _derived_id, send, use_case
from partnerbus.usecases.lifecycle import _apply, _withdraw
from partnerbus.usecases.loop import _notify_status, _tell_source
from partnerbus.usecases.routing import _reroute

log = logging.getLogger("partnerbus.scheduler")

STALLED_STATUSES: frozenset[str] = frozenset({"accepted"})
"""Statuses whose silence the stalled-referrals follow-up watches: accepted, and nothing
since (in progress, on hold, a closing status are news)."""
CONSENT_NOT_OBTAINED = "consent-not-obtained"
_INSTANT = timedelta(microseconds=1)
"""The reads take what started strictly before a bound: one step exactly due is included."""


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
    of consents about to expire; remind the advisor of needs parked for consent, then
    close them (`consent-not-obtained`); remind a partner of an accepted referral with no
    news, then tell the advisor. Each item runs alone (`_isolated`): one that fails (a
    partner gone from the directory, a row that cannot be written) is rolled back, logged,
    counted and tried again at the next pass; the others are done. Each reminder and
    closing is recorded in the ledger by a compare-and-set, under an id derived from what
    it is about: a second pass, or another worker's pass at the same time, sends nothing
    again."""
    now = ledger.clock()
    counts = {
        "reminded": 0,
        "expired": 0,
        "withdrawn-consent-expired": 0,
        "consents-expiring": 0,
        "parked-reminded": 0,
        "parked-closed": 0,
        "stalled-reminded": 0,
        "stalled-reported": 0,
        "failed": 0,
    }

    def tally(key: str, done: bool | None) -> None:
        if done is None:
            counts["failed"] += 1
        elif done:
            counts[key] += 1

    # only the referrals whose reminder (the first step) has come, by today's policy
    for referral in tx.referrals.waiting(ledger.deadlines.reminders_due(now)):
        if _being_sent(referral, now):
            continue  # the next pass: a relay is publishing it (a replay) right now
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
        if _being_sent(referral, now):
            continue
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
        tx.consents.unnotified(now + ledger.consent_notice), now, ledger.consent_notice
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
    _follow_parked(ledger, tx, tally)
    _follow_stalled(ledger, tx, tally)
    return counts


def _being_sent(referral: ReferralRow, now: datetime) -> bool:
    """A relay has checked the referral and is publishing it: its state may not change
    until the relay has recorded the broker's answer (`ReferralRepository.update`)."""
    return referral.sending_until is not None and referral.sending_until > now


def _follow_parked(ledger: Ledger, tx: LedgerTx, tally: Callable[[str, bool | None], None]) -> None:
    """Needs parked for consent: the advisor is reminded once per signal (a reminder of
    the request, with the needs due), then each need closes with `consent-not-obtained`
    once the reminder's notice has run. With no agency to ask, there is nobody to remind:
    the need closes when its wait is over."""
    now = ledger.clock()
    to_remind: dict[str, list[ParkedNeed]] = {}
    for need in tx.signals.parked(now - ledger.parked.first_step + _INSTANT):
        steps = ledger.parked.steps(need.urgency)
        action = follow_up_action(
            steps, need.parked_since, need.reminded_at, now, can_remind=need.agency is not None
        )
        if action == "remind":
            to_remind.setdefault(need.signal_id, []).append(need)
        elif action == "give-up":
            tally(
                "parked-closed",
                _isolated(
                    tx,
                    "parked-close",
                    need.signal_id,
                    partial(_close_parked, ledger, tx, need),
                ),
            )
    for signal_id, needs in to_remind.items():
        tally(
            "parked-reminded",
            _isolated(
                tx,
                "parked-remind",
                signal_id,
                partial(_remind_parked, ledger, tx, signal_id, needs),
            ),
        )


def _remind_parked(ledger: Ledger, tx: LedgerTx, signal_id: str, needs: list[ParkedNeed]) -> bool:
    """Remind the agency's advisor of the needs of this signal still waiting for consent:
    each need is marked (once: another pass or worker that got there first wins), and the
    request is sent again for the needs this pass marked, with when they close."""
    now = ledger.clock()
    marked = [
        n for n in needs if tx.signals.mark_parked_reminded(signal_id, n.need, n.parked_since, now)
    ]
    if not marked:
        return False
    row = tx.signals.get(signal_id)
    assert row is not None and row.agency is not None
    closes_at = min(ledger.parked.steps(n.urgency).give_up_at(n.parked_since, now) for n in marked)
    needs_codes = tuple(n.need for n in marked)
    since = min(n.parked_since for n in marked)
    send(
        ledger,
        tx,
        ConsentRequested(
            message_id=_derived_id(
                "consent-reminder",
                signal_id,
                *(f"{n.need}@{n.parked_since.isoformat()}" for n in marked),
            ),
            occurred_at=now,
            signal_id=signal_id,
            source=row.source,
            person_ref=row.person_ref,
            commune=row.commune,
            needs=needs_codes,
            agency=row.agency,
            advisor=row.advisor,
            reason=(
                f"reminder: no consent since {since:%Y-%m-%d}; the needs close on "
                f"{closes_at:%Y-%m-%d} without one"
            ),
            reminder=True,
            closes_at=closes_at,
        ),
        row.agency,
    )
    tx.audit.record(
        BUS,
        "consent-reminded",
        signal_id,
        now,
        person_ref=row.person_ref,
        partner_id=row.agency,
        why=f"{', '.join(needs_codes)}: parked since {since:%Y-%m-%d}; closes {closes_at:%Y-%m-%d}",
    )
    return True


def _close_parked(ledger: Ledger, tx: LedgerTx, need: ParkedNeed) -> bool:
    """The need waited too long for consent: closed (once), and the source and the
    advisor's agency are told (`SignalClosed` with `consent-not-obtained`). Under the
    person's lock: a consent granted at the same time either routes the need first (and
    the close finds it no longer parked) or comes after and finds it closed."""
    now = ledger.clock()
    tx.signals.lock_person(need.person_ref)
    waited = (now - need.parked_since).days
    detail = (
        f"no consent {waited} days after it was asked"
        if need.agency is not None
        else f"no consent after {waited} days, and no agency covers the commune to ask it"
    )
    if not tx.signals.close_parked(
        need.signal_id, need.need, need.parked_since, "closed", detail, now
    ):
        return False
    row = tx.signals.get(need.signal_id)
    assert row is not None
    _tell_source(
        ledger,
        tx,
        row,
        SignalClosed(
            message_id=_derived_id(
                "closed",
                need.signal_id,
                need.need,
                CONSENT_NOT_OBTAINED,
                need.parked_since.isoformat(),
            ),
            occurred_at=now,
            signal_id=need.signal_id,
            need=need.need,
            outcome=CONSENT_NOT_OBTAINED,
            detail=detail,
        ),
    )
    tx.audit.record(
        BUS,
        CONSENT_NOT_OBTAINED,
        need.signal_id,
        now,
        person_ref=need.person_ref,
        partner_id=need.agency,
        why=f"{need.need}: parked since {need.parked_since:%Y-%m-%d}; {detail}",
    )
    return True


def _follow_stalled(
    ledger: Ledger, tx: LedgerTx, tally: Callable[[str, bool | None], None]
) -> None:
    """Accepted referrals with no news since (`updated_at`, the last status recorded): the
    partner is reminded once, then the advisor's agency is told once the reminder's
    notice has run."""
    now = ledger.clock()
    for referral in tx.referrals.quiet(
        STALLED_STATUSES, now - ledger.stalled.first_step + _INSTANT
    ):
        steps = ledger.stalled.steps(referral.urgency)
        action = follow_up_action(steps, referral.updated_at, referral.stalled_reminded_at, now)
        if action == "remind":
            tally(
                "stalled-reminded",
                _isolated(
                    tx,
                    "stalled-remind",
                    referral.referral_id,
                    partial(_remind_stalled, ledger, tx, referral),
                ),
            )
        elif action == "give-up":
            tally(
                "stalled-reported",
                _isolated(
                    tx,
                    "stalled-report",
                    referral.referral_id,
                    partial(_report_stalled, ledger, tx, referral),
                ),
            )


def _remind_stalled(ledger: Ledger, tx: LedgerTx, referral: ReferralRow) -> bool:
    now = ledger.clock()
    if not tx.referrals.mark_stalled(
        referral.referral_id, referral.status, referral.updated_at, "stalled_reminded_at", now
    ):
        return False
    due_by = ledger.stalled.steps(referral.urgency).give_up_at(referral.updated_at, now)
    send(
        ledger,
        tx,
        ReferralReminder(
            message_id=_derived_id(
                "news-reminder", referral.referral_id, referral.updated_at.isoformat()
            ),
            occurred_at=now,
            referral_id=referral.referral_id,
            partner=referral.partner_id,
            due_by=due_by,
            reason="no-news",
            last_news_at=referral.updated_at,
        ),
        referral.partner_id,
        referral_id=referral.referral_id,
    )
    tx.audit.record(
        BUS,
        "referral-news-reminded",
        referral.referral_id,
        now,
        partner_id=referral.partner_id,
        why=(
            f"{referral.status} with no news since {referral.updated_at:%Y-%m-%d}; "
            f"the advisor is told on {due_by:%Y-%m-%d}"
        ),
    )
    return True


def _report_stalled(ledger: Ledger, tx: LedgerTx, referral: ReferralRow) -> bool:
    now = ledger.clock()
    if not tx.referrals.mark_stalled(
        referral.referral_id, referral.status, referral.updated_at, "stalled_reported_at", now
    ):
        return False
    row = tx.signals.get(referral.signal_id)
    assert row is not None
    # The advisor's agency is told; with none following the person, nobody is (the
    # source may be a creditor, who never hears how a partner's work goes: DISCLOSURE.md).
    target = row.agency
    if target is None:
        tx.audit.record(
            BUS,
            "referral-stalled",
            referral.referral_id,
            now,
            partner_id=referral.partner_id,
            why=f"{referral.partner_id}: no news; no agency follows the person, nobody told",
        )
        return True
    send(
        ledger,
        tx,
        ReferralStalled(
            message_id=_derived_id(
                "stalled", referral.referral_id, referral.updated_at.isoformat()
            ),
            occurred_at=now,
            referral_id=referral.referral_id,
            partner=referral.partner_id,
            status=referral.status,
            signal_id=referral.signal_id,
            need=referral.need,
            last_news_at=referral.updated_at,
            reminded_at=referral.stalled_reminded_at or now,
        ),
        target,
        source=row.source,
        agency=row.agency,
    )
    tx.audit.record(
        BUS,
        "referral-stalled",
        referral.referral_id,
        now,
        partner_id=target,
        why=(
            f"{referral.partner_id}: {referral.status} with no news since "
            f"{referral.updated_at:%Y-%m-%d}, reminded "
            f"{(referral.stalled_reminded_at or now):%Y-%m-%d}"
        ),
    )
    return True


def _remind(ledger: Ledger, tx: LedgerTx, referral: ReferralRow) -> bool:
    now = ledger.clock()
    tx.referrals.update(referral.referral_id, referral.status, now=now, reminded=True)
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
    referrals and the audit trail, and the facts, contact, profile and wishes are dropped; a
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
            body.update(
                {
                    "person_ref": token,
                    "facts": {},
                    "contact": None,
                    "profile": {},
                    "preferences": None,
                }
            )
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
