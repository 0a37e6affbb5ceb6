"""Deadlines: when an unanswered referral is reminded, and when it expires."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from partnerbus.rules import (
    DORA_DEADLINES,
    OPEN,
    PARKED_FOLLOW_UP,
    STALLED_FOLLOW_UP,
    TERMINAL,
    DeadlineAction,
    DeadlinePolicy,
    FollowUpSteps,
    deadline_action,
    follow_up_action,
)

SENT = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
POLICY = DeadlinePolicy(
    routine=timedelta(days=30), urgent=timedelta(days=8), asap=timedelta(days=2)
)
WAITING = ("requested", "delivered", "received")


@pytest.mark.parametrize(
    ("urgency", "due", "remind"),
    [
        ("routine", timedelta(days=30), timedelta(days=15)),
        ("urgent", timedelta(days=8), timedelta(days=4)),
        ("asap", timedelta(days=2), timedelta(days=1)),
    ],
)
def test_due_and_reminder_times_follow_the_urgency(
    urgency: str, due: timedelta, remind: timedelta
) -> None:
    """due_by adds the urgency's window; remind_at adds its reminder fraction of it."""
    assert POLICY.due_by(urgency, SENT) == SENT + due
    assert POLICY.remind_at(urgency, SENT) == SENT + remind


def test_the_dora_policy_reminds_after_ten_days_and_expires_after_thirty() -> None:
    """The default routine policy copies DORA's habit."""
    assert DORA_DEADLINES.remind_at("routine", SENT) == SENT + timedelta(days=10)
    assert DORA_DEADLINES.due_by("routine", SENT) == SENT + timedelta(days=30)


def test_an_unknown_urgency_is_refused() -> None:
    """An urgency outside routine, urgent, asap raises ValueError naming it."""
    with pytest.raises(ValueError, match="unknown urgency 'stat'"):
        POLICY.due_by("stat", SENT)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"routine": timedelta(0)},
        {"urgent": timedelta(days=-1)},
        {"reminder_fraction": 0.0},
        {"reminder_fraction": 1.0},
    ],
)
def test_a_policy_with_empty_windows_or_a_silly_fraction_is_refused(
    kwargs: dict[str, object],
) -> None:
    """Windows must be positive and the reminder fall strictly inside them."""
    values: dict[str, object] = {
        "routine": timedelta(days=30),
        "urgent": timedelta(days=8),
        "asap": timedelta(days=2),
    }
    values.update(kwargs)
    with pytest.raises(ValueError, match="must"):
        DeadlinePolicy(**values)  # type: ignore[arg-type]


def _act(status: str, now: datetime, *, reminded: bool = False, urgency: str = "routine") -> str:
    return deadline_action(status, urgency, SENT, reminded, now, POLICY).kind


@pytest.mark.parametrize("status", WAITING)
def test_a_waiting_referral_is_left_alone_before_its_reminder(status: str) -> None:
    """Before the reminder time nothing happens."""
    assert _act(status, SENT + timedelta(days=15) - timedelta(seconds=1)) == "none"


@pytest.mark.parametrize("status", WAITING)
def test_a_waiting_referral_is_reminded_once_from_its_reminder_time(status: str) -> None:
    """At the reminder time it is reminded, and not again once reminded."""
    assert _act(status, SENT + timedelta(days=15)) == "remind"
    assert _act(status, SENT + timedelta(days=20)) == "remind"
    assert _act(status, SENT + timedelta(days=20), reminded=True) == "none"


@pytest.mark.parametrize("status", WAITING)
@pytest.mark.parametrize("reminded", [True, False])
def test_a_waiting_referral_expires_at_its_due_date(status: str, reminded: bool) -> None:
    """At or after the due date it expires, reminded or not."""
    assert _act(status, SENT + timedelta(days=30) - timedelta(seconds=1), reminded=reminded) in (
        "none",
        "remind",
    )
    assert _act(status, SENT + timedelta(days=30), reminded=reminded) == "expire"
    assert _act(status, SENT + timedelta(days=300), reminded=reminded) == "expire"


@pytest.mark.parametrize("status", sorted((OPEN | TERMINAL) - set(WAITING)))
def test_answered_or_closed_referrals_never_get_reminded_or_expired(status: str) -> None:
    """Accepted and beyond are out of the deadline rule, however late."""
    for days in (0, 15, 30, 3000):
        assert _act(status, SENT + timedelta(days=days)) == "none"


