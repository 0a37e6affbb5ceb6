"""Minimisation per partner kind, pseudonyms per partner, deterministic referral ids."""

from __future__ import annotations

import uuid

import pytest

from partnerbus.rules import (
    DEFAULT_DISCLOSURE,
    DISCLOSURE,
    PARTS,
    disclosed_parts,
    minimise,
    pseudonym,
    referral_id,
    signal_pseudonym,
)
from partnerbus.rules.disclosure import WISHES
from partnerbus.schemas import Contact, Facts, Profile

PROFILE = Profile(age_band="25-59", household="single-parent", publics=("familles",))
FACTS = Facts(
    arrears_eur=1840.5,
    arrears_months=4,
    household_size=3,
    housing_condition="overcrowded",
    note="Mme X. a perdu son emploi en janvier.",
)
CONTACT = Contact(phone="06 12 34 56 78", preferred_time="matin")
KEY = b"0123456789abcdef0123456789abcdef"


def test_every_kind_discloses_only_known_parts() -> None:
    """No kind's entry names a part that does not exist."""
    for kind, parts in DISCLOSURE.items():
        assert parts <= PARTS, kind
    assert {"contact"} | WISHES == DEFAULT_DISCLOSURE


def test_the_disclosure_table_cannot_be_changed_at_run_time() -> None:
    """DISCLOSURE is read-only: minimisation is decided in code review, not at run time."""
    with pytest.raises(TypeError):
        DISCLOSURE["caf"] = PARTS  # type: ignore[index]


@pytest.mark.parametrize(
    ("kind", "parts"),
    [
        ("bailleur-social", PARTS),
        ("ccas-cias", {"contact", "facts.arrears_eur", "facts.arrears_months"}),
        (
            "caf",
            {
                "profile",
                "contact",
                "facts.household_size",
                "facts.arrears_eur",
                "facts.arrears_months",
            },
        ),
        ("siao", {"profile", "contact", "facts.household_size", "facts.housing_condition"}),
        ("points-conseil-budget", {"contact", "facts.arrears_eur", "facts.arrears_months"}),
        ("cresus", {"contact", "facts.arrears_eur", "facts.arrears_months"}),
        ("cidff", {"contact"}),
        ("a-kind-nobody-declared", {"contact"}),
    ],
)
def test_each_kind_receives_its_documented_share(kind: str, parts: set[str]) -> None:
    """The parts disclosed per kind are the ones the table documents, and the person's
    wishes (every kind); unknown kinds get contact (and the wishes)."""
    assert disclosed_parts(kind) == parts | WISHES


def test_the_free_text_note_goes_to_few() -> None:
    """Only the landlord and the département's social workers see the note."""
    with_note = {kind for kind, parts in DISCLOSURE.items() if "facts.note" in parts}
    assert with_note == {"bailleur-social", "maisons-des-solidarites", "departements"}


def test_the_landlord_receives_everything() -> None:
    """bailleur-social gets profile, all facts and contact unchanged."""
    assert minimise("bailleur-social", PROFILE, FACTS, CONTACT) == (PROFILE, FACTS, CONTACT)


def test_the_caf_gets_household_and_arrears_but_not_the_note() -> None:
    """The CAF sees the household size and arrears; the note and housing condition stay."""
    profile, facts, contact = minimise("caf", PROFILE, FACTS, CONTACT)
    assert profile == PROFILE
    assert contact == CONTACT
    assert facts == Facts(arrears_eur=1840.5, arrears_months=4, household_size=3)


def test_the_ccas_gets_contact_and_arrears_only() -> None:
    """A CCAS sees arrears and contact, no profile."""
    assert minimise("ccas-cias", PROFILE, FACTS, CONTACT) == (
        None,
        Facts(arrears_eur=1840.5, arrears_months=4),
        CONTACT,
    )


def test_the_siao_gets_the_household_and_housing() -> None:
    """The SIAO sees household size, housing condition, profile and contact, no money."""
    assert minimise("siao", PROFILE, FACTS, CONTACT) == (
        PROFILE,
        Facts(household_size=3, housing_condition="overcrowded"),
        CONTACT,
    )


