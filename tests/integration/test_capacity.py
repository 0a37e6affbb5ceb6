"""Capacity enforced (SQLite and PostgreSQL): a partner's open referrals take its declared
places; a full partner is skipped, said so in the explanation, and comes back when one of
its referrals closes or a capacity event raises its capacity. On PostgreSQL, workers
routing at once never give a partner more referrals than its places."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from partnerbus import usecases
from partnerbus.directory import match
from partnerbus.ledger.store import LedgerTx, Store
from partnerbus.rules import OPEN
from partnerbus.schemas import (
    CapacityChanged,
    ConsentGranted,
    ConsentRevoked,
    ConsentScope,
    ReferralStatusChanged,
    Signal,
)
from partnerbus.testing import FakeClock
from partnerbus.usecases import Ledger
from tests.conftest import make_ledger
from tests.integration.test_state_races import race

ARREARS = "logement-hebergement--reduire-les-impayes-de-loyer"
ROUBAIX = "59512"
KINDS = ("ccas-cias", "points-conseil-budget", "cresus", "caf", "maisons-des-solidarites", "adil")
# The sample's candidates for arrears in Roubaix, from lmh-recouvrement, best first.
FIRST, SECOND = "ccas-roubaix", "mds-roubaix"
Q = "test.queue"

_ids = iter(range(1_000_000))


def mid(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}"


@pytest.fixture
def ledger(store: Store) -> Ledger:
    return make_ledger(store, FakeClock())


def run(ledger: Ledger, work: Callable[[LedgerTx], Any]) -> Any:
    return ledger.store.run(work)


def capacity(ledger: Ledger, partner: str, remaining: int | None, status: str = "capacity"):
    event = CapacityChanged(
        message_id=mid("cap"),
        occurred_at=ledger.clock(),
        partner=partner,
        status=status,  # type: ignore[arg-type]
        remaining=remaining,
    )
    run(ledger, lambda tx: usecases.record_capacity(ledger, tx, event, Q))


def consented_signal(ledger: Ledger, person: str) -> Signal:
    """A person who consented to every candidate's kind, and her signal (not yet sent)."""
    now = ledger.clock()
    grant = ConsentGranted(
        message_id=mid("m"),
        occurred_at=now,
        consent_id=mid("c"),
        person_ref=person,
        scope=ConsentScope(needs=("logement-hebergement",), partner_kinds=KINDS),
        collected_by="s.benali",
        agency="lmh-agence-roubaix",
        method="oral",
        granted_at=now,
        valid_until=now + timedelta(days=60),
    )
    run(ledger, lambda tx: usecases.grant_consent(ledger, tx, grant, Q))
    return Signal(
        message_id=mid("s"),
        occurred_at=now,
        source="lmh-recouvrement",
        person_ref=person,
        commune=ROUBAIX,
        needs=(ARREARS,),
        urgency="asap",
    )


def refer(ledger: Ledger, person: str) -> dict[str, Any] | None:
    """A consented person's signal: the referral it made (its body), or None."""
    signal = consented_signal(ledger, person)
    run(ledger, lambda tx: usecases.receive_signal(ledger, tx, signal, Q))
    made = [r.referral_id for r in ledger.store.referrals() if r.signal_id == signal.message_id]
    if not made:
        return None
    (rid,) = made
    (body,) = [
        json.loads(body)
        for _, kind, body in ledger.store.outbox()
        if kind == "referral" and json.loads(body)["referral_id"] == rid
    ]
    return body


def answer(ledger: Ledger, referral: dict[str, Any], status: str, **extra: Any) -> None:
    event = ReferralStatusChanged(
        message_id=mid("st"),
        occurred_at=ledger.clock(),
        referral_id=referral["referral_id"],
        partner=referral["partner"],
        status=status,  # type: ignore[arg-type]
        **extra,
    )
    run(ledger, lambda tx: usecases.record_status(ledger, tx, event, Q))


def open_referrals(ledger: Ledger, partner: str) -> int:
    return sum(1 for r in ledger.store.referrals() if r.partner_id == partner and r.status in OPEN)


def complete(ledger: Ledger, referral: dict[str, Any]) -> None:
    answer(ledger, referral, "accepted")
    answer(ledger, referral, "completed", outcome="plan d'apurement signé")


def fail(ledger: Ledger, referral: dict[str, Any]) -> None:
    answer(ledger, referral, "accepted")
    answer(ledger, referral, "failed", reason="unreachable")


def reject(ledger: Ledger, referral: dict[str, Any]) -> None:
    answer(ledger, referral, "rejected", reason="not-eligible")


def expire(ledger: Ledger, referral: dict[str, Any]) -> None:
    assert isinstance(ledger.clock, FakeClock)
    ledger.clock.advance(timedelta(days=2))
    run(ledger, lambda tx: usecases.watch_deadlines(ledger, tx))
    row = ledger.store.referral(referral["referral_id"])
    assert row is not None and row.status == "expired"


