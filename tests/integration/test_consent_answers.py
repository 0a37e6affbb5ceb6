"""The consents' recorder answers a refused event only to the agency that sent it, in the
batch's transaction, and still raises the refusal for the intake to dead-letter (SQLite and
PostgreSQL, without a broker)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

from partnerbus.handlers.batch import Batcher
from partnerbus.handlers.subscribers import ConsentRecorder
from partnerbus.ledger.store import Store
from partnerbus.schemas import ConsentGranted, ConsentScope
from partnerbus.usecases import Ledger, Refused
from tests.conftest import make_ledger

AGENCY = "lmh-agence-roubaix"
Q = "test.consents"


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
