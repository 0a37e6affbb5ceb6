"""The referral state machine, pinned against a table written by hand.

Rows are the current status, columns the reported status, in this order:

    req  del  rcv  acc  rej  inp  hold fail comp canc wdr  exp

A = applied, I = ignored, R = refused. The tables are the specification: they are written
here, not computed from the implementation.
"""

from __future__ import annotations

from typing import get_args

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from partnerbus.rules import (
    ADVISOR_SETTABLE,
    AWAITING_ANSWER,
    BUS_SETTABLE,
    OPEN,
    PARTNER_SETTABLE,
    TERMINAL,
    Transition,
    reroute_after_rejection,
    transition,
)
from partnerbus.schemas import ReferralStatus, RejectReason

COLUMNS = (
    "requested",
    "delivered",
    "received",
    "accepted",
    "rejected",
    "in-progress",
    "on-hold",
    "failed",
    "completed",
    "cancelled",
    "withdrawn",
    "expired",
)

#                   req  del  rcv  acc  rej  inp  hold fail comp canc wdr  exp
PARTNER = {
    "requested":   " R    R    A    A    A    A    A    A    A    R    R    R ",
    "delivered":   " R    R    A    A    A    A    A    A    A    R    R    R ",
    "received":    " R    R    I    A    A    A    A    A    A    R    R    R ",
    "accepted":    " R    R    I    I    R    A    A    A    A    R    R    R ",
    "in-progress": " R    R    I    I    R    I    A    A    A    R    R    R ",
    "on-hold":     " R    R    I    I    R    A    I    A    A    R    R    R ",
    "rejected":    " R    R    I    R    I    R    R    R    R    R    R    R ",
    "failed":      " R    R    I    R    R    R    R    I    R    R    R    R ",
    "completed":   " R    R    I    R    R    R    R    R    I    R    R    R ",
    "cancelled":   " R    R    I    R    R    R    R    R    R    R    R    R ",
    "withdrawn":   " R    R    I    R    R    R    R    R    R    R    R    R ",
    "expired":     " R    R    I    R    R    R    R    R    R    R    R    R ",
}  # fmt: skip

#                   req  del  rcv  acc  rej  inp  hold fail comp canc wdr  exp
BUS = {
    "requested":   " I    A    A    R    R    R    R    R    R    A    A    A ",
    "delivered":   " R    I    A    R    R    R    R    R    R    A    A    A ",
    "received":    " R    I    I    R    R    R    R    R    R    A    A    A ",
    "accepted":    " R    I    I    R    R    R    R    R    R    A    A    I ",
    "in-progress": " R    I    I    R    R    R    R    R    R    A    A    I ",
    "on-hold":     " R    I    I    R    R    R    R    R    R    A    A    I ",
    "rejected":    " R    I    I    R    R    R    R    R    R    I    I    I ",
    "failed":      " R    I    I    R    R    R    R    R    R    I    I    I ",
    "completed":   " R    I    I    R    R    R    R    R    R    I    I    I ",
    "cancelled":   " R    I    I    R    R    R    R    R    R    I    I    I ",
    "withdrawn":   " R    I    I    R    R    R    R    R    R    I    I    I ",
    "expired":     " R    I    I    R    R    R    R    R    R    I    I    I ",
}  # fmt: skip

#                   req  del  rcv  acc  rej  inp  hold fail comp canc wdr  exp
ADVISOR = {
    "requested":   " R    R    R    R    R    R    R    R    R    A    A    R ",
    "delivered":   " R    R    R    R    R    R    R    R    R    A    A    R ",
    "received":    " R    R    R    R    R    R    R    R    R    A    A    R ",
    "accepted":    " R    R    R    R    R    R    R    R    R    A    A    R ",
    "in-progress": " R    R    R    R    R    R    R    R    R    A    A    R ",
    "on-hold":     " R    R    R    R    R    R    R    R    R    A    A    R ",
    "rejected":    " R    R    R    R    R    R    R    R    R    R    R    R ",
    "failed":      " R    R    R    R    R    R    R    R    R    R    R    R ",
    "completed":   " R    R    R    R    R    R    R    R    R    R    R    R ",
    "cancelled":   " R    R    R    R    R    R    R    R    R    I    R    R ",
    "withdrawn":   " R    R    R    R    R    R    R    R    R    R    I    R ",
    "expired":     " R    R    R    R    R    R    R    R    R    R    R    R ",
}  # fmt: skip

