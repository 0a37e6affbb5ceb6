"""Disclosure by recipient role (docs/DISCLOSURE.md): the table agrees with the contract,
and no field ever reaches a role the table does not give it, whatever the message and
whoever receives it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from partnerbus.contract.catalog import CATALOG
from partnerbus.contract.disclosure import disclosure_is_current
from partnerbus.contract.schemas import load_schemas
from partnerbus.directory import Directory, load_sample
from partnerbus.directory.check import find_problems
from partnerbus.rules import (
    ROLE_DISCLOSURE,
    ROLES,
    Disclosed,
    DisclosureError,
    Role,
    disclose,
    internal,
    recipient_roles,
)
from partnerbus.rules.disclosure import (
    DISCLOSURE,
    ENVELOPE,
    WISHES,
    disclosed_parts,
    minimise,
    minimise_preferences,
    receives,
)
from partnerbus.schemas import (
    CapacityChanged,
    ConsentExpiring,
    ConsentRecorded,
    ConsentRejected,
    ConsentRequested,
    Contact,
    Facts,
    NoPartnerFound,
    Partner,
    Preferences,
    Profile,
    Referral,
    ReferralReminder,
    ReferralStalled,
    ReferralStatusChanged,
    ReferralWithdrawn,
    SignalClosed,
)
from partnerbus.schemas.directory import creditor_by_default

NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
NEED = "logement-hebergement--reduire-les-impayes-de-loyer"
SCHEMAS = load_schemas()
OUTBOUND = [c for c in CATALOG if c.outbound]


def default_of(model: type[BaseModel], name: str) -> Any:
    return model.model_fields[name].get_default(call_default_factory=True)


def allowed(table_roles: frozenset[Role], roles: frozenset[Role]) -> bool:
    """The rule of docs/DISCLOSURE.md, written out again: a relation of the recipient may
    see it, and a creditor only what creditors may."""
    relations = roles - {"creditor"}
    if "creditor" in roles and "creditor" not in table_roles:
        return False
    return bool(relations & table_roles)


# ---- the table and the contract ------------------------------------------------------


@pytest.mark.parametrize("contracted", OUTBOUND, ids=lambda c: c.type)
def test_every_field_of_every_message_the_bus_sends_is_in_the_table(contracted) -> None:
    """A new field is never sent by default: the table must say who sees it."""
    table = ROLE_DISCLOSURE[contracted.type]
    assert set(table) == set(contracted.model.model_fields)


@pytest.mark.parametrize("contracted", OUTBOUND, ids=lambda c: c.type)
def test_a_field_the_schema_requires_goes_to_every_recipient_of_the_message(contracted) -> None:
    """So a copy cut for any role is still a valid message of the published contract."""
    table = ROLE_DISCLOSURE[contracted.type]
    receivers = table["message_id"]
    for name in SCHEMAS[contracted.type].get("required", []):
        assert table[name] == receivers, name
    for name, roles in table.items():
        assert roles <= receivers, name
    for name in ENVELOPE:
        assert table[name] == receivers


def test_the_published_document_is_rendered_from_the_table() -> None:
    assert disclosure_is_current()


def test_what_a_partner_wrote_and_why_it_declined_never_reach_a_creditor() -> None:
    """The issue's case, in the table itself."""
    status = ROLE_DISCLOSURE["referral-status-changed"]
    assert "creditor" not in status["note"] | status["outcome"] | status["reason"]
    assert status["note"] == status["outcome"] == frozenset({"advisor"})
    assert "creditor" not in ROLE_DISCLOSURE["signal-closed"]["detail"]
    for part in ("profile", "facts", "contact", "advisor"):
        assert "creditor" not in ROLE_DISCLOSURE["referral"][part]


# ---- random messages × random recipients ----------------------------------------------

text = st.text(alphabet="abcdefghij XYZ-é", min_size=1, max_size=30).map(str.strip).filter(bool)
ids = st.from_regex(r"\A[a-z][a-z0-9-]{2,12}\Z")
partner_ids = st.sampled_from(("ccas-roubaix", "lmh-recouvrement", "lmh-agence-roubaix", "mds"))


