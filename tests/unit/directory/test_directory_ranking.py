"""Each ranking rule of `match`, pinned on the fewest partners that show it."""

from __future__ import annotations

import pytest

from partnerbus.directory import match
from partnerbus.directory.match import eligible, ignored_qpv
from partnerbus.schemas import Agreement, Eligibility, Profile

from .conftest import (
    ARRAS,
    ARREARS,
    HOARDING,
    HOUSING,
    KEEP_HOME,
    LILLE,
    MEL,
    NORD,
    QPV_ROUBAIX,
    ROUBAIX,
    make_directory,
    partner,
)


def ids(candidates: list) -> list[str]:
    return [c.partner_id for c in candidates]


def test_the_most_specific_territory_ranks_first() -> None:
    """A partner covering the commune outranks the EPCI, which outranks the département, région and France."""
    d = make_directory(
        [
            partner("a-france", coverage=("france",)),
            partner("b-region", coverage=("R32",)),
            partner("c-departement", coverage=(NORD,)),
            partner("d-epci", coverage=(MEL,)),
            partner("e-commune", coverage=(LILLE,)),
        ]
    )
    assert ids(match(d, ARREARS, LILLE)) == [
        "e-commune",
        "d-epci",
        "c-departement",
        "b-region",
        "a-france",
    ]


def test_a_qpv_coverage_is_more_specific_than_its_commune() -> None:
    """A service covering the person's QPV outranks one covering the whole commune."""
    d = make_directory(
        [partner("a-commune", coverage=(ROUBAIX,)), partner("b-qpv", coverage=(QPV_ROUBAIX,))]
    )
    assert ids(match(d, ARREARS, ROUBAIX, Profile(qpv=QPV_ROUBAIX))) == ["b-qpv", "a-commune"]
    assert ids(match(d, ARREARS, ROUBAIX)) == ["a-commune"]


def test_the_exact_need_ranks_before_the_parent_need() -> None:
    """On the same territory, a partner listing the exact need outranks one listing its parent."""
    d = make_directory([partner("a-parent", needs=(HOUSING,)), partner("b-exact")])
    candidates = match(d, ARREARS, LILLE)
    assert ids(candidates) == ["b-exact", "a-parent"]
    assert "exact need" in candidates[0].reasons
    assert f"parent need {HOUSING}" in candidates[1].reasons


def test_territory_comes_before_need_precision() -> None:
    """A local partner for the parent need outranks a départemental partner for the exact need."""
    d = make_directory(
        [partner("a-dep-exact", coverage=(NORD,)), partner("b-local-parent", needs=(HOUSING,))]
    )
    assert ids(match(d, ARREARS, LILLE)) == ["b-local-parent", "a-dep-exact"]


def test_a_local_need_falls_back_to_its_declared_parent() -> None:
    """A local code is served first by partners listing it, then by those listing its parent."""
    d = make_directory(
        [partner("a-keep-home", needs=(KEEP_HOME,)), partner("b-hoarding", needs=(HOARDING,))]
    )
    assert ids(match(d, HOARDING, LILLE)) == ["b-hoarding", "a-keep-home"]


def test_a_targeted_service_ranks_before_one_open_to_all() -> None:
    """A service aimed at the person's age band outranks a general one on the same footing."""
    d = make_directory(
        [
            partner("a-open"),
            partner("b-seniors", eligibility=Eligibility(age_bands=("75-plus",))),
        ]
    )
    candidates = match(d, ARREARS, LILLE, Profile(age_band="75-plus"))
    assert ids(candidates) == ["b-seniors", "a-open"]
    assert "eligible: age 75-plus" in candidates[0].reasons


def test_a_service_the_person_is_not_eligible_to_is_never_returned() -> None:
    """Age, household, public and QPV restrictions leave out those who do not fit, and unknown facts never qualify."""
    d = make_directory(
        [
            partner("a-seniors", eligibility=Eligibility(age_bands=("75-plus",))),
            partner("b-families", eligibility=Eligibility(households=("family",))),
            partner("c-women", eligibility=Eligibility(publics=("femmes",))),
            partner("d-qpv", eligibility=Eligibility(qpv_only=True), coverage=(ROUBAIX,)),
            partner("e-open"),
        ]
    )
    young = Profile(age_band="25-59", household="single")
    assert ids(match(d, ARREARS, LILLE, young)) == ["e-open"]
    assert ids(match(d, ARREARS, LILLE)) == ["e-open"]
    woman = Profile(publics=("femmes",))
    assert ids(match(d, ARREARS, LILLE, woman)) == ["c-women", "e-open"]


