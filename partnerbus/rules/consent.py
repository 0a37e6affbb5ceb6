"""Consent rules: does this person's consent let the bus refer this need to this partner now?

Modelled on Aidants Connect's mandates: a consent has a scope (needs, and partner kinds or
partners), fixed durations, and a revocation date; nothing is ever deleted, so a consent's
state at any moment follows from its dates alone. Pure: no clock is read here, `now` is given.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from partnerbus.schemas import ConsentGranted, ConsentScope

ConsentReason = Literal["granted", "missing", "expired", "revoked", "out-of-scope", "not-yet-valid"]
ConsentState = Literal["valid", "revoked", "expired", "not-yet-valid"]

DURATIONS: dict[str, timedelta] = {
    "1d": timedelta(days=1),
    "1m": timedelta(days=30),
    "6m": timedelta(days=182),
    "1y": timedelta(days=365),
}
"""Fixed consent durations, as Aidants Connect's mandates: the advisor picks one, never a date."""


@dataclass(frozen=True)
class ConsentRecord:
    """What the ledger holds about one consent: the one consent type, which the rules
    evaluate and the ledger's store reads and writes as it is."""

    consent_id: str
    person_ref: str
    scope: ConsentScope
    collected_by: str
    agency: str
    method: str
    granted_at: datetime
    valid_until: datetime
    revoked_at: datetime | None = None
    revoked_by: str | None = None
    expiry_notified_at: datetime | None = None
    """When the advisor was told it is about to expire (once)."""

    @classmethod
    def from_event(cls, e: ConsentGranted) -> ConsentRecord:
        return cls(
            consent_id=e.consent_id,
            person_ref=e.person_ref,
            scope=e.scope,
            collected_by=e.collected_by,
            agency=e.agency,
            method=e.method,
            granted_at=e.granted_at,
            valid_until=e.valid_until,
        )

    def state(self, now: datetime) -> ConsentState:
        """Its state at `now`. A revocation wins over everything else; a revocation dated
        after `now` has not happened yet."""
        if self.revoked_at is not None and self.revoked_at <= now:
            return "revoked"
        if now < self.granted_at:
            return "not-yet-valid"
        if now >= self.valid_until:
            return "expired"
        return "valid"

    def covers_need(self, need: str) -> bool:
        return any(need_covered(scope_need, need) for scope_need in self.scope.needs)

    def covers_partner(self, partner_id: str, partner_kind: str) -> bool:
        return partner_id in self.scope.partners or partner_kind in self.scope.partner_kinds


@dataclass(frozen=True)
class ConsentDecision:
    """The consent gate's answer, with the reason and the consent it rests on."""

    allowed: bool
    reason: ConsentReason
    consent_id: str | None
    """The consent that grants (when allowed) or the closest one that failed."""
    detail: str
    """A readable sentence for the advisor and the audit trail."""


def need_covered(scope_need: str, need: str) -> bool:
    """True if a consent for `scope_need` covers `need`: the same code, or its parent.

    The parent of `a--b` is `a` (data·inclusion thématiques); local codes `local-x--y`
    follow the same rule. A child never covers its parent nor its siblings.
    """
    if scope_need == need:
        return True
    return "--" not in scope_need and need.startswith(scope_need + "--")


def valid_until_for(granted_at: datetime, duration: str) -> datetime:
    """The end of a consent granted at `granted_at` for one of the fixed `DURATIONS`."""
    length = DURATIONS.get(duration)
    if length is None:
        known = ", ".join(DURATIONS)
        msg = f"unknown consent duration {duration!r}: choose one of {known}"
        raise ValueError(msg)
    return granted_at + length


