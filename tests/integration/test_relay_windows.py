"""The relay's windows, with publish functions that record what leaves (SQLite and
PostgreSQL; the same on the real broker is tests/e2e/test_relay_windows.py).

A window publishes many rows at once and waits for their confirms together; confirms may
come back in any order. Whatever they do, one referral's rows leave in outbox order, two
relays never publish a row twice while its claim holds, an urgent referral leaves before a
routine backlog, and a revocation is wholly before or after the window that carries it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
from aio_pika.exceptions import DeliveryError
from pamqp.commands import Basic
from sqlalchemy.exc import OperationalError

from partnerbus import usecases
from partnerbus.broker.topology import Topology
from partnerbus.handlers.outbox import Relay
from partnerbus.ledger.store import Conflict, LedgerTx, Store
from partnerbus.rules import disclose
from partnerbus.schemas import (
    ConsentGranted,
    ConsentRevoked,
    ConsentScope,
    ReferralReminder,
    ReferralStatusChanged,
    Signal,
)
from partnerbus.testing import FakeClock
from partnerbus.usecases import Ledger
from tests.conftest import make_ledger

ARREARS = "logement-hebergement--reduire-les-impayes-de-loyer"
KINDS = ("ccas-cias", "points-conseil-budget", "cresus", "caf", "maisons-des-solidarites")


def decide(ledger: Ledger, first: int, count: int, urgency: str = "routine") -> list[str]:
    """`count` consented signals, each making one referral, in one transaction: their
    referral ids."""
    now = ledger.clock()
    signals = []

    def work(tx: LedgerTx) -> None:
        # Every referral goes to ccas-roubaix (the reminders below are its): capacity is
        # enforced and the sample gives it a few places, so the ledger gives it room
        # without a figure, as its own `CapacityChanged` would.
        tx.capacity.set("ccas-roubaix", "capacity", None, now)
        for n in range(first, first + count):
            person = f"T-WIN-{n}"
            usecases.grant_consent(
                ledger,
                tx,
                ConsentGranted(
                    message_id=f"grant-{n}",
                    occurred_at=now,
                    consent_id=f"c-{n}",
                    person_ref=person,
                    scope=ConsentScope(needs=("logement-hebergement",), partner_kinds=KINDS),
                    collected_by="s.benali",
                    agency="lmh-agence-roubaix",
                    method="oral",
                    granted_at=now,
                    valid_until=now + timedelta(days=30),
                ),
                "q",
            )
            signal = Signal(
                message_id=f"sig-{n}",
                occurred_at=now,
                source="lmh-recouvrement",
                person_ref=person,
                commune="59512",
                needs=(ARREARS,),
                urgency=urgency,  # type: ignore[arg-type]
            )
            usecases.receive_signal(ledger, tx, signal, "q")
            signals.append(signal.message_id)

    ledger.store.run(work)
    return [r.referral_id for r in ledger.store.referrals() if r.signal_id in signals]


def follow_ups(ledger: Ledger, referral_ids: list[str], count: int) -> None:
    """`count` reminders queued behind each referral (rows of the same referral)."""
    now = ledger.clock()
    with ledger.store.begin() as tx:
        for rid in referral_ids:
            for k in range(count):
                tx.outbox.enqueue(
                    disclose(
                        ReferralReminder(
                            message_id=f"rem-{rid}-{k}",
                            occurred_at=now,
                            referral_id=rid,
                            partner="ccas-roubaix",
                            due_by=now,
                        ),
                        {"partner"},
                    ),
                    "ccas-roubaix",
                    now,
                    referral_id=rid,
                )


class Recorder:
    """A publish function: records each message when it is published (the order the broker
    receives them), then confirms after a random short pause (confirms out of order)."""

    def __init__(self, seed: int) -> None:
        self.left: list[dict[str, Any]] = []
        self.rng = random.Random(seed)
        self.lock = threading.Lock()

    async def __call__(self, body: bytes, **options: Any) -> None:
        with self.lock:
            self.left.append({"message_id": options["message_id"], **json.loads(body)})
            pause = self.rng.random() / 500
        await asyncio.sleep(pause)


async def drain(*relays: Relay, store: Store) -> None:
    async with asyncio.timeout(120):
        while await asyncio.to_thread(store.pending_count):
            await asyncio.gather(*(relay.flush() for relay in relays))


async def test_a_window_of_many_referrals_keeps_each_referrals_order(store: Store) -> None:
    """120 referrals with two reminders each, sent in windows of 64 with confirms out of order: each referral leaves before its reminders, in outbox order, each row once."""
    ledger = make_ledger(store)
    rids = decide(ledger, 0, 120)
    follow_ups(ledger, rids, 2)
    recorder = Recorder(1)
    with ThreadPoolExecutor(1) as executor:
        relay = Relay(ledger, Topology("p"), recorder, executor, timeout_s=5, window=64)
        await drain(relay, store=store)
    ids = [m["message_id"] for m in recorder.left]
    assert len(ids) == len(set(ids)), "a row was published twice"
    for rid in rids:
        mine = [m["message_id"] for m in recorder.left if m.get("referral_id") == rid]
        mine = [i for i in mine if i == rid or i.startswith("rem-")]
        assert mine == [rid, f"rem-{rid}-0", f"rem-{rid}-1"], mine
    assert relay.sent == len(ids)


async def test_two_relays_never_send_a_row_twice_nor_reorder_a_referral(store: Store) -> None:
    """Two relays (own database threads) drain 150 referrals with two reminders each at once: no row is published twice, each referral's rows leave in order, and both did part of the work."""
    ledger = make_ledger(store)
    rids = decide(ledger, 1000, 150)
    follow_ups(ledger, rids, 2)
    recorder = Recorder(2)
    with ThreadPoolExecutor(1) as one, ThreadPoolExecutor(1) as two:
        first = Relay(ledger, Topology("p"), recorder, one, timeout_s=5, window=32)
        second = Relay(ledger, Topology("p"), recorder, two, timeout_s=5, window=32)
        await drain(first, second, store=store)
    ids = [m["message_id"] for m in recorder.left]
    assert len(ids) == len(set(ids)), "a row was published twice"
    for rid in rids:
        mine = [m["message_id"] for m in recorder.left if m.get("referral_id") == rid]
        mine = [i for i in mine if i == rid or i.startswith("rem-")]
        assert mine == [rid, f"rem-{rid}-0", f"rem-{rid}-1"], mine
    assert first.sent > 0 and second.sent > 0, (first.sent, second.sent)
    assert first.sent + second.sent == len(ids)


