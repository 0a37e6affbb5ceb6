"""`match` against a straightforward reference: every partner checked one by one, scored
as docs/DIRECTORY.md describes, sorted on the score. `match` itself reads precomputed
indexes (pre-sorted entry tuples, reachable entries per sender, prebuilt scores): whatever
the directory, the query and the live state, both must give the very same list."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from partnerbus.directory import Directory, match
from partnerbus.directory.match import eligible
from partnerbus.directory.model import REMAINING_CAP, directory_from_records
from partnerbus.directory.territory import FRANCE_ALIASES, LEVEL_RANK, Territory, ancestors
from partnerbus.schemas import Agreement, Profile

from .conftest import (
    ARREARS,
    HOUSING,
    KEEP_HOME,
    LILLE,
    MEL,
    NORD,
    QPV_ROUBAIX,
    ROUBAIX,
    make_directory,
    needs,
    partner,
)
from .test_directory_properties import scenarios

CAPACITY_RANK = {"capacity": 0, "additional-assessment-required": 1, "waitlist": 2}


def reference(
    d: Directory,
    need: str,
    commune: str,
    profile: Profile | None = None,
    sender: str | None = None,
    exclude: frozenset[str] = frozenset(),
    limit: int | None = None,
    home_visit: bool = False,
) -> list[tuple[str, int, tuple[object, ...], tuple[str, ...]]]:
    """(partner id, rank, score, reasons) of every candidate, the slow and obvious way."""
    if not d.has_commune(commune) or not d.has_need(need):
        return []
    # the commune, its EPCI, then its own département (whichever its EPCI is filed under)
    places = [t.code for t in ancestors(d.territories, commune)]
    if profile is not None and profile.qpv:
        qpv = d.territories.get(profile.qpv)
        if qpv is not None and qpv.parent == commune:
            places.insert(0, profile.qpv)
    need_chain: list[str] = []
    current: str | None = need
    while current is not None and current not in need_chain:
        need_chain.append(current)
        current = d.needs[current].parent
    sender_org = d.partner(sender).organisation if sender is not None else None
    rows = []
    for p in d.partners():
        if p.id == sender or p.id in exclude:
            continue
        covered = {"france" if c in FRANCE_ALIASES else c for c in p.coverage}
        where = None
        for place in places:
            if place not in covered:
                continue
            for need_level, code in enumerate(need_chain):
                if code in p.needs and not (need_level and p.kind == "bailleur-social"):
                    where = (place, need_level, code)
                    break
            if where is not None:
                break
        if where is None:
            continue
        place, need_level, code = where
        status, remaining = d.capacity(p.id)
        if status == "no-capacity" or remaining == 0:
            continue
        ok, elig_reason = eligible(d, p, commune, profile)
        if not ok:
            continue
        elig_rank = 1 if elig_reason == "open to all" else 0
        if sender_org is None:
            agr_rank, agr_reason = 1, "no sender: agreement not checked"
        elif sender_org == p.organisation:
            agr_rank, agr_reason = 1, f"same organisation {sender_org}"
        else:
            rule = d.agreement_rule(sender_org, p.organisation)
            if rule is None:
                continue
            if rule.needs & set(need_chain):
                agr_rank, agr_reason = 0, rule.scoped_reason
            elif rule.general:
                agr_rank, agr_reason = 1, rule.reason
            else:
                continue
        accepted, answered = d.acceptance(p.id)
        rate = -round((accepted + 1) / (answered + 2), 3) if answered else -0.5
        score = (
            LEVEL_RANK[d.territories[place].level],
            need_level,
            elig_rank,
            agr_rank,
            CAPACITY_RANK[status],
            max(-remaining, -REMAINING_CAP) if remaining is not None else 0,
            rate,
            p.id,
        )
        visits = "local-a-domicile" in p.modes
        if home_visit:
            score = (*score[:4], 0 if visits else 1, *score[4:])
        if status == "capacity":
            capacity = f"capacity {remaining} left" if remaining is not None else "capacity open"
        else:
            capacity = status + (f" ({remaining} left)" if remaining is not None else "")
        reasons = (
            d.where_reason(place),
            "exact need" if need_level == 0 else f"parent need {code}",
            elig_reason,
            agr_reason,
            capacity,
            f"accepted {accepted}/{answered} recently" if answered else "no recent answers",
        )
        if home_visit:
            wish = "visits at home" if visits else "no home visits"
            reasons = (*reasons, f"{wish} (home visit wanted)")
        rows.append((score, reasons))
    rows.sort()
    out = [(s[-1], rank, s, r) for rank, (s, r) in enumerate(rows, start=1)]
    return out[:limit] if limit is not None else out


def fast(d: Directory, *args: object, **kwargs: object) -> list[tuple[object, ...]]:
    return [(c.partner_id, c.rank, c.score, c.reasons) for c in match(d, *args, **kwargs)]  # type: ignore[arg-type]


STATUSES = ["capacity", "no-capacity", "waitlist", "additional-assessment-required"]
events = st.lists(
    st.tuples(
        st.integers(0, 11),
        st.sampled_from(STATUSES) | st.booleans(),
        st.none() | st.integers(0, 4) | st.just(10**7),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    scenarios(),
    events,
    st.none() | st.integers(1, 4),
    st.booleans(),
    st.sets(st.integers(0, 11)),
)
def test_match_is_the_reference_ranking(
    scenario: tuple, live: list, limit: int | None, home_visit: bool, visiting: set[int]
) -> None:
    ps, rules, need, commune, profile, sender, exclude = scenario
    home = ("en-presentiel", "local-a-domicile")
    ps = [p.model_copy(update={"modes": home}) if i in visiting else p for i, p in enumerate(ps)]
    d = make_directory(ps, rules)
    for i, what, remaining in live:
        pid = ps[i % len(ps)].id
        if isinstance(what, bool):
            d.record_answer(pid, what)
        else:
            d.apply_capacity(pid, what, remaining)
    sender_id = sender.id if sender else None
    args = (need, commune, profile, sender_id, exclude, limit)
    expected = reference(d, *args, home_visit=home_visit)
    assert fast(d, *args, home_visit=home_visit) == expected
    # and again: nothing a match reads is left changed by the previous one
    assert fast(d, *args, home_visit=home_visit) == expected


def test_a_partner_met_twice_ranks_at_its_best_place() -> None:
    """Nested coverage codes, a repeated France code, a need listed with its parent: the
    partner is a candidate once, for its most specific territory and need."""
    d = make_directory(
        [
            partner("nested", coverage=(NORD, LILLE, MEL), needs=(HOUSING, ARREARS)),
            partner("twice-france", coverage=("france", "99100"), needs=(ARREARS, ARREARS)),
            partner("qpv-and-town", coverage=(ROUBAIX, QPV_ROUBAIX), needs=(HOUSING,)),
            partner("landlord", kind="bailleur-social", coverage=(LILLE, NORD), needs=(HOUSING,)),
            partner(
                "landlord-exact",
                kind="bailleur-social",
                coverage=(LILLE, "france"),
                needs=(HOUSING, ARREARS),
            ),
        ]
    )
    for commune, profile in (
        (LILLE, None),
        (ROUBAIX, None),
        (ROUBAIX, Profile(qpv=QPV_ROUBAIX)),
    ):
        got = fast(d, ARREARS, commune, profile)
        assert got == reference(d, ARREARS, commune, profile)
        assert len({pid for pid, *_ in got}) == len(got)
    lille = {pid: score for pid, _, score, _ in fast(d, ARREARS, LILLE)}
    assert lille["nested"][:2] == (LEVEL_RANK["commune"], 0)
    assert lille["landlord-exact"][:2] == (LEVEL_RANK["commune"], 0)
    assert "landlord" not in lille


def test_live_changes_reorder_the_precomputed_lists() -> None:
    d = make_directory([partner(f"p{i}", capacity=i + 1) for i in range(6)])
    assert [pid for pid, *_ in fast(d, ARREARS, LILLE)] == [f"p{i}" for i in range(5, -1, -1)]
    d.apply_capacity("p0", "capacity", 50)
    d.apply_capacity("p5", "waitlist", 3)
    for _ in range(3):
        d.record_answer("p2", True)
    d.record_answer("p3", False)
    assert fast(d, ARREARS, LILLE) == reference(d, ARREARS, LILLE)
    assert [pid for pid, *_ in fast(d, ARREARS, LILLE)][:2] == ["p0", "p4"]
    assert fast(d, ARREARS, LILLE, limit=2) == reference(d, ARREARS, LILLE, limit=2)


def test_a_territory_chain_that_does_not_go_up_the_levels_still_ranks() -> None:
    """A commune attached to another commune (not something the loaders build): the two
    communes' partners rank together, by score."""
    territories = [
        Territory("france", "France", "france", None),
        Territory("R32", "Hauts-de-France", "region", "france"),
        Territory(NORD, "Nord", "departement", "R32"),
        Territory(LILLE, "Lille", "commune", NORD),
        Territory("59999", "Hameau", "commune", LILLE),
    ]
    d = directory_from_records(
        territories=territories,
        needs=needs(),
        partners=[
            partner("a-lille", coverage=(LILLE,), capacity=1),
            partner("b-hameau", coverage=("59999",), capacity=5),
            partner("c-hameau", coverage=("59999",), needs=(HOUSING,)),
            partner("d-nord", coverage=(NORD,), needs=(KEEP_HOME, ARREARS)),
        ],
        agreements=[Agreement(from_org="a-lille", to_org="b-hameau")],
    )
    for sender in (None, "a-lille"):
        got = fast(d, ARREARS, "59999", sender=sender)
        assert got == reference(d, ARREARS, "59999", sender=sender)
    assert [pid for pid, *_ in fast(d, ARREARS, "59999")] == [
        "b-hameau",
        "a-lille",
        "c-hameau",
        "d-nord",
    ]