preferences = st.builds(
    Preferences,
    through_advisor=st.booleans(),
    do_not_contact=st.booleans(),
    home_visit=st.booleans(),
    languages=st.sampled_from(((), ("fr",), ("ar", "fr"), ("kab",))),
)


@st.composite
def outbound_messages(draw: st.DrawFn) -> BaseModel:
    """Any message the bus sends, with every optional field filled in (or not)."""
    envelope = {"message_id": draw(ids), "occurred_at": NOW}
    maybe = lambda strategy: draw(st.one_of(st.none(), strategy))  # noqa: E731
    kind = draw(st.sampled_from([c.type for c in OUTBOUND]))
    if kind == "referral":
        wishes = maybe(preferences)
        contact = maybe(st.just(Contact(phone="0612345678")))
        return Referral(
            **envelope,
            referral_id=draw(ids),
            signal_ref="s-" + draw(ids),
            attempt=draw(st.integers(1, 5)),
            partner=draw(partner_ids),
            need=NEED,
            person="p-" + draw(ids),
            commune="59512",
            urgency=draw(st.sampled_from(("routine", "urgent", "asap"))),
            due_by=NOW + timedelta(days=10),
            agency="lmh-agence-roubaix",
            advisor=maybe(st.just("s.benali")),
            profile=maybe(st.just(Profile(age_band="25-59", household="family"))),
            facts=maybe(
                st.builds(
                    Facts,
                    arrears_eur=st.just(1200.0),
                    household_size=st.integers(1, 6),
                    note=text,
                )
            ),
            contact=None if wishes and wishes.no_direct_contact else contact,
            preferences=wishes,
            why=draw(st.lists(text, max_size=3).map(tuple)),
        )
    if kind == "referral-withdrawn":
        return ReferralWithdrawn(
            **envelope,
            referral_id=draw(ids),
            partner=draw(partner_ids),
            reason=draw(st.sampled_from(("consent-revoked", "consent-expired"))),
        )
    if kind == "referral-reminder":
        news = draw(st.booleans())
        return ReferralReminder(
            **envelope,
            referral_id=draw(ids),
            partner=draw(partner_ids),
            due_by=NOW,
            reason="no-news" if news else "no-answer",
            last_news_at=NOW - timedelta(days=30) if news else None,
        )
    if kind == "referral-status-changed":
        status = draw(st.sampled_from(("accepted", "rejected", "completed", "expired")))
        reason = draw(st.sampled_from(("unreachable", "not-interested", "full", "other")))
        return ReferralStatusChanged(
            **envelope,
            referral_id=draw(ids),
            partner=draw(partner_ids),
            status=status,
            reason=reason if status == "rejected" or draw(st.booleans()) else None,
            outcome=maybe(text),
            note=maybe(text),
            signal_id=draw(ids),
            need=NEED,
        )
    if kind == "signal-closed":
        return SignalClosed(
            **envelope,
            signal_id=draw(ids),
            need=NEED,
            outcome=draw(st.sampled_from(("consent-refused", "advisor-decides", "completed"))),
            detail=maybe(text),
        )
    if kind == "consent-requested":
        return ConsentRequested(
            **envelope,
            signal_id=draw(ids),
            source="lmh-recouvrement",
            person_ref="T-" + draw(ids),
            commune="59512",
            needs=(NEED,),
            agency="lmh-agence-roubaix",
            advisor=maybe(st.just("s.benali")),
            reason="missing",
            suggested_partners=("ccas-roubaix",),
            reminder=draw(st.booleans()),
            closes_at=maybe(st.just(NOW + timedelta(days=7))),
        )
    if kind == "no-partner-found":
        return NoPartnerFound(
            **envelope,
            signal_id=draw(ids),
            need=NEED,
            commune="59512",
            person_ref="T-" + draw(ids),
            agency="lmh-agence-roubaix",
            tried=("ccas-roubaix",),
            reason=draw(text),
        )
    if kind == "consent-recorded":
        return ConsentRecorded(
            **envelope,
            event_id=draw(ids),
            event=draw(st.sampled_from(["consent-granted", "consent-revoked", "consent-refused"])),
            consent_id=maybe(ids),
            signal_id=maybe(ids),
            person_ref="T-" + draw(ids),
            agency="lmh-agence-roubaix",
            detail=maybe(text),
        )
    if kind == "consent-rejected":
        return ConsentRejected(
            **envelope,
            event_id=draw(ids),
            event=draw(st.sampled_from(["consent-granted", "consent-revoked", "consent-refused"])),
            consent_id=maybe(ids),
            signal_id=maybe(ids),
            person_ref=maybe(st.just("T-" + draw(ids))),
            agency="lmh-agence-roubaix",
            reason=draw(text),
        )
    if kind == "referral-stalled":
        return ReferralStalled(
            **envelope,
            referral_id=draw(ids),
            partner="ccas-roubaix",
            status="accepted",
            signal_id=draw(ids),
            need=NEED,
            last_news_at=NOW - timedelta(days=40),
            reminded_at=NOW - timedelta(days=10),
        )
    assert kind == "consent-expiring"
    return ConsentExpiring(
        **envelope,
        consent_id=draw(ids),
        person_ref="T-" + draw(ids),
        agency="lmh-agence-roubaix",
        valid_until=NOW + timedelta(days=3),
    )