def test_a_qpv_only_service_needs_a_resident_of_a_qpv_of_that_commune() -> None:
    """QPV-only services take residents of a QPV located in the person's commune."""
    d = make_directory([partner("a-qpv", eligibility=Eligibility(qpv_only=True), coverage=(NORD,))])
    assert ids(match(d, ARREARS, ROUBAIX, Profile(qpv=QPV_ROUBAIX))) == ["a-qpv"]
    assert ids(match(d, ARREARS, LILLE, Profile(qpv=QPV_ROUBAIX))) == []
    assert ids(match(d, ARREARS, ROUBAIX, Profile())) == []


def test_a_qpv_unknown_to_the_directory_never_qualifies() -> None:
    """A QPV code the directory does not know, or knows in another commune, is ignored for eligibility, and the reasons say so."""
    d = make_directory(
        [
            partner("a-qpv-only", eligibility=Eligibility(qpv_only=True), coverage=(NORD,)),
            partner(
                "b-qpv-public",
                eligibility=Eligibility(publics=("residents-qpv-frr",)),
                coverage=(NORD,),
            ),
            partner(
                "c-qpv-or-seniors",
                eligibility=Eligibility(publics=("residents-qpv-frr", "seniors")),
                coverage=(NORD,),
            ),
            partner("d-open", coverage=(NORD,)),
        ]
    )
    unknown = Profile(qpv="QN9999999")
    assert ids(match(d, ARREARS, ROUBAIX, unknown)) == ["d-open"]
    assert ids(match(d, ARREARS, LILLE, Profile(qpv=QPV_ROUBAIX))) == ["d-open"]
    (senior, _) = match(d, ARREARS, ROUBAIX, Profile(qpv="QN9999999", age_band="75-plus"))
    assert senior.partner_id == "c-qpv-or-seniors"
    assert senior.reasons[2] == (
        "eligible: public seniors; QPV QN9999999 ignored (not a known QPV of 59512)"
    )
    assert eligible(d, d.partner("a-qpv-only"), ROUBAIX, unknown) == (
        False,
        "QPV residents only; QPV QN9999999 ignored (not a known QPV of 59512)",
    )
    assert ignored_qpv(d, ROUBAIX, unknown) == "QPV QN9999999 ignored (not a known QPV of 59512)"
    assert ignored_qpv(d, ROUBAIX, Profile(qpv=QPV_ROUBAIX)) is None
    known = match(d, ARREARS, ROUBAIX, Profile(qpv=QPV_ROUBAIX))
    assert ids(known) == ["a-qpv-only", "b-qpv-public", "c-qpv-or-seniors", "d-open"]


def test_seniors_and_qpv_residents_are_derived_publics() -> None:
    """An age band of 60+ counts as `seniors`, a QPV as `residents-qpv-frr`."""
    d = make_directory(
        [
            partner("a-seniors", eligibility=Eligibility(publics=("seniors",))),
            partner(
                "b-qpv",
                eligibility=Eligibility(publics=("residents-qpv-frr",)),
                coverage=(ROUBAIX,),
            ),
        ]
    )
    assert ids(match(d, ARREARS, LILLE, Profile(age_band="60-74"))) == ["a-seniors"]
    assert ids(match(d, ARREARS, ROUBAIX, Profile(qpv=QPV_ROUBAIX))) == ["b-qpv"]


def test_a_referral_leaves_an_organisation_only_along_an_agreement() -> None:
    """Without an agreement from the sender's organisation, a partner is not a candidate."""
    d = make_directory(
        [
            partner("sender", organisation="lmh", needs=()),
            partner("a-agreed"),
            partner("b-no-agreement"),
        ],
        [Agreement(from_org="lmh", to_org="a-agreed")],
    )
    candidates = match(d, ARREARS, LILLE, sender="sender")
    assert ids(candidates) == ["a-agreed"]
    assert "agreement lmh -> a-agreed" in candidates[0].reasons
    assert ids(match(d, ARREARS, LILLE)) == ["a-agreed", "b-no-agreement"]


def test_an_agreement_runs_one_way() -> None:
    """An agreement from A to B does not let referrals travel from B to A."""
    d = make_directory(
        [partner("pa", needs=()), partner("pb")],
        [Agreement(from_org="pb", to_org="pa")],
    )
    assert match(d, ARREARS, LILLE, sender="pa") == []


