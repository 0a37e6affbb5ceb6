"""State changes never overwrite each other: a partner's answer, the relay's confirm, a
revocation and the deadline watch race on one referral, each in its own transaction on its
own thread (as the workers' database threads do), many times. On PostgreSQL (READ
COMMITTED) a transition decided on a plain read and written unconditionally was lost; now
every state write is a compare-and-set or holds the row lock, and a conflict re-runs the
transaction. Whatever the interleaving, the result is that of some serial order."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from partnerbus import usecases
from partnerbus.ledger.store import LedgerTx, Store
from partnerbus.schemas import (
    ConsentGranted,
    ConsentRevoked,
    ConsentScope,
    ReferralStatusChanged,
    Signal,
)
from partnerbus.testing import FakeClock
from partnerbus.usecases import Ledger
from tests.conftest import make_ledger

ARREARS = "logement-hebergement--reduire-les-impayes-de-loyer"
KINDS = ("ccas-cias", "points-conseil-budget", "cresus", "caf", "maisons-des-solidarites")
ROUNDS = 30

_ids = iter(range(1_000_000))


def mid(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}"


def in_tx(store: Store, work: Callable[[LedgerTx], Any]) -> Any:
    """One transaction as the service runs it (with its retry on conflict)."""
    return store.run(work)


def a_referral(ledger: Ledger, n: int) -> tuple[str, str, str]:
    """A fresh person, consent and signal: (referral id, partner, consent id)."""
    now = ledger.clock()
    person = f"T-RACE-{n}"
    consent_id = mid("c")
    grant = ConsentGranted(
        message_id=mid("m"),
        occurred_at=now,
        consent_id=consent_id,
        person_ref=person,
        scope=ConsentScope(needs=("logement-hebergement",), partner_kinds=KINDS),
        collected_by="s.benali",
        agency="lmh-agence-roubaix",
        method="oral",
        granted_at=now,
        valid_until=now + timedelta(days=60),
    )
    signal = Signal(
        message_id=mid("s"),
        occurred_at=now,
        source="lmh-recouvrement",
        person_ref=person,
        commune="59512",
        needs=(ARREARS,),
        urgency="asap",
    )
    in_tx(ledger.store, lambda tx: usecases.grant_consent(ledger, tx, grant, "q"))
    in_tx(ledger.store, lambda tx: usecases.receive_signal(ledger, tx, signal, "q"))
    (referral,) = [r for r in ledger.store.referrals() if r.signal_id == signal.message_id]
    return referral.referral_id, referral.partner_id, consent_id


def answer(ledger: Ledger, rid: str, partner: str, status: str) -> Callable[[LedgerTx], Any]:
    event = ReferralStatusChanged(
        message_id=mid("st"),
        occurred_at=ledger.clock(),
        referral_id=rid,
        partner=partner,
        status=status,  # type: ignore[arg-type]
    )
    return lambda tx: usecases.record_status(ledger, tx, event, "q")


def confirm(ledger: Ledger, rid: str) -> Callable[[LedgerTx], Any]:
    return lambda tx: usecases.mark_delivered(ledger, tx, rid)


def revoke(ledger: Ledger, consent_id: str) -> Callable[[LedgerTx], Any]:
    event = ConsentRevoked(
        message_id=mid("rv"),
        occurred_at=ledger.clock(),
        consent_id=consent_id,
        revoked_by="s.benali",
        agency="lmh-agence-roubaix",
        revoked_at=ledger.clock(),
    )
    return lambda tx: usecases.revoke_consent(ledger, tx, event, "q")


def deadlines(ledger: Ledger) -> Callable[[LedgerTx], Any]:
    return lambda tx: usecases.watch_deadlines(ledger, tx)


def race(store: Store, *works: Callable[[LedgerTx], Any]) -> None:
    """Start every transaction at once, each on its own thread; re-raise what failed."""
    gate = threading.Barrier(len(works))
    errors: list[BaseException] = []

    def run(work: Callable[[LedgerTx], Any]) -> None:
        try:
            gate.wait(timeout=30)
            in_tx(store, work)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in works]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a transaction never finished"
    if errors:
        raise errors[0]


def serial_history(store: Store, rid: str) -> list[str]:
    """The referral's history read as a serial order: each recorded decision starts from
    the status the referral had then, and the row holds the last applied status. Returns
    the applied statuses, in order."""
    status = None
    applied: list[str] = []
    for row in store.history(rid):
        if status is not None:
            assert row["from_status"] == status, (
                f"{rid}: {row['to_status']} ({row['outcome']}) was decided on "
                f"{row['from_status']} while the referral was {status}: a lost transition"
            )
        if row["outcome"] == "applied":
            status = row["to_status"]
            applied.append(status)
    referral = store.referral(rid)
    assert referral is not None
    assert referral.status == status, f"{rid}: the row says {referral.status}, history {status}"
    return applied


@pytest.fixture
def ledger(store: Store) -> Ledger:
    return make_ledger(store, FakeClock())


def test_a_partners_acceptance_is_never_erased_by_a_late_confirm(ledger: Ledger) -> None:
    """`accepted` racing the relay's confirm ends accepted (the confirm is then late and ignored), its deadline untouched; never delivered."""
    for n in range(ROUNDS):
        rid, partner, _ = a_referral(ledger, n)
        race(ledger.store, answer(ledger, rid, partner, "accepted"), confirm(ledger, rid))
        applied = serial_history(ledger.store, rid)
        assert applied[-1] == "accepted", f"round {n}: {applied}"


def test_a_withdrawal_is_never_reopened_by_a_late_confirm(ledger: Ledger) -> None:
    """A revocation racing the relay's confirm ends withdrawn: the confirm never re-opens a referral whose consent was revoked."""
    for n in range(ROUNDS):
        rid, _, consent_id = a_referral(ledger, 1000 + n)
        race(ledger.store, revoke(ledger, consent_id), confirm(ledger, rid))
        applied = serial_history(ledger.store, rid)
        assert applied[-1] == "withdrawn", f"round {n}: {applied}"


def test_an_answer_and_the_deadline_watch_agree_on_one_order(ledger: Ledger) -> None:
    """Past its deadline, a referral the partner accepts while the watch expires it is either accepted (the expiry came late and was ignored) or expired and the acceptance refused; never both applied."""
    assert isinstance(ledger.clock, FakeClock)
    for n in range(ROUNDS):
        rid, partner, _ = a_referral(ledger, 2000 + n)
        in_tx(ledger.store, confirm(ledger, rid))
        ledger.clock.advance(timedelta(days=2))
        race(ledger.store, answer(ledger, rid, partner, "accepted"), deadlines(ledger))
        applied = serial_history(ledger.store, rid)
        assert applied[-1] in ("accepted", "expired"), f"round {n}: {applied}"
        assert not {"accepted", "expired"} <= set(applied), f"round {n}: {applied}"


def test_partner_answers_confirms_and_revocations_all_at_once(ledger: Ledger) -> None:
    """Four writers on one referral (received, accepted, confirm, revocation): it ends withdrawn, and its history is one serial chain."""
    for n in range(ROUNDS):
        rid, partner, consent_id = a_referral(ledger, 3000 + n)
        race(
            ledger.store,
            answer(ledger, rid, partner, "received"),
            answer(ledger, rid, partner, "accepted"),
            confirm(ledger, rid),
            revoke(ledger, consent_id),
        )
        applied = serial_history(ledger.store, rid)
        assert applied[-1] == "withdrawn", f"round {n}: {applied}"
        assert "delivered" not in applied[applied.index("withdrawn") :], applied
