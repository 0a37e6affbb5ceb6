"""The scheduler's follow-ups (issue 11), on SQLite and PostgreSQL with a fake clock: a need
parked for consent reminds the advisor, then closes (`consent-not-obtained`); an accepted
referral with no news reminds the partner, then the advisor is told. Each step leaves
once, whatever the passes and the workers running them."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text

from partnerbus import usecases
from partnerbus.ledger.store import Store
from partnerbus.schemas import (
    ConsentGranted,
    ConsentScope,
    Facts,
    ReferralStatusChanged,
    Signal,
)
from partnerbus.testing import FakeClock
from partnerbus.usecases import Ledger
from tests.conftest import make_ledger
from tests.integration.test_scheduler import referred
from tests.integration.test_state_races import race

ARREARS = "logement-hebergement--reduire-les-impayes-de-loyer"
ROUBAIX = "59512"
AGENCY = "lmh-agence-roubaix"
SOURCE = "lmh-recouvrement"
KINDS = ("ccas-cias", "points-conseil-budget", "cresus", "caf", "maisons-des-solidarites")
Q = "test.queue"
DAY = timedelta(days=1)


@pytest.fixture
def ledger(store: Store) -> Ledger:
    return make_ledger(store, FakeClock())


def parked_signal(ledger: Ledger, person: str, urgency: str = "routine") -> str:
    """A signal about `person`, who has consented to nothing: its need is parked and the
    agency's advisor asked. Its id."""
    signal = Signal(
        message_id=f"sig-{person}",
        occurred_at=ledger.clock(),
        source=SOURCE,
        person_ref=person,
        commune=ROUBAIX,
        needs=(ARREARS,),
        urgency=urgency,  # type: ignore[arg-type]
        facts=Facts(arrears_eur=900, note="a note"),
    )
    with ledger.store.begin() as tx:
        assert usecases.receive_signal(ledger, tx, signal, Q)
        assert tx.signals.need_states(signal.message_id) == {ARREARS: "parked"}
    return signal.message_id


def grant(ledger: Ledger, person: str) -> None:
    now = ledger.clock()
    event = ConsentGranted(
        message_id=f"grant-{person}-{now:%Y%m%d%H%M%S%f}",
        occurred_at=now,
        consent_id=f"c-{person}-{now:%Y%m%d%H%M%S%f}",
        person_ref=person,
        scope=ConsentScope(needs=("logement-hebergement",), partner_kinds=KINDS),
        collected_by="s.benali",
        agency=AGENCY,
        method="oral",
        granted_at=now,
        valid_until=now + timedelta(days=60),
    )
    ledger.store.run(lambda tx: usecases.grant_consent(ledger, tx, event, Q))


def tick(ledger: Ledger) -> dict[str, int]:
    return ledger.store.run(lambda tx: usecases.watch_deadlines(ledger, tx))


def two_workers(ledger: Ledger) -> dict[str, int]:
    """Two passes that overlap, as two workers' schedulers: the first runs and holds its
    transaction open while the second starts on another thread; on PostgreSQL the first
    commits only once the second waits on a row the first wrote (it read the rows before
    the first committed, so each step must be settled by the ledger's compare-and-set, not
    by what the second read); SQLite runs them one after the other. The sum of what they
    counted."""
    store = ledger.store
    counted: list[dict[str, int]] = []
    errors: list[BaseException] = []

    def second() -> None:
        try:
            counted.append(store.run(lambda tx: usecases.watch_deadlines(ledger, tx)))
        except BaseException as exc:
            errors.append(exc)

    with store.begin() as tx:
        counted.append(usecases.watch_deadlines(ledger, tx))
        thread = threading.Thread(target=second)
        thread.start()
        if not store.is_sqlite:
            wait_blocked(store)
    thread.join(timeout=60)
    assert not thread.is_alive(), "the second pass never finished"
    if errors:
        raise errors[0]
    return {key: sum(c[key] for c in counted) for key in counted[0]}


