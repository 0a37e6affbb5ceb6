"""Who may record, refuse and revoke consent, and which times the bus believes: the use
cases themselves decide, whatever door the event came through (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select

from partnerbus import usecases
from partnerbus.ledger import tables
from partnerbus.ledger.store import Store
from partnerbus.schemas import (
    ConsentGranted,
    ConsentRefused,
    ConsentRevoked,
    ConsentScope,
    Contact,
    Signal,
)
from partnerbus.usecases import Ledger, Refused
from tests.conftest import make_ledger

ARREARS = "logement-hebergement--reduire-les-impayes-de-loyer"
ROUBAIX = "59512"
AGENCY = "lmh-agence-roubaix"  # advisors s.benali and l.petit
KINDS = ("ccas-cias", "points-conseil-budget", "cresus", "caf", "maisons-des-solidarites")


@pytest.fixture
def ledger(store: Store) -> Ledger:
    return make_ledger(store)


def mid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def run(ledger: Ledger, use_case, message) -> bool:
    with ledger.store.begin() as tx:
        return use_case(ledger, tx, message, "q")


def a_signal(ledger: Ledger, person: str) -> Signal:
    return Signal(
        message_id=mid("sig"),
        occurred_at=ledger.clock(),
        source="lmh-recouvrement",
        person_ref=person,
        commune=ROUBAIX,
        needs=(ARREARS,),
        contact=Contact(phone="0612345678"),
    )


def a_consent(ledger: Ledger, person: str, **changes) -> ConsentGranted:
    now = ledger.clock()
    values = {
        "message_id": mid("msg"),
        "occurred_at": now,
        "consent_id": mid("c"),
        "person_ref": person,
        "scope": ConsentScope(needs=("logement-hebergement",), partner_kinds=KINDS),
        "collected_by": "s.benali",
        "agency": AGENCY,
        "method": "oral",
        "granted_at": now,
        "valid_until": now + timedelta(days=30),
    }
    values.update(changes)
    return ConsentGranted(**values)


def a_revocation(ledger: Ledger, consent_id: str, **changes) -> ConsentRevoked:
    values = {
        "message_id": mid("msg"),
        "occurred_at": ledger.clock(),
        "consent_id": consent_id,
        "revoked_by": "l.petit",
        "agency": AGENCY,
        "revoked_at": ledger.clock(),
    }
    values.update(changes)
    return ConsentRevoked(**values)


def parked_person(ledger: Ledger) -> tuple[str, Signal]:
    person = mid("T")
    signal = a_signal(ledger, person)
    run(ledger, usecases.receive_signal, signal)
    return person, signal


def outbox(ledger: Ledger, kind: str) -> list[dict]:
    return [json.loads(body) for _key, t, body in ledger.store.outbox() if t == kind]


def states(ledger: Ledger, signal_id: str) -> dict[str, str]:
    with ledger.store.begin() as tx:
        return tx.signals.need_states(signal_id)


@pytest.mark.parametrize(
    ("agency", "collected_by", "why"),
    [
        ("ccas-roubaix", "ccas-roubaix", "advisors"),
        ("lmh-recouvrement", "s.benali", "advisors"),
        (AGENCY, "a.martin", "a.martin"),
        (AGENCY, "Samira Benali", "Samira Benali"),
    ],
    ids=["ccas-naming-itself", "landlord-service-without-advisors", "other-agency-s", "a-name"],
)
def test_only_a_pivot_s_own_advisor_records_a_consent(ledger, agency, collected_by, why):
    """A consent from a partner without advisors, or collected by someone who is not one of the agency's advisors, is refused with the reason: nothing recorded, the parked need stays parked."""
    person, signal = parked_person(ledger)
    with pytest.raises(Refused, match=why):
        run(
            ledger,
            usecases.grant_consent,
            a_consent(ledger, person, agency=agency, collected_by=collected_by),
        )
    assert ledger.store.count("consents") == 0
    assert ledger.store.count("referrals") == 0
    assert states(ledger, signal.message_id) == {ARREARS: "parked"}


def test_a_pivot_s_own_advisor_records_a_consent(ledger):
    """The control: the agency's own advisor records it and the parked need leaves."""
    person, signal = parked_person(ledger)
    assert run(ledger, usecases.grant_consent, a_consent(ledger, person))
    assert ledger.store.count("referrals") == 1
    assert states(ledger, signal.message_id) == {ARREARS: "routed"}


