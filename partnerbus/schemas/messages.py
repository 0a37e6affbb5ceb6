"""The message contracts of the bus.

Inbound (partners → bus): Signal, ReferralStatusChanged, CapacityChanged,
ConsentGranted, ConsentRevoked, ConsentRefused, and the advisor's decisions from her
agency: ReferralCancelled, NeedDirected, ReferralTransferred, NeedReopened,
OrientationRecorded.
Outbound (bus → a partner's queue): Referral, ReferralWithdrawn, ReferralReminder,
ReferralStalled, ConsentRequested, ConsentExpiring, NoPartnerFound, SignalClosed,
ReferralStatusChanged forwarded to the signal's source and the advisor (the closed loop),
and the answers to an agency's consent events: ConsentRecorded, ConsentRejected.
Each body carries its `type`, so a partner's consumer can tell them apart without headers.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, Strict, model_validator

from .base import (
    CommuneCode,
    Instant,
    Message,
    MessageId,
    NeedCode,
    OrganisationId,
    PartnerId,
    PseudonymousRef,
    Record,
    ShortText,
    Urgency,
)

AgeBand = Literal["under-25", "25-59", "60-74", "75-plus"]
Household = Literal["single", "couple", "family", "single-parent", "other"]
ConsentMethod = Literal["oral", "paper", "sms"]

ReferralStatus = Literal[
    "requested",  # recorded by the bus, on its way
    "delivered",  # the broker confirmed the publish (publisher confirm)
    "received",  # the partner's consumer took it (acked)
    "accepted",
    "rejected",
    "in-progress",
    "on-hold",
    "failed",
    "completed",
    "cancelled",
    "withdrawn",  # consent revoked
    "expired",  # deadline passed without an answer
]
"""FHIR SDOH Task statuses plus what only a bus can observe (delivered, received),
and withdrawn / expired."""

RejectReason = Literal[
    "unreachable", "not-eligible", "not-interested", "full", "duplicate", "other"
]
"""Why a partner declined (DORA's list, shortened)."""

CapacityStatus = Literal["capacity", "no-capacity", "waitlist", "additional-assessment-required"]
"""FHIR SDOH capacity codes."""


class Profile(Record):
    """What eligibility rules need about the person, and nothing more."""

    age_band: AgeBand | None = None
    household: Household | None = None
    qpv: Annotated[str, Field(pattern=r"^QN\d{5,7}$")] | None = None
    """Code of the priority neighbourhood (quartier prioritaire) the person lives in."""
    publics: tuple[Annotated[str, Field(pattern=r"^[a-z0-9-]{2,60}$")], ...] = ()
    """data·inclusion publics the person belongs to (seniors, familles…)."""


class Contact(Record):
    """How a partner may reach the person. Disclosed only to kinds that contact people."""

    phone: Annotated[str, Field(pattern=r"^\+?[0-9 .-]{6,20}$")] | None = None
    preferred_time: Annotated[str, Field(max_length=80)] | None = None


class Facts(Record):
    """Minimal facts a partner may need; each partner kind sees only its share."""

    # Numbers are strict, as their schema says: `false` or "4" is a partner's bug, not 0 or 4.
    arrears_eur: Annotated[float, Field(ge=0, le=1_000_000), Strict()] | None = None
    arrears_months: Annotated[int, Field(ge=0, le=240), Strict()] | None = None
    household_size: Annotated[int, Field(ge=1, le=30), Strict()] | None = None
    housing_condition: Literal["substandard", "hoarding", "overcrowded", "unfit"] | None = None
    note: ShortText | None = None
    """Free text: disclosed to few, deleted early by the retention job."""


LanguageCode = Annotated[str, Field(pattern=r"^[a-z]{2,3}$")]
"""An ISO 639 language code: two letters (639-1, `fr`, `ar`) or three (639-3, `kab`)."""


class Preferences(Record):
    """How the person wishes to be approached, as the advisor or the source heard it. Every
    partner receiving a referral sees it (docs/DISCLOSURE.md): each wish changes what the
    partner may do or how it meets her."""

    through_advisor: bool = False
    """Contact her through her advisor only: the referral carries no contact details, the
    partner calls the advisor (named in the referral's `agency` and `advisor`)."""
    do_not_contact: bool = False
    """Nobody contacts her directly: the referral carries no contact details at all."""
    home_visit: bool = False
    """She wants a home visit: partners that visit at home (`local-a-domicile` in their
    directory `modes`) rank first within their tier."""
    languages: Annotated[
        tuple[LanguageCode, ...],
        Field(max_length=5, json_schema_extra={"uniqueItems": True}),
    ] = ()
    """Languages she speaks, best first (ISO 639 codes)."""

    @property
    def no_direct_contact(self) -> bool:
        """The partner may not reach her directly: contact details are never disclosed."""
        return self.do_not_contact or self.through_advisor


class Signal(Message):
    """A partner saw a situation that needs help. One signal may carry several needs."""

    type: Literal["signal"] = "signal"
    source: PartnerId
    """The partner that raises the signal; must match the authenticated AMQP user."""
    person_ref: PseudonymousRef
    """The source's own pseudonymous reference of the person (e.g. the tenancy's number)."""
    commune: CommuneCode
    needs: Annotated[
        tuple[NeedCode, ...],
        Field(min_length=1, max_length=10, json_schema_extra={"uniqueItems": True}),
    ]
    urgency: Urgency = "routine"
    agency: PartnerId | None = None
    """The agency that follows the person (a partner with advisors: a landlord's agency, an
    association's team): asked for her consent and told of every outcome."""
    landlord: OrganisationId | None = None
    """Without `agency`: the organisation that houses the person (the social landlord, the
    association renting her an IML flat) or follows her at home (a housing-improvement
    scheme): the bus asks its agency covering the commune. With neither, the source's own
    organisation's agency, else the only organisation's covering the commune; when several
    organisations' agencies cover it, needs waiting for consent close at once
    (`consent-not-obtained`), asking the source to name one."""
    profile: Profile = Profile()
    facts: Facts = Facts()
    contact: Contact | None = None
    preferences: Preferences | None = None
    """How she wishes to be approached (set by the source or the advisor); none: no wish."""

    @model_validator(mode="after")
    def _needs_unique(self) -> Signal:
        if len(set(self.needs)) != len(self.needs):
            msg = "needs must not repeat"
            raise ValueError(msg)
        return self


class ConsentScope(Record):
    """What a consent covers: needs (a parent code covers its children), and to whom."""

    needs: Annotated[tuple[NeedCode, ...], Field(min_length=1)]
    partner_kinds: tuple[Annotated[str, Field(pattern=r"^[a-z0-9-]{2,60}$")], ...] = ()
    partners: tuple[PartnerId, ...] = ()

    @model_validator(mode="after")
    def _someone(self) -> ConsentScope:
        if not self.partner_kinds and not self.partners:
            msg = "a consent names partner kinds or partners: consent to 'anyone' is not consent"
            raise ValueError(msg)
        return self


class ConsentGranted(Message):
    """The person agreed, in front of an advisor, to be referred."""

    type: Literal["consent-granted"] = "consent-granted"
    consent_id: MessageId
    person_ref: PseudonymousRef
    scope: ConsentScope
    collected_by: Annotated[str, Field(min_length=2, max_length=80)]
    """The advisor who collected it."""
    agency: PartnerId
    method: ConsentMethod
    granted_at: Instant
    valid_until: Instant

    @model_validator(mode="after")
    def _period(self) -> ConsentGranted:
        if self.valid_until <= self.granted_at:
            msg = "valid_until must be after granted_at"
            raise ValueError(msg)
        return self


class ConsentRevoked(Message):
    type: Literal["consent-revoked"] = "consent-revoked"
    consent_id: MessageId
    revoked_by: Annotated[str, Field(min_length=2, max_length=80)]
    agency: PartnerId
    revoked_at: Instant
    reason: ShortText | None = None


class ConsentRefused(Message):
    """The person said no: the parked signal closes with that outcome."""

    type: Literal["consent-refused"] = "consent-refused"
    signal_id: MessageId
    person_ref: PseudonymousRef
    needs: tuple[NeedCode, ...] = ()
    """Needs refused; empty means all needs of the signal."""
    collected_by: Annotated[str, Field(min_length=2, max_length=80)]
    agency: PartnerId


class ReferralCancelled(Message):
    """The advisor's decision, from her agency: cancel this referral (the person moved, the
    need is met elsewhere...). The partner is told to drop it (`ReferralWithdrawn`, reason
    `signal-cancelled`) if it may have received it; the source and the advisor hear the
    status `cancelled`; the need closes. Only the agency that follows the signal decides."""

    type: Literal["referral-cancelled"] = "referral-cancelled"
    referral_id: MessageId
    agency: PartnerId
    decided_by: Annotated[str, Field(min_length=2, max_length=80)]
    """The advisor who decided (one of the agency's advisors)."""
    reason: Annotated[str, Field(min_length=3, max_length=500)]
    """Why, in the advisor's words: kept in the referral's history and told to her agency,
    never to the partner."""


class NeedDirected(Message):
    """The advisor's decision, from her agency: send this need of the signal to the partner
    she chose, among those the directory has an agreement with that cover the need in the
    person's commune (the directory's ranking is advice: the referral's `why` gives it).
    Refused while the need has an open referral (cancel it first) and when the person's
    consent does not cover the partner (record her consent first)."""

    type: Literal["need-directed"] = "need-directed"
    signal_id: MessageId
    need: NeedCode
    partner: PartnerId
    """The partner the advisor chose."""
    agency: PartnerId
    decided_by: Annotated[str, Field(min_length=2, max_length=80)]
    note: ShortText | None = None
    """Why this partner, in the advisor's words (kept in the history, not sent on)."""


class ReferralTransferred(Message):
    """The advisor's decision, from her agency: this referral, accepted by its partner,
    goes to another partner she chose (one with an agreement covering the need, that the
    person's consent covers). The first partner is told to drop it (`ReferralWithdrawn`,
    `signal-cancelled`), the referral closes as `cancelled`, a new referral goes to the
    other partner; the source and the advisor hear both."""

    type: Literal["referral-transferred"] = "referral-transferred"
    referral_id: MessageId
    partner: PartnerId
    """The partner that takes the need over."""
    agency: PartnerId
    decided_by: Annotated[str, Field(min_length=2, max_length=80)]
    reason: Annotated[str, Field(min_length=3, max_length=500)]
    """Why, in the advisor's words: kept in the history, told to her agency only."""


class NeedReopened(Message):
    """The advisor's decision, from her agency: a need whose road ended (completed,
    closed, no partner, refused, withdrawn) starts again, routed by the directory as a new
    attempt (the person's consent still gates it: parked and asked for if missing)."""

    type: Literal["need-reopened"] = "need-reopened"
    signal_id: MessageId
    need: NeedCode
    agency: PartnerId
    decided_by: Annotated[str, Field(min_length=2, max_length=80)]
    note: Annotated[str, Field(min_length=3, max_length=500)]
    """Why it reopens, in the advisor's words (kept in the need's state and history)."""


class OrientationRecorded(Message):
    """The advisor's record, from her agency: she oriented the person to this partner
    outside the bus (by phone, in person...). The bus sends the partner nothing; it
    records a referral closed as `completed` (under the person's consent, which must cover
    that partner), so that the closed loop (the source and the agency hear it, the need
    closes) and the figures include it."""

    type: Literal["orientation-recorded"] = "orientation-recorded"
    signal_id: MessageId
    need: NeedCode
    partner: PartnerId
    """The partner she oriented the person to (one of the directory's)."""
    agency: PartnerId
    decided_by: Annotated[str, Field(min_length=2, max_length=80)]
    channel: Literal["phone", "in-person", "email", "letter"] = "phone"
    oriented_at: Instant
    note: ShortText | None = None
    """What was agreed, in the advisor's words: told to her agency only."""


ConsentEvent = Literal["consent-granted", "consent-revoked", "consent-refused"]
"""The consent events an agency sends, as the bus's answers name them."""


class ConsentRecorded(Message):
    """To the agency: the bus recorded its consent event. One per event (`event_id` is the
    event's `message_id`; a redelivered event is not answered again), sent once the record
    is committed."""

    type: Literal["consent-recorded"] = "consent-recorded"
    event_id: MessageId
    """The `message_id` of the agency's event this answers."""
    event: ConsentEvent
    consent_id: MessageId | None = None
    """The consent granted or revoked (none for a refusal, which names its signal)."""
    signal_id: MessageId | None = None
    """The signal whose parked needs the person refused (consent-refused only)."""
    person_ref: PseudonymousRef
    agency: PartnerId
    status: Literal["recorded"] = "recorded"
    detail: str | None = None
    """What the record did: parked needs released, referrals withdrawn, needs closed."""


class ConsentRejected(Message):
    """To the agency: the bus read its consent event, authenticated it as the agency's,
    and refused it; nothing was recorded. The event is also in the consents queue's dead
    letters, with the same reason. Sent only to the agency authenticated as the sender:
    a message the bus cannot read, or whose sender does not match, is only dead-lettered."""

    type: Literal["consent-rejected"] = "consent-rejected"
    event_id: MessageId
    """The `message_id` of the agency's event this answers."""
    event: ConsentEvent
    consent_id: MessageId | None = None
    signal_id: MessageId | None = None
    person_ref: PseudonymousRef | None = None
    agency: PartnerId
    status: Literal["rejected"] = "rejected"
    reason: str
    """Why, as the dead letter's `partnerbus-error` header says it."""


class ConsentRequested(Message):
    """To the advisor: ask the person before anyone contacts them."""

    type: Literal["consent-requested"] = "consent-requested"
    signal_id: MessageId
    source: PartnerId
    person_ref: PseudonymousRef
    commune: CommuneCode
    needs: tuple[NeedCode, ...]
    agency: PartnerId
    advisor: str | None
    reason: str
    """Why consent is needed: missing, expired, revoked, out of scope."""
    suggested_partners: tuple[PartnerId, ...] = ()
    reminder: bool = False
    """True on the reminder of a request still unanswered (the needs are still parked);
    it suggests no partner (the first request did)."""
    closes_at: Instant | None = None
    """On a reminder: when the needs close (`SignalClosed` with `consent-not-obtained`)
    if no consent covers them by then."""


class Referral(Message):
    """An orientation: to this partner, for this need. Payload minimised for its kind."""

    type: Literal["referral"] = "referral"
    referral_id: MessageId
    signal_ref: MessageId
    """The signal's reference for this partner only (a keyed hash): referrals from one
    signal to this partner share it; two partners cannot join on it."""
    attempt: Annotated[int, Field(ge=1)]
    partner: PartnerId
    need: NeedCode
    person: str
    """Pseudonym of the person for this partner only (a keyed hash)."""
    commune: CommuneCode
    urgency: Urgency
    due_by: Instant
    agency: PartnerId
    advisor: str | None = None
    profile: Profile | None = None
    facts: Facts | None = None
    contact: Contact | None = None
    preferences: Preferences | None = None
    """How she wishes to be approached: through the advisor, not at all, at home, in which
    languages. With `do_not_contact` or `through_advisor`, `contact` is always empty."""
    why: tuple[str, ...] = ()
    """Why this partner was chosen (the directory's reasons)."""

    @model_validator(mode="after")
    def _no_contact_when_refused(self) -> Referral:
        if (
            self.preferences is not None
            and self.preferences.no_direct_contact
            and self.contact is not None
        ):
            msg = "a referral whose person asked not to be contacted directly carries no contact"
            raise ValueError(msg)
        return self


class ReferralStatusChanged(Message):
    """A referral's status moved. Partners send it; the bus forwards it to the source and
    the advisor with `signal_id` and `need` filled in. A partner's completion carries its
    outcome, its rejection a reason; each forwarded copy holds what its recipient's roles
    may see (docs/DISCLOSURE.md): the advisor's all of it, the source's no `outcome` or
    `note`, a creditor's no `reason` either."""

    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                {
                    "description": (
                        "A partner's rejection carries its reason. The bus's copy to a "
                        "creditor (signal_id set) leaves it out (docs/DISCLOSURE.md)."
                    ),
                    "if": {
                        "properties": {
                            "status": {"const": "rejected"},
                            "signal_id": {"type": "null"},
                        },
                        "required": ["status"],
                    },
                    "then": {"required": ["reason"], "properties": {"reason": {"type": "string"}}},
                },
                {
                    "description": (
                        "A partner's completion carries its outcome. The bus's copy to the "
                        "signal's source has signal_id set and leaves outcome and note out."
                    ),
                    "if": {
                        "properties": {
                            "status": {"const": "completed"},
                            "signal_id": {"type": "null"},
                        },
                        "required": ["status"],
                    },
                    "then": {
                        "required": ["outcome"],
                        "properties": {"outcome": {"type": "string", "minLength": 1}},
                    },
                },
            ]
        }
    )

    type: Literal["referral-status-changed"] = "referral-status-changed"
    referral_id: MessageId
    partner: PartnerId
    status: ReferralStatus
    reason: RejectReason | None = None
    outcome: ShortText | None = None
    note: ShortText | None = None
    signal_id: MessageId | None = None
    need: NeedCode | None = None

    @model_validator(mode="after")
    def _reason_on_reject(self) -> ReferralStatusChanged:
        if self.status == "rejected" and self.reason is None and self.signal_id is None:
            msg = (
                "a rejection carries a reason: unreachable, not-eligible, not-interested, "
                "full, duplicate or other"
            )
            raise ValueError(msg)
        if self.status == "completed" and not self.outcome and self.signal_id is None:
            msg = "a completion carries its outcome: what was done for the person"
            raise ValueError(msg)
        return self


