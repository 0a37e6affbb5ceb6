"""The referral state machine.

    requested ─▶ delivered ─▶ received ─▶ accepted ─▶ in-progress ─▶ completed
        (bus: publisher    (partner's       │  ▲          │  ▲
         confirm)           consumer)       │  └─ on-hold ◀┘  │ failed (from accepted,
                                            ▼                 │ in-progress, on-hold)
                                         rejected

    cancelled (bus or advisor) and withdrawn (consent revoked) from any open state;
    expired (bus, deadline passed) from requested, delivered, received.

Messages arrive at least once and out of order: the publisher confirm, the partner's
receipt and its answers travel by different routes and may be handled by different workers.
So the machine is tolerant where tolerance is safe and strict where a status would lie:

- a partner may skip forward from a waiting state (requested, delivered, received) to any
  status it may report: an `accepted` handled before the `delivered` confirm is recorded,
  or a `completed` overtaking its `in-progress`, must not be lost;
- observations (`delivered`, `received`) and partner statuses the referral has already
  gone past (`accepted` once in progress) arriving late are ignored, never a step back;
- the same status again is ignored (a repeat, not an error);
- a bus decision (expire, cancel, withdraw) meeting a referral that has moved on
  (answered or closed meanwhile) is ignored: the bus acted on a stale read;
- everything else is refused with a reason: a status the actor may not set, a
  rejection after acceptance (report `failed`), anything after a terminal status; an
  advisor cancelling or withdrawing a closed referral is refused so she is told.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from partnerbus.schemas import ReferralStatus, RejectReason

Actor = Literal["bus", "partner", "advisor"]
Outcome = Literal["applied", "ignored", "refused"]

STATUSES: tuple[str, ...] = get_args(ReferralStatus)
ACTORS: tuple[str, ...] = get_args(Actor)

AWAITING_ANSWER: frozenset[str] = frozenset({"requested", "delivered", "received"})
"""Sent, not yet answered: only these get reminders and expire."""
ANSWERED_OPEN: frozenset[str] = frozenset({"accepted", "in-progress", "on-hold"})
OPEN: frozenset[str] = AWAITING_ANSWER | ANSWERED_OPEN
TERMINAL: frozenset[str] = frozenset(
    {"rejected", "completed", "failed", "cancelled", "withdrawn", "expired"}
)

PARTNER_SETTABLE: frozenset[str] = frozenset(
    {"received", "accepted", "rejected", "in-progress", "on-hold", "failed", "completed"}
)
BUS_SETTABLE: frozenset[str] = frozenset(
    {"requested", "delivered", "received", "cancelled", "withdrawn", "expired"}
)
"""`requested` only as a repeat of the creation; `received` when the bus itself observes it."""
ADVISOR_SETTABLE: frozenset[str] = frozenset({"cancelled", "withdrawn"})
SETTABLE: dict[str, frozenset[str]] = {
    "bus": BUS_SETTABLE,
    "partner": PARTNER_SETTABLE,
    "advisor": ADVISOR_SETTABLE,
}

# How far along the road to an answer and its work a status is; observations and answers
# below the current rank arrive late.
_RANK: dict[str, int] = {
    "requested": 0,
    "delivered": 1,
    "received": 2,
    "accepted": 3,
    "in-progress": 4,
    "on-hold": 4,
}
_OBSERVATIONS = frozenset({"delivered", "received"})
_BUS_CLOSURES = frozenset({"cancelled", "withdrawn", "expired"})

# Where a partner may go from a status it has answered and not closed.
_PARTNER_FROM_ANSWERED: dict[str, frozenset[str]] = {
    "accepted": frozenset({"in-progress", "on-hold", "failed", "completed"}),
    "in-progress": frozenset({"on-hold", "failed", "completed"}),
    "on-hold": frozenset({"in-progress", "failed", "completed"}),
}


@dataclass(frozen=True)
class Transition:
    """What the state machine made of a reported status."""

    outcome: Outcome
    from_status: str
    to_status: str
    reason: str
    """A readable sentence, recorded in the referral's history."""

    @property
    def applied(self) -> bool:
        return self.outcome == "applied"


