"""Who may publish what on the bus: one table, read by every door.

RabbitMQ's permissions (`partnerbus.broker.access.grants_for`), the HTTP gateway and the
consent use cases all ask these functions, so a partner has the same rights whatever door
it uses. Pure: a partner record in, names out.

- every partner may publish signals and statuses (as itself);
- only a pivot, a partner with social advisors (a landlord's agency, an association that
  houses people), records consent events, and only through one of its own advisors.
"""

from __future__ import annotations

from typing import Literal

from partnerbus.schemas.directory import Partner

Intake = Literal["signals", "statuses", "consents"]
INTAKES: tuple[Intake, ...] = ("signals", "statuses", "consents")
"""The bus's intake exchanges, by their topology name."""


def is_pivot(partner: Partner) -> bool:
    """A pivot has social advisors: it asks and records the person's consent."""
    return bool(partner.advisors)


def advisor_ids(partner: Partner) -> frozenset[str]:
    return frozenset(a.id for a in partner.advisors)


def may_publish(partner: Partner, *, consent_writers: bool = True) -> tuple[Intake, ...]:
    """The intake exchanges this partner may publish to, in `INTAKES` order.

    `consent_writers=False` withholds consent events even from pivots (consents are then
    recorded only through the bus's own tools)."""
    intakes: list[Intake] = ["signals", "statuses"]
    if consent_writers and is_pivot(partner):
        intakes.append("consents")
    return tuple(intakes)


def refusal(partner: Partner, intake: Intake, *, consent_writers: bool = True) -> str | None:
    """Why this partner may not publish to `intake`, or None when it may."""
    if intake in may_publish(partner, consent_writers=consent_writers):
        return None
    if intake == "consents" and consent_writers:
        return (
            f"{partner.id!r} has no social advisors: only a pivot (an agency with advisors) "
            "records consent events"
        )
    return f"{partner.id!r} may not publish {intake}"


__all__ = ["INTAKES", "Intake", "advisor_ids", "is_pivot", "may_publish", "refusal"]
