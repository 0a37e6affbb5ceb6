"""One `now` per transaction: a use case stamps everything it writes with one instant."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select

from partnerbus import usecases
from partnerbus.ledger import tables as t
from partnerbus.ledger.store import Store
from partnerbus.testing import FakeClock
from tests.conftest import make_ledger
from tests.integration.test_usecases import Q, a_consent, a_signal


class TickingClock(FakeClock):
    """A clock that moves a millisecond every time it is read."""

    def __call__(self) -> datetime:
        return self.advance(timedelta(milliseconds=1))


def stamps(store: Store) -> set[datetime]:
    """Every instant the intake of one signal wrote, over the tables it writes."""
    columns = (
        t.processed.c.processed_at,
        t.signals.c.received_at,
        t.signal_needs.c.updated_at,
        t.referrals.c.created_at,
        t.referrals.c.updated_at,
        t.referral_history.c.at,
        t.outbox.c.created_at,
        t.audit.c.at,
    )
    with store.begin() as tx:
        return {at for column in columns for at in tx.conn.execute(select(column)).scalars()}


def test_a_signal_is_recorded_at_one_instant_however_often_the_clock_is_read(
    store: Store,
) -> None:
    """A signal routed to a partner writes its dedupe mark, signal, need, referral, history, outbox rows and audit all at the instant its transaction started."""
    clock = TickingClock()
    ledger = make_ledger(store, clock)
    consent = a_consent(ledger)
    with store.begin() as tx:
        assert usecases.grant_consent(ledger, tx, consent, Q)
    signal = a_signal(ledger)
    before = clock.now
    with store.begin() as tx:
        assert usecases.receive_signal(ledger, tx, signal, Q)
    with store.begin() as tx:
        assert tx.conn.execute(select(t.referrals.c.referral_id)).all()  # it was routed
    assert {at for at in stamps(store) if at > before} == {before + timedelta(milliseconds=1)}
