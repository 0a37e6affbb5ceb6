"""Consent rules: scope, validity, revocation, the reason when consent is lacking."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from partnerbus.rules import (
    DURATIONS,
    ConsentDecision,
    ConsentRecord,
    covered_needs,
    evaluate_consent,
    expiring_soon,
    need_covered,
    valid_until_for,
)
from partnerbus.schemas import ConsentGranted, ConsentScope

T0 = datetime(2026, 1, 1, tzinfo=UTC)
ARREARS = "logement-hebergement--reduire-les-impayes-de-loyer"
KEEP_HOME = "logement-hebergement--se-maintenir-dans-le-logement"
HOUSING = "logement-hebergement"
DEBT = "difficultes-financieres--situation-dendettement-surendettement"
PERSON = "tenant-0001"


def consent(
    consent_id: str = "c-1",
    *,
    person_ref: str = PERSON,
    needs: tuple[str, ...] = (HOUSING,),
    kinds: tuple[str, ...] = ("ccas-cias",),
    partners: tuple[str, ...] = (),
    granted_at: datetime = T0,
    valid_until: datetime = T0 + timedelta(days=365),
    revoked_at: datetime | None = None,
) -> ConsentRecord:
    return ConsentRecord(
        consent_id=consent_id,
        person_ref=person_ref,
        scope=ConsentScope(needs=needs, partner_kinds=kinds, partners=partners),
        collected_by="a.martin",
        agency="agence-lille-sud",
        method="oral",
        granted_at=granted_at,
        valid_until=valid_until,
        revoked_at=revoked_at,
    )


def decide(
    consents: list[ConsentRecord],
    now: datetime = T0 + timedelta(days=10),
    *,
    need: str = ARREARS,
    partner_id: str = "ccas-lille",
    partner_kind: str = "ccas-cias",
) -> ConsentDecision:
    return evaluate_consent(consents, PERSON, need, partner_id, partner_kind, now)


# need_covered ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("scope_need", "need", "covered"),
    [
        (ARREARS, ARREARS, True),
        (HOUSING, ARREARS, True),
        (HOUSING, HOUSING, True),
        (ARREARS, HOUSING, False),
        (ARREARS, KEEP_HOME, False),
        ("logement", ARREARS, False),
        ("logement-hebergement-bis", ARREARS, False),
        (HOUSING, DEBT, False),
        ("local-accumulation", "local-accumulation--desencombrement", True),
        ("local-accumulation--desencombrement", "local-accumulation", False),
        ("local-accumulation", "accumulation--desencombrement", False),
        (HOUSING, "local-logement-hebergement--x", False),
    ],
)
def test_a_parent_code_covers_its_children_and_nothing_else(
    scope_need: str, need: str, covered: bool
) -> None:
    """A scope need covers itself and, when a parent, its children; never a sibling or parent."""
    assert need_covered(scope_need, need) is covered


# allowed --------------------------------------------------------------------------------
def test_a_valid_consent_for_the_kind_allows_and_says_why() -> None:
    """A consent covering the parent need for the partner's kind grants, with a readable detail."""
    decision = decide([consent("c-12", valid_until=datetime(2027, 1, 1, tzinfo=UTC))])
    assert decision.allowed
    assert decision.reason == "granted"
    assert decision.consent_id == "c-12"
    assert decision.detail == (
        "consent c-12 (oral, by a.martin) covers logement-hebergement "
        "for kind ccas-cias until 2027-01-01"
    )


def test_a_consent_naming_the_partner_allows_whatever_its_kinds() -> None:
    """A consent naming the partner id allows even though no kind matches."""
    decision = decide([consent(kinds=(), partners=("ccas-lille",))])
    assert decision.allowed
    assert "for partner ccas-lille" in decision.detail