async def test_an_urgent_referral_leaves_before_a_routine_backlog(store: Store) -> None:
    """An asap referral decided after 1,000 routine ones leaves first, before the routine backlog drains; each `delivered` notice leaves right after its referral's window (claimed as it was written, no claim of its own)."""
    ledger = make_ledger(store)
    routine = decide(ledger, 2000, 1000)
    (urgent,) = decide(ledger, 5000, 1, urgency="asap")
    recorder = Recorder(3)
    with ThreadPoolExecutor(1) as executor:
        relay = Relay(ledger, Topology("p"), recorder, executor, timeout_s=5)
        await drain(relay, store=store)
    referrals = [m["referral_id"] for m in recorder.left if m["type"] == "referral"]
    assert sorted(referrals) == sorted([*routine, urgent])
    assert referrals.index(urgent) == 0, referrals.index(urgent)
    # each referral's `delivered` notices (source and agency) follow it, before the
    # backlog is over: they went with their window, not behind every referral
    sent_at = {m["referral_id"]: i for i, m in enumerate(recorder.left) if m["type"] == "referral"}
    notices = [
        (i, m["referral_id"])
        for i, m in enumerate(recorder.left)
        if m["type"] == "referral-status-changed" and m["status"] == "delivered"
    ]
    assert len(notices) == 2 * len(sent_at)
    assert all(i > sent_at[rid] for i, rid in notices)
    assert min(i for i, _ in notices) < max(sent_at.values())


