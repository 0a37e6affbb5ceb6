"""Property: whatever the directory and the query, no candidate is ever outside its coverage,
its needs, its eligibility, the agreements or its capacity; and nobody who fits is missed."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from partnerbus.directory import match
from partnerbus.schemas import Agreement, Eligibility, Partner, Profile

from .conftest import (
    ARRAS,
    ARREARS,
    HOARDING,
    HOUSING,
    KEEP_HOME,
    LILLE,
    QPV_ROUBAIX,
    RIGHTS,
    ROUBAIX,
    TERRITORIES,
    make_directory,
)

PARENT = {t.code: t.parent for t in TERRITORIES}
CODES = [t.code for t in TERRITORIES]
NEEDS = [ARREARS, HOUSING, KEEP_HOME, HOARDING, RIGHTS, "difficultes-administratives-ou-juridiques"]
NEED_PARENT = {
    ARREARS: HOUSING,
    KEEP_HOME: HOUSING,
    HOARDING: KEEP_HOME,
    RIGHTS: "difficultes-administratives-ou-juridiques",
}
ORGS = ["o1", "o2", "o3"]
AGE_BANDS = ["under-25", "25-59", "60-74", "75-plus"]
HOUSEHOLDS = ["single", "couple", "family", "single-parent", "other"]
PUBLICS = ["femmes", "seniors", "familles", "residents-qpv-frr", "tous-publics"]


def chain_of(code: str | None, parents: dict) -> list[str]:
    out = []
    while code is not None:
        out.append(code)
        code = parents.get(code)
    return out


@st.composite
def partners(draw: st.DrawFn, pid: str) -> Partner:
    return Partner(
        id=pid,
        name=pid,
        kind=draw(st.sampled_from(["ccas-cias", "bailleur-social", "caf"])),
        organisation=draw(st.sampled_from(ORGS)),
        needs=tuple(draw(st.sets(st.sampled_from(NEEDS), max_size=3))),
        coverage=tuple(draw(st.sets(st.sampled_from(CODES), min_size=1, max_size=3))),
        eligibility=Eligibility(
            age_bands=tuple(draw(st.sets(st.sampled_from(AGE_BANDS), max_size=2))),
            households=tuple(draw(st.sets(st.sampled_from(HOUSEHOLDS), max_size=2))),
            publics=tuple(draw(st.sets(st.sampled_from(PUBLICS), max_size=2))),
            qpv_only=draw(st.booleans()),
        )
        if draw(st.booleans())
        else Eligibility(),
        capacity=draw(st.none() | st.integers(0, 3)),
        capacity_status=draw(
            st.sampled_from(
                [
                    "capacity",
                    "capacity",
                    "no-capacity",
                    "waitlist",
                    "additional-assessment-required",
                ]
            )
        ),
    )


agreements = st.builds(
    Agreement,
    from_org=st.sampled_from(ORGS),
    to_org=st.sampled_from(ORGS),
    needs=st.sets(st.sampled_from(NEEDS), max_size=2).map(tuple),
)
profiles = st.none() | st.builds(
    Profile,
    age_band=st.none() | st.sampled_from(AGE_BANDS),
    household=st.none() | st.sampled_from(HOUSEHOLDS),
    # QN0620001 and QN9999999 are unknown to the directory: they must never qualify
    qpv=st.none() | st.sampled_from([QPV_ROUBAIX, "QN0620001", "QN9999999"]),
    publics=st.sets(st.sampled_from(PUBLICS), max_size=2).map(tuple),
)


def oracle_eligible(p: Partner, commune: str, profile: Profile | None) -> bool:
    e = p.eligibility
    if e.age_bands and (profile is None or profile.age_band not in e.age_bands):
        return False
    if e.households and (profile is None or profile.household not in e.households):
        return False
    # a QPV counts only when the directory knows it and it lies in the person's commune
    qpv = profile.qpv if profile else None
    resident = qpv is not None and PARENT.get(qpv) == commune
    if e.qpv_only and not resident:
        return False
    if e.publics and "tous-publics" not in e.publics:
        have = set(profile.publics) if profile else set()
        if resident:
            have.add("residents-qpv-frr")
        if profile and profile.age_band in ("60-74", "75-plus"):
            have.add("seniors")
        if profile and profile.household in ("family", "single-parent"):
            have.add("familles")
        if not have & set(e.publics):
            return False
    return True


def oracle_fits(
    p: Partner,
    need: str,
    commune: str,
    profile: Profile | None,
    sender: Partner | None,
    rules: list[Agreement],
    exclude: frozenset[str],
) -> bool:
    places = set(chain_of(commune, PARENT))
    if profile and profile.qpv and PARENT.get(profile.qpv) == commune:
        places.add(profile.qpv)
    need_chain = chain_of(need, NEED_PARENT)
    if not places & set(p.coverage):
        return False
    if p.kind == "bailleur-social":
        if need not in p.needs:
            return False
    elif not set(need_chain) & set(p.needs):
        return False
    if p.capacity_status == "no-capacity" or p.capacity == 0:
        return False
    if p.id in exclude or (sender is not None and p.id == sender.id):
        return False
    if sender is not None and sender.organisation != p.organisation:
        allowed = [
            a for a in rules if (a.from_org, a.to_org) == (sender.organisation, p.organisation)
        ]
        if not any(not a.needs or set(a.needs) & set(need_chain) for a in allowed):
            return False
    return oracle_eligible(p, commune, profile)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple:
    count = draw(st.integers(1, 12))
    ps = [draw(partners(f"p{i:02d}")) for i in range(count)]
    rules = draw(st.lists(agreements, max_size=6))
    need = draw(st.sampled_from(NEEDS))
    commune = draw(st.sampled_from([LILLE, ROUBAIX, ARRAS]))
    profile = draw(profiles)
    sender = draw(st.none() | st.sampled_from(ps))
    exclude = frozenset(draw(st.sets(st.sampled_from([p.id for p in ps]), max_size=2)))
    return ps, rules, need, commune, profile, sender, exclude


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_candidates_are_exactly_the_partners_that_fit(scenario: tuple) -> None:
    """Every candidate covers the commune, serves the need, takes the person, is reachable and has room; none that fits is missing."""
    ps, rules, need, commune, profile, sender, exclude = scenario
    d = make_directory(ps, rules)
    candidates = match(d, need, commune, profile, sender.id if sender else None, exclude)
    got = [c.partner_id for c in candidates]
    for c in candidates:
        assert oracle_fits(c.partner, need, commune, profile, sender, rules, exclude), c
    expected = {p.id for p in ps if oracle_fits(p, need, commune, profile, sender, rules, exclude)}
    assert set(got) == expected
    assert len(got) == len(set(got))
    assert [c.rank for c in candidates] == list(range(1, len(candidates) + 1))
    assert [c.score for c in candidates] == sorted(c.score for c in candidates)