def test_an_asap_referral_runs_on_its_own_clock() -> None:
    """An asap referral is reminded after a day and expires after two."""
    assert _act("delivered", SENT + timedelta(days=1), urgency="asap") == "remind"
    assert _act("delivered", SENT + timedelta(days=2), urgency="asap") == "expire"


def test_every_action_says_why() -> None:
    """The action carries a readable reason, naming the due date where there is one."""
    action = deadline_action("received", "routine", SENT, False, SENT + timedelta(days=31), POLICY)
    assert action == DeadlineAction("expire", "no answer by 2026-04-01T09:00+00:00")
    assert deadline_action("accepted", "routine", SENT, False, SENT, POLICY).reason


# follow-ups: parked needs and stalled referrals -------------------------------------------

STEPS = FollowUpSteps(remind=timedelta(days=7), give_up=timedelta(days=30))


@pytest.mark.parametrize(
    ("elapsed", "reminded_after", "expected"),
    [
        (timedelta(days=6, hours=23), None, "none"),
        (timedelta(days=7), None, "remind"),
        (timedelta(days=40), None, "remind"),  # a late pass reminds first, never closes at once
        (timedelta(days=29), timedelta(days=7), "none"),
        (timedelta(days=30), timedelta(days=7), "give-up"),
        (timedelta(days=62), timedelta(days=40), "none"),  # the reminder keeps its notice
        (timedelta(days=63), timedelta(days=40), "give-up"),
    ],
)
def test_a_follow_up_reminds_once_then_gives_up_after_the_notice(
    elapsed: timedelta, reminded_after: timedelta | None, expected: str
) -> None:
    """Remind at `remind`; give up at `give_up`, and never sooner after the reminder than the notice between the two steps (23 days here)."""
    reminded_at = SENT + reminded_after if reminded_after is not None else None
    assert follow_up_action(STEPS, SENT, reminded_at, SENT + elapsed) == expected


def test_with_nobody_to_remind_a_follow_up_gives_up_at_its_time() -> None:
    """No agency to remind: nothing at 7 days, give up at 30."""
    at = SENT + timedelta(days=7)
    assert follow_up_action(STEPS, SENT, None, at, can_remind=False) == "none"
    at = SENT + timedelta(days=30)
    assert follow_up_action(STEPS, SENT, None, at, can_remind=False) == "give-up"


def test_the_default_follow_ups_are_shorter_for_more_urgent_needs() -> None:
    """Parked: remind 7/3/1 days, close 30/14/7; stalled: remind 30/14/7, report 45/21/10."""
    for policy in (PARKED_FOLLOW_UP, STALLED_FOLLOW_UP):
        routine, urgent, asap = (policy.steps(u) for u in ("routine", "urgent", "asap"))
        assert routine.remind > urgent.remind > asap.remind
        assert routine.give_up > urgent.give_up > asap.give_up
    assert PARKED_FOLLOW_UP.steps("routine") == FollowUpSteps(timedelta(days=7), timedelta(days=30))
    assert STALLED_FOLLOW_UP.steps("asap") == FollowUpSteps(timedelta(days=7), timedelta(days=10))
    assert (PARKED_FOLLOW_UP.first_step, STALLED_FOLLOW_UP.first_step) == (
        timedelta(days=1),
        timedelta(days=7),
    ), "the passes read only what started before the shortest first step"


@pytest.mark.parametrize(
    ("remind", "give_up", "error"),
    [
        (timedelta(0), timedelta(days=1), "positive"),
        (timedelta(days=3), timedelta(days=3), "after the reminder"),
        (timedelta(days=3), timedelta(days=2), "after the reminder"),
    ],
)
def test_follow_up_steps_must_come_in_order(
    remind: timedelta, give_up: timedelta, error: str
) -> None:
    """A reminder after a positive time, and the last step after it: else a clear error."""
    with pytest.raises(ValueError, match=error):
        FollowUpSteps(remind, give_up)


def test_an_unknown_urgency_has_no_follow_up() -> None:
    with pytest.raises(ValueError, match="unknown urgency"):
        PARKED_FOLLOW_UP.steps("stat")