async def test_a_revocation_during_a_window_is_wholly_before_or_after_it(store: Store) -> None:
    """Consents revoked while windows of referrals are in flight: each referral either never left (withheld, no withdrawal) or left and then its withdrawal followed; the audit says which."""
    ledger = make_ledger(store)
    rids = decide(ledger, 7000, 60)
    consents = {r.referral_id: r.consent_id for r in store.referrals() if r.referral_id in rids}
    recorder = Recorder(4)
    rng = random.Random(4)

    def revoke(consent_id: str) -> None:
        event = ConsentRevoked(
            message_id=f"rv-{consent_id}",
            occurred_at=ledger.clock(),
            consent_id=consent_id,
            revoked_by="s.benali",
            agency="lmh-agence-roubaix",
            revoked_at=ledger.clock(),
        )
        store.run(lambda tx: usecases.revoke_consent(ledger, tx, event, "q"))

    async def revocations() -> None:
        for rid in rng.sample(rids, 30):
            await asyncio.to_thread(revoke, consents[rid])
            await asyncio.sleep(rng.random() / 200)

    with ThreadPoolExecutor(1) as executor:
        relay = Relay(ledger, Topology("p"), recorder, executor, timeout_s=5, window=8)
        await asyncio.gather(revocations(), relay.flush())
        await drain(relay, store=store)
    for rid in rids:
        kinds = [m["type"] for m in recorder.left if m.get("referral_id") == rid]
        kinds = [k for k in kinds if k in ("referral", "referral-withdrawn")]
        actions = [a.action for a in store.audit_trail(rid)]
        verdicts = [a for a in actions if a in ("referral-withdrawn", "referral-withheld")]
        if store.referral(rid).status == "withdrawn":
            if "referral" in kinds:
                assert kinds == ["referral", "referral-withdrawn"], (rid, kinds)
                assert "referral-disclosed" in actions and verdicts == ["referral-withdrawn"]
            else:
                assert kinds == [], (rid, kinds)
                assert "referral-disclosed" not in actions and verdicts == ["referral-withheld"]
        else:
            assert kinds == ["referral"], (rid, kinds)
            assert "referral-disclosed" in actions and verdicts == []


class RefusesNotices(Recorder):
    """Refuses the first `refusals` `delivered` notices as the broker would a message it
    cannot take (nack), then takes them; takes everything else."""

    def __init__(self, refusals: int) -> None:
        super().__init__(5)
        self.refusals = refusals

    async def __call__(self, body: bytes, **options: Any) -> None:
        if options.get("message_type") == "referral-status-changed" and self.refusals > 0:
            self.refusals -= 1
            raise DeliveryError(None, Basic.Nack(delivery_tag=1, multiple=False))
        await super().__call__(body, **options)


async def test_delivered_notices_go_with_their_window_and_a_refused_one_waits(
    store: Store,
) -> None:
    """A window of 10 referrals (with the 10 consent answers before them): their 20 `delivered` notices are published right after it without a claim of their own (one claim in all); the 3 the broker refuses stay in the outbox with their error, unclaimed, and leave at the next flush, each once."""
    ledger = make_ledger(store)
    rids = decide(ledger, 9000, 10)
    publish = RefusesNotices(3)
    claims: list[int] = []
    claim = store.claim_pending

    def counted(*args: Any, **kwargs: Any) -> Any:
        rows = claim(*args, **kwargs)
        claims.append(len(rows))
        return rows

    store.claim_pending = counted  # type: ignore[method-assign]
    with ThreadPoolExecutor(1) as executor:
        relay = Relay(ledger, Topology("p"), publish, executor, timeout_s=5)
        await relay.flush(rounds=1)
        assert [c for c in claims if c] == [20]
        notices = [m for m in publish.left if m["type"] == "referral-status-changed"]
        assert len(notices) == 17
        failing = await asyncio.to_thread(store.failing_count)
        assert failing == 3
        assert await asyncio.to_thread(store.pending_count) == 3
        await drain(relay, store=store)
    notices = [m["message_id"] for m in publish.left if m["type"] == "referral-status-changed"]
    assert len(notices) == len(set(notices)) == 2 * len(rids)
    assert await asyncio.to_thread(store.failing_count) == 0