def transition(current: str, new: str, actor: Actor) -> Transition:
    """Decide whether `actor` may move a referral from `current` to `new`.

    Raises ValueError on an unknown status or actor (a programming error, not a message).
    """
    for status in (current, new):
        if status not in STATUSES:
            msg = f"unknown referral status {status!r}"
            raise ValueError(msg)
    if actor not in SETTABLE:
        msg = f"unknown actor {actor!r}: one of {', '.join(ACTORS)}"
        raise ValueError(msg)
    outcome, reason = _decide(current, new, actor)
    return Transition(outcome, current, new, reason)


def _decide(current: str, new: str, actor: str) -> tuple[Outcome, str]:
    if new not in SETTABLE[actor]:
        return "refused", f"a {actor} may not set a referral {new}"
    if new == current:
        return "ignored", f"already {current}: a repeat changes nothing"
    if new == "requested":
        return "refused", f"nothing moves back to requested (it is {current})"
    if new in _OBSERVATIONS:
        if current in _RANK and _RANK[current] < _RANK[new]:
            return "applied", f"{new} after {current}"
        return "ignored", f"{new} arrived late: the referral is already {current}"
    if current in TERMINAL:
        if actor == "bus":
            return "ignored", f"already closed as {current}: nothing to {_verb(new)}"
        return "refused", f"the referral is closed ({current}): it cannot become {new}"
    if actor in ("bus", "advisor"):
        return _closure(current, new)
    return _partner_answer(current, new)


def _closure(current: str, new: str) -> tuple[Outcome, str]:
    # current is open here; new is cancelled, withdrawn or expired.
    if new == "expired" and current not in AWAITING_ANSWER:
        return "ignored", f"answered meanwhile ({current}): only unanswered referrals expire"
    return "applied", f"{new} while {current}"


def _partner_answer(current: str, new: str) -> tuple[Outcome, str]:
    # current is open here; new is a partner status other than received.
    if current in AWAITING_ANSWER:
        return "applied", f"{new} after {current}"
    if new in _PARTNER_FROM_ANSWERED[current]:
        return "applied", f"{new} after {current}"
    if new == "rejected":
        return (
            "refused",
            f"already {current}: a referral accepted cannot be rejected, report failed instead",
        )
    # accepted (or in-progress) once past it: a late or repeated answer.
    return "ignored", f"{new} arrived late: the referral is already {current}"


def _verb(status: str) -> str:
    return {"cancelled": "cancel", "withdrawn": "withdraw", "expired": "expire"}.get(
        status, "change"
    )


def transfer(current: str) -> Transition:
    """The advisor moves a referral to another partner: only one its partner answered and
    holds (accepted, in progress, on hold); it closes as `cancelled` and a new referral
    goes to the other partner. One still awaiting its answer is cancelled and the need
    sent anew instead (the partner has not taken it on)."""
    if current not in STATUSES:
        msg = f"unknown referral status {current!r}"
        raise ValueError(msg)
    if current not in ANSWERED_OPEN:
        why = f"only a referral its partner accepted is transferred (it is {current})" + (
            ": cancel it and send the need instead" if current in AWAITING_ANSWER else ""
        )
        return Transition("refused", current, "cancelled", why)
    return transition(current, "cancelled", "advisor")


NEED_CLOSED: frozenset[str] = frozenset({"closed", "no-partner", "refused", "withdrawn"})
"""A need's states once its road ended (completed, closed for the advisor, no partner, the
person refused, consent withdrawn): only such a need is reopened by the advisor."""


REROUTE_AFTER: dict[str, bool] = {
    "not-eligible": True,  # the person may fit another partner's rules
    "full": True,  # another partner may have room
    "other": True,  # the partner could not take it; the next one may
    "unreachable": False,  # the person is the problem: the advisor reaches them first
    "not-interested": False,  # the person said no: the advisor talks with them, not the bus
    "duplicate": False,  # already followed elsewhere: sending it again would duplicate it
}
"""Whether a rejection sends the referral on to the next-best partner, per reason."""


def reroute_after_rejection(reason: RejectReason | str) -> bool:
    """True if the bus should try the next-best partner; False if the advisor decides."""
    reroute = REROUTE_AFTER.get(reason)
    if reroute is None:
        msg = f"unknown rejection reason {reason!r}: one of {', '.join(REROUTE_AFTER)}"
        raise ValueError(msg)
    return reroute
