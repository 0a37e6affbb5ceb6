"""Routing as a pure decision, and the wrappers every use case runs in: no database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from partnerbus.directory import Directory, load_sample, match
from partnerbus.rules import ConsentRecord, DeadlinePolicy
from partnerbus.schemas import ConsentScope, Signal
from partnerbus.usecases import (
    AwaitConsent,
    Ledger,
    NoPartner,
    Room,
    SendReferral,
    decide_routing,
    intake,
    use_case,
)
from tests.keys import TEST_KEY_BYTES

ARREARS = "logement-hebergement--reduire-les-impayes-de-loyer"
ROUBAIX = "59512"
NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
PERSON = "T-ROUTE-0001"


@pytest.fixture(scope="module")
def directory() -> Directory:
    return load_sample()


def a_signal(**extra: Any) -> Signal:
    values: dict[str, Any] = {
        "message_id": "sig-1",
        "occurred_at": NOW,
        "source": "lmh-recouvrement",
        "person_ref": PERSON,
        "commune": ROUBAIX,
        "needs": (ARREARS,),
    }
    values.update(extra)
    return Signal(**values)


def a_consent(kinds: tuple[str, ...], **extra: Any) -> ConsentRecord:
    values: dict[str, Any] = {
        "consent_id": "c-1",
        "person_ref": PERSON,
        "scope": ConsentScope(needs=("logement-hebergement",), partner_kinds=kinds),
        "collected_by": "s.benali",
        "agency": "lmh-agence-roubaix",
        "method": "oral",
        "granted_at": NOW - timedelta(days=1),
        "valid_until": NOW + timedelta(days=30),
    }
    values.update(extra)
    return ConsentRecord(**values)


def test_a_consent_to_the_best_candidates_kind_sends_the_need_to_it(
    directory: Directory,
) -> None:
    """With a consent covering the best candidate's kind, the need goes to that candidate under that consent."""
    best = match(directory, ARREARS, ROUBAIX, sender="lmh-recouvrement")[0]
    decision = decide_routing(
        directory, a_signal(), ARREARS, [a_consent((best.partner.kind,))], NOW
    )
    assert isinstance(decision, SendReferral)
    assert decision.candidate.partner_id == best.partner_id
    assert decision.consent.allowed and decision.consent.consent_id == "c-1"


def test_without_consent_the_need_awaits_it_with_the_candidates_to_suggest(
    directory: Directory,
) -> None:
    """No consent at all: the need waits, with the reason `missing` and every candidate kept to suggest."""
    decision = decide_routing(directory, a_signal(), ARREARS, [], NOW)
    assert isinstance(decision, AwaitConsent)
    assert decision.consent.reason == "missing"
    assert [c.partner_id for c in decision.candidates] == [
        c.partner_id for c in match(directory, ARREARS, ROUBAIX, sender="lmh-recouvrement")
    ]


def test_a_consent_that_ended_is_no_consent(directory: Directory) -> None:
    """A consent whose validity ended before `now` does not send anything: the need awaits consent, reason `expired`."""
    kinds = tuple({c.partner.kind for c in match(directory, ARREARS, ROUBAIX)})
    ended = a_consent(kinds, valid_until=NOW - timedelta(seconds=1))
    decision = decide_routing(directory, a_signal(), ARREARS, [ended], NOW)
    assert isinstance(decision, AwaitConsent) and decision.consent.reason == "expired"


def test_the_partners_tried_are_never_chosen_again(directory: Directory) -> None:
    """With every candidate already tried, no partner is left, and the reason names those tried."""
    everyone = tuple(
        c.partner_id for c in match(directory, ARREARS, ROUBAIX, sender="lmh-recouvrement")
    )
    decision = decide_routing(directory, a_signal(), ARREARS, [], NOW, tried=everyone)
    assert isinstance(decision, NoPartner)
    assert decision.tried == everyone and "besides" in decision.reason


def test_a_source_gone_from_the_directory_is_said_in_the_reason(directory: Directory) -> None:
    """A signal whose source left the directory has no agreement to travel along: no partner, and the reason says why."""
    decision = decide_routing(directory, a_signal(source="gone-partner"), ARREARS, [], NOW)
    assert isinstance(decision, NoPartner)
    assert "no longer in the directory" in decision.reason


def test_the_decision_is_the_same_every_time(directory: Directory) -> None:
    """Pure: the same facts give the same decision (no clock read, nothing written)."""
    consents = [a_consent(("ccas-cias", "caf"))]
    first = decide_routing(directory, a_signal(), ARREARS, consents, NOW)
    assert decide_routing(directory, a_signal(), ARREARS, consents, NOW) == first


KINDS = ("ccas-cias", "points-conseil-budget", "caf", "maisons-des-solidarites", "adil")


def rooms(full: set[str], asked: list[str] | None = None) -> Any:
    """A room check: the partners in `full` have none; the others one place of two."""

    def room(candidate: Any) -> Room:
        if asked is not None:
            asked.append(candidate.partner_id)
        if candidate.partner_id in full:
            return Room(free=False, reason="full (2 open of 2)")
        return Room(free=True, reason="capacity 1 left (1 open of 2)")

    return room