class Held(Recorder):
    """Takes every message at once but confirms no referral until `release` is set: the
    window waits for its confirms as long as the test says."""

    def __init__(self) -> None:
        super().__init__(6)
        self.published = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, body: bytes, **options: Any) -> None:
        await super().__call__(body, **options)
        if options.get("message_type") == "referral":
            self.published.set()
            await self.release.wait()


class Reruns(logging.Handler):
    """Set when a transaction re-runs after a concurrent change (`Store.run` logs it)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "re-run after a concurrent change" in record.getMessage():
            self.seen.set()


@contextlib.contextmanager
def watching_reruns() -> Iterator[Reruns]:
    logger = logging.getLogger("partnerbus.ledger")
    handler, level = Reruns(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def applied(store: Store, rid: str) -> list[str]:
    """The statuses applied to a referral, in order."""
    return [h["to_status"] for h in store.history(rid) if h["outcome"] == "applied"]


async def while_in_flight(
    ledger: Ledger, rid: str, publish: Held, write: Callable[[LedgerTx], Any]
) -> None:
    """A relay publishes `rid` and holds its confirm; `write` (a transaction about it) runs
    meanwhile and must re-run, not commit, until the confirm is released and recorded;
    then everything left is sent."""
    store = ledger.store
    with watching_reruns() as reruns, ThreadPoolExecutor(1) as executor:
        relay = Relay(ledger, Topology("p"), publish, executor, timeout_s=5)
        flushing = asyncio.create_task(relay.flush())
        await asyncio.wait_for(publish.published.wait(), 10)
        writing = asyncio.create_task(asyncio.to_thread(store.run, write))
        assert await asyncio.to_thread(reruns.seen.wait, 10), "the writer never met it"

        assert not writing.done()
        assert applied(store, rid) == ["requested"]
        publish.release.set()
        await asyncio.wait_for(asyncio.gather(flushing, writing), 15)
        await drain(relay, store=store)


async def test_nothing_is_held_open_while_a_window_awaits_its_confirms(store: Store) -> None:
    """While the broker has not confirmed a window, another writer commits at once (on SQLite the write lock is free; the relay used to hold it through the confirms), and the window's referrals are marked as being sent; once confirmed they are delivered and the mark is gone."""
    ledger = make_ledger(store)
    rids = decide(ledger, 11000, 3)
    publish = Held()
    with ThreadPoolExecutor(1) as executor:
        relay = Relay(ledger, Topology("p"), publish, executor, timeout_s=5)
        flushing = asyncio.create_task(relay.flush())
        await asyncio.wait_for(publish.published.wait(), 10)

        more = await asyncio.wait_for(asyncio.to_thread(decide, ledger, 11100, 1), 5)

        assert len(more) == 1
        marked = [store.referral(rid) for rid in rids]
        assert all(r is not None and r.status == "requested" for r in marked)
        assert all(r is not None and r.sending_until is not None for r in marked[:1])
        publish.release.set()
        await asyncio.wait_for(flushing, 10)
    for rid in rids:
        referral = store.referral(rid)
        assert referral is not None
        assert (referral.status, referral.sending_until) == ("delivered", None)


async def test_a_revocation_meeting_a_referral_in_flight_comes_after_its_confirm(
    store: Store,
) -> None:
    """A revocation that commits while its referral is published and not yet confirmed would let it leave after the person said no: it re-runs until the confirm is recorded, then withdraws it, and the partner is told after the referral."""
    ledger = make_ledger(store)
    (rid,) = decide(ledger, 11200, 1)
    referral = store.referral(rid)
    assert referral is not None
    publish = Held()
    event = ConsentRevoked(
        message_id="rv-in-flight",
        occurred_at=ledger.clock(),
        consent_id=referral.consent_id,
        revoked_by="s.benali",
        agency="lmh-agence-roubaix",
        revoked_at=ledger.clock(),
    )
    await while_in_flight(
        ledger, rid, publish, lambda tx: usecases.revoke_consent(ledger, tx, event, "q")
    )
    assert applied(store, rid) == ["requested", "delivered", "withdrawn"]
    kinds = [m["type"] for m in publish.left if m.get("referral_id") == rid]
    assert [k for k in kinds if k in ("referral", "referral-withdrawn")] == [
        "referral",
        "referral-withdrawn",
    ]
    actions = [a.action for a in store.audit_trail(rid)]
    assert actions.index("referral-disclosed") < actions.index("referral-withdrawn")
    assert "referral-withheld" not in actions