role_sets = st.sets(st.sampled_from(ROLES)).map(frozenset)


@settings(max_examples=400, deadline=None)
@given(message=outbound_messages(), roles=role_sets)
def test_no_field_reaches_a_role_the_table_does_not_give_it(
    message: BaseModel, roles: frozenset[Role]
) -> None:
    """Whatever the message and the recipient's roles: what is sent holds no field those
    roles may not see, keeps every field they may, and is valid against the published
    schema; a message those roles do not receive is not made at all."""
    kind = message.type  # type: ignore[attr-defined]
    table = ROLE_DISCLOSURE[kind]
    if not allowed(table["message_id"], roles):
        with pytest.raises(DisclosureError):
            disclose(message, roles)
        return
    out = disclose(message, roles).message
    model = type(message)
    for name in model.model_fields:
        value = getattr(out, name)
        if allowed(table[name], roles):
            assert value == getattr(message, name), name
        else:
            assert value == default_of(model, name), f"{name} reached {sorted(roles)}"
    jsonschema.validate(json.loads(out.model_dump_json()), SCHEMAS[kind])


# ---- the creditor -------------------------------------------------------------------


def a_rejection(**extra: Any) -> ReferralStatusChanged:
    values: dict[str, Any] = {
        "message_id": "m-1",
        "occurred_at": NOW,
        "referral_id": "r-1",
        "partner": "mds-roubaix",
        "status": "rejected",
        "reason": "not-interested",
        "note": "Mme X. ne souhaite pas être accompagnée (séparation en cours)",
        "signal_id": "s-1",
        "need": NEED,
    }
    return ReferralStatusChanged(**(values | extra))


def test_a_creditor_source_hears_the_status_not_the_reason_nor_the_note() -> None:
    """The recovery service raised the signal: it learns the MDS declined, not why."""
    roles = recipient_roles(
        a_rejection(),
        "lmh-recouvrement",
        source="lmh-recouvrement",
        agency="lmh-agence-roubaix",
        creditor=True,
    )
    assert roles == {"source", "creditor"}
    out = disclose(a_rejection(), roles).message
    assert (out.status, out.referral_id, out.need) == ("rejected", "r-1", NEED)
    assert (out.reason, out.note, out.outcome) == (None, None, None)


def test_an_ordinary_source_hears_the_reason_but_not_the_note() -> None:
    out = disclose(a_rejection(), {"source"}).message
    assert (out.reason, out.note) == ("not-interested", None)


