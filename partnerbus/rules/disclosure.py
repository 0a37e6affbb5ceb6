"""Minimisation and pseudonyms: each partner learns only what its kind needs.

`DISCLOSURE` is the one place deciding which parts of a signal a referral carries for a
partner kind; each entry says why. The person travels under a pseudonym proper to each
partner, so two partners cannot join their files on it; referral ids derive from their
signal, need and attempt, so a redelivered signal makes the same referral, not a second one.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Mapping
from types import MappingProxyType

from partnerbus.errors import ConfigError
from partnerbus.schemas import Contact, Facts, Profile

PARTS: frozenset[str] = frozenset(
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

_ARREARS = frozenset({"facts.arrears_eur", "facts.arrears_months"})
_HOUSING = frozenset({"facts.household_size", "facts.housing_condition"})
_CONTACT = frozenset({"contact"})

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
        "caf": frozenset({"profile", "contact", "facts.household_size"}) | _ARREARS,
        "mutualite-sociale-agricole": frozenset({"profile", "contact", "facts.household_size"})
        | _ARREARS,
        # Emergency housing: placement depends on household, its make-up and the housing.
        "siao": frozenset({"profile", "contact"}) | _HOUSING,
        "chrs": frozenset({"profile", "contact"}) | _HOUSING,
        "chu": frozenset({"profile", "contact"}) | _HOUSING,
        # Rehousing (1% logement): the household and why the current home does not fit.
        "action-logement": frozenset({"profile", "contact"}) | _HOUSING,
        # Budget and debt advice: the arrears are the subject.
        "points-conseil-budget": _CONTACT | _ARREARS,
        "cresus": _CONTACT | _ARREARS,
        # Family associations running protection measures (budget).
        "udaf": _CONTACT | _ARREARS,
        "unaf": _CONTACT | _ARREARS,
        # Legal help against an eviction procedure: the arrears are the case.
        "points-justice": _CONTACT | _ARREARS,
        # Centres sociaux: activities by public (seniors, families), nothing about money.
        "fcsf": frozenset({"profile", "contact"}),
        # Young workers' residences take by age band.
        "residences-fjt": frozenset({"profile", "contact"}),
        # Disability and autonomy files: age band and publics, nothing about money.
        "mdph": frozenset({"profile", "contact"}),
        "maison-departementale-de-lautonomie": frozenset({"profile", "contact"}),
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
    kind: str, profile: Profile, facts: Facts, contact: Contact | None
) -> tuple[Profile | None, Facts | None, Contact | None]:
    """Only what `kind` may see; None for a part it may not see or that holds nothing."""
    parts = disclosed_parts(kind)
    shown_profile = profile if "profile" in parts and profile != Profile() else None
    shown_contact = contact if "contact" in parts and contact != Contact() else None
    kept = {
        name: value
        for name, value in facts.model_dump(exclude_none=True).items()
        if f"facts.{name}" in parts
    }
    shown_facts = Facts(**kept) if kept else None
    return shown_profile, shown_facts, shown_contact


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