TABLES = {"partner": PARTNER, "bus": BUS, "advisor": ADVISOR}
OUTCOMES = {"A": "applied", "I": "ignored", "R": "refused"}


def _expected(actor: str, current: str, new: str) -> str:
    cells = TABLES[actor][current].split()
    return OUTCOMES[cells[COLUMNS.index(new)]]


TRIPLES = [(current, new, actor) for actor in TABLES for current in COLUMNS for new in COLUMNS]


def test_the_tables_cover_every_status_and_actor() -> None:
    """The hand-written tables have one row per status and one cell per status."""
    assert set(COLUMNS) == set(get_args(ReferralStatus))
    for table in TABLES.values():
        assert set(table) == set(COLUMNS)
        assert all(len(row.split()) == len(COLUMNS) for row in table.values())


@pytest.mark.parametrize(("current", "new", "actor"), TRIPLES)
def test_every_transition_follows_the_table(current: str, new: str, actor: str) -> None:
    """Each (current, new, actor) triple gives the outcome the hand-written table says."""
    result = transition(current, new, actor)  # type: ignore[arg-type]
    assert result.outcome == _expected(actor, current, new)
    assert (result.from_status, result.to_status) == (current, new)
    assert result.reason
    assert result.applied is (result.outcome == "applied")


def test_open_and_terminal_split_every_status() -> None:
    """Every status is either open or terminal, never both."""
    assert set(get_args(ReferralStatus)) == OPEN | TERMINAL
    assert not OPEN & TERMINAL
    assert {"rejected", "completed", "failed", "cancelled", "withdrawn", "expired"} == TERMINAL
    assert {"requested", "delivered", "received"} == AWAITING_ANSWER


def test_partners_may_report_only_their_own_statuses() -> None:
    """A partner reports received and its answers, never bus observations or closures."""
    assert {
        "received",
        "accepted",
        "rejected",
        "in-progress",
        "on-hold",
        "failed",
        "completed",
    } == PARTNER_SETTABLE
    assert {"cancelled", "withdrawn"} == ADVISOR_SETTABLE
    assert {"delivered", "expired", "cancelled", "withdrawn"} <= BUS_SETTABLE


def test_nothing_leaves_a_terminal_status() -> None:
    """From a terminal status no actor gets anything applied."""
    for actor in TABLES:
        for current in TERMINAL:
            for new in COLUMNS:
                assert transition(current, new, actor).outcome != "applied"  # type: ignore[arg-type]


def test_an_accepted_answer_overtaking_the_publisher_confirm_is_applied() -> None:
    """An accepted handled before the confirm is recorded applies, and the late confirm is a no-op."""
    first = transition("requested", "accepted", "partner")
    late = transition(first.to_status, "delivered", "bus")
    assert first.outcome == "applied"
    assert late.outcome == "ignored"


def test_a_completed_referral_cannot_be_accepted_again() -> None:
    """A late accepted after completion is refused, with a readable reason."""
    result = transition("completed", "accepted", "partner")
    assert result == Transition(
        "refused",
        "completed",
        "accepted",
        "the referral is closed (completed): it cannot become accepted",
    )


def test_a_partner_cannot_withdraw_or_expire_a_referral() -> None:
    """Withdrawn, expired and delivered are the bus's to say, not a partner's."""
    for new in ("withdrawn", "expired", "delivered", "cancelled"):
        result = transition("received", new, "partner")
        assert result.outcome == "refused"
        assert "partner may not" in result.reason


def test_a_rejected_referral_cannot_start() -> None:
    """Rejected is terminal: in-progress after it is refused."""
    assert transition("rejected", "in-progress", "partner").outcome == "refused"


def test_an_accepted_referral_is_not_rejected_but_failed() -> None:
    """Once accepted a partner reports failed, and the refusal says so."""
    result = transition("accepted", "rejected", "partner")
    assert result.outcome == "refused"
    assert "failed" in result.reason
    assert transition("accepted", "failed", "partner").outcome == "applied"


