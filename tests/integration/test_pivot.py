"""The pivot from the tenancy, not from the commune (issue 11), on SQLite and PostgreSQL:
several organisations' agencies cover Roubaix (Lille Métropole Habitat, Vilogia, Habitat et
Humanisme); a signal names its agency or its landlord, or comes from the landlord's own
service; the agency so found is asked for consent, reminded, and told of every outcome.
With none named and several possible, the bus picks nobody."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest

from partnerbus import usecases
from partnerbus.ledger.store import Store
from partnerbus.schemas import ConsentGranted, ConsentScope, ReferralStatusChanged, Signal
from partnerbus.testing import FakeClock
from partnerbus.usecases import Ledger, Refused
from tests.conftest import make_ledger

ARREARS = "logement-hebergement--reduire-les-impayes-de-loyer"
ROUBAIX = "59512"
LILLE = "59350"
VILOGIA = "vilogia-agence-roubaix"
IML = "hh-nord-iml"
LMH = "lmh-agence-roubaix"
KINDS = ("ccas-cias", "points-conseil-budget", "cresus", "caf", "maisons-des-solidarites")
Q = "test.queue"
DAY = timedelta(days=1)

_counter = iter(range(1_000_000))


@pytest.fixture
def ledger(store: Store) -> Ledger:
    return make_ledger(store, FakeClock())


def a_signal(ledger: Ledger, person: str, source: str, **extra: Any) -> Signal:
    values: dict[str, Any] = {
        "message_id": f"sig-{person}-{next(_counter)}",
        "occurred_at": ledger.clock(),
        "source": source,
        "person_ref": person,
        "commune": ROUBAIX,
        "needs": (ARREARS,),
    }
    values.update(extra)
    return Signal(**values)


def receive(ledger: Ledger, signal: Signal) -> None:
    usecases.check_signal(ledger, signal)
    with ledger.store.begin() as tx:
        assert usecases.receive_signal(ledger, tx, signal, Q)


def sent(store: Store, message_type: str, **match: Any) -> list[tuple[str, dict[str, Any]]]:
    rows = [(key, json.loads(body)) for key, kind, body in store.outbox() if kind == message_type]
    return [(key, body) for key, body in rows if all(body.get(k) == v for k, v in match.items())]


def grant(ledger: Ledger, person: str, agency: str, advisor: str) -> None:
    now = ledger.clock()
    n = next(_counter)
    event = ConsentGranted(
        message_id=f"grant-{person}-{n}",
        occurred_at=now,
        consent_id=f"c-{person}-{n}",
        person_ref=person,
        scope=ConsentScope(needs=("logement-hebergement",), partner_kinds=KINDS),
        collected_by=advisor,
        agency=agency,
        method="oral",
        granted_at=now,
        valid_until=now + timedelta(days=60),
    )
    ledger.store.run(lambda tx: usecases.grant_consent(ledger, tx, event, Q))


def state(store: Store, signal_id: str) -> str:
    with store.read() as tx:
        return tx.signals.need_states(signal_id)[ARREARS]


def test_a_vilogia_signal_is_followed_by_vilogias_agency_on_every_path(ledger: Ledger) -> None:
    """From Vilogia's recovery service, in Roubaix where LMH has an agency too: Vilogia's agency is asked for consent (its advisor named), reminded, records the consent, is named on the referral and hears the partner's status; LMH's agency hears nothing."""
    store, clock = ledger.store, ledger.clock
    assert isinstance(clock, FakeClock)
    signal = a_signal(ledger, "T-VIL-1", "vilogia-recouvrement")
    receive(ledger, signal)
    ((key, asked),) = sent(store, "consent-requested", signal_id=signal.message_id)
    assert (key, asked["agency"], asked["advisor"]) == (VILOGIA, VILOGIA, "k.mercier")

    clock.advance(7 * DAY)
    assert store.run(lambda tx: usecases.watch_deadlines(ledger, tx))["parked-reminded"] == 1
    reminded = sent(store, "consent-requested", signal_id=signal.message_id, reminder=True)
    assert [key for key, _ in reminded] == [VILOGIA]

    with pytest.raises(Refused, match="not one of the advisors"):
        grant(ledger, "T-VIL-1", VILOGIA, "s.benali")
    grant(ledger, "T-VIL-1", VILOGIA, "k.mercier")
    assert state(store, signal.message_id) == "routed"
    ((partner, referral),) = sent(store, "referral")
    assert (referral["agency"], referral["advisor"]) == (VILOGIA, "k.mercier")

    status = ReferralStatusChanged(
        message_id=f"st-{next(_counter)}",
        occurred_at=clock(),
        referral_id=referral["referral_id"],
        partner=partner,
        status="accepted",
    )
    store.run(lambda tx: usecases.record_status(ledger, tx, status, Q))
    told = sorted(key for key, _ in sent(store, "referral-status-changed", status="accepted"))
    assert told == sorted(["vilogia-recouvrement", VILOGIA])
    every = {key for key, _, _ in store.outbox()}
    assert LMH not in every


def test_an_lmh_signal_in_the_same_commune_stays_lmhs(ledger: Ledger) -> None:
    """The source's own organisation's agency first: LMH's recovery service's signal in Roubaix asks LMH's agency, not Vilogia's."""
    signal = a_signal(ledger, "T-LMH-1", "lmh-recouvrement")
    receive(ledger, signal)
    ((key, asked),) = sent(ledger.store, "consent-requested", signal_id=signal.message_id)
    assert (key, asked["advisor"]) == (LMH, "s.benali")


@pytest.mark.parametrize(
    ("extra", "agency", "advisor"),
    [
        ({"landlord": "vilogia"}, VILOGIA, "k.mercier"),
        ({"landlord": "lmh"}, LMH, "s.benali"),
        ({"landlord": "habitat-humanisme-nord"}, IML, "e.vandamme"),
        ({"agency": IML}, IML, "e.vandamme"),
        ({"agency": VILOGIA, "landlord": "vilogia"}, VILOGIA, "k.mercier"),
    ],
)
def test_a_signal_naming_its_landlord_or_agency_asks_that_one(
    ledger: Ledger, extra: dict[str, str], agency: str, advisor: str
) -> None:
    """A CCAS knows whose tenant the person is: the landlord named resolves to its agency covering the commune; an association's team (not a landlord) can be the pivot."""
    signal = a_signal(ledger, f"T-NAMED-{next(_counter)}", "ccas-roubaix", **extra)
    receive(ledger, signal)
    ((key, asked),) = sent(ledger.store, "consent-requested", signal_id=signal.message_id)
    assert (key, asked["agency"], asked["advisor"]) == (agency, agency, advisor)
    grant(ledger, signal.person_ref, agency, advisor)
    assert state(ledger.store, signal.message_id) == "routed"


