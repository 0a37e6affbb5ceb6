"""Who follows a person (issue 11): any partner with advisors can be the pivot, never a
creditor; several organisations' agencies may cover one commune, and then only the signal
(its agency, its landlord, its source's organisation) says which one follows the person."""

from __future__ import annotations

from partnerbus.directory import Directory
from partnerbus.directory.check import find_problems
from partnerbus.schemas import Advisor

from .conftest import LILLE, MEL, ROUBAIX, make_directory, partner

ADVISOR = (Advisor(id="a.one", name="A One"),)


def two_landlords() -> Directory:
    return make_directory(
        [
            partner("lmh-roubaix", kind="bailleur-social", organisation="lmh",
                    coverage=(ROUBAIX,), needs=(), advisors=ADVISOR),
            partner("lmh-recouvrement", kind="bailleur-social", organisation="lmh",
                    coverage=(MEL,), needs=()),
            partner("vilogia-roubaix", kind="bailleur-social", organisation="vilogia",
                    coverage=(ROUBAIX,), needs=(), advisors=(Advisor(id="b.two", name="B"),)),
            partner("vilogia-recouvrement", kind="bailleur-social", organisation="vilogia",
                    coverage=(MEL,), needs=(), creditor=True,
                    advisors=(Advisor(id="c.three", name="C"),)),
            partner("iml", kind="association", organisation="hh",
                    coverage=(MEL,), advisors=(Advisor(id="d.four", name="D"),)),
            partner("ccas-roubaix", coverage=(ROUBAIX,)),
        ]
    )  # fmt: skip


def test_any_partner_with_advisors_is_a_pivot_never_a_creditor() -> None:
    """An association's team is a pivot like a landlord's agency; a creditor with advisors is none; most specific coverage first, then by id."""
    d = two_landlords()
    assert [p.id for p in d.pivots_covering(ROUBAIX)] == ["lmh-roubaix", "vilogia-roubaix", "iml"]
    assert [p.id for p in d.pivots_covering(LILLE)] == ["iml"]
    assert d.pivot_organisations(ROUBAIX) == ("hh", "lmh", "vilogia")


def test_agency_for_an_organisation_is_its_own() -> None:
    d = two_landlords()
    assert d.agency_for(ROUBAIX, "vilogia").id == "vilogia-roubaix"  # type: ignore[union-attr]
    assert d.agency_for(ROUBAIX, "hh").id == "iml"  # type: ignore[union-attr]
    assert d.agency_for(LILLE, "lmh") is None
    assert d.agency_for(ROUBAIX, "ccas-roubaix") is None


def test_resolve_agency_takes_the_signal_then_the_landlord_then_the_source() -> None:
    """The agency named; else the landlord's covering the commune; else the source itself if a pivot, else its organisation's."""
    d = two_landlords()
    named = d.resolve_agency(ROUBAIX, agency="iml", landlord="lmh", source="lmh-recouvrement")
    assert named.agency is not None and named.agency.id == "iml"
    landlord = d.resolve_agency(ROUBAIX, landlord="vilogia", source="lmh-recouvrement")
    assert landlord.agency is not None and landlord.agency.id == "vilogia-roubaix"
    for source, agency in [
        ("lmh-recouvrement", "lmh-roubaix"),
        ("vilogia-recouvrement", "vilogia-roubaix"),
        ("vilogia-roubaix", "vilogia-roubaix"),
        ("iml", "iml"),
    ]:
        found = d.resolve_agency(ROUBAIX, source=source)
        assert found.agency is not None and found.agency.id == agency, source
        assert not found.ambiguous


def test_resolve_agency_never_picks_among_organisations() -> None:
    """Naming neither, from a source without an agency there: the only organisation's agency, or nobody when several could follow the person, with the reason naming them."""
    d = two_landlords()
    alone = d.resolve_agency(LILLE, source="ccas-roubaix")
    assert alone.agency is not None and alone.agency.id == "iml"
    several = d.resolve_agency(ROUBAIX, source="ccas-roubaix")
    assert several.agency is None
    assert several.ambiguous == ("hh", "lmh", "vilogia")
    assert "(hh, lmh, vilogia)" in several.refusal(ROUBAIX)
    assert "`agency`" in several.refusal(ROUBAIX)
    none = make_directory([partner("ccas-roubaix", coverage=(ROUBAIX,))])
    nobody = none.resolve_agency(ROUBAIX, source="ccas-roubaix")
    assert (nobody.agency, nobody.ambiguous) == (None, ())
    assert nobody.refusal(ROUBAIX) == f"no agency covers {ROUBAIX}"


def test_the_sample_has_two_landlords_and_an_iml_association_in_roubaix(
    sample_static: Directory,
) -> None:
    """Vilogia beside LMH in Roubaix, Habitat et Humanisme over the MEL: three organisations follow people there; the sample stays free of errors."""
    d = sample_static
    assert d.pivot_organisations(ROUBAIX) == (
        "amelio-mel",
        "habitat-humanisme-nord",
        "lmh",
        "vilogia",
    )
    assert d.agency_for(ROUBAIX, "vilogia").id == "vilogia-agence-roubaix"  # type: ignore[union-attr]
    assert d.partner("hh-nord-iml").kind == "association"
    assert d.resolve_agency(ROUBAIX, source="vilogia-recouvrement").agency.id == (  # type: ignore[union-attr]
        "vilogia-agence-roubaix"
    )
    assert d.resolve_agency(ROUBAIX, source="lmh-recouvrement").agency.id == (  # type: ignore[union-attr]
        "lmh-agence-roubaix"
    )
    assert d.resolve_agency(ROUBAIX, source="ccas-roubaix").agency is None
    assert [p for p in find_problems(d) if p.severity == "error"] == []