def test_the_consent_granted_event_becomes_a_record() -> None:
    """from_event copies every field, and a new record is not revoked."""
    event = ConsentGranted(
        message_id="m-1",
        occurred_at=T0,
        consent_id="c-7",
        person_ref=PERSON,
        scope=ConsentScope(needs=(HOUSING,), partner_kinds=("caf",)),
        collected_by="a.martin",
        agency="agence-lille-sud",
        method="sms",
        granted_at=T0,
        valid_until=T0 + DURATIONS["6m"],
    )
    record = ConsentRecord.from_event(event)
    assert record == ConsentRecord(
        consent_id="c-7",
        person_ref=PERSON,
        scope=event.scope,
        collected_by="a.martin",
        agency="agence-lille-sud",
        method="sms",
        granted_at=T0,
        valid_until=T0 + timedelta(days=182),
        revoked_at=None,
    )


def test_validity_starts_at_the_grant_and_ends_just_before_valid_until() -> None:
    """granted_at <= now < valid_until: the first instant allows, the end instant does not."""
    c = consent(valid_until=T0 + timedelta(days=1))
    assert decide([c], now=T0).allowed
    assert decide([c], now=T0 + timedelta(days=1) - timedelta(microseconds=1)).allowed
    assert decide([c], now=T0 + timedelta(days=1)).reason == "expired"
    assert decide([c], now=T0 - timedelta(microseconds=1)).reason == "not-yet-valid"


def test_a_revocation_counts_from_its_own_instant() -> None:
    """revoked_at <= now is revoked; a revocation dated later has not happened yet."""
    c = consent(revoked_at=T0 + timedelta(days=5))
    assert decide([c], now=T0 + timedelta(days=5)).reason == "revoked"
    assert decide([c], now=T0 + timedelta(days=5) - timedelta(seconds=1)).allowed


def test_among_several_allowing_consents_the_longest_lasting_wins() -> None:
    """The consent with the latest valid_until is the one recorded on the referral."""
    short = consent("c-a", valid_until=T0 + timedelta(days=30))
    long = consent("c-b", valid_until=T0 + timedelta(days=300))
    assert decide([short, long]).consent_id == "c-b"
    assert decide([long, short]).consent_id == "c-b"


def test_equal_ends_are_broken_by_the_smallest_consent_id() -> None:
    """With the same valid_until, the smallest consent_id wins whatever the input order."""
    a, b = consent("c-a"), consent("c-b")
    assert decide([b, a]).consent_id == "c-a"
    assert decide([a, b]).consent_id == "c-a"


def test_a_valid_consent_wins_over_revoked_and_expired_ones() -> None:
    """One allowing consent is enough, whatever else the person has."""
    revoked = consent("c-a", revoked_at=T0)
    expired = consent("c-b", valid_until=T0 + timedelta(days=1))
    valid = consent("c-c")
    assert decide([revoked, expired, valid]).consent_id == "c-c"


# refused: the reason ---------------------------------------------------------------------
def test_no_consent_at_all_is_missing() -> None:
    """A person without any consent gets "missing" and no consent id."""
    decision = decide([])
    assert (decision.allowed, decision.reason, decision.consent_id) == (False, "missing", None)
    assert PERSON in decision.detail


def test_other_peoples_consents_do_not_count() -> None:
    """A consent of someone else is ignored: "missing", not "granted"."""
    assert decide([consent(person_ref="tenant-0002")]).reason == "missing"


def test_a_consent_for_another_need_is_out_of_scope() -> None:
    """A consent for debt does not let the bus refer rent arrears."""
    decision = decide([consent(needs=(DEBT,))])
    assert decision.reason == "out-of-scope"
    assert decision.consent_id == "c-1"
    assert ARREARS in decision.detail
    assert DEBT in decision.detail


def test_a_consent_for_another_partner_kind_is_out_of_scope() -> None:
    """A consent for the CCAS does not let the bus refer to the CAF."""
    decision = decide([consent()], partner_id="caf-59", partner_kind="caf")
    assert decision.reason == "out-of-scope"
    assert "kind ccas-cias" in decision.detail


def test_a_child_consent_does_not_cover_its_parent_need() -> None:
    """A consent for arrears does not cover the whole housing theme."""
    assert decide([consent(needs=(ARREARS,))], need=HOUSING).reason == "out-of-scope"