def test_naming_neither_where_several_organisations_follow_people_closes_the_need(
    ledger: Ledger,
) -> None:
    """A CCAS signal in Roubaix naming no agency nor landlord: the bus picks nobody; the need waiting for consent closes at once (consent-not-obtained) and the source is told to name the agency or landlord; no advisor is asked."""
    store = ledger.store
    signal = a_signal(ledger, "T-AMB-1", "ccas-roubaix")
    receive(ledger, signal)
    assert sent(store, "consent-requested") == []
    ((key, closed),) = sent(store, "signal-closed", signal_id=signal.message_id)
    assert key == "ccas-roubaix"
    assert closed["outcome"] == "consent-not-obtained"
    assert "amelio-mel, habitat-humanisme-nord, lmh, vilogia" in closed["detail"]
    assert "`agency`" in closed["detail"] and "`landlord`" in closed["detail"]
    assert state(store, signal.message_id) == "closed"
    with store.read() as tx:
        row = tx.signals.get(signal.message_id)
    assert row is not None and row.agency is None
    assert "consent-not-requested" in [a.action for a in store.audit_trail(signal.message_id)]


def test_naming_neither_with_consent_on_file_still_routes(ledger: Ledger) -> None:
    """Only what waits for consent closes: a need the person already consented to goes to its partner, agency or not."""
    grant(ledger, "T-AMB-2", VILOGIA, "k.mercier")
    signal = a_signal(ledger, "T-AMB-2", "ccas-roubaix")
    receive(ledger, signal)
    assert state(ledger.store, signal.message_id) == "routed"
    assert sent(ledger.store, "signal-closed") == []


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"agency": "lmh-recouvrement"}, "is a creditor"),
        ({"agency": "vilogia-recouvrement"}, "is a creditor"),
        ({"agency": "ccas-lille"}, "has no social advisors"),
        ({"agency": "nobody-here"}, "unknown agency"),
        ({"landlord": "nobody-here"}, "unknown landlord"),
        ({"landlord": "vilogia", "commune": LILLE}, "vilogia' has no agency covering 59350"),
        ({"landlord": "lmh", "agency": VILOGIA}, "belongs to 'vilogia', not to"),
    ],
)
def test_a_signal_naming_a_wrong_pivot_is_refused(
    ledger: Ledger, extra: dict[str, str], reason: str
) -> None:
    """A creditor, a partner without advisors, an unknown id, a landlord with no agency in the commune, an agency of another landlord than the one named: refused with the reason, nothing recorded."""
    signal = a_signal(ledger, "T-BAD-1", "ccas-roubaix", **extra)
    with pytest.raises(Refused, match=reason):
        usecases.check_signal(ledger, signal)