def test_an_unknown_kind_gets_contact_only() -> None:
    """A kind missing from the table is given a way to reach the person, nothing more."""
    assert minimise("nouveau-reseau", PROFILE, FACTS, CONTACT) == (None, None, CONTACT)


def test_parts_holding_nothing_are_none() -> None:
    """Empty profile, facts with nothing disclosable, and an empty contact become None."""
    assert minimise("bailleur-social", Profile(), Facts(), Contact()) == (None, None, None)
    assert minimise("ccas-cias", PROFILE, Facts(note="rien d'autre"), None) == (None, None, None)


def test_the_pseudonym_is_stable_and_shaped() -> None:
    """The same key, partner and person give the same 'p-' plus 24 hex characters."""
    first = pseudonym(KEY, "ccas-lille", "tenant-0001")
    assert first == pseudonym(KEY, "ccas-lille", "tenant-0001")
    assert first.startswith("p-")
    assert len(first) == 26
    int(first[2:], 16)


def test_two_partners_cannot_join_on_the_pseudonym() -> None:
    """One person gets a different pseudonym at each partner."""
    assert pseudonym(KEY, "ccas-lille", "tenant-0001") != pseudonym(KEY, "caf-59", "tenant-0001")


def test_the_pseudonym_depends_on_the_key_and_the_person() -> None:
    """Another key or another person gives another pseudonym."""
    base = pseudonym(KEY, "ccas-lille", "tenant-0001")
    assert base != pseudonym(b"another-secret-key", "ccas-lille", "tenant-0001")
    assert base != pseudonym(KEY, "ccas-lille", "tenant-0002")


def test_the_pseudonym_is_the_documented_hmac() -> None:
    """It is HMAC-SHA256 over 'partner|person', truncated: partners can be told how it is made."""
    import hashlib
    import hmac

    expected = hmac.new(KEY, b"ccas-lille|tenant-0001", hashlib.sha256).hexdigest()[:24]
    assert pseudonym(KEY, "ccas-lille", "tenant-0001") == "p-" + expected


def test_a_pseudonym_without_a_key_is_refused() -> None:
    """An empty key raises ValueError: an unkeyed hash could be reversed by guessing."""
    with pytest.raises(ValueError, match="secret key"):
        pseudonym(b"", "ccas-lille", "tenant-0001")


def test_two_partners_cannot_join_on_the_signal_reference() -> None:
    """One signal gets one reference per partner, stable for that partner, and never equal to the person's pseudonym of the same string."""
    at_ccas = signal_pseudonym(KEY, "ccas-lille", "sig-1")
    assert at_ccas == signal_pseudonym(KEY, "ccas-lille", "sig-1")
    assert at_ccas != signal_pseudonym(KEY, "caf-59", "sig-1")
    assert at_ccas != signal_pseudonym(KEY, "ccas-lille", "sig-2")
    assert at_ccas[2:] != pseudonym(KEY, "ccas-lille", "sig-1")[2:]
    assert at_ccas.startswith("s-")
    with pytest.raises(ValueError, match="secret key"):
        signal_pseudonym(b"", "ccas-lille", "sig-1")


def test_the_referral_id_derives_from_signal_need_and_attempt() -> None:
    """The same inputs give the same uuid; any other input gives another."""
    rid = referral_id("sig-1", "logement-hebergement", 1)
    assert rid == referral_id("sig-1", "logement-hebergement", 1)
    assert uuid.UUID(rid).version == 5
    others = {
        referral_id("sig-2", "logement-hebergement", 1),
        referral_id("sig-1", "logement-hebergement--reduire-les-impayes-de-loyer", 1),
        referral_id("sig-1", "logement-hebergement", 2),
    }
    assert rid not in others
    assert len(others) == 3


def test_the_referral_id_is_pinned_across_releases() -> None:
    """The namespace never changes: a known input keeps its known id."""
    assert referral_id("s1", "n", 1) == "c017ccfb-9ff4-5e01-8080-8e98f9da0643"


def test_attempts_count_from_one() -> None:
    """Attempt 0 raises ValueError."""
    with pytest.raises(ValueError, match="from 1"):
        referral_id("sig-1", "logement-hebergement", 0)
