"""Property: no referral ever leaves without a consent valid at that moment, whatever the
sequence of grants, revocations, signals, rejections, passing time and sends (SQLite and
PostgreSQL). "Leaves" is checked twice: when the referral is decided (its row and outbox
entry are written) and when the relay publishes it, which may be much later (a broker
outage): the relay runs with a publish function that records what it is given."""

from __future__ import annotations

import asyncio
import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from partnerbus import usecases
from partnerbus.broker.topology import Topology
from partnerbus.handlers.outbox import Relay
from partnerbus.ledger.store import Store
from partnerbus.schemas import (
    ConsentGranted,
    ConsentRevoked,
    ConsentScope,
    ReferralStatusChanged,
    Signal,
)
from partnerbus.testing import FakeClock
from tests.conftest import make_ledger

PERSONS = ("T-P1", "T-P2", "T-P3")
NEEDS = (
    "logement-hebergement--reduire-les-impayes-de-loyer",
    "logement-hebergement--se-maintenir-dans-le-logement",
    "difficultes-financieres--ameliorer-sa-gestion-budgetaire",
)
SCOPE_NEEDS = (*NEEDS, "logement-hebergement", "difficultes-financieres")
KINDS = (
    "ccas-cias",
    "maisons-des-solidarites",
    "caf",
    "points-conseil-budget",
    "cresus",
    "association",
    "adil",
)
COMMUNES = ("59512", "59599", "59350")
AGENCY = "lmh-agence-roubaix"

grant = st.tuples(
    st.just("grant"),
    st.sampled_from(PERSONS),
    st.lists(st.sampled_from(SCOPE_NEEDS), min_size=1, max_size=3, unique=True),
    st.lists(st.sampled_from(KINDS), min_size=1, max_size=4, unique=True),
    st.integers(min_value=-3, max_value=3),  # start, days from now (later: refused)
    st.integers(min_value=1, max_value=40),  # duration, days
)
revoke = st.tuples(st.just("revoke"), st.integers(min_value=0, max_value=20))
signal = st.tuples(
    st.just("signal"),
    st.sampled_from(PERSONS),
    st.lists(st.sampled_from(NEEDS), min_size=1, max_size=2, unique=True),
    st.sampled_from(COMMUNES),
)
advance = st.tuples(st.just("advance"), st.integers(min_value=1, max_value=24 * 20))
reject = st.tuples(
    st.just("reject"),
    st.integers(min_value=0, max_value=20),
    st.sampled_from(("full", "not-eligible", "other", "unreachable")),
)
tick = st.tuples(st.just("tick"))
send = st.tuples(st.just("send"))
# A broad grant (every need, every kind, from now on) makes referrals likely, so that the
# property is exercised, not only vacuously true.
broad = st.tuples(
    st.just("grant"),
    st.sampled_from(PERSONS),
    st.just(["logement-hebergement", "difficultes-financieres"]),
    st.just(list(KINDS)),
    st.just(0),
    st.integers(min_value=1, max_value=40),
)
operations = st.lists(
    st.one_of(grant, broad, revoke, signal, signal, advance, reject, tick, send, send),
    min_size=3,
    max_size=25,
)


def allows(consent: Any, person: str, need: str, partner_id: str, kind: str, now: Any) -> bool:
    """The oracle, written from the rule's words, independently of the code under test."""
    return (
        consent.person_ref == person
        and consent.granted_at <= now < consent.valid_until
        and (consent.revoked_at is None or consent.revoked_at > now)
        and any(need == n or need.startswith(n + "--") for n in consent.scope.needs)
        and (kind in consent.scope.partner_kinds or partner_id in consent.scope.partners)
    )


