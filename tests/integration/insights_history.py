"""A small scripted ledger history for the insights' tests: rows written straight into the
tables with chosen timestamps, so the figures can be computed by hand."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

from partnerbus.ledger import tables as t
from partnerbus.ledger.store import Store

UNTIL = datetime(2026, 4, 1, tzinfo=UTC)
SINCE = datetime(2026, 1, 1, tzinfo=UTC)  # 90 days before UNTIL
PREVIOUS = datetime(2025, 10, 3, tzinfo=UTC)  # 90 days before SINCE
H = timedelta(hours=1)
D = timedelta(days=1)


class History:
    """Collects rows, then writes them in one transaction."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.signals: list[dict[str, Any]] = []
        self.needs: list[dict[str, Any]] = []
        self.referrals: list[dict[str, Any]] = []
        self.history: list[dict[str, Any]] = []
        self._ids = itertools.count(1)

    def signal(self, person: str, commune: str, source: str, at: datetime) -> str:
        signal_id = f"sig-{self.prefix}{next(self._ids)}"
        self.signals.append(
            {
                "signal_id": signal_id,
                "source": source,
                "person_ref": person,
                "commune": commune,
                "urgency": "routine",
                "agency": None,
                "advisor": None,
                "body": "{}",
                "received_at": at,
            }
        )
        return signal_id

    def need(
        self,
        signal_id: str,
        need: str,
        state: str,
        at: datetime,
        *,
        parked_since: datetime | None = None,
    ) -> None:
        self.needs.append(
            {
                "signal_id": signal_id,
                "need": need,
                "state": state,
                "detail": None,
                "updated_at": at,
                "parked_since": parked_since,
            }
        )

    def referral(
        self,
        signal_id: str,
        need: str,
        partner: str,
        created: datetime,
        steps: list[tuple[str, timedelta, str]],
        *,
        confirmed: bool = True,
        reason: str | None = None,
        attempt: int = 1,
    ) -> str:
        """`steps`: (to_status, after creation, outcome) in order; the referral ends in
        the last applied status. `confirmed`: the broker's confirm recorded (sent_at)."""
        referral_id = f"ref-{self.prefix}{next(self._ids)}"
        status = "requested"
        closed_at = None
        for to_status, after, outcome in steps:
            self.history.append(
                {
                    "referral_id": referral_id,
                    "from_status": status,
                    "to_status": to_status,
                    "outcome": outcome,
                    "actor": partner if to_status not in ("delivered", "expired") else "bus",
                    "reason": None,
                    "at": created + after,
                }
            )
            if outcome == "applied":
                status = to_status
                if status in ("rejected", "completed", "failed", "expired", "cancelled"):
                    closed_at = created + after
        self.referrals.append(
            {
                "referral_id": referral_id,
                "signal_id": signal_id,
                "need": need,
                "attempt": attempt,
                "partner_id": partner,
                "partner_kind": "ccas",
                "consent_id": "consent-x",
                "status": status,
                "reason": reason,
                "urgency": "routine",
                "created_at": created,
                "updated_at": created,
                "sent_at": created if confirmed else None,
                "reminded": False,
                "closed_at": closed_at,
            }
        )
        return referral_id

    def write(self, store: Store) -> None:
        with store.begin() as tx:
            for table, rows in (
                (t.signals, self.signals),
                (t.signal_needs, self.needs),
                (t.referrals, self.referrals),
                (t.referral_history, self.history),
            ):
                if rows:
                    tx.conn.execute(table.insert(), rows)


def answered(status: str, hours: float) -> list[tuple[str, timedelta, str]]:
    """Delivered at once, then `status` after `hours`."""
    return [("delivered", timedelta(0), "applied"), (status, hours * H, "applied")]