def test_on_hold_goes_back_to_in_progress() -> None:
    """A referral on hold resumes with in-progress."""
    assert transition("in-progress", "on-hold", "partner").outcome == "applied"
    assert transition("on-hold", "in-progress", "partner").outcome == "applied"


def test_a_deadline_meeting_an_answer_is_ignored() -> None:
    """The watcher expiring a referral answered meanwhile is a stale read, not an error."""
    result = transition("accepted", "expired", "bus")
    assert result.outcome == "ignored"
    assert "answered meanwhile" in result.reason


def test_an_advisor_cancelling_a_closed_referral_is_told_why() -> None:
    """The advisor's cancel on a completed referral is refused and names the status."""
    result = transition("completed", "cancelled", "advisor")
    assert result.outcome == "refused"
    assert "completed" in result.reason


@pytest.mark.parametrize(("current", "new"), [("bogus", "accepted"), ("accepted", "bogus")])
def test_unknown_statuses_are_a_programming_error(current: str, new: str) -> None:
    """An unknown status raises ValueError naming it."""
    with pytest.raises(ValueError, match="bogus"):
        transition(current, new, "partner")


def test_an_unknown_actor_is_a_programming_error() -> None:
    """An unknown actor raises ValueError naming it."""
    with pytest.raises(ValueError, match="robot"):
        transition("requested", "accepted", "robot")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("reason", "reroute"),
    [
        ("not-eligible", True),
        ("full", True),
        ("other", True),
        ("unreachable", False),
        ("not-interested", False),
        ("duplicate", False),
    ],
)
def test_rejections_reroute_unless_the_person_or_a_duplicate_is_why(
    reason: str, reroute: bool
) -> None:
    """A rejection goes to the next-best partner unless the advisor must decide."""
    assert reroute_after_rejection(reason) is reroute


def test_every_reject_reason_has_a_reroute_decision() -> None:
    """Each RejectReason of the schemas is decided, none raises."""
    for reason in get_args(RejectReason):
        assert isinstance(reroute_after_rejection(reason), bool)


def test_an_unknown_reject_reason_raises() -> None:
    """An unknown reason raises ValueError listing the known ones."""
    with pytest.raises(ValueError, match="unknown rejection reason 'bored'"):
        reroute_after_rejection("bored")


ORDER = {"requested": 0, "delivered": 1, "received": 2, "accepted": 3, "in-progress": 4}


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(COLUMNS), st.sampled_from(("bus", "partner", "advisor"))),
        max_size=25,
    )
)
def test_any_stream_of_reports_never_reopens_or_steps_back(
    reports: list[tuple[str, str]],
) -> None:
    """Whatever arrives in whatever order, a closed referral stays closed and an open one only
    moves forward (on-hold and back to in-progress aside)."""
    status = "requested"
    for new, actor in reports:
        result = transition(status, new, actor)  # type: ignore[arg-type]
        if result.outcome != "applied":
            continue
        assert status not in TERMINAL
        if status in ORDER and new in ORDER:
            assert ORDER[new] > ORDER[status]
        if status == "on-hold":
            assert new != "accepted"
        status = new


TRANSFER = {
    "requested": "R",
    "delivered": "R",
    "received": "R",
    "accepted": "A",
    "rejected": "R",
    "in-progress": "A",
    "on-hold": "A",
    "failed": "R",
    "completed": "R",
    "cancelled": "R",
    "withdrawn": "R",
    "expired": "R",
}
"""The advisor transfers only a referral its partner accepted and holds (written by hand)."""


@pytest.mark.parametrize("current", sorted(TRANSFER))
def test_the_advisor_transfers_only_an_accepted_open_referral(current: str) -> None:
    """A transfer closes the referral as `cancelled`: applied from accepted, in progress, on hold; refused otherwise, telling a waiting referral's advisor to cancel and send instead."""
    from partnerbus.rules import transfer

    result = transfer(current)
    assert result.outcome == {"A": "applied", "R": "refused"}[TRANSFER[current]]
    assert result.to_status == "cancelled"
    if current in AWAITING_ANSWER:
        assert "cancel it and send the need instead" in result.reason
