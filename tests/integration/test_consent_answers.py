"""The consents' recorder answers a refused event only to the agency that sent it, in the
batch's transaction, and still raises the refusal for the intake to dead-letter (SQLite and
PostgreSQL, without a broker)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest

from partnerbus import usecases
from partnerbus.handlers.batch import Batcher
from partnerbus.handlers.subscribers import ConsentRecorder
from partnerbus.ledger.store import Store
from partnerbus.schemas import ConsentGranted, ConsentScope, Signal
from partnerbus.usecases import Ledger, Refused
from tests.conftest import make_ledger

AGENCY = "lmh-agence-roubaix"
Q = "test.consents"
ARREARS = "logement-hebergement--reduire-les-impayes-de-loyer"
CONSENT_SCOPE = ConsentScope(
    needs=("logement-hebergement",),
    partner_kinds=(
        "ccas-cias",
        "points-conseil-budget",
        "cresus",
        "caf",
        "maisons-des-solidarites",
    ),
)


@pytest.fixture
def ledger(store: Store) -> Ledger:
    return make_ledger(store)


@pytest.fixture
def recorder(ledger: Ledger) -> Iterator[ConsentRecorder]:
    with ThreadPoolExecutor(1) as executor:
        yield ConsentRecorder(ledger, Batcher(ledger.store, executor), Q)


def grant(ledger: Ledger, message_id: str, collected_by: str = "s.benali") -> ConsentGranted:
    now = ledger.clock()
    return ConsentGranted(
        message_id=message_id,
        occurred_at=now,
        consent_id=f"c-{message_id}",
        person_ref="T-0001",
        scope=ConsentScope(needs=("logement-hebergement",), partner_kinds=("ccas-cias",)),
        collected_by=collected_by,
        agency=AGENCY,
        method="oral",
        granted_at=now,
        valid_until=now + timedelta(days=30),
    )


def answers(ledger: Ledger) -> list[tuple[str, dict]]:
    return [
        (key, json.loads(body))
        for key, kind, body in ledger.store.outbox()
        if kind in ("consent-recorded", "consent-rejected")
    ]


def username(ledger: Ledger) -> str:
    return ledger.directory.partner(AGENCY).username


async def test_a_refusal_from_the_agency_s_own_user_is_answered_and_still_raised(
    ledger: Ledger, recorder: ConsentRecorder
) -> None:
    """Refused, from the agency's user: the refusal is raised (dead-lettered by the intake), a ConsentRejected is committed for the agency, nothing else is recorded; sent again, no second answer."""
    event = grant(ledger, "m-1", collected_by="a.martin")
    for _ in range(2):
        with pytest.raises(Refused, match=r"a\.martin"):
            await recorder.record(event, username(ledger))
    ((key, answer),) = answers(ledger)
    assert (key, answer["type"], answer["event_id"]) == (AGENCY, "consent-rejected", "m-1")
    assert ledger.store.count("consents") == 0
    assert ledger.store.count("processed_messages", message_id="m-1", queue=Q) == 0


@pytest.mark.parametrize("sender", ["guest", "lmh-proximite", None], ids=str)
async def test_a_refusal_on_another_sender_s_claim_is_not_answered(
    ledger: Ledger, recorder: ConsentRecorder, sender: str | None
) -> None:
    """Refused, sent by a trusted user, another partner's user or nobody known: raised, and nothing is put in the outbox for the agency."""
    with pytest.raises(Refused):
        await recorder.record(grant(ledger, "m-2", collected_by="a.martin"), sender)
    assert answers(ledger) == []


async def test_a_recorded_consent_is_answered_once(
    ledger: Ledger, recorder: ConsentRecorder
) -> None:
    """Recorded: True, one ConsentRecorded; the same event again: False, no second answer."""
    event = grant(ledger, "m-3")
    assert await recorder.record(event, "guest")
    assert not await recorder.record(event, "guest")
    ((key, answer),) = answers(ledger)
    assert (key, answer["type"], answer["event_id"]) == (AGENCY, "consent-recorded", "m-3")


def a_signal(ledger: Ledger, person: str) -> Signal:
    return Signal(
        message_id=f"sig-{person}",
        occurred_at=ledger.clock(),
        source="lmh-recouvrement",
        person_ref=person,
        commune="59512",
        needs=(ARREARS,),
    )


def test_a_signal_and_its_consent_recorded_at_once_end_in_one_referral(ledger: Ledger) -> None:
    """For each of thirty people, her signal and her consent are recorded by two workers at the same moment (a barrier, two connections): every signal ends routed, with one referral, whichever transaction came first."""
    people = [f"T-RACE-{n:03d}" for n in range(30)]
    barrier = threading.Barrier(2)

    def record(use_case: Callable[..., bool], message: Any) -> bool:
        barrier.wait(timeout=10)
        return ledger.store.run(lambda tx: use_case(ledger, tx, message, Q))

    with ThreadPoolExecutor(2) as pool:
        for person in people:
            consent = grant(ledger, f"m-{person}").model_copy(
                update={"person_ref": person, "scope": CONSENT_SCOPE}
            )
            both = [
                pool.submit(record, usecases.receive_signal, a_signal(ledger, person)),
                pool.submit(record, usecases.grant_consent, consent),
            ]
            assert [f.result(timeout=30) for f in both] == [True, True]
    with ledger.store.begin() as tx:
        states = {p: tx.signals.need_states(f"sig-{p}") for p in people}
    assert all(s == {ARREARS: "routed"} for s in states.values()), states
    assert ledger.store.count("referrals") == len(people)