def test_partners_of_the_senders_organisation_need_no_agreement() -> None:
    """Within one organisation, a referral needs no agreement."""
    d = make_directory(
        [
            partner("sender", organisation="lmh", needs=()),
            partner("colleague", organisation="lmh", kind="bailleur-social"),
        ]
    )
    candidates = match(d, ARREARS, LILLE, sender="sender")
    assert ids(candidates) == ["colleague"]
    assert "same organisation lmh" in candidates[0].reasons


def test_a_need_scoped_agreement_ranks_before_a_general_one() -> None:
    """An agreement naming the need (or its parent) outranks a general agreement."""
    d = make_directory(
        [
            partner("sender", organisation="lmh", needs=()),
            partner("a-general"),
            partner("b-scoped"),
        ],
        [
            Agreement(from_org="lmh", to_org="a-general"),
            Agreement(from_org="lmh", to_org="b-scoped", needs=(HOUSING,)),
        ],
    )
    candidates = match(d, ARREARS, LILLE, sender="sender")
    assert ids(candidates) == ["b-scoped", "a-general"]
    assert "agreement lmh -> b-scoped for this need" in candidates[0].reasons


def test_a_need_scoped_agreement_does_not_carry_other_needs() -> None:
    """An agreement for one need does not open the way for another."""
    d = make_directory(
        [partner("sender", organisation="lmh", needs=()), partner("pa")],
        [Agreement(from_org="lmh", to_org="pa", needs=(KEEP_HOME,))],
    )
    assert match(d, ARREARS, LILLE, sender="sender") == []


def test_a_partner_with_places_left_ranks_before_a_waitlist() -> None:
    """Capacity, then additional assessment, then waitlist; more places left first."""
    d = make_directory(
        [
            partner("a-waitlist", capacity_status="waitlist"),
            partner("b-assessment", capacity_status="additional-assessment-required"),
            partner("c-open"),
            partner("d-two-left", capacity=2),
            partner("e-five-left", capacity=5),
        ]
    )
    assert ids(match(d, ARREARS, LILLE)) == [
        "e-five-left",
        "d-two-left",
        "c-open",
        "b-assessment",
        "a-waitlist",
    ]


def test_a_full_partner_is_never_returned() -> None:
    """`no-capacity` or zero places left takes a partner out of the list."""
    d = make_directory(
        [
            partner("a-full", capacity_status="no-capacity"),
            partner("b-zero", capacity=0),
            partner("c-ok"),
        ]
    )
    assert ids(match(d, ARREARS, LILLE)) == ["c-ok"]


def test_a_capacity_event_steers_the_next_match_at_once() -> None:
    """apply_capacity changes the very next match, both ways."""
    d = make_directory([partner("pa"), partner("pb")])
    assert ids(match(d, ARREARS, LILLE)) == ["pa", "pb"]
    d.apply_capacity("pa", "no-capacity", None)
    assert ids(match(d, ARREARS, LILLE)) == ["pb"]
    d.apply_capacity("pa", "capacity", 3)
    candidates = match(d, ARREARS, LILLE)
    assert ids(candidates) == ["pa", "pb"]
    assert "capacity 3 left" in candidates[0].reasons
    d.apply_capacity("pb", "capacity", 0)
    assert ids(match(d, ARREARS, LILLE)) == ["pa"]


def test_an_unknown_capacity_status_is_refused() -> None:
    """Only the FHIR SDOH capacity codes are accepted."""
    d = make_directory([partner("pa")])
    with pytest.raises(ValueError, match="unknown capacity status"):
        d.apply_capacity("pa", "full", None)
    with pytest.raises(KeyError):
        d.apply_capacity("nobody", "capacity", None)


def test_a_higher_recent_acceptance_rate_ranks_first() -> None:
    """A partner that accepts its referrals outranks one that declines them."""
    d = make_directory([partner("pa"), partner("pb")])
    for _ in range(3):
        d.record_answer("pa", accepted=False)
        d.record_answer("pb", accepted=True)
    candidates = match(d, ARREARS, LILLE)
    assert ids(candidates) == ["pb", "pa"]
    assert "accepted 3/3 recently" in candidates[0].reasons
    assert "accepted 0/3 recently" in candidates[1].reasons


def test_the_acceptance_window_keeps_the_last_twenty_answers_smoothed() -> None:
    """Only the 20 latest answers count, Laplace-smoothed so one answer does not decide."""
    d = make_directory([partner("pa"), partner("pb")])
    for _ in range(20):
        d.record_answer("pa", accepted=False)
    for _ in range(20):
        d.record_answer("pa", accepted=True)
    assert d.acceptance("pa") == (20, 20), "the 20 declines fell out of the window"
    # 1 decline: (0 + 1) / (1 + 2) = 0.333, not 0 %: pb stays behind an unknown (0.5) only
    d2 = make_directory([partner("pa"), partner("pb")])
    d2.record_answer("pb", accepted=False)
    assert ids(match(d2, ARREARS, LILLE)) == ["pa", "pb"]
    assert "accepted 0/1 recently" in match(d2, ARREARS, LILLE)[1].reasons