def test_the_advisor_hears_everything_even_when_she_raised_the_signal() -> None:
    roles = recipient_roles(
        a_rejection(),
        "lmh-agence-roubaix",
        source="lmh-agence-roubaix",
        agency="lmh-agence-roubaix",
    )
    assert roles == {"source", "advisor"}
    assert disclose(a_rejection(), roles).message == a_rejection()


def test_a_completion_outcome_never_reaches_a_creditor_of_the_agencys_kind() -> None:
    """Same kind as the agency (bailleur-social) is no longer what decides: the role is."""
    done = a_rejection(status="completed", reason=None, outcome="FSL granted, plan agreed")
    out = disclose(done, {"source", "creditor"}).message
    assert out.outcome is None and out.note is None and out.status == "completed"


def test_a_closing_detail_naming_the_reason_never_reaches_a_creditor() -> None:
    closed = SignalClosed(
        message_id="m-2",
        occurred_at=NOW,
        signal_id="s-1",
        need=NEED,
        outcome="advisor-decides",
        detail="mds-roubaix rejected it (not-interested); the advisor decides what next",
    )
    out = disclose(closed, {"source", "creditor"}).message
    assert out.outcome == "advisor-decides" and out.detail is None
    assert disclose(closed, {"source"}).message.detail == closed.detail


def test_a_creditor_is_never_asked_for_consent() -> None:
    asked = ConsentRequested(
        message_id="m-3",
        occurred_at=NOW,
        signal_id="s-1",
        source="lmh-recouvrement",
        person_ref="T-0001",
        commune="59512",
        needs=(NEED,),
        agency="lmh-recouvrement",
        advisor=None,
        reason="missing",
    )
    roles = recipient_roles(asked, "lmh-recouvrement", creditor=True)
    assert roles == {"advisor", "creditor"}
    assert not receives("consent-requested", roles)
    with pytest.raises(DisclosureError, match="consent-requested"):
        disclose(asked, roles)


def test_a_referral_to_a_creditor_carries_nothing_about_the_person() -> None:
    referral = Referral(
        message_id="r-1",
        occurred_at=NOW,
        referral_id="r-1",
        signal_ref="s-x",
        attempt=1,
        partner="lmh-recouvrement",
        need=NEED,
        person="p-x",
        commune="59512",
        urgency="routine",
        due_by=NOW,
        agency="lmh-agence-roubaix",
        advisor="s.benali",
        facts=Facts(arrears_eur=1200.0, note="advisor's note"),
        contact=Contact(phone="0612345678"),
    )
    roles = recipient_roles(referral, "lmh-recouvrement", creditor=True)
    out = disclose(referral, roles).message
    assert (out.facts, out.contact, out.profile, out.advisor) == (None, None, None, None)
    assert disclose(referral, {"partner"}).message is referral  # nothing cut: no copy


# ---- who is a creditor, and the outbox's door ------------------------------------------


def landlord(pid: str, name: str, **extra: Any) -> Partner:
    return Partner(id=pid, name=name, kind="bailleur-social", organisation="lmh", **extra)


@pytest.mark.parametrize(
    ("partner", "creditor"),
    [
        (landlord("lmh-recouvrement", "LMH — service recouvrement"), True),
        (landlord("lmh-sc", "LMH — service précontentieux"), True),
        (landlord("lmh-proximite", "LMH — équipe de proximité"), False),
        (landlord("lmh-agence-roubaix", "LMH — agence Roubaix"), False),
        (landlord("lmh-recouvrement", "LMH — recouvrement", creditor=False), False),
        (landlord("lmh-dette", "LMH — dettes locatives", creditor=True), True),
        (Partner(id="ccas-x", name="recouvrement", kind="ccas-cias", organisation="ccas-x"), False),
    ],
    ids=lambda v: getattr(v, "id", str(v)),
)
def test_who_is_a_creditor(partner: Partner, creditor: bool) -> None:
    assert partner.is_creditor is creditor
    if partner.creditor is None:
        assert creditor_by_default(partner) is creditor