def run_sequence(store: Store, ops: list[tuple[Any, ...]]) -> int:
    clock = FakeClock()
    ledger = make_ledger(store, clock)
    consents: list[str] = []
    checked = 0
    published: list[dict[str, Any]] = []
    stream: list[tuple[str, str | None]] = []  # (type, referral id) as they left, in order

    async def publish(body: bytes, **options: Any) -> None:
        message = json.loads(body)
        stream.append((options["message_type"], message.get("referral_id")))
        if options.get("message_type") == "referral":
            published.append(message)

    def send_pending() -> int:
        """Run the relay once, as the service does; check every referral it publishes
        against the consent at this instant."""
        published.clear()
        with ThreadPoolExecutor(1) as executor:
            relay = Relay(ledger, Topology("p"), publish, executor, timeout_s=1)
            asyncio.run(relay.flush())
        now = clock()
        with store.begin() as tx:
            for body in published:
                referral = tx.referrals.get(body["referral_id"])
                consent = tx.consents.get(referral.consent_id)
                person = tx.signals.get(referral.signal_id).person_ref
                assert allows(
                    consent, person, referral.need, referral.partner_id, referral.partner_kind, now
                ), f"{referral.referral_id} published without a consent valid at that moment"
        return len(published)

    def mid() -> str:
        return uuid.uuid4().hex

    for op in ops:
        now = clock()
        existing = store.referrals()
        before = {r.referral_id for r in existing}
        open_ = [r for r in existing if r.status in ("requested", "delivered")]
        with store.begin() as tx:
            if op[0] == "grant":
                _, person, needs, kinds, start, days = op
                begins = now + timedelta(days=start)
                consent_id = mid()
                event = ConsentGranted(
                    message_id=mid(),
                    occurred_at=now,
                    consent_id=consent_id,
                    person_ref=person,
                    scope=ConsentScope(needs=tuple(needs), partner_kinds=tuple(kinds)),
                    collected_by="s.benali",
                    agency=AGENCY,
                    method="oral",
                    granted_at=begins,
                    valid_until=begins + timedelta(days=days),
                )
                if begins > now:
                    # A consent dated in the future is refused, never kept to start later.
                    with pytest.raises(usecases.Refused, match="future"):
                        usecases.grant_consent(ledger, tx, event, "q")
                else:
                    consents.append(consent_id)
                    usecases.grant_consent(ledger, tx, event, "q")
            elif op[0] == "revoke" and consents:
                consent_id = consents[op[1] % len(consents)]
                if tx.consents.get(consent_id).revoked_at is None:
                    usecases.revoke_consent(
                        ledger,
                        tx,
                        ConsentRevoked(
                            message_id=mid(),
                            occurred_at=now,
                            consent_id=consent_id,
                            revoked_by="s.benali",
                            agency=AGENCY,
                            revoked_at=now,
                        ),
                        "q",
                    )
            elif op[0] == "signal":
                _, person, needs, commune = op
                usecases.receive_signal(
                    ledger,
                    tx,
                    Signal(
                        message_id=mid(),
                        occurred_at=now,
                        source="lmh-recouvrement",
                        person_ref=person,
                        commune=commune,
                        needs=tuple(needs),
                    ),
                    "q",
                )
            elif op[0] == "advance":
                clock.advance(timedelta(hours=op[1]))
            elif op[0] == "reject":
                if open_:
                    target = open_[op[1] % len(open_)]
                    usecases.record_status(
                        ledger,
                        tx,
                        ReferralStatusChanged(
                            message_id=mid(),
                            occurred_at=now,
                            referral_id=target.referral_id,
                            partner=target.partner_id,
                            status="rejected",
                            reason=op[2],
                        ),
                        "q",
                    )
            elif op[0] == "tick":
                usecases.watch_deadlines(ledger, tx)
        if op[0] == "send":
            checked += send_pending()
        new = [r for r in store.referrals() if r.referral_id not in before]
        with store.begin() as tx:
            for referral in new:
                if referral.referral_id in before:
                    continue
                signal_row = tx.signals.get(referral.signal_id)
                consent = tx.consents.get(referral.consent_id)
                assert consent is not None, "a referral names the consent it left under"
                assert allows(
                    consent,
                    signal_row.person_ref,
                    referral.need,
                    referral.partner_id,
                    referral.partner_kind,
                    clock(),
                ), f"{referral.referral_id} left without a valid consent"
                checked += 1
    check_what_left(store, stream)
    return checked


def check_what_left(store: Store, stream: list[tuple[str, str | None]]) -> None:
    """Of what the relay published: a withdrawal only for a referral that left before it,
    and the audit records a disclosure exactly for the referrals that left, and a
    withheld referral as withheld."""
    left: set[str] = set()
    for kind, rid in stream:
        if kind == "referral" and rid:
            left.add(rid)
        if kind == "referral-withdrawn":
            assert rid in left, f"a withdrawal of {rid}, which never left (or not before it)"
    for referral in store.referrals():
        actions = [a.action for a in store.audit_trail(referral.referral_id)]
        rid = referral.referral_id
        assert ("referral-disclosed" in actions) == (rid in left), f"{rid}: {actions}"
        if "referral-withheld" in actions:
            assert rid not in left, f"{rid} left, yet the audit says withheld"


def check_property(store: Store, examples: int) -> int:
    total = {"checked": 0}

    @settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(ops=operations)
    # One sequence that surely makes and sends a referral, so that a run of few random
    # examples (PostgreSQL's) never checks nothing.
    @example(
        ops=[
            (
                "grant",
                "T-P1",
                ["logement-hebergement", "difficultes-financieres"],
                list(KINDS),
                0,
                30,
            ),
            ("signal", "T-P1", [NEEDS[0]], "59512"),
            ("send",),
        ]
    )
    def check(ops: list[tuple[Any, ...]]) -> None:
        store.drop_all()
        store.create_all()
        total["checked"] += run_sequence(store, ops)

    check()
    return total["checked"]


def test_no_referral_leaves_without_a_consent_valid_at_that_moment_on_sqlite() -> None:
    """For random sequences, every new referral's consent covers its person, need and partner at that instant."""
    store = Store("sqlite://")
    try:
        assert check_property(store, 200) > 0, "the examples made referrals to check"
    finally:
        store.dispose()


@pytest.mark.postgres
def test_no_referral_leaves_without_a_consent_valid_at_that_moment_on_postgresql() -> None:
    """The same property on PostgreSQL (fewer examples: each starts from empty tables)."""
    from sqlalchemy import create_engine, text

    from tests.conftest import POSTGRES_URL, require

    require("PostgreSQL", POSTGRES_URL, 5432)
    schema = f"pbt_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    store = Store(POSTGRES_URL, schema=schema)
    try:
        assert check_property(store, 25) > 0, "the examples made referrals to check"
    finally:
        store.dispose()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