def withdraw(ledger: Ledger, referral: dict[str, Any]) -> None:
    row = ledger.store.referral(referral["referral_id"])
    assert row is not None
    event = ConsentRevoked(
        message_id=mid("rv"),
        occurred_at=ledger.clock(),
        consent_id=row.consent_id,
        revoked_by="s.benali",
        agency="lmh-agence-roubaix",
        revoked_at=ledger.clock(),
    )
    run(ledger, lambda tx: usecases.revoke_consent(ledger, tx, event, Q))


def test_a_full_partner_is_skipped_and_said_so(ledger: Ledger) -> None:
    """Capacity 1: the first referral takes the place; the second need goes to the next partner, whose referral explains why the first was skipped."""
    capacity(ledger, FIRST, 1)
    first = refer(ledger, "T-CAP-1")
    assert first is not None and first["partner"] == FIRST
    assert "capacity 1 left (0 open of 1)" in first["why"]
    second = refer(ledger, "T-CAP-2")
    assert second is not None and second["partner"] == SECOND
    assert f"{FIRST} skipped: full (1 open of 1)" in second["why"]
    assert open_referrals(ledger, FIRST) == 1


def test_the_directorys_declared_capacity_counts_without_any_event(ledger: Ledger) -> None:
    """The sample declares 3 places for ccas-roubaix: the fourth open referral goes elsewhere."""
    assert ledger.directory.partner(FIRST).capacity == 3
    partners = [refer(ledger, f"T-DECL-{n}") for n in range(4)]
    assert [p["partner"] if p else None for p in partners] == [FIRST, FIRST, FIRST, SECOND]
    assert partners[2] is not None and "capacity 1 left (2 open of 3)" in partners[2]["why"]


@pytest.mark.parametrize(
    "close", [complete, fail, reject, expire, withdraw], ids=lambda f: f.__name__
)
def test_a_full_partner_comes_back_when_one_of_its_referrals_closes(
    ledger: Ledger, close: Callable[[Ledger, dict[str, Any]], None]
) -> None:
    """Completed, failed, rejected, expired or withdrawn: the place is free again and the next need goes to the partner."""
    capacity(ledger, FIRST, 1)
    first = refer(ledger, "T-BACK-1")
    assert first is not None and first["partner"] == FIRST
    second = refer(ledger, "T-BACK-2")
    assert second is not None and second["partner"] == SECOND
    answer(ledger, second, "accepted")  # answered: the deadline watch leaves it alone
    close(ledger, first)
    assert open_referrals(ledger, FIRST) == 0
    third = refer(ledger, "T-BACK-3")
    assert third is not None and third["partner"] == FIRST
    assert not any("skipped" in reason for reason in third["why"])


def test_a_capacity_event_raising_the_capacity_brings_the_partner_back(ledger: Ledger) -> None:
    """Full at 1 open of 1; the partner says 2: the next need goes to it, the one after is skipped again."""
    capacity(ledger, FIRST, 1)
    assert refer(ledger, "T-RAISE-1")["partner"] == FIRST  # type: ignore[index]
    assert refer(ledger, "T-RAISE-2")["partner"] == SECOND  # type: ignore[index]
    capacity(ledger, FIRST, 2)
    third = refer(ledger, "T-RAISE-3")
    assert third is not None and third["partner"] == FIRST
    assert "capacity 1 left (1 open of 2)" in third["why"]
    fourth = refer(ledger, "T-RAISE-4")
    assert fourth is not None and fourth["partner"] == SECOND
    assert f"{FIRST} skipped: full (2 open of 2)" in fourth["why"]


def test_the_ledgers_no_capacity_is_obeyed_before_the_directory_hears_of_it(
    ledger: Ledger,
) -> None:
    """A worker whose directory has not yet applied the broadcast still reads the partner's last capacity event in the ledger."""
    capacity(ledger, FIRST, None, status="no-capacity")
    assert ledger.directory.capacity(FIRST) == ("capacity", 3)  # no broadcast in this test
    referral = refer(ledger, "T-NOCAP")
    assert referral is not None and referral["partner"] == SECOND
    assert f"{FIRST} skipped: no-capacity" in referral["why"]


def test_no_partner_with_room_is_reported_full(ledger: Ledger) -> None:
    """Every candidate full: the need closes as no partner, the reason naming each full partner; the agency is told."""
    candidates = [
        c.partner_id for c in match(ledger.directory, ARREARS, ROUBAIX, sender="lmh-recouvrement")
    ]
    for partner in candidates:
        capacity(ledger, partner, 1)
    taken = [refer(ledger, f"T-ALL-{n}") for n in range(len(candidates))]
    assert sorted(r["partner"] for r in taken if r) == sorted(candidates)
    assert refer(ledger, "T-ALL-LAST") is None
    (told,) = [
        json.loads(body)
        for _, kind, body in ledger.store.outbox()
        if kind == "no-partner-found" and "T-ALL-LAST" in body
    ]
    assert told["reason"].startswith(f"no partner with room for {ARREARS} in {ROUBAIX}: ")
    for partner in candidates:
        assert f"{partner} skipped: full (1 open of 1)" in told["reason"]


