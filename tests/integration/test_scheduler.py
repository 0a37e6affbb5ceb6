"""The scheduled pass item by item: one bad referral or consent never stops the others
(SQLite and PostgreSQL, without a broker)."""

from __future__ import annotations

import dataclasses
import logging
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import REGISTRY

from partnerbus import usecases
from partnerbus.directory import Directory, match
from partnerbus.ledger.repos import AuditRepository, ConsentRepository
from partnerbus.ledger.store import Store
from partnerbus.rules.deadlines import URGENCIES, DeadlinePolicy, deadline_action
from partnerbus.schemas import (
    ConsentGranted,
    ConsentScope,
    Contact,
    Facts,
    ReferralStatusChanged,
    Signal,
)
from partnerbus.usecases import Ledger
from tests.conftest import make_ledger

ARREARS = "logement-hebergement--reduire-les-impayes-de-loyer"
ROUBAIX = "59512"
KINDS = ("ccas-cias", "points-conseil-budget", "cresus", "caf", "maisons-des-solidarites")
Q = "test.queue"
FAILURES = "partnerbus_scheduled_item_failures_total"


def without(directory: Directory, *partner_ids: str) -> Directory:
    """The same directory with these partners removed (as after an edit of the file)."""
    return Directory(
        territories=directory.territories,
        needs=directory.needs,
        partners=[p for p in directory.partners() if p.id not in partner_ids],
        agreements=directory.agreements,
        organisations=directory.organisations,
    )


def failures(task: str) -> float:
    return REGISTRY.get_sample_value(FAILURES, {"task": task}) or 0.0


def referred(ledger: Ledger, person: str, source: str, days: int = 60) -> str:
    """A consented signal about `person` from `source`; the id of its delivered referral."""
    now = ledger.clock()
    consent = ConsentGranted(
        message_id=f"grant-{person}",
        occurred_at=now,
        consent_id=f"c-{person}",
        person_ref=person,
        scope=ConsentScope(needs=("logement-hebergement",), partner_kinds=KINDS),
        collected_by="s.benali",
        agency="lmh-agence-roubaix",
        method="oral",
        granted_at=now,
        valid_until=now + timedelta(days=days),
    )
    signal = Signal(
        message_id=f"sig-{person}",
        occurred_at=now,
        source=source,
        person_ref=person,
        commune=ROUBAIX,
        needs=(ARREARS,),
        facts=Facts(arrears_eur=900, note="a note"),
        contact=Contact(phone="0612345678"),
    )
    with ledger.store.begin() as tx:
        usecases.grant_consent(ledger, tx, consent, Q)
    with ledger.store.begin() as tx:
        usecases.receive_signal(ledger, tx, signal, Q)
    (referral,) = [r for r in ledger.store.referrals() if r.signal_id == signal.message_id]
    with ledger.store.begin() as tx:
        usecases.mark_delivered(ledger, tx, referral.referral_id)
    return referral.referral_id


def tick(ledger: Ledger) -> dict[str, int]:
    with ledger.store.begin() as tx:
        return usecases.watch_deadlines(ledger, tx)


def status_of(store: Store, referral_id: str) -> str:
    found = store.referral(referral_id)
    assert found is not None
    return found.status


def test_a_partner_removed_from_the_directory_does_not_stop_the_deadline_pass(
    store: Store,
) -> None:
    """The sender of one signal and the partner holding its referral leave the directory: at the deadline that referral expires with no agreement left to reroute along, and the other referral expires and is rerouted as usual."""
    ledger = make_ledger(store)
    first = referred(ledger, "T-GONE-1", "lmh-recouvrement")
    second = referred(ledger, "T-STAY-2", "lmh-proximite")
    holder = store.referral(first)
    assert holder is not None
    smaller = dataclasses.replace(
        ledger, directory=without(ledger.directory, "lmh-recouvrement", holder.partner_id)
    )
    ledger.clock.advance(timedelta(days=11))  # past the routine deadline (10 days)

    counts = tick(smaller)

    assert status_of(store, first) == "expired"
    assert status_of(store, second) == "expired"
    assert counts["expired"] == 2
    with store.begin() as tx:
        assert tx.signals.need_states("sig-T-GONE-1") == {ARREARS: "no-partner"}
        (again,) = [r for r in tx.referrals.for_signal("sig-T-STAY-2") if r.attempt == 2]
    assert again.partner_id != holder.partner_id