def test_an_expired_consent_in_scope_is_expired() -> None:
    """The only in-scope consent ended: "expired", naming it and its end."""
    decision = decide([consent(valid_until=T0 + timedelta(days=2))])
    assert decision.reason == "expired"
    assert decision.consent_id == "c-1"
    assert "expired on 2026-01-03" in decision.detail


def test_a_revoked_consent_in_scope_is_revoked() -> None:
    """The only in-scope consent was revoked: "revoked", naming it and when."""
    decision = decide([consent(revoked_at=T0 + timedelta(days=3, hours=9, minutes=30))])
    assert decision.reason == "revoked"
    assert "revoked on 2026-01-04T09:30+00:00" in decision.detail


def test_a_revoked_expired_consent_is_revoked() -> None:
    """A consent both revoked and past its end reads as revoked: the revocation wins."""
    c = consent(valid_until=T0 + timedelta(days=2), revoked_at=T0 + timedelta(days=1))
    assert decide([c], now=T0 + timedelta(days=10)).reason == "revoked"


def test_a_future_consent_in_scope_is_not_yet_valid() -> None:
    """A consent starting later: "not-yet-valid", with its start, not "missing"."""
    c = consent(granted_at=T0 + timedelta(days=20), valid_until=T0 + timedelta(days=50))
    decision = decide([c])
    assert decision.reason == "not-yet-valid"
    assert "only from 2026-01-21" in decision.detail


def test_a_future_consent_is_reported_before_an_ended_one() -> None:
    """Waiting for a consent already given beats asking again after an old one ended."""
    old = consent("c-old", revoked_at=T0 + timedelta(days=1))
    future = consent("c-new", granted_at=T0 + timedelta(days=20))
    decision = decide([old, future])
    assert (decision.reason, decision.consent_id) == ("not-yet-valid", "c-new")


def test_the_earliest_future_consent_is_reported() -> None:
    """Of two consents starting later, the one starting first is named."""
    later = consent("c-a", granted_at=T0 + timedelta(days=40))
    sooner = consent("c-b", granted_at=T0 + timedelta(days=20))
    assert decide([later, sooner]).consent_id == "c-b"


def test_a_renewal_that_lapsed_after_an_old_revocation_reads_expired() -> None:
    """The person's latest word decides: revoked long ago, re-granted, lapsed: "expired"."""
    revoked = consent("c-a", revoked_at=T0 + timedelta(days=1))
    lapsed = consent("c-b", granted_at=T0 + timedelta(days=2), valid_until=T0 + timedelta(days=5))
    decision = decide([revoked, lapsed])
    assert (decision.reason, decision.consent_id) == ("expired", "c-b")


def test_a_revocation_after_an_old_expiry_reads_revoked() -> None:
    """The person's latest word decides: lapsed long ago, re-granted, revoked: "revoked"."""
    lapsed = consent("c-a", valid_until=T0 + timedelta(days=2))
    revoked = consent("c-b", granted_at=T0 + timedelta(days=3), revoked_at=T0 + timedelta(days=4))
    decision = decide([lapsed, revoked])
    assert (decision.reason, decision.consent_id) == ("revoked", "c-b")


def test_a_revocation_at_the_very_end_of_another_consent_wins() -> None:
    """On a tie between an expiry and a revocation, the explicit revocation is reported."""
    end = T0 + timedelta(days=3)
    lapsed = consent("c-a", valid_until=end)
    revoked = consent("c-b", revoked_at=end)
    assert decide([lapsed, revoked]).reason == "revoked"


def test_an_ended_consent_in_scope_beats_a_valid_one_out_of_scope() -> None:
    """What the advisor must renew matters more than an unrelated valid consent."""
    unrelated = consent("c-a", needs=(DEBT,))
    lapsed = consent("c-b", valid_until=T0 + timedelta(days=2))
    assert decide([unrelated, lapsed]).reason == "expired"