def test_answers_loaded_from_the_record_replace_the_window() -> None:
    """`set_answers` replaces what a worker had counted with the durable record's last answers, and the ranking follows."""
    d = make_directory([partner("pa"), partner("pb")])
    for _ in range(5):
        d.record_answer("pa", accepted=True)
    d.set_answers("pa", [False] * 25)
    assert d.acceptance("pa") == (0, 20)
    d.set_answers("pb", [True, True])
    assert ids(match(d, ARREARS, LILLE)) == ["pb", "pa"]


def test_capacity_outweighs_acceptance_rate() -> None:
    """A waitlisted partner stays behind an open one whatever its acceptance rate."""
    d = make_directory([partner("pa", capacity_status="waitlist"), partner("pb")])
    d.record_answer("pa", accepted=True)
    d.record_answer("pb", accepted=False)
    assert ids(match(d, ARREARS, LILLE)) == ["pb", "pa"]


def test_ties_are_broken_by_partner_id() -> None:
    """Equal partners come in id order, whatever the order they were loaded in."""
    d = make_directory([partner("pc"), partner("pa"), partner("pb")])
    assert ids(match(d, ARREARS, LILLE)) == ["pa", "pb", "pc"]


def test_a_social_landlord_gets_only_needs_it_lists_explicitly() -> None:
    """A `bailleur-social` partner is never matched through a parent need."""
    d = make_directory(
        [
            partner("agency-parent", kind="bailleur-social", needs=(HOUSING,)),
            partner("agency-exact", kind="bailleur-social", coverage=(NORD,)),
            partner("ccas", needs=(HOUSING,)),
        ]
    )
    assert ids(match(d, ARREARS, LILLE)) == ["ccas", "agency-exact"]


def test_a_social_landlord_can_match_exactly_further_up_the_territory_chain() -> None:
    """A landlord listing the parent locally and the exact need départementally is found by the latter."""
    d = make_directory(
        [
            partner("agency", kind="bailleur-social", needs=(HOUSING,), coverage=(LILLE,)),
            partner("agency-2", kind="bailleur-social", organisation="agency", coverage=(NORD,)),
        ]
    )
    assert ids(match(d, ARREARS, LILLE)) == ["agency-2"]


def test_the_sender_and_partners_already_tried_are_left_out() -> None:
    """Rerouting passes the tried partners in `exclude`; the sender never refers to itself."""
    d = make_directory([partner(pid, organisation="org") for pid in ("pa", "pb", "pc")])
    assert ids(match(d, ARREARS, LILLE, sender="pa")) == ["pb", "pc"]
    assert ids(match(d, ARREARS, LILLE, exclude=frozenset({"pb"}))) == ["pa", "pc"]


def test_ranks_are_one_based_and_limit_cuts_the_list() -> None:
    """Candidates carry ranks 1..n in order, and `limit` keeps the best ones."""
    d = make_directory([partner("pa"), partner("pb"), partner("pc")])
    candidates = match(d, ARREARS, LILLE, limit=2)
    assert [(c.rank, c.partner_id) for c in candidates] == [(1, "pa"), (2, "pb")]
    assert candidates[0].score < candidates[1].score


def test_unknown_need_commune_or_sender_gives_no_candidate() -> None:
    """An unknown need or commune is a business outcome (no partner); an unknown sender (one removed from the directory since its signal) has no agreement: no partner either, never a KeyError."""
    d = make_directory([partner("pa")])
    assert match(d, "logement-hebergement--inconnu", LILLE) == []
    assert match(d, ARREARS, "99999") == []
    assert match(d, ARREARS, ARRAS) == []
    assert match(d, ARREARS, LILLE, sender="nobody") == []


def test_reasons_say_where_what_who_and_how_full() -> None:
    """Each candidate explains its territory, need, eligibility, agreement, capacity and answers."""
    d = make_directory([partner("pa", capacity=3, coverage=(MEL,))])
    (candidate,) = match(d, ARREARS, LILLE)
    assert candidate.reasons == (
        f"covers {MEL} (epci Métropole Européenne de Lille)",
        "exact need",
        "open to all",
        "no sender: agreement not checked",
        "capacity 3 left",
        "no recent answers",
    )