def test_an_unknown_sender_is_no_agreement_in_matching() -> None:
    """A sender the directory does not know may reach nobody: no candidate, not a KeyError."""
    ledger = make_ledger(Store("sqlite://"))
    d = without(ledger.directory, "lmh-recouvrement")
    assert match(d, ARREARS, ROUBAIX, sender="lmh-recouvrement") == []
    assert match(d, ARREARS, ROUBAIX, sender="nobody-at-all") == []


def test_a_status_from_a_partner_removed_from_the_directory_is_recorded(store: Store) -> None:
    """The partner that holds a referral answers after it left the directory: its answer is recorded (nothing to rank it on any more), not a KeyError."""
    ledger = make_ledger(store)
    rid = referred(ledger, "T-GONE-3", "lmh-recouvrement")
    holder = store.referral(rid)
    assert holder is not None
    smaller = dataclasses.replace(ledger, directory=without(ledger.directory, holder.partner_id))
    event = ReferralStatusChanged(
        message_id="st-gone-3",
        occurred_at=ledger.clock(),
        referral_id=rid,
        partner=holder.partner_id,
        status="accepted",
    )
    with store.begin() as tx:
        assert usecases.record_status(smaller, tx, event, Q)
    assert status_of(store, rid) == "accepted"


def test_a_failing_referral_is_rolled_back_counted_logged_and_retried_while_the_others_go_on(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One referral's expiry raises: its changes are rolled back, the failure is logged (its id and the error class, no person data) and counted; the other referral expires; the next pass expires the first one too."""
    ledger = make_ledger(store)
    bad = referred(ledger, "T-BAD-PERSON-4", "lmh-recouvrement")
    good = referred(ledger, "T-GOOD-5", "lmh-proximite")
    ledger.clock.advance(timedelta(days=11))
    real = AuditRepository.record

    def audit(
        self: AuditRepository, actor: str, action: str, subject: str, *args, **kwargs
    ) -> None:
        real(self, actor, action, subject, *args, **kwargs)
        if action == "referral-expired" and subject == bad:
            raise RuntimeError("T-BAD-PERSON-4 +33 6 00 00 00 04")

    monkeypatch.setattr(AuditRepository, "record", audit)
    before = failures("expire")
    caplog.set_level(logging.DEBUG)

    counts = tick(ledger)

    assert status_of(store, good) == "expired"
    assert status_of(store, bad) == "delivered", "the failed item is rolled back whole"
    assert counts["expired"] == 1
    assert counts["failed"] == 1
    assert failures("expire") == before + 1
    said = [r.getMessage() for r in caplog.records if bad in r.getMessage()]
    assert said and "RuntimeError" in said[0]
    assert "T-BAD-PERSON-4" not in caplog.text and "+33" not in caplog.text
    with store.begin() as tx:
        assert len(tx.referrals.for_signal("sig-T-BAD-PERSON-4")) == 1, "nothing rerouted for it"

    monkeypatch.setattr(AuditRepository, "record", real)
    counts = tick(ledger)
    assert status_of(store, bad) == "expired", "retried at the next pass"
    assert counts["expired"] == 1


def test_a_failing_withdrawal_or_notice_does_not_stop_the_others(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Consents that end: one withdrawal and one expiry notice raise, the others are done."""
    ledger = make_ledger(store)
    bad = referred(ledger, "T-W-BAD", "lmh-recouvrement", days=2)
    good = referred(ledger, "T-W-GOOD", "lmh-proximite", days=2)
    real_withdraw = usecases.schedule._withdraw
    real_notified = ConsentRepository.mark_expiry_notified

    def withdraw(ledger, tx, referral, *args, **kwargs):
        if referral.referral_id == bad:
            raise RuntimeError("boom")
        return real_withdraw(ledger, tx, referral, *args, **kwargs)

    def notified(self, consent_id, at):
        if consent_id == "c-T-W-BAD":
            raise RuntimeError("boom")
        return real_notified(self, consent_id, at)

    monkeypatch.setattr(usecases.schedule, "_withdraw", withdraw)
    monkeypatch.setattr(ConsentRepository, "mark_expiry_notified", notified)
    before = (failures("consent-ended"), failures("consent-expiring"))

    counts = tick(ledger)  # both consents end within the notice (14 days)
    assert counts["consents-expiring"] == 1
    with store.begin() as tx:
        assert tx.consents.get("c-T-W-GOOD").expiry_notified_at is not None
        assert tx.consents.get("c-T-W-BAD").expiry_notified_at is None

    ledger.clock.advance(timedelta(days=3))  # past both consents, before the deadline
    counts = tick(ledger)
    assert status_of(store, good) == "withdrawn"
    assert status_of(store, bad) == "delivered", "rolled back, tried again next pass"
    assert counts["withdrawn-consent-expired"] == 1
    assert failures("consent-ended") == before[0] + 1
    assert failures("consent-expiring") == before[1] + 1


def test_the_deadline_pass_reads_only_the_referrals_with_something_due(store: Store) -> None:
    """The watch reads, per urgency, the waiting referrals whose reminder has come by the
    policy in force (sent, or created if never sent): none that has nothing due is read,
    and every one that the policy says to remind or expire is (issue 9: a pass that read
    every open referral held the write lock for as long as it took)."""
    policy = DeadlinePolicy(
        routine=timedelta(days=10), urgent=timedelta(days=3), asap=timedelta(days=1)
    )
    now = datetime(2026, 6, 1, 12, tzinfo=UTC)
    expected_read: set[str] = set()
    must_act: set[str] = set()
    with store.begin() as tx:
        n = 0
        for urgency in URGENCIES:
            for hours in (1, 11, 13, 23, 25, 71, 73, 119, 121, 239, 241, 1000):
                for sent in (True, False):
                    for status in ("requested", "delivered", "received", "accepted"):
                        n += 1
                        rid = f"r-{n}"
                        started = now - timedelta(hours=hours)
                        tx.referrals.add(
                            referral_id=rid,
                            signal_id=f"s-{n}",
                            need="n",
                            attempt=1,
                            partner_id="p",
                            partner_kind="k",
                            consent_id="c",
                            status=status,
                            urgency=urgency,
                            created_at=started - timedelta(hours=1) if sent else started,
                            updated_at=started,
                            sent_at=started if sent else None,
                            reminded=hours % 2 == 1,
                        )
                        if status == "accepted":
                            continue
                        if started <= now - policy.window(urgency) * policy.reminder_fraction:
                            expected_read.add(rid)
                        action = deadline_action(
                            status, urgency, started, hours % 2 == 1, now, policy
                        )
                        if action.kind != "none":
                            must_act.add(rid)
    with store.read() as tx:
        read = {r.referral_id for r in tx.referrals.waiting(policy.reminders_due(now))}
    assert read == expected_read
    assert must_act <= read
    assert must_act and len(read) < n / 2


def test_the_consent_expiry_notice_reads_only_the_consents_ending_within_the_notice(
    store: Store,
) -> None:
    """Only the consents ending by the horizon are read for the expiry notice; one that
    ends later is not."""
    ledger = make_ledger(store)
    referred(ledger, "T-SOON-1", "lmh-proximite", days=5)
    referred(ledger, "T-LATE-2", "lmh-proximite", days=60)
    now = ledger.clock()
    with store.read() as tx:
        soon = {c.person_ref for c in tx.consents.unnotified(now + timedelta(days=14))}
        later = {c.person_ref for c in tx.consents.unnotified(now + timedelta(days=90))}
    assert soon == {"T-SOON-1"}
    assert later == {"T-SOON-1", "T-LATE-2"}