def test_out_of_scope_names_the_closest_consent() -> None:
    """Out of scope, a valid consent covering the need is named before others."""
    other_need = consent("c-a", needs=(DEBT,))
    right_need_wrong_kind = consent("c-b", kinds=("caf",))
    ended_right_need = consent("c-c", kinds=("caf",), valid_until=T0 + timedelta(days=1))
    decision = decide([other_need, ended_right_need, right_need_wrong_kind])
    assert (decision.reason, decision.consent_id) == ("out-of-scope", "c-b")


def test_out_of_scope_prefers_a_valid_consent_to_an_ended_one() -> None:
    """Out of scope and none covers the need: a valid consent is named before an ended one."""
    ended = consent("c-a", needs=(DEBT,), valid_until=T0 + timedelta(days=1))
    valid = consent("c-b", needs=(DEBT,))
    assert decide([ended, valid]).consent_id == "c-b"


# covered_needs, expiring_soon, durations ------------------------------------------------
def test_covered_needs_decides_each_need_in_order() -> None:
    """One decision per need, keyed by need, in the order given."""
    decisions = covered_needs(
        iter([consent(needs=(ARREARS,))]),
        PERSON,
        [ARREARS, KEEP_HOME],
        "ccas-lille",
        "ccas-cias",
        T0 + timedelta(days=1),
    )
    assert list(decisions) == [ARREARS, KEEP_HOME]
    assert decisions[ARREARS].allowed
    assert decisions[KEEP_HOME].reason == "out-of-scope"


def test_expiring_soon_lists_valid_consents_ending_within_the_window() -> None:
    """Only valid, unrevoked consents ending within the window, soonest first."""
    now = T0 + timedelta(days=100)
    ends_in_3 = consent("c-a", valid_until=now + timedelta(days=3))
    ends_in_14 = consent("c-b", valid_until=now + timedelta(days=14))
    ends_in_15 = consent("c-c", valid_until=now + timedelta(days=15))
    already_ended = consent("c-d", valid_until=now)
    revoked = consent("c-e", valid_until=now + timedelta(days=2), revoked_at=now)
    future = consent("c-f", granted_at=now + timedelta(days=1), valid_until=now + timedelta(days=5))
    found = expiring_soon(
        [ends_in_15, ends_in_14, revoked, already_ended, ends_in_3, future], now, timedelta(days=14)
    )
    assert [c.consent_id for c in found] == ["c-a", "c-b"]


def test_expiring_soon_ties_are_ordered_by_consent_id() -> None:
    """Consents ending together are listed by consent_id."""
    b, a = (
        consent("c-b", valid_until=T0 + timedelta(days=2)),
        consent("c-a", valid_until=T0 + timedelta(days=2)),
    )
    assert [c.consent_id for c in expiring_soon([b, a], T0, timedelta(days=7))] == ["c-a", "c-b"]


@pytest.mark.parametrize(("duration", "days"), [("1d", 1), ("1m", 30), ("6m", 182), ("1y", 365)])
def test_fixed_durations_give_the_end_of_validity(duration: str, days: int) -> None:
    """Each fixed duration adds its number of days to the grant."""
    assert valid_until_for(T0, duration) == T0 + timedelta(days=days)


def test_an_unknown_duration_is_refused_with_the_choices() -> None:
    """An unknown duration raises ValueError listing the fixed ones."""
    with pytest.raises(
        ValueError, match=r"unknown consent duration '3w': choose one of 1d, 1m, 6m, 1y"
    ):
        valid_until_for(T0, "3w")


def test_consent_state_follows_the_dates() -> None:
    """state() reads valid, revoked, expired or not-yet-valid from the dates alone."""
    c = consent(valid_until=T0 + timedelta(days=2))
    assert c.state(T0 - timedelta(seconds=1)) == "not-yet-valid"
    assert c.state(T0) == "valid"
    assert c.state(T0 + timedelta(days=2)) == "expired"
    assert replace(c, revoked_at=T0).state(T0) == "revoked"


