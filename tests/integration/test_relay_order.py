"""Two relays on one record, one of them paused after its claim, with publish functions that
record what leaves (SQLite and PostgreSQL; the real-broker race is tests/e2e/test_referral_order.py).

A consent revoked while a relay holds an untried claim on the referral: the other relay
must not send the withdrawal first, and once the claim is settled the referral is
withheld and no withdrawal is sent at all (the partner never received it)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

from partnerbus import usecases
from partnerbus.broker.topology import Topology
from partnerbus.handlers.outbox import Relay
from partnerbus.ledger.store import Store
from partnerbus.rules import disclose
from partnerbus.schemas import (
    ConsentGranted,
    ConsentRevoked,
    ConsentScope,
    ReferralReminder,
    Signal,
)
from tests.conftest import make_ledger

ARREARS = "logement-hebergement--reduire-les-impayes-de-loyer"
TO_PARTNER = ("referral", "referral-withdrawn")
KINDS = ("ccas-cias", "points-conseil-budget", "cresus", "caf", "maisons-des-solidarites")


class PausingStore:
    """The store, except that a claim waits (on the relay's database thread) until the test
    lets it go: the relay then holds claims it has not tried yet. The claim leaves out the
    checks the relay asks it to run in its transaction (`then`), as when they fail there
    (the relay then checks the window apart): the referral is claimed, not yet checked."""

    def __init__(self, store: Store, claimed: threading.Event, go_on: threading.Event) -> None:
        self._store, self._claimed, self._go_on = store, claimed, go_on

    def claim_pending(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("then", None)
        rows = self._store.claim_pending(*args, **kwargs)
        if rows:
            self._claimed.set()
            self._go_on.wait(30)
        return rows

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


async def test_a_withdrawal_never_overtakes_nor_outlives_a_referral_another_relay_holds(
    store: Store,
) -> None:
    """Relay 1 has claimed [referral, x] and not yet checked them; the consent is revoked; relay 2 sends nothing for the referral; relay 1 then withholds it and drops the withdrawal."""
    ledger = make_ledger(store)
    now = ledger.clock()
    with store.begin() as tx:  # an earlier message, so that relay 1 is busy before the referral
        tx.outbox.enqueue(
            disclose(
                ReferralReminder(
                    message_id="x",
                    occurred_at=now,
                    referral_id="other",
                    partner="ccas-roubaix",
                    due_by=now,
                ),
                {"partner"},
            ),
            "ccas-roubaix",
            now,
        )
    grant = ConsentGranted(
        message_id="g",
        occurred_at=now,
        consent_id="c-slow",
        person_ref="T-SLOW",
        scope=ConsentScope(needs=("logement-hebergement",), partner_kinds=KINDS),
        collected_by="s.benali",
        agency="lmh-agence-roubaix",
        method="oral",
        granted_at=now,
        valid_until=now + timedelta(days=30),
    )
    signal = Signal(
        message_id="s",
        occurred_at=now,
        source="lmh-recouvrement",
        person_ref="T-SLOW",
        commune="59512",
        needs=(ARREARS,),
    )
    store.run(lambda tx: usecases.grant_consent(ledger, tx, grant, "q"))
    store.run(lambda tx: usecases.receive_signal(ledger, tx, signal, "q"))
    (referral,) = store.referrals()
    rid = referral.referral_id
    assert referral.consent_id == "c-slow"

    left: list[tuple[str, str | None]] = []
    claimed, go_on = threading.Event(), threading.Event()

    async def record(body: bytes, **options: Any) -> None:
        left.append((options["message_type"], json.loads(body).get("referral_id")))

    revoked = ConsentRevoked(
        message_id="r",
        occurred_at=now,
        consent_id="c-slow",
        revoked_by="s.benali",
        agency="lmh-agence-roubaix",
        revoked_at=now,
    )
    paused = dataclasses.replace(ledger, store=PausingStore(store, claimed, go_on))
    with ThreadPoolExecutor(1) as one, ThreadPoolExecutor(1) as two:
        first = Relay(paused, Topology("p"), record, one, timeout_s=5)
        second = Relay(ledger, Topology("p"), record, two, timeout_s=5)
        flushing = asyncio.create_task(first.flush(rounds=1))
        try:
            async with asyncio.timeout(30):
                # relay 1 holds its claim on the referral, untried
                assert await asyncio.to_thread(claimed.wait, 30)
                await asyncio.to_thread(
                    store.run, lambda tx: usecases.revoke_consent(ledger, tx, revoked, "q")
                )
                await second.flush()
                about = [kind for kind, r in left if r == rid and kind in TO_PARTNER]
                assert about == [], f"relay 2 sent {about} while relay 1 held the referral"
        finally:
            go_on.set()
        async with asyncio.timeout(30):
            await flushing
            await first.flush()
            await second.flush()

    about = [kind for kind, r in left if r == rid and kind in TO_PARTNER]
    assert about == [], f"the partner heard of a referral it never received: {about}"
    assert store.pending_count() == 0
    assert store.referral(rid).status == "withdrawn"
    actions = [a.action for a in store.audit_trail(rid)]
    assert "referral-disclosed" not in actions
    assert [a for a in actions if a in ("referral-withheld", "referral-withdrawn")] == [
        "referral-withheld"
    ]


async def test_a_referral_whose_publish_failed_is_withdrawn_after_it_not_withheld(
    store: Store,
) -> None:
    """A publish that failed (no confirm) may have reached the partner: after a revocation the referral is not sent again, but the partner is told to drop it, and the audit says withdrawn, not disclosed."""
    ledger = make_ledger(store)
    now = ledger.clock()
    grant = ConsentGranted(
        message_id="g2",
        occurred_at=now,
        consent_id="c-lost",
        person_ref="T-LOST",
        scope=ConsentScope(needs=("logement-hebergement",), partner_kinds=KINDS),
        collected_by="s.benali",
        agency="lmh-agence-roubaix",
        method="oral",
        granted_at=now,
        valid_until=now + timedelta(days=30),
    )
    signal = Signal(
        message_id="s2",
        occurred_at=now,
        source="lmh-recouvrement",
        person_ref="T-LOST",
        commune="59512",
        needs=(ARREARS,),
    )
    store.run(lambda tx: usecases.grant_consent(ledger, tx, grant, "q"))
    store.run(lambda tx: usecases.receive_signal(ledger, tx, signal, "q"))
    (referral,) = store.referrals()
    rid = referral.referral_id
    left: list[tuple[str, str | None]] = []

    async def lost(body: bytes, **options: Any) -> None:
        raise TimeoutError  # no confirm: it may or may not be in the partner's queue

    async def fine(body: bytes, **options: Any) -> None:
        left.append((options["message_type"], json.loads(body).get("referral_id")))

    revoked = ConsentRevoked(
        message_id="r2",
        occurred_at=now,
        consent_id="c-lost",
        revoked_by="s.benali",
        agency="lmh-agence-roubaix",
        revoked_at=now,
    )
    with ThreadPoolExecutor(1) as executor:
        await Relay(ledger, Topology("p"), lost, executor, timeout_s=5).flush(rounds=1)
        store.run(lambda tx: usecases.revoke_consent(ledger, tx, revoked, "q"))
        await Relay(ledger, Topology("p"), fine, executor, timeout_s=5).flush()

    assert [kind for kind, r in left if r == rid and kind in TO_PARTNER] == ["referral-withdrawn"]
    assert store.pending_count() == 0
    actions = [a.action for a in store.audit_trail(rid)]
    assert "referral-disclosed" not in actions
    assert [a for a in actions if a in ("referral-withheld", "referral-withdrawn")] == [
        "referral-withdrawn"
    ]