def evaluate_consent(
    consents: Iterable[ConsentRecord],
    person_ref: str,
    need: str,
    partner_id: str,
    partner_kind: str,
    now: datetime,
) -> ConsentDecision:
    """May the bus refer `need` of `person_ref` to this partner at `now`?

    Only the person's own consents count. A consent allows when it is valid at `now`
    (granted_at <= now < valid_until, not revoked at or before now), one of its needs covers
    `need`, and it names the partner or the partner's kind. When several allow, the one
    lasting longest wins, then the smallest consent_id: the choice is deterministic.

    When none allows, the reason is the most useful one for the advisor who must ask again:

    1. a consent covering this need and partner starts later: "not-yet-valid" (the one
       starting first): nothing to ask, wait;
    2. else a consent covering this need and partner ended: the person's latest word
       decides, i.e. the one that ended last, "revoked" (at its revocation) or "expired"
       (at its end); on a tie a revocation wins, being the person's explicit choice;
    3. else the person has consents, none for this need and partner: "out-of-scope"
       (the closest one: valid now and covering the need, else valid now, else any);
    4. else "missing".
    """
    own = sorted((c for c in consents if c.person_ref == person_ref), key=lambda c: c.consent_id)
    in_scope = [
        c for c in own if c.covers_need(need) and c.covers_partner(partner_id, partner_kind)
    ]
    target = f"{need} for {partner_id} (kind {partner_kind})"

    allowing = [c for c in in_scope if c.state(now) == "valid"]
    if allowing:
        # max() keeps the first of equals: own is sorted by consent_id.
        best = max(allowing, key=lambda c: c.valid_until)
        return ConsentDecision(
            True, "granted", best.consent_id, _granted_detail(best, need, partner_id, partner_kind)
        )

    upcoming = [c for c in in_scope if c.state(now) == "not-yet-valid"]
    if upcoming:
        first = min(upcoming, key=lambda c: c.granted_at)
        detail = (
            f"consent {first.consent_id} ({_who(first)}) covers {target} "
            f"but only from {_when(first.granted_at)}"
        )
        return ConsentDecision(False, "not-yet-valid", first.consent_id, detail)

    ended = [c for c in in_scope if c.state(now) in ("revoked", "expired")]
    if ended:
        last = max(ended, key=lambda c: (_ended_at(c, now), c.state(now) == "revoked"))
        if last.state(now) == "revoked":
            assert last.revoked_at is not None  # state() says so
            detail = (
                f"consent {last.consent_id} ({_who(last)}) covered {target} "
                f"but was revoked on {_when(last.revoked_at)}"
            )
            return ConsentDecision(False, "revoked", last.consent_id, detail)
        detail = (
            f"consent {last.consent_id} ({_who(last)}) covered {target} "
            f"but expired on {_when(last.valid_until)}"
        )
        return ConsentDecision(False, "expired", last.consent_id, detail)

    if own:
        closest = max(
            own,
            key=lambda c: (
                c.state(now) == "valid" and c.covers_need(need),
                c.state(now) == "valid",
            ),
        )
        detail = (
            f"no consent of {person_ref} covers {target}; the closest, consent "
            f"{closest.consent_id} ({_who(closest)}), covers {_scope_text(closest.scope)}"
        )
        return ConsentDecision(False, "out-of-scope", closest.consent_id, detail)

    return ConsentDecision(False, "missing", None, f"no consent recorded for {person_ref}")


def covered_needs(
    consents: Iterable[ConsentRecord],
    person_ref: str,
    needs: Iterable[str],
    partner_id: str,
    partner_kind: str,
    now: datetime,
) -> dict[str, ConsentDecision]:
    """The decision for each need, in the order given (a signal carries several needs)."""
    snapshot = list(consents)
    return {
        need: evaluate_consent(snapshot, person_ref, need, partner_id, partner_kind, now)
        for need in needs
    }


def expiring_soon(
    consents: Iterable[ConsentRecord], now: datetime, within: timedelta
) -> list[ConsentRecord]:
    """Consents valid at `now` whose end falls within `within` (inclusive), soonest first:
    the advisor is told in time to renew them."""
    horizon = now + within
    soon = [c for c in consents if c.state(now) == "valid" and c.valid_until <= horizon]
    return sorted(soon, key=lambda c: (c.valid_until, c.consent_id))


def _ended_at(consent: ConsentRecord, now: datetime) -> datetime:
    if consent.state(now) == "revoked":
        assert consent.revoked_at is not None  # state() says so
        return consent.revoked_at
    return consent.valid_until


def _granted_detail(consent: ConsentRecord, need: str, partner_id: str, partner_kind: str) -> str:
    scope_need = next(n for n in consent.scope.needs if need_covered(n, need))
    whom = (
        f"partner {partner_id}" if partner_id in consent.scope.partners else f"kind {partner_kind}"
    )
    return (
        f"consent {consent.consent_id} ({_who(consent)}) covers {scope_need} "
        f"for {whom} until {_when(consent.valid_until)}"
    )


def _who(consent: ConsentRecord) -> str:
    return f"{consent.method}, by {consent.collected_by}"


def _scope_text(scope: ConsentScope) -> str:
    whom = [f"kind {k}" for k in scope.partner_kinds] + [f"partner {p}" for p in scope.partners]
    return f"{', '.join(scope.needs)} for {', '.join(whom)}"


def _when(moment: datetime) -> str:
    """A date when the moment is a midnight, else the minute with its offset."""
    if (moment.hour, moment.minute, moment.second, moment.microsecond) == (0, 0, 0, 0):
        return moment.date().isoformat()
    return moment.isoformat(timespec="minutes")