def test_a_full_candidate_is_skipped_and_the_chosen_ones_reasons_say_so(
    directory: Directory,
) -> None:
    """The best candidate full: the need goes to the next, whose reasons carry its counted capacity and why the first was skipped."""
    first, second = match(directory, ARREARS, ROUBAIX, sender="lmh-recouvrement")[:2]
    decision = decide_routing(
        directory,
        a_signal(),
        ARREARS,
        [a_consent(KINDS)],
        NOW,
        room=rooms({first.partner_id}),
    )
    assert isinstance(decision, SendReferral)
    assert decision.candidate.partner_id == second.partner_id
    reasons = decision.candidate.reasons
    assert reasons[:4] == second.reasons[:4] and reasons[5] == second.reasons[5]
    assert reasons[4] == "capacity 1 left (1 open of 2)"
    assert reasons[6:] == (f"{first.partner_id} skipped: full (2 open of 2)",)


def test_room_is_asked_only_of_consented_candidates_until_one_has_a_place(
    directory: Directory,
) -> None:
    """Room is counted for consented candidates only, best first, and no further than the one chosen."""
    candidates = match(directory, ARREARS, ROUBAIX, sender="lmh-recouvrement")
    asked: list[str] = []
    consented = a_consent(("maisons-des-solidarites", "caf"))
    decision = decide_routing(
        directory, a_signal(), ARREARS, [consented], NOW, room=rooms(set(), asked)
    )
    assert isinstance(decision, SendReferral)
    kinds = {"maisons-des-solidarites", "caf"}
    assert asked == [next(c.partner_id for c in candidates if c.partner.kind in kinds)]


def test_every_consented_candidate_full_is_no_partner_naming_them(directory: Directory) -> None:
    """Every candidate the person consented to is full and no other exists: no partner, the reason naming each full one."""
    everyone = [c.partner_id for c in match(directory, ARREARS, ROUBAIX, sender="lmh-recouvrement")]
    decision = decide_routing(
        directory, a_signal(), ARREARS, [a_consent(KINDS)], NOW, room=rooms(set(everyone))
    )
    assert isinstance(decision, NoPartner)
    assert decision.reason.startswith(f"no partner with room for {ARREARS} in {ROUBAIX}: ")
    for partner in everyone:
        assert f"{partner} skipped: full (2 open of 2)" in decision.reason


def test_full_consented_candidates_leave_the_others_awaiting_consent(
    directory: Directory,
) -> None:
    """The consented candidate full, others not consented to: the need awaits consent, suggesting only those others."""
    candidates = match(directory, ARREARS, ROUBAIX, sender="lmh-recouvrement")
    first = candidates[0]
    decision = decide_routing(
        directory,
        a_signal(),
        ARREARS,
        [a_consent((first.partner.kind,))],
        NOW,
        room=rooms({first.partner_id}),
    )
    assert isinstance(decision, AwaitConsent)
    assert first.partner_id not in [c.partner_id for c in decision.candidates]
    assert [c.partner_id for c in decision.candidates] == [
        c.partner_id for c in candidates if c.partner.kind != first.partner.kind
    ]


class Ticking:
    """A clock that moves a second on every read: what a use case must not notice."""

    def __init__(self) -> None:
        self.now = NOW
        self.reads = 0

    def __call__(self) -> datetime:
        self.reads += 1
        self.now += timedelta(seconds=1)
        return self.now


class FakeProcessed:
    """The dedupe marks' repository, in memory."""

    def __init__(self) -> None:
        self.marks: dict[tuple[str, str], datetime] = {}

    def first_time(self, message_id: str, queue: str, now: datetime) -> bool:
        if (message_id, queue) in self.marks:
            return False
        self.marks[message_id, queue] = now
        return True


class FakeTx:
    """Only the dedupe marks of a transaction, in memory."""

    def __init__(self) -> None:
        self.processed = FakeProcessed()


def a_ledger(directory: Directory, clock: Ticking) -> Ledger:
    return Ledger(
        store=None,  # type: ignore[arg-type]
        directory=directory,
        clock=clock,
        pseudonym_key=TEST_KEY_BYTES,
        deadlines=DeadlinePolicy(
            routine=timedelta(days=10), urgent=timedelta(days=3), asap=timedelta(days=1)
        ),
    )


def test_a_use_case_reads_one_now_however_often_it_asks(directory: Directory) -> None:
    """Inside `use_case`, every read of the clock gives the instant the transaction started: the clock itself is read once."""
    clock = Ticking()

    @use_case
    def reads_thrice(ledger: Ledger, tx: object) -> list[datetime]:
        return [ledger.clock(), ledger.clock(), ledger.clock()]

    seen = reads_thrice(a_ledger(directory, clock), FakeTx())  # type: ignore[arg-type]
    assert clock.reads == 1 and seen == [clock.now] * 3


def test_intake_runs_a_message_once_per_queue_and_marks_it_at_the_same_now(
    directory: Directory,
) -> None:
    """`intake` marks the message in the use case's transaction at the use case's own `now`, runs it once, and answers False for a duplicate."""
    clock = Ticking()
    ledger = a_ledger(directory, clock)
    tx = FakeTx()
    ran: list[datetime] = []

    @intake
    def receive(ledger: Ledger, tx: object, message: Signal) -> None:
        ran.append(ledger.clock())

    assert receive(ledger, tx, a_signal(), "q")  # type: ignore[arg-type]
    assert not receive(ledger, tx, a_signal(), "q")  # type: ignore[arg-type]
    assert receive(ledger, tx, a_signal(), "other-q")  # type: ignore[arg-type]
    assert len(ran) == 2 and tx.processed.marks["sig-1", "q"] == ran[0]