def response_history() -> History:
    """Partners p-slow, p-fast, p-tiny; sources src-a, src-b (the figures in the tests)."""
    h = History()
    person = itertools.count(1)
    need = "logement-hebergement--reduire-les-impayes-de-loyer"

    def sent(partner: str, source: str, created: datetime, steps: Any, **kw: Any) -> None:
        signal_id = h.signal(f"person-{next(person)}", "59350", source, created)
        h.referral(signal_id, need, partner, created, steps, **kw)

    day = SINCE + 10 * D
    # p-slow, this period: answers after 1, 2, 3, 4 h (accepted), 5 h (rejected full),
    # 10 h (rejected); one expired, one still waiting.
    for i, hours in enumerate((1, 2, 3, 4)):
        steps = answered("accepted", hours)
        if i == 0:  # an ignored repeat before the answer counts for nothing
            steps.insert(1, ("accepted", 0.5 * H, "ignored"))
        sent("p-slow", "src-a", day + i * D, steps)
    sent("p-slow", "src-b", day + 5 * D, answered("rejected", 5), reason="full")
    sent("p-slow", "src-b", day + 6 * D, answered("rejected", 10), reason="not-eligible")
    sent(
        "p-slow",
        "src-a",
        day + 7 * D,
        [("delivered", 0 * H, "applied"), ("expired", 72 * H, "applied")],
    )
    sent("p-slow", "src-a", day + 8 * D, [("delivered", 0 * H, "applied")])
    # p-slow, the previous period: 1, 1, 2, 2, 3 h
    for i, hours in enumerate((1, 1, 2, 2, 3)):
        sent("p-slow", "src-a", PREVIOUS + (10 + i) * D, answered("accepted", hours))
    # p-fast, this period: accepted after 5 h each (one received first, one whose answer
    # overtook the broker's confirm), completed 1 to 5 days later; all from src-a.
    for i in range(5):
        steps = [("delivered", timedelta(0), "applied")]
        if i == 1:
            steps.append(("received", 1 * H, "applied"))
        steps += [("accepted", 5 * H, "applied"), ("completed", (5 + 24 * (i + 1)) * H, "applied")]
        if i == 2:
            steps = [s for s in steps if s[0] != "delivered"]
        sent("p-fast", "src-a", day + i * D, steps, confirmed=i != 2)
    # p-fast, the previous period: 6 h each
    for i in range(5):
        sent("p-fast", "src-a", PREVIOUS + (20 + i) * D, answered("accepted", 6))
    # p-tiny: three persons only
    for i in range(3):
        sent("p-tiny", "src-b", day + i * D, answered("accepted", 2))
    # outside both periods: counted nowhere
    sent("p-fast", "src-a", UNTIL + D, answered("accepted", 100))
    sent("p-fast", "src-a", PREVIOUS - D, answered("accepted", 100))
    return h


LILLE, ROUBAIX, TOURCOING, VILLENEUVE = "59350", "59512", "59599", "59009"
MEL = "200093201"
N1 = "logement-hebergement--reduire-les-impayes-de-loyer"
N2 = "sante--sante-mentale"


def unmet_history() -> History:
    """Unmet needs in four communes of the MEL (the figures in the tests)."""
    h = History("u")
    person = itertools.count(1)
    at = SINCE + 20 * D

    def signal(commune: str, when: datetime = at) -> str:
        return h.signal(f"person-u{next(person)}", commune, "src-a", when)

    # Lille, N1: five persons with no partner, two refused for `full`
    for _ in range(5):
        h.need(signal(LILLE), N1, "no-partner", at)
    for _ in range(2):
        s = signal(LILLE)
        h.need(s, N1, "routed", at)
        h.referral(s, N1, "p-x", at, answered("rejected", 3), reason="full")
    # Roubaix, N1: three expired unanswered (one of them twice, two attempts: one need)
    for i in range(3):
        s = signal(ROUBAIX)
        h.need(s, N1, "routed", at)
        h.referral(s, N1, "p-x", at, [("expired", 80 * H, "applied")])
        if i == 0:
            h.referral(s, N1, "p-y", at, [("expired", 90 * H, "applied")], attempt=2)
    # Tourcoing, N1: two closed for want of consent (parked, never sent)
    for _ in range(2):
        h.need(signal(TOURCOING), N1, "closed", at, parked_since=at - 30 * D)
    # Villeneuve-d'Ascq, N2: two with no partner
    for _ in range(2):
        h.need(signal(VILLENEUVE), N2, "no-partner", at)
    # counted nowhere: a parked need later sent and completed; a refusal for another
    # reason; events outside the period; a need still parked
    s = signal(LILLE)
    h.need(s, N1, "closed", at, parked_since=at - 5 * D)
    h.referral(s, N1, "p-x", at, answered("completed", 5))
    s = signal(LILLE)
    h.need(s, N1, "routed", at)
    h.referral(s, N1, "p-x", at, answered("rejected", 3), reason="not-eligible")
    h.need(signal(LILLE), N1, "no-partner", UNTIL + D)
    h.need(signal(LILLE), N1, "no-partner", SINCE - D)
    h.need(signal(LILLE), N1, "parked", at, parked_since=at)
    return h
