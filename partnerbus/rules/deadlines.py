"""Deadlines: when a partner that has not answered is reminded, and when its referral expires.

Procedures are slow, so every referral carries a due date from its urgency; half-way
(by default) the partner is reminded once; past the due date an unanswered referral expires
and the bus tries the next-best partner. Only referrals still waiting for an answer
expire: once accepted, the partner works at its own pace, but an accepted referral with no
news for long reminds the partner, then the advisor is told (`STALLED_FOLLOW_UP`). A need
parked for the person's consent reminds the advisor, then closes (`PARKED_FOLLOW_UP`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal, get_args

from partnerbus.rules.lifecycle import AWAITING_ANSWER
from partnerbus.schemas.base import Urgency

URGENCIES: tuple[str, ...] = get_args(Urgency)


@dataclass(frozen=True)
class DeadlinePolicy:
    """How long a partner has to answer, per urgency (FHIR priorities)."""

    routine: timedelta
    urgent: timedelta
    asap: timedelta
    reminder_fraction: float = 0.5
    """When the reminder goes, as a fraction of the time to answer."""

    def __post_init__(self) -> None:
        for urgency in URGENCIES:
            if self.window(urgency) <= timedelta(0):
                msg = f"the {urgency} deadline must be positive, not {self.window(urgency)}"
                raise ValueError(msg)
        if not 0 < self.reminder_fraction < 1:
            msg = (
                f"reminder_fraction must lie strictly between 0 and 1, not {self.reminder_fraction}"
            )
            raise ValueError(msg)

    def window(self, urgency: str) -> timedelta:
        """The time a partner has to answer a referral of this urgency."""
        if urgency not in URGENCIES:
            msg = f"unknown urgency {urgency!r}: one of routine, urgent, asap"
            raise ValueError(msg)
        window: timedelta = getattr(self, urgency)
        return window

    def due_by(self, urgency: str, sent_at: datetime) -> datetime:
        return sent_at + self.window(urgency)

    def remind_at(self, urgency: str, sent_at: datetime) -> datetime:
        return sent_at + self.window(urgency) * self.reminder_fraction

    def reminders_due(self, now: datetime) -> dict[str, datetime]:
        """Per urgency, the latest start (sent, or created) of a referral whose reminder
        has come at `now`: a referral started later has nothing due (its expiry comes after
        its reminder), so the deadline watch need not read it."""
        return {u: now - self.window(u) * self.reminder_fraction for u in URGENCIES}


DORA_DEADLINES = DeadlinePolicy(
    routine=timedelta(days=30),
    urgent=timedelta(days=7),
    asap=timedelta(days=2),
    reminder_fraction=1 / 3,
)
"""DORA's habit for routine orientations (a reminder after 10 days, expiry after 30),
shortened for urgent and asap ones."""


@dataclass(frozen=True)
class DeadlineAction:
    """What the deadline watcher should do with one referral now."""

    kind: Literal["none", "remind", "expire"]
    reason: str = ""


def deadline_action(
    status: str,
    urgency: str,
    sent_at: datetime,
    reminded: bool,
    now: datetime,
    policy: DeadlinePolicy,
) -> DeadlineAction:
    """Expire at or after the due date, remind once at or after the reminder time, else
    nothing; only referrals waiting for an answer (requested, delivered, received)."""
    if status not in AWAITING_ANSWER:
        return DeadlineAction("none", f"{status}: not waiting for an answer")
    due_by = policy.due_by(urgency, sent_at)
    due = _minute(due_by)
    if now >= due_by:
        return DeadlineAction("expire", f"no answer by {due}")
    if reminded:
        return DeadlineAction("none", f"already reminded; due {due}")
    if now >= policy.remind_at(urgency, sent_at):
        return DeadlineAction("remind", f"no answer since {_minute(sent_at)}; due {due}")
    return DeadlineAction("none", f"within the time to answer; due {due}")


def _minute(moment: datetime) -> str:
    return moment.isoformat(timespec="minutes")


@dataclass(frozen=True)
class FollowUpSteps:
    """Two steps after a quiet start: a reminder `remind` after it, then the last step
    (`give_up`: close the need, or tell the advisor) counted from the same start, but never
    sooner after the reminder than `give_up - remind`, so the reminder always leaves its
    full notice (a pass that did not run for a while sends the reminder first)."""

    remind: timedelta
    give_up: timedelta

    def __post_init__(self) -> None:
        if self.remind <= timedelta(0):
            msg = f"the reminder must come after a positive time, not {self.remind}"
            raise ValueError(msg)
        if self.give_up <= self.remind:
            msg = f"the last step ({self.give_up}) must come after the reminder ({self.remind})"
            raise ValueError(msg)

    def give_up_at(self, since: datetime, reminded_at: datetime | None) -> datetime:
        """When the last step is due: `give_up` after the start, and at least the notice
        (`give_up - remind`) after the reminder."""
        due = since + self.give_up
        if reminded_at is not None:
            due = max(due, reminded_at + (self.give_up - self.remind))
        return due


@dataclass(frozen=True)
class FollowUpPolicy:
    """The two steps of a time-driven follow-up, per urgency: parked needs (remind the
    advisor, then close the need) and stalled referrals (remind the partner, then tell the
    advisor)."""

    routine: FollowUpSteps
    urgent: FollowUpSteps
    asap: FollowUpSteps

    @property
    def first_step(self) -> timedelta:
        """The shortest wait before any step, whatever the urgency: nothing that began
        since `now - first_step` needs a follow-up yet (the passes read only the older)."""
        return min(self.routine.remind, self.urgent.remind, self.asap.remind)

    def steps(self, urgency: str) -> FollowUpSteps:
        if urgency not in URGENCIES:
            msg = f"unknown urgency {urgency!r}: one of routine, urgent, asap"
            raise ValueError(msg)
        steps: FollowUpSteps = getattr(self, urgency)
        return steps


PARKED_FOLLOW_UP = FollowUpPolicy(
    routine=FollowUpSteps(remind=timedelta(days=7), give_up=timedelta(days=30)),
    urgent=FollowUpSteps(remind=timedelta(days=3), give_up=timedelta(days=14)),
    asap=FollowUpSteps(remind=timedelta(days=1), give_up=timedelta(days=7)),
)
"""A need waiting for the person's consent: the advisor is reminded after a week (3 days
urgent, 1 day asap); the need closes (`consent-not-obtained`) after 30 days (14, 7)."""

STALLED_FOLLOW_UP = FollowUpPolicy(
    routine=FollowUpSteps(remind=timedelta(days=30), give_up=timedelta(days=45)),
    urgent=FollowUpSteps(remind=timedelta(days=14), give_up=timedelta(days=21)),
    asap=FollowUpSteps(remind=timedelta(days=7), give_up=timedelta(days=10)),
)
"""An accepted referral with no news: the partner is reminded after 30 days (14 urgent,
7 asap); the advisor is told after 45 days (21, 10)."""

FollowUpKind = Literal["none", "remind", "give-up"]


def follow_up_action(
    steps: FollowUpSteps,
    since: datetime,
    reminded_at: datetime | None,
    now: datetime,
    *,
    can_remind: bool = True,
) -> FollowUpKind:
    """What a follow-up does now with an item quiet since `since`: remind once (when
    someone can be reminded), then give up once the reminder's notice has run
    (`FollowUpSteps.give_up_at`); with nobody to remind, give up at `give_up` after the
    start."""
    if reminded_at is None and can_remind:
        return "remind" if now >= since + steps.remind else "none"
    return "give-up" if now >= steps.give_up_at(since, reminded_at) else "none"