def test_eligibility_and_agreement_rank_before_the_live_state_within_a_group() -> None:
    """Same territory, same need: a service aimed at the person, or reached through an
    agreement naming the need, ranks before one with more room (the pre-sorted lists are
    in live order, so matching has to regroup them)."""
    d = make_directory(
        [
            partner("a-open", capacity=9),
            partner("b-seniors", capacity=1, eligibility={"age_bands": ("75-plus",)}),
            partner("c-open", capacity=5, organisation="o-general"),
            partner("d-scoped", capacity=2, organisation="o-scoped"),
            partner("lmh-recouvrement", organisation="lmh", needs=(KEEP_HOME,)),
        ],
        [
            Agreement(from_org="lmh", to_org="a-open"),
            Agreement(from_org="lmh", to_org="b-seniors"),
            Agreement(from_org="lmh", to_org="o-general"),
            Agreement(from_org="lmh", to_org="o-scoped", needs=(HOUSING,)),
        ],
    )
    senior = Profile(age_band="75-plus")
    assert [pid for pid, *_ in fast(d, ARREARS, LILLE, senior)] == [
        "b-seniors",
        "a-open",
        "c-open",
        "d-scoped",
    ]
    got = fast(d, ARREARS, LILLE, senior, "lmh-recouvrement")
    assert [pid for pid, *_ in got] == ["b-seniors", "d-scoped", "a-open", "c-open"]
    assert [rank for _, rank, *_ in got] == [1, 2, 3, 4]
    for profile in (None, senior):
        for limit in (None, 1, 2, 3):
            assert fast(d, ARREARS, LILLE, profile, "lmh-recouvrement", limit=limit) == (
                reference(d, ARREARS, LILLE, profile, "lmh-recouvrement", limit=limit)
            )