def test_workers_routing_at_once_never_both_take_the_last_place(store: Store) -> None:
    """Two workers (threads, each its own transaction) route a need to a partner with one place left, many times: it gets exactly one of each pair; the other goes to the next partner. On PostgreSQL the partner's lock decides (without it both took the place); SQLite serialises writers."""
    ledger = make_ledger(store, FakeClock())
    capacity(ledger, FIRST, 1)
    for n in range(15):
        signals = [consented_signal(ledger, f"T-RACE-{n}-{k}") for k in range(2)]
        race(
            store,
            *(
                (lambda tx, s=s: usecases.receive_signal(ledger, tx, s, Q))  # type: ignore[misc]
                for s in signals
            ),
        )
        made = {r.signal_id: r.partner_id for r in store.referrals()}
        assert sorted(made[s.message_id] for s in signals) == [FIRST, SECOND], f"round {n}"
        assert open_referrals(ledger, FIRST) == 1, f"round {n}"
        (mine,) = [r for r in store.referrals() if r.partner_id == FIRST and r.status in OPEN]
        complete(ledger, {"referral_id": mine.referral_id, "partner": FIRST})


def _count_statements(store: Store) -> list[str]:
    from sqlalchemy import event

    seen: list[str] = []

    @event.listens_for(store.engine, "before_cursor_execute")
    def _count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT COUNT(*)"):
            seen.append(statement)

    return seen


def test_a_batch_counts_the_places_it_gives_as_it_gives_them(ledger: Ledger) -> None:
    """Four signals in one transaction (an intake batch): the sample's 3 places of the first partner go to the first three, the fourth goes on; each partner's places are counted once in the transaction, then kept by its own writes."""
    signals = [consented_signal(ledger, f"T-BATCH-{n}") for n in range(4)]
    counts = _count_statements(ledger.store)

    def batch(tx: LedgerTx) -> None:
        for signal in signals:
            usecases.receive_signal(ledger, tx, signal, Q)

    run(ledger, batch)
    partners = [
        r.partner_id
        for s in signals
        for r in ledger.store.referrals()
        if r.signal_id == s.message_id
    ]
    assert partners == [FIRST, FIRST, FIRST, SECOND]
    whys = {
        json.loads(body)["referral_id"]: json.loads(body)["why"]
        for _, kind, body in ledger.store.outbox()
        if kind == "referral"
    }
    third = next(r for r in ledger.store.referrals() if r.signal_id == signals[2].message_id)
    assert "capacity 1 left (2 open of 3)" in whys[third.referral_id]
    fourth = next(r for r in ledger.store.referrals() if r.signal_id == signals[3].message_id)
    assert f"{FIRST} skipped: full (3 open of 3)" in whys[fourth.referral_id]
    assert len(counts) == len({FIRST, SECOND} & {p.id for p in _declared(ledger)}), counts


def _declared(ledger: Ledger) -> list[Any]:
    return [p for p in ledger.directory.partners() if p.capacity is not None]


@pytest.mark.parametrize("read_first", [True, False], ids=["read", "unread"])
def test_a_place_freed_in_a_batch_is_given_again_in_it(ledger: Ledger, read_first: bool) -> None:
    """In one transaction: a partner with one place declines the referral it holds, then the next signal of the batch gets that place, whether the transaction had read the referral before (its count follows the write) or not (it counts again)."""
    capacity(ledger, FIRST, 1)
    first = refer(ledger, "T-FREE-1")
    assert first is not None and first["partner"] == FIRST
    signal = consented_signal(ledger, "T-FREE-2")
    decline = ReferralStatusChanged(
        message_id=mid("st"),
        occurred_at=ledger.clock(),
        referral_id=first["referral_id"],
        partner=FIRST,
        status="rejected",
        reason="not-eligible",
    )

    def batch(tx: LedgerTx) -> None:
        assert tx.capacity.taken(FIRST, OPEN) == 1
        if read_first:
            tx.referrals.get(first["referral_id"])
        usecases.record_status(ledger, tx, decline, Q)
        assert tx.capacity.taken(FIRST, OPEN) == 0
        usecases.receive_signal(ledger, tx, signal, Q)
        assert tx.capacity.taken(FIRST, OPEN) == 1

    run(ledger, batch)
    (made,) = [r for r in ledger.store.referrals() if r.signal_id == signal.message_id]
    assert made.partner_id == FIRST
    assert open_referrals(ledger, FIRST) == 1


def test_a_status_written_without_reading_the_referral_counts_the_places_again(
    ledger: Ledger,
) -> None:
    """The repository's own guard: a compare-and-set on a referral this transaction never read (it cannot tell whose it is) makes the next count read the database again."""
    capacity(ledger, FIRST, 1)
    first = refer(ledger, "T-RECOUNT-1")
    assert first is not None and first["partner"] == FIRST

    def batch(tx: LedgerTx) -> None:
        assert tx.capacity.taken(FIRST, OPEN) == 1
        tx.referrals.update(
            first["referral_id"], "requested", now=ledger.clock(), status="rejected"
        )
        assert tx.capacity.taken(FIRST, OPEN) == 0

    run(ledger, batch)