def test_a_disclosed_message_is_made_by_disclose_only() -> None:
    status = CapacityChanged(
        message_id="c-1", occurred_at=NOW, partner="ccas-roubaix", status="capacity"
    )
    with pytest.raises(TypeError):
        Disclosed(status, frozenset({"partner"}), object())
    assert internal(status).roles == frozenset()


# ---- a creditor is never an agency ---------------------------------------------------


def test_a_creditor_with_advisors_is_no_agency_and_the_directory_check_says_so() -> None:
    """Marked a creditor, an agency's record is skipped by `agency_for` (nobody would ask
    a creditor for consent) and `check` reports the mistake as an error."""
    sample = load_sample()
    agency = sample.agency_for("59512", "lmh")
    assert agency is not None and not sample.is_creditor(agency.id)
    assert sample.is_creditor("lmh-recouvrement") and not sample.is_creditor("lmh-proximite")
    assert not [p for p in find_problems(sample) if "creditor" in p.message]

    marked = Directory(
        territories=sample.territories,
        needs=sample.needs,
        partners=[
            p.model_copy(update={"creditor": True}) if p.id == agency.id else p
            for p in sample.partners()
        ],
        agreements=sample.agreements,
        organisations=sample.organisations,
    )
    assert marked.is_creditor(agency.id)
    found = marked.agency_for("59512", "lmh")
    assert found is None or found.id != agency.id
    (problem,) = [p for p in find_problems(marked) if "creditor" in p.message]
    assert (problem.severity, problem.subject) == ("error", agency.id)


# ---- the person's wishes -----------------------------------------------------------------

KINDS = [*DISCLOSURE, "nouveau-reseau"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_sees_every_wish_of_the_person(kind: str) -> None:
    """Do-not-contact and through-the-advisor change what any partner may do: no kind may
    miss them (and a kind the table does not know gets them by default)."""
    assert disclosed_parts(kind) >= WISHES


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(KINDS), wishes=preferences)
def test_no_kind_gets_contact_details_when_the_person_refused_direct_contact(
    kind: str, wishes: Preferences
) -> None:
    contact = Contact(phone="0612345678", preferred_time="le matin")
    _, _, shown = minimise(kind, Profile(), Facts(), contact, wishes)
    assert (shown is None) == (wishes.no_direct_contact or "contact" not in disclosed_parts(kind))
    assert minimise_preferences(kind, wishes) == (wishes if wishes != Preferences() else None)


def test_a_referral_never_carries_contact_details_the_person_refused() -> None:
    fields = {
        "message_id": "r-1",
        "occurred_at": NOW,
        "referral_id": "r-1",
        "signal_ref": "s-x",
        "attempt": 1,
        "partner": "ccas-roubaix",
        "need": NEED,
        "person": "p-x",
        "commune": "59512",
        "urgency": "routine",
        "due_by": NOW,
        "agency": "lmh-agence-roubaix",
        "contact": Contact(phone="0612345678"),
    }
    for wish in ({"do_not_contact": True}, {"through_advisor": True}):
        with pytest.raises(ValueError, match="no contact"):
            Referral(**fields, preferences=Preferences(**wish))
    assert Referral(**fields, preferences=Preferences(home_visit=True)).contact is not None


def test_a_creditor_partner_still_hears_how_the_person_wishes_to_be_approached() -> None:
    wishes = Preferences(do_not_contact=True, languages=("ar", "fr"))
    referral = Referral(
        message_id="r-1",
        occurred_at=NOW,
        referral_id="r-1",
        signal_ref="s-x",
        attempt=1,
        partner="lmh-recouvrement",
        need=NEED,
        person="p-x",
        commune="59512",
        urgency="routine",
        due_by=NOW,
        agency="lmh-agence-roubaix",
        facts=Facts(arrears_eur=1200.0),
        preferences=wishes,
    )
    out = disclose(referral, recipient_roles(referral, "lmh-recouvrement", creditor=True)).message
    assert (out.facts, out.preferences) == (None, wishes)
