"""Minimisation and pseudonyms: each recipient learns only what its role and kind need.

`ROLE_DISCLOSURE` is the one place deciding which fields of each message the bus sends a
recipient may see, by its role towards the signal (source, advisor, partner, creditor;
docs/DISCLOSURE.md is rendered from it); `disclose` applies it to every message written to
the outbox. `DISCLOSURE` then decides which parts of a signal a referral carries for a
partner kind; each entry says why. The person travels under a pseudonym proper to each
partner, so two partners cannot join their files on it; referral ids derive from their
signal, need and attempt, so a redelivered signal makes the same referral, not a second one.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import uuid
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Generic, Literal, TypeVar, get_args

from pydantic import BaseModel

from partnerbus.errors import ConfigError
from partnerbus.schemas import Contact, Facts, Message, Preferences, Profile

WISHES: frozenset[str] = frozenset(
    {
        "preferences.through_advisor",
        "preferences.do_not_contact",
        "preferences.home_visit",
        "preferences.languages",
    }
)
"""How the person wishes to be approached: every kind sees all of it. Contact through the
advisor and do-not-contact change what a partner may do (and take `contact` away), a home
visit and her languages how it meets her; none of it says anything about her situation."""
PARTS: frozenset[str] = (
    frozenset(
        {
            "profile",
            "contact",
            "facts.arrears_eur",
            "facts.arrears_months",
            "facts.household_size",
            "facts.housing_condition",
            "facts.note",
        }
    )
    | WISHES
)

_ARREARS = frozenset({"facts.arrears_eur", "facts.arrears_months"})
_HOUSING = frozenset({"facts.household_size", "facts.housing_condition"})
_CONTACT = frozenset({"contact"}) | WISHES

DEFAULT_DISCLOSURE: frozenset[str] = _CONTACT
"""Kinds not listed below: enough to reach the person, who tells the rest herself."""

DISCLOSURE: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        # The landlord holds the tenancy file already and its advisor wrote the note.
        "bailleur-social": PARTS,
        # Statutory social workers of the département (FSL, global assessment), bound by
        # professional secrecy: everything, the note included.
        "maisons-des-solidarites": PARTS,
        "departements": PARTS,
        # Emergency financial aid: the arrears and how to reach the person.
        "ccas-cias": _CONTACT | _ARREARS,
        # Benefits (APL, rights review) depend on the household and the arrears procedure is
        # the CAF's own; never the note.
        "caf": (frozenset({"profile", "facts.household_size"}) | _CONTACT) | _ARREARS,
        "mutualite-sociale-agricole": (frozenset({"profile", "facts.household_size"}) | _CONTACT)
        | _ARREARS,
        # Emergency housing: placement depends on household, its make-up and the housing.
        "siao": (frozenset({"profile"}) | _CONTACT) | _HOUSING,
        "chrs": (frozenset({"profile"}) | _CONTACT) | _HOUSING,
        "chu": (frozenset({"profile"}) | _CONTACT) | _HOUSING,
        # Rehousing (1% logement): the household and why the current home does not fit.
        "action-logement": (frozenset({"profile"}) | _CONTACT) | _HOUSING,
        # Budget and debt advice: the arrears are the subject.
        "points-conseil-budget": _CONTACT | _ARREARS,
        "cresus": _CONTACT | _ARREARS,
        # Family associations running protection measures (budget).
        "udaf": _CONTACT | _ARREARS,
        "unaf": _CONTACT | _ARREARS,
        # Legal help against an eviction procedure: the arrears are the case.
        "points-justice": _CONTACT | _ARREARS,
        # Centres sociaux: activities by public (seniors, families), nothing about money.
        "fcsf": (frozenset({"profile"}) | _CONTACT),
        # Young workers' residences take by age band.
        "residences-fjt": (frozenset({"profile"}) | _CONTACT),
        # Disability and autonomy files: age band and publics, nothing about money.
        "mdph": (frozenset({"profile"}) | _CONTACT),
        "maison-departementale-de-lautonomie": (frozenset({"profile"}) | _CONTACT),
        # Food aid: how many mouths.
        "croix-rouge": _CONTACT | {"facts.household_size"},
        "secours-populaire": _CONTACT | {"facts.household_size"},
        "restos-du-coeur": _CONTACT | {"facts.household_size"},
        "banques-alimentaires": _CONTACT | {"facts.household_size"},
        # Health (cms, cmp, csapa, cpam), women's rights (cidff), front desks (france-service,
        # pimms-mediation, communes): the person tells them herself; contact only.
        "cms": _CONTACT,
        "cmp": _CONTACT,
        "csapa": _CONTACT,
        "cpam": _CONTACT,
        "cidff": _CONTACT,
        "france-service": _CONTACT,
        "pimms-mediation": _CONTACT,
        "communes": _CONTACT,
    }
)
"""Partner kind -> the parts of a signal its referrals carry."""


def disclosed_parts(kind: str) -> frozenset[str]:
    """What a partner of this kind receives; unknown kinds get `DEFAULT_DISCLOSURE`."""
    return DISCLOSURE.get(kind, DEFAULT_DISCLOSURE)


def minimise(
    kind: str,
    profile: Profile,
    facts: Facts,
    contact: Contact | None,
    preferences: Preferences | None = None,
) -> tuple[Profile | None, Facts | None, Contact | None]:
    """Only what `kind` may see; None for a part it may not see or that holds nothing.
    A person who asked not to be contacted directly (`do_not_contact`, or through her
    advisor only) has no contact details disclosed, whatever the kind."""
    parts = disclosed_parts(kind)
    shown_profile = profile if "profile" in parts and profile != Profile() else None
    shown_contact = contact if "contact" in parts and contact != Contact() else None
    if preferences is not None and preferences.no_direct_contact:
        shown_contact = None
    kept = {
        name: value
        for name, value in facts.model_dump(exclude_none=True).items()
        if f"facts.{name}" in parts
    }
    shown_facts = Facts(**kept) if kept else None
    return shown_profile, shown_facts, shown_contact


def minimise_preferences(kind: str, preferences: Preferences | None) -> Preferences | None:
    """The person's wishes `kind` may see (`WISHES`: all of them, for every kind today);
    None when she expressed none."""
    if preferences is None:
        return None
    parts = disclosed_parts(kind)
    wishes = {
        name: value
        for name, value in preferences.model_dump(exclude_defaults=True).items()
        if f"preferences.{name}" in parts
    }
    return Preferences(**wishes) if wishes else None


# ---- disclosure by recipient role -------------------------------------------------------

Role = Literal["source", "advisor", "partner", "creditor"]
"""What a recipient is to the signal a message is about:

- `source`: the partner that sent the signal (it may be a creditor);
- `advisor`: the landlord's agency that follows the person and holds her consent;
- `partner`: the organisation a referral is addressed to;
- `creditor`: a recipient whose relation to the person is a debt (the landlord's recovery
  service: `Partner.is_creditor`). It is a restriction, not a relation: it applies on top
  of the others, so a creditor that is the signal's source sees only what both `source`
  and `creditor` may see.
"""
ROLES: tuple[Role, ...] = get_args(Role)

_S: Role = "source"
_A: Role = "advisor"
_P: Role = "partner"
_C: Role = "creditor"
ENVELOPE = ("type", "message_id", "occurred_at", "schema_version")
"""Fields every message has: they go to whoever receives the message."""


def _fields(receivers: Iterable[Role], **fields: Iterable[Role]) -> Mapping[str, frozenset[Role]]:
    everyone = frozenset(receivers)
    table = dict.fromkeys(ENVELOPE, everyone)
    table.update({name: frozenset(roles) for name, roles in fields.items()})
    return MappingProxyType(table)


_LOOP = (_S, _A, _C)
"""The closed loop: the source and the advisor hear where each need stands, a creditor
source included (it learns the status, not why)."""
_TO_PARTNER = (_P, _C)
"""About a referral, to the partner it is addressed to (a creditor may be one)."""

ROLE_DISCLOSURE: Mapping[str, Mapping[str, frozenset[Role]]] = MappingProxyType(
    {
        "referral": _fields(
            _TO_PARTNER,
            referral_id=_TO_PARTNER,
            signal_ref=_TO_PARTNER,
            attempt=_TO_PARTNER,
            partner=_TO_PARTNER,
            need=_TO_PARTNER,
            person=_TO_PARTNER,
            commune=_TO_PARTNER,
            urgency=_TO_PARTNER,
            due_by=_TO_PARTNER,
            agency=_TO_PARTNER,
            why=_TO_PARTNER,
            # Who follows the person and what the source knows of her: to the partner
            # that helps her (its kind's share only: `DISCLOSURE`), never to a creditor.
            advisor=(_P,),
            profile=(_P,),
            facts=(_P,),
            contact=(_P,),
            # How she wishes to be approached (do not contact, through her advisor, a home
            # visit, her languages) limits what any recipient may do: a creditor included.
            preferences=_TO_PARTNER,
        ),
        "referral-withdrawn": _fields(
            _TO_PARTNER, referral_id=_TO_PARTNER, partner=_TO_PARTNER, reason=_TO_PARTNER
        ),
        "referral-reminder": _fields(
            _TO_PARTNER,
            referral_id=_TO_PARTNER,
            partner=_TO_PARTNER,
            due_by=_TO_PARTNER,
            reason=_TO_PARTNER,
            last_news_at=_TO_PARTNER,
        ),
        "referral-stalled": _fields(
            (_A,),
            referral_id=(_A,),
            partner=(_A,),
            status=(_A,),
            signal_id=(_A,),
            need=(_A,),
            last_news_at=(_A,),
            reminded_at=(_A,),
        ),
        "referral-status-changed": _fields(
            _LOOP,
            referral_id=_LOOP,
            partner=_LOOP,
            status=_LOOP,
            signal_id=_LOOP,
            need=_LOOP,
            # Why the partner declined (unreachable, not interested, not eligible…) is
            # about the person: the source may hear it, a creditor never.
            reason=(_S, _A),
            # What the partner wrote (a completion's outcome, a note): the advisor only.
            outcome=(_A,),
            note=(_A,),
        ),
        "signal-closed": _fields(
            _LOOP,
            signal_id=_LOOP,
            need=_LOOP,
            outcome=_LOOP,
            # The detail names a partner's refusal and its reason: not to a creditor.
            detail=(_S, _A),
        ),
        # The person's reference, the consent's scope and life: to the advisor who holds it.
        "consent-requested": _fields(
            (_A,),
            signal_id=(_A,),
            source=(_A,),
            person_ref=(_A,),
            commune=(_A,),
            needs=(_A,),
            agency=(_A,),
            advisor=(_A,),
            reason=(_A,),
            suggested_partners=(_A,),
            reminder=(_A,),
            closes_at=(_A,),
        ),
        "no-partner-found": _fields(
            (_A,),
            signal_id=(_A,),
            need=(_A,),
            commune=(_A,),
            person_ref=(_A,),
            agency=(_A,),
            tried=(_A,),
            reason=(_A,),
        ),
        "consent-expiring": _fields(
            (_A,),
            consent_id=(_A,),
            person_ref=(_A,),
            agency=(_A,),
            valid_until=(_A,),
        ),
        "consent-recorded": _fields(
            (_A,),
            event_id=(_A,),
            event=(_A,),
            consent_id=(_A,),
            signal_id=(_A,),
            person_ref=(_A,),
            agency=(_A,),
            status=(_A,),
            detail=(_A,),
        ),
        "consent-rejected": _fields(
            (_A,),
            event_id=(_A,),
            event=(_A,),
            consent_id=(_A,),
            signal_id=(_A,),
            person_ref=(_A,),
            agency=(_A,),
            status=(_A,),
            reason=(_A,),
        ),
    }
)
"""Message type -> field -> the roles that may see it. The single source of truth of
docs/DISCLOSURE.md (`partnerbus contract disclosure` renders it)."""


class DisclosureError(ValueError):
    """The bus was about to send a message to a recipient whose roles do not receive it
    (a bug or a directory mistake, e.g. a creditor named as the advisor's agency)."""


def may_see(roles: Collection[Role], allowed: Collection[Role]) -> bool:
    """Whether a recipient with these roles may see what `allowed` roles may: one of its
    relations must be allowed, and a creditor only what creditors may see."""
    if _C in roles and _C not in allowed:
        return False
    return any(role in allowed for role in roles if role != _C)


def receives(message_type: str, roles: Collection[Role]) -> bool:
    """Whether a recipient with these roles receives this type of message at all."""
    table = ROLE_DISCLOSURE.get(message_type)
    return table is not None and may_see(roles, table["message_id"])


def recipient_roles(
    message: Message,
    recipient: str,
    *,
    source: str | None = None,
    agency: str | None = None,
    creditor: bool = False,
) -> frozenset[Role]:
    """What `recipient` is to the signal `message` is about: `source` and `agency` are the
    signal's (a message about a consent names its agency itself)."""
    kind = getattr(message, "type", "")
    roles: set[Role] = set()
    if kind in ("referral", "referral-withdrawn", "referral-reminder") and recipient == getattr(
        message, "partner", None
    ):
        roles.add(_P)
    if kind in (
        "consent-requested",
        "no-partner-found",
        "consent-expiring",
        "consent-recorded",
        "consent-rejected",
    ):
        agency = getattr(message, "agency", None)
    if source is not None and recipient == source:
        roles.add(_S)
    if agency is not None and recipient == agency:
        roles.add(_A)
    if creditor:
        roles.add(_C)
    return frozenset(roles)


M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Disclosed(Generic[M]):
    """A message as one recipient may see it: what the outbox accepts. Made by `disclose`
    only (the outbox takes nothing else, so no message leaves without the table)."""

    message: M
    roles: frozenset[Role]
    _token: object

    def __post_init__(self) -> None:
        if self._token is not _MINT:
            msg = "a Disclosed message is made by disclose() or internal(), nowhere else"
            raise TypeError(msg)


_MINT = object()


def disclose(message: M, roles: Collection[Role]) -> Disclosed[M]:
    """`message` with every field these roles may not see set back to its default (None,
    or empty); `DisclosureError` if they do not receive this type of message at all."""
    kind = str(getattr(message, "type", type(message).__name__))
    table = ROLE_DISCLOSURE.get(kind)
    role_set = frozenset(roles)
    if table is None or not may_see(role_set, table["message_id"]):
        who = ", ".join(sorted(role_set)) or "no role"
        msg = f"a {kind} message is not for a recipient that is {who} (docs/DISCLOSURE.md)"
        raise DisclosureError(msg)
    hidden = {
        name: default
        for name, default in _hidden(kind, type(message), role_set)
        if getattr(message, name) != default
    }
    if hidden:
        # validated again: what leaves is still a message of the contract
        fields = type(message).model_fields
        message = type(message).model_validate(
            {**{name: getattr(message, name) for name in fields}, **hidden}
        )
    return Disclosed(message, role_set, _MINT)


@functools.cache
def _hidden(
    kind: str, model: type[BaseModel], roles: frozenset[Role]
) -> tuple[tuple[str, object], ...]:
    """The fields of `model` these roles may not see, with their defaults (a field the
    table does not name is seen by nobody)."""
    table = ROLE_DISCLOSURE[kind]
    return tuple(
        (name, field.get_default(call_default_factory=True))
        for name, field in model.model_fields.items()
        if not may_see(roles, table.get(name, frozenset()))
    )


def internal(message: M) -> Disclosed[M]:
    """A message for the bus's own workers (a capacity broadcast), never for a partner:
    the outbox refuses to send it to a partner's queue."""
    return Disclosed(message, frozenset(), _MINT)


def visible_fields(message_type: str, roles: Collection[Role]) -> frozenset[str]:
    """The fields of this type of message a recipient with these roles may see."""
    table = ROLE_DISCLOSURE[message_type]
    return frozenset(name for name, allowed in table.items() if may_see(roles, allowed))


def render_disclosure_table() -> str:
    """docs/DISCLOSURE.md's table, from `ROLE_DISCLOSURE`: message × field → roles."""
    lines = [
        "| message | field | " + " | ".join(ROLES) + " |",
        "|---|---|" + "---|" * len(ROLES),
    ]
    for kind, table in ROLE_DISCLOSURE.items():
        for name, allowed in table.items():
            if name in ENVELOPE and name != "message_id":
                continue
            label = "*(receives it)*" if name == "message_id" else f"`{name}`"
            cells = " | ".join("yes" if role in allowed else "—" for role in ROLES)
            lines.append(f"| `{kind}` | {label} | {cells} |")
    return "\n".join(lines) + "\n"


MIN_KEY_LENGTH = 32
"""Characters of the pseudonym key, at the least: `secrets.token_urlsafe(32)` gives 43."""
KNOWN_KEYS: frozenset[str] = frozenset(
    {
        "change-me-in-production",  # the default of partnerbus 0.1: published
        "changeme",
        "change-me",
        "secret",
        "password",
        "partnerbus",
        "test-key",
        "test",
        "key",
        "k",
    }
)
"""Values published in this repository, its history or any tutorial: anyone may try them."""
KNOWN_PARTS = ("change-me", "changeme", "example", "placeholder", "your-key", "replace-me")
"""Text a key copied from an example still holds."""
MIN_DISTINCT = 10
"""Distinct characters a key holds at the least: `aaaa…` or `0101…` is guessed at once."""
MAKE_A_KEY = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"


class PseudonymKeyError(ConfigError):
    """The pseudonym key is missing or could be guessed: the bus does not start with it."""


def check_pseudonym_key(key: str | bytes | None) -> bytes:
    """The key, as bytes, when it is fit to pseudonymise with; `PseudonymKeyError` saying
    why and how to make one otherwise. With a guessable key, a partner recovers a person's
    reference from its pseudonym by trying references (a tenancy number is a few thousand
    guesses) and computes another partner's pseudonym for the same person."""
    text = key.decode("utf-8", "replace") if isinstance(key, bytes) else (key or "")
    how = f"set PARTNERBUS_PSEUDONYM_KEY to a random secret of its own, e.g. `{MAKE_A_KEY}`"
    if not text.strip():
        msg = f"no pseudonym key: {how}"
    elif len(text) < MIN_KEY_LENGTH:
        msg = f"the pseudonym key is too short ({len(text)} characters, at least {MIN_KEY_LENGTH})"
        msg += f": {how}"
    elif text.lower() in KNOWN_KEYS or any(part in text.lower() for part in KNOWN_PARTS):
        msg = f"the pseudonym key is a published example value, anyone can try it: {how}"
    elif len(set(text)) < MIN_DISTINCT:
        msg = f"the pseudonym key repeats a few characters, it would be guessed: {how}"
    else:
        return text.encode() if isinstance(key, str) else bytes(key or b"")
    raise PseudonymKeyError(msg)


def pseudonym(key: bytes, partner_id: str, person_ref: str) -> str:
    """The person's reference for this partner only: an HMAC-SHA256 under the bus's key.

    Stable (the partner recognises the person across referrals), different per partner
    (two partners cannot join on it), and not reversible without the key.
    """
    if not key:
        msg = "a pseudonym needs a secret key: without one it can be reversed by guessing"
        raise ValueError(msg)
    # "|" can appear in neither a partner id nor a person reference: no two pairs collide.
    digest = hmac.new(key, f"{partner_id}|{person_ref}".encode(), hashlib.sha256).hexdigest()
    return "p-" + digest[:24]


def signal_pseudonym(key: bytes, partner_id: str, signal_id: str) -> str:
    """The signal's reference for this partner only: two referrals to one partner from one
    signal share it (so the partner sees they belong together), but two partners that each
    received a referral from the signal cannot join on it."""
    if not key:
        msg = "a pseudonym needs a secret key: without one it can be reversed by guessing"
        raise ValueError(msg)
    digest = hmac.new(key, f"signal|{partner_id}|{signal_id}".encode(), hashlib.sha256)
    return "s-" + digest.hexdigest()[:24]


REFERRAL_NAMESPACE = uuid.UUID("4f1d3c2a-8a59-5b0e-9c61-2d7e0b6a51c3")
"""Fixed forever: changing it would give every redelivered signal new referral ids."""


def referral_id(signal_id: str, need: str, attempt: int) -> str:
    """The referral's id, derived from what it is: the same inputs, the same id."""
    if attempt < 1:
        msg = f"attempts count from 1, not {attempt}"
        raise ValueError(msg)
    return str(uuid.uuid5(REFERRAL_NAMESPACE, f"{signal_id}|{need}|{attempt}"))
