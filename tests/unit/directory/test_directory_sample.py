"""The bundled Lille / Nord sample: the interface others code against, and the demo scenarios."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from partnerbus.directory import Candidate, Directory, load_sample, match
from partnerbus.schemas import Partner, Profile

from .conftest import ARREARS, KEEP_HOME, RIGHTS

DATA = Path(__file__).parents[3] / "partnerbus" / "directory" / "data" / "communes-mel.csv"


def test_every_mel_commune_is_in_the_territory_graph(sample_static: Directory) -> None:
    """All communes of the Métropole Européenne de Lille (EPCI 200093201) are known."""
    with DATA.open(encoding="utf-8") as fh:
        codes = [row["commune_insee"] for row in csv.DictReader(fh)]
    assert len(codes) == 95
    assert all(sample_static.has_commune(code) for code in codes)
    assert not sample_static.has_commune("75056")
    assert not sample_static.has_commune("200093201")


def test_needs_include_parents_and_local_codes(sample_static: Directory) -> None:
    """Taxonomy codes, their parents and the sample's local codes are known needs."""
    assert sample_static.has_need(ARREARS)
    assert sample_static.has_need("logement-hebergement")
    assert sample_static.has_need("local-logement--incurie")
    assert not sample_static.has_need("logement-hebergement--inconnu")


def test_partners_are_sorted_and_looked_up_by_id(sample_static: Directory) -> None:
    """partners() is sorted by id; partner() raises KeyError for an unknown id."""
    partners = sample_static.partners()
    assert [p.id for p in partners] == sorted(p.id for p in partners)
    assert all(isinstance(p, Partner) for p in partners)
    assert sample_static.partner("caf-nord").kind == "caf"
    with pytest.raises(KeyError):
        sample_static.partner("nobody")


@pytest.mark.parametrize(
    ("commune", "agency"),
    [
        ("59350", "lmh-agence-lille-sud"),
        ("59009", "lmh-agence-lille-sud"),
        ("59512", "lmh-agence-roubaix"),
        ("59650", "lmh-agence-roubaix"),
        ("59599", "lmh-agence-tourcoing"),
        ("59250", "lmh-agence-weppes"),
        ("59303", "lmh-agence-weppes"),
    ],
)
def test_each_commune_has_its_landlord_agency(
    sample_static: Directory, commune: str, agency: str
) -> None:
    """agency_for returns the landlord's agency covering the commune."""
    found = sample_static.agency_for(commune, "lmh")
    assert found is not None
    assert found.id == agency


def test_every_mel_commune_has_exactly_one_agency(sample_static: Directory) -> None:
    """The four agencies partition the MEL: no commune is left without an agency."""
    for commune in sample_static.communes():
        assert sample_static.agency_for(commune, "lmh") is not None, commune
    assert sample_static.agency_for("62041", "lmh") is None


def test_the_advisor_naming_the_commune_wins_over_the_whole_agency(
    sample_static: Directory,
) -> None:
    """advisor_for prefers the advisor following the commune, then one following the agency."""
    named = sample_static.advisor_for("lmh-agence-roubaix", "59512")
    whole = sample_static.advisor_for("lmh-agence-roubaix", "59650")
    assert named is not None and named.id == "s.benali"
    assert whole is not None and whole.id == "l.petit"
    assert sample_static.advisor_for("lmh-recouvrement", "59512") is None


@pytest.mark.parametrize(
    ("need", "commune", "sender"),
    [
        (ARREARS, "59512", "lmh-recouvrement"),
        (KEEP_HOME, "59599", "lmh-proximite"),
        (RIGHTS, "59350", "ccas-lille"),
    ],
)
def test_each_demo_scenario_has_a_next_best_partner(
    sample_static: Directory, need: str, commune: str, sender: str
) -> None:
    """The three demo signals each find at least two candidates, so a decline reroutes."""
    candidates = match(sample_static, need, commune, sender=sender)
    assert len(candidates) >= 2
    assert all(isinstance(c, Candidate) for c in candidates)
    rerouted = match(
        sample_static, need, commune, sender=sender, exclude=frozenset({candidates[0].partner_id})
    )
    assert rerouted[0].partner_id == candidates[1].partner_id


def test_the_arrears_scenario_starts_with_the_roubaix_ccas(sample_static: Directory) -> None:
    """Arrears in Roubaix from the recovery service: local CCAS first, with its reasons."""
    first = match(sample_static, ARREARS, "59512", sender="lmh-recouvrement")[0]
    assert first.partner_id == "ccas-roubaix"
    assert first.reasons[:2] == ("covers 59512 (commune)", "exact need")
    assert "agreement lmh -> ccas-roubaix" in first.reasons


def test_an_organisation_without_agreement_is_out_of_the_landlords_reach(
    sample_static: Directory,
) -> None:
    """The CIDFF has no agreement with the landlord: a CCAS may refer to it, the landlord may not."""
    woman = Profile(publics=("femmes",))
    from_ccas = match(sample_static, RIGHTS, "59350", woman, sender="ccas-lille")
    from_lmh = match(sample_static, RIGHTS, "59350", woman, sender="lmh-agence-lille-sud")
    assert "cidff-nord" in [c.partner_id for c in from_ccas]
    assert "cidff-nord" not in [c.partner_id for c in from_lmh]


def test_agencies_never_receive_needs_they_do_not_list(sample_static: Directory) -> None:
    """A `bailleur-social` partner only appears for a need it explicitly lists."""
    for need in (ARREARS, KEEP_HOME, RIGHTS, "logement-hebergement"):
        for commune in ("59350", "59512", "59599"):
            kinds = {c.partner.kind for c in match(sample_static, need, commune)}
            assert "bailleur-social" not in kinds
    moving = match(sample_static, "logement-hebergement--changer-de-logement", "59512")
    assert moving[0].partner_id == "lmh-agence-roubaix"


def test_a_full_partner_is_skipped_until_it_has_room_again(sample: Directory) -> None:
    """A capacity event on the sample moves the next match to the next-best partner."""
    first = match(sample, ARREARS, "59512", sender="lmh-recouvrement")[0].partner_id
    sample.apply_capacity(first, "no-capacity", None)
    after = match(sample, ARREARS, "59512", sender="lmh-recouvrement")
    assert first not in [c.partner_id for c in after]
    sample.apply_capacity(first, "capacity", 1)
    assert match(sample, ARREARS, "59512", sender="lmh-recouvrement")[0].partner_id == first
    assert sample.capacity(first) == ("capacity", 1)


def test_each_load_sample_call_has_its_own_live_state() -> None:
    """A capacity event on one sample directory leaves a freshly loaded one untouched."""
    first = load_sample()
    first.apply_capacity("ccas-roubaix", "no-capacity", None)
    first.record_answer("caf-nord", accepted=False)
    second = load_sample()
    assert second.capacity("ccas-roubaix") == ("capacity", 3)
    assert second.acceptance("caf-nord") == (0, 0)