class ReferralWithdrawn(Message):
    """To a partner: the consent behind this referral is gone; drop the data."""

    type: Literal["referral-withdrawn"] = "referral-withdrawn"
    referral_id: MessageId
    partner: PartnerId
    reason: Literal["consent-revoked", "consent-expired", "signal-cancelled"]


class ReferralReminder(Message):
    """To a partner, `reason` `no-answer`: the referral still waits for its answer (it
    expires at `due_by`); `no-news`: it accepted the referral and has sent no news since
    `last_news_at` (a status by `due_by`, or the advisor is told)."""

    type: Literal["referral-reminder"] = "referral-reminder"
    referral_id: MessageId
    partner: PartnerId
    due_by: Instant
    reason: Literal["no-answer", "no-news"] = "no-answer"
    last_news_at: Instant | None = None
    """On a `no-news` reminder: when the partner's last status was recorded."""


class ReferralStalled(Message):
    """To the advisor's agency: a partner accepted this referral, was reminded, and has
    still sent no news."""

    type: Literal["referral-stalled"] = "referral-stalled"
    referral_id: MessageId
    partner: PartnerId
    status: ReferralStatus
    signal_id: MessageId
    need: NeedCode
    last_news_at: Instant
    reminded_at: Instant


class NoPartnerFound(Message):
    """To the advisor: nobody in the directory can take this need here."""

    type: Literal["no-partner-found"] = "no-partner-found"
    signal_id: MessageId
    need: NeedCode
    commune: CommuneCode
    person_ref: PseudonymousRef
    agency: PartnerId | None
    tried: tuple[PartnerId, ...] = ()
    reason: str