def wait_blocked(store: Store, timeout: float = 20.0) -> None:
    """Until another session waits on a lock for one of the follow-ups' writes (a row, or
    a person's lock before a closing) (PostgreSQL)."""
    deadline = time.monotonic() + timeout
    query = text(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND (query LIKE 'UPDATE signal_needs%' OR query LIKE 'UPDATE referrals%' "
        "OR query LIKE '%pg_advisory_xact_lock%')"
    )
    with store.engine.connect() as conn:
        while time.monotonic() < deadline:
            if conn.execute(query).scalar_one():
                return
            conn.rollback()
            time.sleep(0.01)
    raise AssertionError("the second pass never waited on the first one's rows")


def sent(store: Store, message_type: str, **match: Any) -> list[tuple[str, dict[str, Any]]]:
    """(routing key, body) of the outbox rows of this type whose body has these values."""
    rows = [(key, json.loads(body)) for key, kind, body in store.outbox() if kind == message_type]
    return [(key, body) for key, body in rows if all(body.get(k) == v for k, v in match.items())]


def reminders(store: Store, signal_id: str) -> list[dict[str, Any]]:
    return [b for _, b in sent(store, "consent-requested", signal_id=signal_id, reminder=True)]


def closings(store: Store, signal_id: str) -> list[tuple[str, dict[str, Any]]]:
    return sent(store, "signal-closed", signal_id=signal_id, outcome="consent-not-obtained")


def state(store: Store, signal_id: str) -> str:
    with store.read() as tx:
        return tx.signals.need_states(signal_id)[ARREARS]


def actions(store: Store, subject: str) -> list[str]:
    return [a.action for a in store.audit_trail(subject) if a.subject == subject]


# parked needs --------------------------------------------------------------------------


def test_a_parked_need_reminds_the_advisor_once_then_closes_for_the_source(
    ledger: Ledger,
) -> None:
    """Routine: nothing before 7 days; at 7 days one reminder of the request to the agency (with when the need closes), audited; at 30 days the need closes, the source and the agency get SignalClosed(consent-not-obtained), audited; the passes after send nothing again, and a consent granted after the closing routes nothing."""
    store, clock = ledger.store, ledger.clock
    assert isinstance(clock, FakeClock)
    signal_id = parked_signal(ledger, "T-PARK-1")
    start = clock()

    clock.advance(6 * DAY)
    assert tick(ledger)["parked-reminded"] == 0
    clock.advance(DAY)
    assert tick(ledger)["parked-reminded"] == 1
    assert tick(ledger)["parked-reminded"] == 0, "a second pass sends nothing again"
    (reminder,) = reminders(store, signal_id)
    assert reminder["needs"] == [ARREARS]
    assert reminder["agency"] == AGENCY
    assert reminder["closes_at"].startswith((start + 30 * DAY).date().isoformat())
    assert [key for key, _ in sent(store, "consent-requested", signal_id=signal_id)] == [
        AGENCY,
        AGENCY,
    ], "the first request, then its reminder, both to the agency"
    assert "consent-reminded" in actions(store, signal_id)
    assert state(store, signal_id) == "parked"

    clock.advance(22 * DAY)  # day 29
    assert tick(ledger)["parked-closed"] == 0
    clock.advance(DAY)  # day 30
    counts = tick(ledger)
    assert counts["parked-closed"] == 1
    assert counts["failed"] == 0
    assert state(store, signal_id) == "closed"
    assert sorted(key for key, _ in closings(store, signal_id)) == sorted([SOURCE, AGENCY])
    assert "consent-not-obtained" in actions(store, signal_id)

    clock.advance(10 * DAY)
    assert tick(ledger)["parked-closed"] == 0
    assert len(closings(store, signal_id)) == 2, "closed once"
    grant(ledger, "T-PARK-1")
    assert store.count("referrals", signal_id=signal_id) == 0
    assert state(store, signal_id) == "closed"


def test_a_consent_granted_after_the_reminder_still_routes_the_need(ledger: Ledger) -> None:
    """The advisor is reminded, then the person consents: the need is routed to a partner as usual, and it never closes for want of consent."""
    store, clock = ledger.store, ledger.clock
    assert isinstance(clock, FakeClock)
    signal_id = parked_signal(ledger, "T-PARK-2")
    clock.advance(8 * DAY)
    assert tick(ledger)["parked-reminded"] == 1

    grant(ledger, "T-PARK-2")

    assert state(store, signal_id) == "routed"
    (referral,) = [r for r in store.referrals() if r.signal_id == signal_id]
    assert sent(store, "referral", referral_id=referral.referral_id)
    clock.advance(40 * DAY)
    counts = tick(ledger)
    assert counts["parked-closed"] == 0
    assert closings(store, signal_id) == []


def test_the_periods_follow_the_urgency(ledger: Ledger) -> None:
    """An asap need: reminded after a day, closed after 7; an urgent one after 3 and 14 (the defaults)."""
    store, clock = ledger.store, ledger.clock
    assert isinstance(clock, FakeClock)
    asap = parked_signal(ledger, "T-PARK-ASAP", "asap")
    urgent = parked_signal(ledger, "T-PARK-URG", "urgent")
    clock.advance(DAY)
    assert tick(ledger)["parked-reminded"] == 1
    assert len(reminders(store, asap)) == 1
    clock.advance(2 * DAY)  # day 3
    assert tick(ledger)["parked-reminded"] == 1
    assert len(reminders(store, urgent)) == 1
    clock.advance(4 * DAY)  # day 7
    assert tick(ledger)["parked-closed"] == 1
    assert state(store, asap) == "closed"
    assert state(store, urgent) == "parked"
    clock.advance(7 * DAY)  # day 14
    assert tick(ledger)["parked-closed"] == 1
    assert state(store, urgent) == "closed"


def test_a_late_pass_sends_the_reminder_first_and_leaves_it_its_notice(ledger: Ledger) -> None:
    """No pass ran for 40 days: the first one reminds the advisor (it does not close at once); the need closes 23 days later (the notice between the two steps)."""
    store, clock = ledger.store, ledger.clock
    assert isinstance(clock, FakeClock)
    signal_id = parked_signal(ledger, "T-PARK-LATE")
    clock.advance(40 * DAY)
    counts = tick(ledger)
    assert (counts["parked-reminded"], counts["parked-closed"]) == (1, 0)
    clock.advance(22 * DAY)
    assert tick(ledger)["parked-closed"] == 0
    clock.advance(DAY)
    assert tick(ledger)["parked-closed"] == 1
    assert state(store, signal_id) == "closed"


def test_retention_applies_to_a_need_closed_for_want_of_consent(ledger: Ledger) -> None:
    """A parked signal is kept whatever its age; once closed for want of consent, retention anonymises it after the retention period."""
    store, clock = ledger.store, ledger.clock
    assert isinstance(clock, FakeClock)
    signal_id = parked_signal(ledger, "T-PARK-RET")

    def retain() -> dict[str, int]:
        return store.run(
            lambda tx: usecases.apply_retention(
                ledger, tx, keep=timedelta(days=60), keep_free_text=timedelta(days=30)
            )
        )

    clock.advance(7 * DAY)
    tick(ledger)
    clock.advance(23 * DAY)
    assert tick(ledger)["parked-closed"] == 1
    clock.advance(61 * DAY)
    assert retain()["anonymised"] == 1
    with store.read() as tx:
        row = tx.signals.get(signal_id)
    assert row is not None and row.anonymised_at is not None
    assert row.person_ref.startswith("anon-")


def test_two_workers_remind_and_close_each_need_once(ledger: Ledger) -> None:
    """Two passes at once, on two threads (as two workers): one reminder per need, then one closing, never two."""
    store, clock = ledger.store, ledger.clock
    assert isinstance(clock, FakeClock)
    signals = [parked_signal(ledger, f"T-PARK-RACE-{n}") for n in range(5)]
    clock.advance(7 * DAY)
    first = two_workers(ledger)
    assert (first["parked-reminded"], first["failed"]) == (5, 0)
    assert tick(ledger)["parked-reminded"] == 0
    clock.advance(23 * DAY)
    first = two_workers(ledger)
    assert (first["parked-closed"], first["failed"]) == (5, 0)
    assert tick(ledger)["parked-closed"] == 0
    for signal_id in signals:
        assert len(reminders(store, signal_id)) == 1
        assert len(closings(store, signal_id)) == 2  # the source's copy and the agency's
        assert actions(store, signal_id).count("consent-reminded") == 1
        assert actions(store, signal_id).count("consent-not-obtained") == 1


def test_a_consent_racing_the_closing_either_routes_or_closes_the_need(ledger: Ledger) -> None:
    """At the closing time, a grant and the pass run at once: the need is either routed (and never closed) or closed (and never routed), never both."""
    store, clock = ledger.store, ledger.clock
    assert isinstance(clock, FakeClock)
    people = [f"T-PARK-GRANT-{n}" for n in range(8)]
    signals = [parked_signal(ledger, person) for person in people]
    clock.advance(7 * DAY)
    tick(ledger)
    clock.advance(23 * DAY)
    for person, signal_id in zip(people, signals, strict=True):
        event = ConsentGranted(
            message_id=f"grant-{person}",
            occurred_at=clock(),
            consent_id=f"c-{person}",
            person_ref=person,
            scope=ConsentScope(needs=("logement-hebergement",), partner_kinds=KINDS),
            collected_by="s.benali",
            agency=AGENCY,
            method="oral",
            granted_at=clock(),
            valid_until=clock() + timedelta(days=60),
        )
        race(
            store,
            lambda tx, e=event: usecases.grant_consent(ledger, tx, e, Q),
            lambda tx: usecases.watch_deadlines(ledger, tx),
        )
        routed = store.count("referrals", signal_id=signal_id)
        closed = len(closings(store, signal_id))
        if state(store, signal_id) == "routed":
            assert (routed, closed) == (1, 0), person
        else:
            assert state(store, signal_id) == "closed"
            assert (routed, closed) == (0, 2), person


def test_a_need_parked_again_by_a_grant_for_something_else_keeps_its_wait(
    ledger: Ledger,
) -> None:
    """A consent that does not cover the need (another need) routes nothing and parks it again: its wait still runs from the first parking (reminded at day 7, not 7 days after the grant)."""
    store, clock = ledger.store, ledger.clock
    assert isinstance(clock, FakeClock)
    signal_id = parked_signal(ledger, "T-PARK-AGAIN")
    clock.advance(5 * DAY)
    now = clock()
    event = ConsentGranted(
        message_id="grant-T-PARK-AGAIN",
        occurred_at=now,
        consent_id="c-T-PARK-AGAIN",
        person_ref="T-PARK-AGAIN",
        scope=ConsentScope(needs=("numerique",), partner_kinds=KINDS),
        collected_by="s.benali",
        agency=AGENCY,
        method="oral",
        granted_at=now,
        valid_until=now + timedelta(days=60),
    )
    store.run(lambda tx: usecases.grant_consent(ledger, tx, event, Q))
    assert state(store, signal_id) == "parked"
    clock.advance(2 * DAY)
    assert tick(ledger)["parked-reminded"] == 1


def test_a_need_back_at_the_consent_gate_starts_a_new_wait(ledger: Ledger) -> None:
    """A referral whose consent ran out before the partner took it up is withdrawn and its need parked again: that new wait is followed from its own start (a reminder 7 days later)."""
    store, clock = ledger.store, ledger.clock
    assert isinstance(clock, FakeClock)
    rid = referred(ledger, "T-PARK-BACK", SOURCE, days=3)
    signal_id = store.referral(rid).signal_id  # type: ignore[union-attr]
    clock.advance(4 * DAY)
    assert tick(ledger)["withdrawn-consent-expired"] == 1
    assert state(store, signal_id) == "parked"
    clock.advance(6 * DAY)
    assert tick(ledger)["parked-reminded"] == 0
    clock.advance(DAY)
    assert tick(ledger)["parked-reminded"] == 1
    clock.advance(23 * DAY)
    assert tick(ledger)["parked-closed"] == 1


# stalled referrals ---------------------------------------------------------------------


def accepted(ledger: Ledger, person: str) -> str:
    """A referral the partner has accepted (now): its id."""
    rid = referred(ledger, person, SOURCE)
    referral = ledger.store.referral(rid)
    assert referral is not None
    event = ReferralStatusChanged(
        message_id=f"acc-{rid}",
        occurred_at=ledger.clock(),
        referral_id=rid,
        partner=referral.partner_id,
        status="accepted",
    )
    ledger.store.run(lambda tx: usecases.record_status(ledger, tx, event, Q))
    return rid


def news(ledger: Ledger, rid: str, status: str) -> None:
    referral = ledger.store.referral(rid)
    assert referral is not None
    event = ReferralStatusChanged(
        message_id=f"{status}-{rid}",
        occurred_at=ledger.clock(),
        referral_id=rid,
        partner=referral.partner_id,
        status=status,  # type: ignore[arg-type]
    )
    ledger.store.run(lambda tx: usecases.record_status(ledger, tx, event, Q))


def news_reminders(store: Store, rid: str) -> list[tuple[str, dict[str, Any]]]:
    return sent(store, "referral-reminder", referral_id=rid, reason="no-news")


def stalled(store: Store, rid: str) -> list[tuple[str, dict[str, Any]]]:
    return sent(store, "referral-stalled", referral_id=rid)


def test_an_accepted_referral_with_no_news_reminds_the_partner_then_tells_the_advisor(
    ledger: Ledger,
) -> None:
    """Routine: nothing before 30 days of silence; at 30 days one news reminder to the partner (due when the advisor is told), audited; at 45 days the agency gets ReferralStalled, audited; nothing is sent again after."""
    store, clock = ledger.store, ledger.clock
    assert isinstance(clock, FakeClock)
    rid = accepted(ledger, "T-QUIET-1")
    referral = store.referral(rid)
    assert referral is not None
    last_news = referral.updated_at

    clock.advance(29 * DAY)
    assert tick(ledger)["stalled-reminded"] == 0
    clock.advance(DAY)
    assert tick(ledger)["stalled-reminded"] == 1
    assert tick(ledger)["stalled-reminded"] == 0
    ((key, reminder),) = news_reminders(store, rid)
    assert key == referral.partner_id
    assert reminder["partner"] == referral.partner_id
    assert reminder["due_by"].startswith((last_news + 45 * DAY).date().isoformat())
    assert reminder["last_news_at"].startswith(last_news.date().isoformat())
    assert "referral-news-reminded" in actions(store, rid)

    clock.advance(14 * DAY)  # day 44
    assert tick(ledger)["stalled-reported"] == 0
    clock.advance(DAY)  # day 45
    assert tick(ledger)["stalled-reported"] == 1
    clock.advance(30 * DAY)
    counts = tick(ledger)
    assert (counts["stalled-reminded"], counts["stalled-reported"]) == (0, 0)
    ((key, report),) = stalled(store, rid)
    assert key == AGENCY
    assert (report["signal_id"], report["need"], report["status"]) == (
        referral.signal_id,
        ARREARS,
        "accepted",
    )
    assert report["partner"] == referral.partner_id
    assert "referral-stalled" in actions(store, rid)
    assert len(news_reminders(store, rid)) == 1
    assert store.referral(rid).status == "accepted"  # type: ignore[union-attr]


def test_news_after_the_reminder_stops_the_follow_up(ledger: Ledger) -> None:
    """Reminded, the partner reports in-progress: the advisor is never told of a stall."""
    store, clock = ledger.store, ledger.clock
    assert isinstance(clock, FakeClock)
    rid = accepted(ledger, "T-QUIET-2")
    clock.advance(31 * DAY)
    assert tick(ledger)["stalled-reminded"] == 1
    news(ledger, rid, "in-progress")
    clock.advance(60 * DAY)
    counts = tick(ledger)
    assert (counts["stalled-reminded"], counts["stalled-reported"]) == (0, 0)
    assert stalled(store, rid) == []


def test_an_unanswered_referral_gets_only_the_answer_reminder(ledger: Ledger) -> None:
    """A referral still waiting for its answer is not followed for news: its reminder is of the answer (reason no-answer)."""
    store, clock = ledger.store, ledger.clock
    assert isinstance(clock, FakeClock)
    rid = referred(ledger, "T-QUIET-3", SOURCE)
    clock.advance(6 * DAY)
    counts = tick(ledger)
    assert (counts["reminded"], counts["stalled-reminded"]) == (1, 0)
    ((_, reminder),) = sent(store, "referral-reminder", referral_id=rid)
    assert reminder["reason"] == "no-answer"


def test_two_workers_remind_and_report_a_stalled_referral_once(ledger: Ledger) -> None:
    """Two passes at once, on two threads: one news reminder per referral, then one report to the advisor."""
    store, clock = ledger.store, ledger.clock
    assert isinstance(clock, FakeClock)
    rids = [accepted(ledger, f"T-QUIET-RACE-{n}") for n in range(5)]
    clock.advance(30 * DAY)
    first = two_workers(ledger)
    assert (first["stalled-reminded"], first["failed"]) == (5, 0)
    assert tick(ledger)["stalled-reminded"] == 0
    clock.advance(15 * DAY)
    first = two_workers(ledger)
    assert (first["stalled-reported"], first["failed"]) == (5, 0)
    assert tick(ledger)["stalled-reported"] == 0
    for rid in rids:
        assert len(news_reminders(store, rid)) == 1
        assert len(stalled(store, rid)) == 1
        assert actions(store, rid).count("referral-news-reminded") == 1
        assert actions(store, rid).count("referral-stalled") == 1


def test_a_no_news_reminder_from_the_dead_letters_is_replayed_only_while_still_accepted(
    ledger: Ledger,
) -> None:
    """A partner's dead-lettered no-news reminder goes back to the outbox while the referral is still accepted without news; once the partner has sent a status, the replay is refused with why."""
    store, clock = ledger.store, ledger.clock
    assert isinstance(clock, FakeClock)
    rid = accepted(ledger, "T-QUIET-REPLAY")
    partner = store.referral(rid).partner_id  # type: ignore[union-attr]
    clock.advance(30 * DAY)
    tick(ledger)
    ((_, reminder),) = news_reminders(store, rid)
    body = json.dumps(reminder).encode()

    def replay() -> str | None:
        return store.run(lambda tx: usecases.replay_to_partner(ledger, tx, partner, body))

    assert replay() is None
    news(ledger, rid, "in-progress")
    refused = replay()
    assert refused is not None and "in-progress" in refused
