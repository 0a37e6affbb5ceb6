"""Deadlines: when a partner that has not answered is reminded, and when its referral expires.

Procedures are slow, so every referral carries a due date from its urgency; half-way
(by default) the partner is reminded once; past the due date an unanswered referral expires
and the bus tries the next-best partner. Only referrals still waiting for an answer are
concerned: once accepted, the partner's own pace is the advisor's business, not a timer's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from partnerbus.rules.lifecycle import AWAITING_ANSWER


@dataclass(frozen=True)
class DeadlinePolicy:
    """How long a partner has to answer, per urgency (FHIR priorities)."""

    routine: timedelta
    urgent: timedelta
    asap: timedelta
    reminder_fraction: float = 0.5
    """When the reminder goes, as a fraction of the time to answer."""

    def __post_init__(self) -> None:
        for urgency in ("routine", "urgent", "asap"):
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
        if urgency not in ("routine", "urgent", "asap"):
            msg = f"unknown urgency {urgency!r}: one of routine, urgent, asap"
            raise ValueError(msg)
        window: timedelta = getattr(self, urgency)
        return window

    def due_by(self, urgency: str, sent_at: datetime) -> datetime:
        return sent_at + self.window(urgency)

    def remind_at(self, urgency: str, sent_at: datetime) -> datetime:
        return sent_at + self.window(urgency) * self.reminder_fraction


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
