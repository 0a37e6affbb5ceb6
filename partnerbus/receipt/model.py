"""The tenant's receipt (GDPR article 15) as data: what the renderers show, already in
plain French, built from the ledger's rows by `build.build_receipt` (a pure function)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from partnerbus.settings import Settings


@dataclass(frozen=True, slots=True)
class Dated:
    """One dated line: something that happened, said to the tenant."""

    at: datetime
    text: str


@dataclass(frozen=True, slots=True)
class NeedView:
    label: str
    """The need in words (the taxonomy's French label)."""
    state: str
    """Where it stands, in words."""


@dataclass(frozen=True, slots=True)
class ReferralView:
    """One referral: the partner, what it received, what it answered."""

    need: str
    partner: str
    """The partner's name, as the directory gives it."""
    partner_kind: str
    """What kind of organisation it is, in words."""
    created_at: datetime
    sent_at: datetime | None
    shared: tuple[str, ...]
    """The categories of data the partner received (nothing internal: no ids)."""
    not_sent: str | None
    """Why the partner received nothing through the bus (withheld before it left, or an
    orientation the advisor made outside the bus), in words; None: it was sent."""
    status: str
    """The current status, in words."""
    reason: str | None
    """Why it was declined or withdrawn, in words."""
    partner_text: str | None
    """What the partner wrote (an outcome), as written: renderers escape it."""
    text_erased: bool
    """What the partner wrote was erased after the free-text retention period."""
    consent: str
    """Under which consent it was sent (its number in this receipt, its date)."""
    history: tuple[Dated, ...]


@dataclass(frozen=True, slots=True)
class SignalView:
    """One signal about the tenant: who raised it, what it said, what came of it."""

    received_at: datetime
    source: str
    """Who reported the situation (the organisation's name)."""
    source_learns: str
    """What that organisation is told back, in words."""
    agency: str | None
    advisor: str | None
    commune: str
    urgency: str
    needs: tuple[NeedView, ...]
    data: tuple[str, ...]
    """What the signal said about her, item by item, values included."""
    note: str | None
    """The free text of the signal, as written (renderers escape it)."""
    note_erased_at: datetime | None
    referrals: tuple[ReferralView, ...]


@dataclass(frozen=True, slots=True)
class ConsentView:
    number: int
    granted_at: datetime
    valid_until: datetime
    collected_by: str
    agency: str
    method: str
    needs: tuple[str, ...]
    recipients: tuple[str, ...]
    """The kinds of organisations and the named partners it allows, in words."""
    state: str
    """Valid, expired or revoked (when, by whom), in words."""


@dataclass(frozen=True, slots=True)
class Retention:
    """How long the ledger keeps what it keeps (`Settings.retention_days`,
    `Settings.free_text_retention_days`)."""

    days: int = 730
    free_text_days: int = 90

    @classmethod
    def of(cls, settings: Settings) -> Retention:
        """The periods the bus's settings give its retention pass."""
        return cls(settings.retention_days, settings.free_text_retention_days)


@dataclass(frozen=True, slots=True)
class Receipt:
    """Everything the tenant's right of access covers that the bus holds about her."""

    person_ref: str
    produced_at: datetime
    produced_by: str
    """The advisor who produced it (her name)."""
    agency: str
    """The advisor's agency (its name): the tenant's contact for her rights."""
    network: str
    """The directory's name: the network the bus serves."""
    signals: tuple[SignalView, ...]
    consents: tuple[ConsentView, ...]
    consent_events: tuple[Dated, ...]
    """Her consents given, refused and withdrawn, in order."""
    recipients: tuple[str, ...]
    """Every organisation that received data about her, in words."""
    reads: tuple[Dated, ...]
    """Who read her file through the bus's tools (before this receipt)."""
    erased: tuple[str, ...]
    """What was erased or anonymised, in words (never the erased data itself)."""
    retention: Retention