# property --------------------------------------------------------------------------------
NEEDS = (HOUSING, ARREARS, KEEP_HOME, DEBT, "difficultes-financieres", "local-x", "local-x--y")
KINDS = ("ccas-cias", "caf", "siao", "bailleur-social")
PARTNERS = ("ccas-lille", "caf-59", "siao-59", "lmh")
PEOPLE = ("tenant-0001", "tenant-0002")
HOURS = st.integers(min_value=0, max_value=24 * 60)


@st.composite
def consents(draw: st.DrawFn) -> list[ConsentRecord]:
    records = []
    for index in range(draw(st.integers(min_value=0, max_value=6))):
        start = draw(HOURS)
        length = draw(st.integers(min_value=1, max_value=24 * 30))
        revoked_after = draw(st.none() | st.integers(min_value=0, max_value=24 * 40))
        kinds = tuple(draw(st.sets(st.sampled_from(KINDS), max_size=2)))
        partners = tuple(
            draw(st.sets(st.sampled_from(PARTNERS), min_size=0 if kinds else 1, max_size=2))
        )
        records.append(
            consent(
                f"c-{index}",
                person_ref=draw(st.sampled_from(PEOPLE)),
                needs=tuple(draw(st.sets(st.sampled_from(NEEDS), min_size=1, max_size=3))),
                kinds=kinds,
                partners=partners,
                granted_at=T0 + timedelta(hours=start),
                valid_until=T0 + timedelta(hours=start + length),
                revoked_at=None
                if revoked_after is None
                else T0 + timedelta(hours=start + revoked_after),
            )
        )
    return records


@settings(max_examples=300, deadline=None)
@given(
    records=consents(),
    now_hours=HOURS,
    person=st.sampled_from(PEOPLE),
    need=st.sampled_from(NEEDS),
    partner=st.sampled_from(PARTNERS),
    kind=st.sampled_from(KINDS),
)
def test_allowed_implies_a_valid_consent_of_that_person_covers_need_and_partner(
    records: list[ConsentRecord], now_hours: int, person: str, need: str, partner: str, kind: str
) -> None:
    """Whenever the gate allows, the named consent is the person's, valid now, in scope; and
    whenever such a consent exists, the gate allows."""
    now = T0 + timedelta(hours=now_hours)
    decision = evaluate_consent(records, person, need, partner, kind, now)

    def grants(c: ConsentRecord) -> bool:
        return (
            c.person_ref == person
            and c.granted_at <= now < c.valid_until
            and (c.revoked_at is None or c.revoked_at > now)
            and any(n == need or need.startswith(n + "--") for n in c.scope.needs)
            and (partner in c.scope.partners or kind in c.scope.partner_kinds)
        )

    by_id = {c.consent_id: c for c in records}
    if decision.allowed:
        assert decision.reason == "granted"
        assert decision.consent_id is not None
        assert grants(by_id[decision.consent_id])
    else:
        assert not any(grants(c) for c in records)
        assert decision.reason != "granted"
        if decision.consent_id is None:
            assert decision.reason == "missing"
            assert not any(c.person_ref == person for c in records)
        else:
            assert by_id[decision.consent_id].person_ref == person


@settings(max_examples=200, deadline=None)
@given(
    records=consents(),
    now_hours=HOURS,
    need=st.sampled_from(NEEDS),
    partner=st.sampled_from(PARTNERS),
    kind=st.sampled_from(KINDS),
    data=st.data(),
)
def test_the_decision_does_not_depend_on_the_order_of_consents(
    records: list[ConsentRecord],
    now_hours: int,
    need: str,
    partner: str,
    kind: str,
    data: st.DataObject,
) -> None:
    """Any permutation of the same consents gives the same decision, detail included."""
    now = T0 + timedelta(hours=now_hours)
    shuffled = data.draw(st.permutations(records))
    assert evaluate_consent(records, PERSON, need, partner, kind, now) == evaluate_consent(
        shuffled, PERSON, need, partner, kind, now
    )
