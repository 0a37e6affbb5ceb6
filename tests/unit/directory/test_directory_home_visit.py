"""A home visit wanted: partners that visit at home (`local-a-domicile`) rank first within
their tier, never above a better territory, need, eligibility or agreement."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from partnerbus.directory import match
from partnerbus.directory.match import NO_VISITS, VISITS
from partnerbus.schemas import Agreement, Eligibility, Profile

from .conftest import ARREARS, HOUSING, LILLE, MEL, make_directory, partner
from .test_directory_match_reference import fast, reference

HOME = ("en-presentiel", "local-a-domicile")


def ids(candidates: list) -> list[str]:
    return [c.partner_id for c in candidates]


def test_a_partner_that_visits_ranks_first_when_the_person_wants_a_home_visit() -> None:
    d = make_directory(
        [
            partner("a-desk"),
            partner("b-remote", modes=("a-distance",)),
            partner("c-home", modes=HOME),
        ]
    )
    wanted = match(d, ARREARS, LILLE, home_visit=True)
    assert ids(wanted) == ["c-home", "a-desk", "b-remote"]
    assert [c.rank for c in wanted] == [1, 2, 3]
    assert VISITS in wanted[0].reasons and NO_VISITS in wanted[1].reasons
    assert [c.score for c in wanted] == sorted(c.score for c in wanted)


def test_without_the_wish_home_visits_change_nothing() -> None:
    d = make_directory([partner("a-desk"), partner("c-home", modes=HOME)])
    plain = match(d, ARREARS, LILLE)
    assert ids(plain) == ["a-desk", "c-home"]
    assert all(VISITS not in c.reasons and NO_VISITS not in c.reasons for c in plain)
    assert all(len(c.reasons) == 6 for c in plain)


def test_a_home_visit_never_outranks_a_more_specific_territory() -> None:
    d = make_directory([partner("a-commune"), partner("b-epci", coverage=(MEL,), modes=HOME)])
    assert ids(match(d, ARREARS, LILLE, home_visit=True)) == ["a-commune", "b-epci"]


def test_a_home_visit_never_outranks_the_exact_need() -> None:
    d = make_directory([partner("a-exact"), partner("b-parent", needs=(HOUSING,), modes=HOME)])
    assert ids(match(d, ARREARS, LILLE, home_visit=True)) == ["a-exact", "b-parent"]


def test_a_home_visit_never_outranks_a_targeted_service_or_a_scoped_agreement() -> None:
    d = make_directory(
        [
            partner("sender", organisation="lmh", needs=()),
            partner("a-general", modes=HOME),
            partner("b-scoped"),
            partner("c-seniors", eligibility=Eligibility(age_bands=("75-plus",))),
        ],
        [
            Agreement(from_org="lmh", to_org="a-general"),
            Agreement(from_org="lmh", to_org="b-scoped", needs=(HOUSING,)),
            Agreement(from_org="lmh", to_org="c-seniors"),
        ],
    )
    senior = Profile(age_band="75-plus")
    assert ids(match(d, ARREARS, LILLE, senior, sender="sender", home_visit=True)) == [
        "c-seniors",
        "b-scoped",
        "a-general",
    ]


def test_a_home_visit_outranks_capacity_and_acceptance_rate_within_the_tier() -> None:
    d = make_directory(
        [partner("a-desk"), partner("b-home", modes=HOME, capacity_status="waitlist")]
    )
    assert ids(match(d, ARREARS, LILLE)) == ["a-desk", "b-home"]
    assert ids(match(d, ARREARS, LILLE, home_visit=True)) == ["b-home", "a-desk"]


@settings(max_examples=60, deadline=None)
@given(
    visiting=st.lists(st.booleans(), min_size=1, max_size=6),
    waitlisted=st.lists(st.booleans(), min_size=6, max_size=6),
)
def test_the_wish_only_reorders_the_same_candidates(
    visiting: list[bool], waitlisted: list[bool]
) -> None:
    """Same candidates with or without the wish; with it, in each tier, every partner that
    visits comes before every one that does not, each side in its usual order."""
    d = make_directory(
        [
            partner(
                f"p{i}",
                modes=HOME if visits else ("en-presentiel",),
                capacity_status="waitlist" if waitlisted[i] else "capacity",
            )
            for i, visits in enumerate(visiting)
        ]
    )
    plain = ids(match(d, ARREARS, LILLE))
    wanted = ids(match(d, ARREARS, LILLE, home_visit=True))
    visitors = {f"p{i}" for i, visits in enumerate(visiting) if visits}
    assert wanted == [p for p in plain if p in visitors] + [p for p in plain if p not in visitors]


@st.composite
def dense_tiers(draw: st.DrawFn) -> tuple[list, list[Agreement]]:
    """Many partners sharing territories, needs, eligibility and agreement ranks: every
    tier holds several, some visiting at home."""
    ps = [partner("sender", organisation="lmh", needs=())]
    rules = []
    for i in range(draw(st.integers(2, 10))):
        pid = f"p{i:02d}"
        ps.append(
            partner(
                pid,
                coverage=(draw(st.sampled_from((LILLE, MEL))),),
                needs=(draw(st.sampled_from((ARREARS, HOUSING))),),
                eligibility=draw(
                    st.sampled_from((Eligibility(), Eligibility(age_bands=("75-plus",))))
                ),
                modes=HOME if draw(st.booleans()) else ("en-presentiel",),
                capacity_status=draw(st.sampled_from(("capacity", "waitlist"))),
            )
        )
        scope = draw(st.sampled_from(((), (HOUSING,))))
        rules.append(Agreement(from_org="lmh", to_org=pid, needs=scope))
    return ps, rules


@settings(max_examples=150, deadline=None)
@given(dense_tiers(), st.none() | st.integers(1, 4))
def test_match_with_the_wish_is_the_reference_ranking(tiers: tuple, limit: int | None) -> None:
    ps, rules = tiers
    d = make_directory(ps, rules)
    senior = Profile(age_band="75-plus")
    args = (ARREARS, LILLE, senior, "sender", frozenset(), limit)
    assert fast(d, *args, home_visit=True) == reference(d, *args, home_visit=True)
    assert fast(d, *args) == reference(d, *args)