async def test_a_partners_answer_meeting_its_referral_in_flight_comes_after_the_confirm(
    store: Store,
) -> None:
    """A partner fast enough to answer before the relay has recorded the broker's confirm: the answer re-runs until then, so the history reads requested, delivered, accepted (it is not refused as coming before delivery, nor does the confirm overwrite it)."""
    ledger = make_ledger(store)
    (rid,) = decide(ledger, 11300, 1)
    referral = store.referral(rid)
    assert referral is not None
    publish = Held()
    event = ReferralStatusChanged(
        message_id="st-in-flight",
        occurred_at=ledger.clock(),
        referral_id=rid,
        partner=referral.partner_id,
        status="accepted",
    )
    await while_in_flight(
        ledger, rid, publish, lambda tx: usecases.record_status(ledger, tx, event, "q")
    )
    assert applied(store, rid) == ["requested", "delivered", "accepted"]


async def test_a_relay_lost_between_publish_and_record_holds_changes_only_for_a_while(
    store: Store,
) -> None:
    """The relay publishes a referral and cannot record the confirm (its database went away): the referral stays marked, and a revocation meanwhile re-runs (in the service, its message is tried again later). Once the mark's time is over the revocation goes through and, since the referral may have left, a withdrawal follows it; the next relay sends that, after the referral's own row is found closed."""
    clock = FakeClock()
    ledger = make_ledger(store, clock)
    (rid,) = decide(ledger, 11400, 1)
    referral = store.referral(rid)
    assert referral is not None
    publish = Recorder(7)
    with ThreadPoolExecutor(1) as executor:
        relay = Relay(ledger, Topology("p"), publish, executor, timeout_s=5)

        def lost(*args: Any) -> Any:
            raise OperationalError("UPDATE outbox", {}, Exception("connection lost"))

        relay._record_window = lost  # type: ignore[method-assign]
        with contextlib.suppress(OperationalError):
            await relay.flush()
        assert [m["type"] for m in publish.left if m["type"].startswith("referral")] == ["referral"]
        marked = store.referral(rid)
        assert marked is not None and marked.sending_until is not None
        event = ConsentRevoked(
            message_id="rv-after-loss",
            occurred_at=clock(),
            consent_id=referral.consent_id,
            revoked_by="s.benali",
            agency="lmh-agence-roubaix",
            revoked_at=clock(),
        )

        def revoke() -> Any:
            return store.run(lambda tx: usecases.revoke_consent(ledger, tx, event, "q"), tries=2)

        with pytest.raises(Conflict):
            await asyncio.to_thread(revoke)
        assert applied(store, rid) == ["requested"]

        clock.advance(marked.sending_until - clock() + timedelta(seconds=1))
        await asyncio.to_thread(revoke)
        assert applied(store, rid) == ["requested", "withdrawn"]
        clock.advance(timedelta(minutes=2))  # the lost relay's claim is over
        relay = Relay(ledger, Topology("p"), publish, executor, timeout_s=5)
        await drain(relay, store=store)
    kinds = [m["type"] for m in publish.left if m.get("referral_id") == rid]
    assert [k for k in kinds if k in ("referral", "referral-withdrawn")] == [
        "referral",
        "referral-withdrawn",
    ]
    actions = [a.action for a in store.audit_trail(rid)]
    assert "referral-withdrawn" in actions and "referral-withheld" not in actions