@pytest.mark.parametrize(
    ("agency", "collected_by", "why"),
    [
        # the agency that does follow the signal is not named: the sender hears this reason
        ("lmh-agence-lille-sud", "a.martin", "not followed by 'lmh-agence-lille-sud'"),
        ("ccas-roubaix", "ccas-roubaix", "advisors"),
        (AGENCY, "a.martin", "a.martin"),
    ],
    ids=["another-agency", "no-advisors", "other-agency-s-advisor"],
)
def test_only_the_signal_s_agency_records_a_refusal(ledger, agency, collected_by, why):
    """A refusal from an agency that does not own the signal, or not by its advisor, is refused: the need stays parked and nobody is told it closed."""
    person, signal = parked_person(ledger)
    refusal = ConsentRefused(
        message_id=mid("msg"),
        occurred_at=ledger.clock(),
        signal_id=signal.message_id,
        person_ref=person,
        collected_by=collected_by,
        agency=agency,
    )
    with pytest.raises(Refused, match=why):
        run(ledger, usecases.refuse_consent, refusal)
    assert states(ledger, signal.message_id) == {ARREARS: "parked"}
    assert outbox(ledger, "signal-closed") == []


@pytest.mark.parametrize(
    ("agency", "revoked_by", "why"),
    [
        ("lmh-agence-lille-sud", "a.martin", "another agency"),
        (AGENCY, "a.martin", "a.martin"),
    ],
    ids=["another-agency", "other-agency-s-advisor"],
)
def test_only_the_consent_s_agency_revokes_it(ledger, agency, revoked_by, why):
    """A revocation from another agency, or naming another agency's advisor, is refused: the consent stands."""
    person = mid("T")
    given = a_consent(ledger, person)
    run(ledger, usecases.grant_consent, given)
    with pytest.raises(Refused, match=why):
        run(
            ledger,
            usecases.revoke_consent,
            a_revocation(ledger, given.consent_id, agency=agency, revoked_by=revoked_by),
        )
    with ledger.store.begin() as tx:
        assert tx.consents.get(given.consent_id).revoked_at is None


def test_a_revocation_recorded_for_the_person_by_a_non_advisor_is_kept(ledger):
    """`revoked_by` may name the person's own word ("the tenant, by phone"): the agency's revocation stands."""
    person = mid("T")
    given = a_consent(ledger, person)
    run(ledger, usecases.grant_consent, given)
    revocation = a_revocation(ledger, given.consent_id, revoked_by="the tenant, by phone")
    assert run(ledger, usecases.revoke_consent, revocation)
    with ledger.store.begin() as tx:
        assert tx.consents.get(given.consent_id).revoked_at == ledger.clock()


def test_a_revocation_dated_in_the_future_takes_effect_when_recorded(ledger):
    """`revoked_at` a year ahead: stored as the bus's now (the stated time stays in the journal), open referrals withdrawn at once, a later signal parked."""
    person = mid("T")
    given = a_consent(ledger, person)
    run(ledger, usecases.grant_consent, given)
    run(ledger, usecases.receive_signal, a_signal(ledger, person))
    (referral,) = ledger.store.referrals()
    later = ledger.clock() + timedelta(days=365)
    run(ledger, usecases.revoke_consent, a_revocation(ledger, given.consent_id, revoked_at=later))
    assert ledger.store.referral(referral.referral_id).status == "withdrawn"
    with ledger.store.begin() as tx:
        assert tx.consents.get(given.consent_id).revoked_at == ledger.clock()
    with ledger.store.begin() as tx:
        (body,) = tx.conn.execute(
            select(tables.consent_journal.c.body).where(
                tables.consent_journal.c.consent_id == given.consent_id,
                tables.consent_journal.c.event == "revoked",
            )
        ).scalars()
    stated = ConsentRevoked.model_validate_json(body).revoked_at
    assert stated == later, "the journal keeps the time the partner stated"

    ledger.clock.advance(timedelta(hours=1))  # type: ignore[attr-defined]
    second = a_signal(ledger, person)
    run(ledger, usecases.receive_signal, second)
    assert states(ledger, second.message_id) == {ARREARS: "parked"}
    assert len(ledger.store.referrals()) == 1


def test_a_grant_a_few_seconds_ahead_is_clamped_to_now(ledger):
    """A partner's clock a little fast: the consent is recorded as granted now, and it works now."""
    person, signal = parked_person(ledger)
    ahead = ledger.clock() + timedelta(seconds=90)
    given = a_consent(ledger, person, granted_at=ahead, valid_until=ahead + timedelta(days=30))
    assert run(ledger, usecases.grant_consent, given)
    with ledger.store.begin() as tx:
        assert tx.consents.get(given.consent_id).granted_at == ledger.clock()
    assert states(ledger, signal.message_id) == {ARREARS: "routed"}


def test_a_grant_dated_in_the_future_is_refused(ledger):
    """`granted_at` a month ahead: refused with the reason (a consent records what the person said), never kept to start later nor moved to now."""
    person, signal = parked_person(ledger)
    ahead = ledger.clock() + timedelta(days=30)
    given = a_consent(ledger, person, granted_at=ahead, valid_until=ahead + timedelta(days=30))
    with pytest.raises(Refused, match="future"):
        run(ledger, usecases.grant_consent, given)
    assert ledger.store.count("consents") == 0
    assert states(ledger, signal.message_id) == {ARREARS: "parked"}