class SignalClosed(Message):
    """To the source and the advisor: this need of the signal ends here."""

    type: Literal["signal-closed"] = "signal-closed"
    signal_id: MessageId
    need: NeedCode
    outcome: Literal[
        "consent-refused", "no-partner", "completed", "advisor-decides", "consent-not-obtained"
    ]
    """`consent-not-obtained`: the need waited for the person's consent too long (the
    advisor was reminded) and closes unreferred."""
    detail: str | None = None


class CapacityChanged(Message):
    """A partner tells the directory whether it can take more referrals."""

    type: Literal["capacity-changed"] = "capacity-changed"
    partner: PartnerId
    status: CapacityStatus
    remaining: Annotated[int, Field(ge=0), Strict()] | None = None


class ConsentExpiring(Message):
    type: Literal["consent-expiring"] = "consent-expiring"
    consent_id: MessageId
    person_ref: PseudonymousRef
    agency: PartnerId
    valid_until: Instant


StatusMessage = Annotated[ReferralStatusChanged | CapacityChanged, Field(discriminator="type")]
ConsentMessage = Annotated[
    ConsentGranted
    | ConsentRevoked
    | ConsentRefused
    | ReferralCancelled
    | NeedDirected
    | ReferralTransferred
    | NeedReopened
    | OrientationRecorded,
    Field(discriminator="type"),
]
"""What an agency publishes on the consents exchange: its consent events and its
advisors' decisions on the referrals of the signals it follows."""
OutboundMessage = Annotated[
    Referral
    | ReferralWithdrawn
    | ReferralReminder
    | ReferralStalled
    | ReferralStatusChanged
    | ConsentRequested
    | ConsentExpiring
    | ConsentRecorded
    | ConsentRejected
    | NoPartnerFound
    | SignalClosed,
    Field(discriminator="type"),
]
