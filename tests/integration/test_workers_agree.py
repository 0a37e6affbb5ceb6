"""Several workers, one record: each worker's directory ranks on the same acceptance rates."""

from __future__ import annotations

import json
from datetime import timedelta

from partnerbus import usecases
from partnerbus.directory import load_sample
from partnerbus.entrypoints.bootstrap import create_app
from partnerbus.schemas import ConsentGranted, ConsentScope, ReferralStatusChanged, Signal
from partnerbus.settings import Settings
from partnerbus.testing import FakeClock
from tests.keys import TEST_KEY

KINDS = ("ccas-cias", "points-conseil-budget", "cresus", "caf", "maisons-des-solidarites")
ARREARS = "logement-hebergement--reduire-les-impayes-de-loyer"


async def test_a_worker_learns_the_answers_another_worker_recorded(engine_url: str) -> None:
    """Answers recorded by one worker reach another worker's directory at its next pass; a later pass reloads only the partners that answered since."""
    settings = Settings(database_url=engine_url, prefix="pbt-workers", pseudonym_key=TEST_KEY)
    clock = FakeClock()
    first = create_app(settings, directory=load_sample(), clock=clock)
    second = create_app(settings, directory=load_sample(), clock=clock)
    try:
        first.store.create_all()
        ledger = first.ledger
        now = ledger.clock()
        with first.store.begin() as tx:
            usecases.grant_consent(
                ledger,
                tx,
                ConsentGranted(
                    message_id="c-msg",
                    occurred_at=now,
                    consent_id="c-1",
                    person_ref="T-WORKERS",
                    scope=ConsentScope(needs=("logement-hebergement",), partner_kinds=KINDS),
                    collected_by="s.benali",
                    agency="lmh-agence-roubaix",
                    method="oral",
                    granted_at=now,
                    valid_until=now + timedelta(days=30),
                ),
                "q",
            )
        answered: dict[str, list[bool]] = {}
        for i in range(3):
            with first.store.begin() as tx:
                usecases.receive_signal(
                    ledger,
                    tx,
                    Signal(
                        message_id=f"sig-{i}",
                        occurred_at=now,
                        source="lmh-recouvrement",
                        person_ref="T-WORKERS",
                        commune="59512",
                        needs=(ARREARS,),
                    ),
                    "q",
                )
            referral = json.loads(
                [b for _, kind, b in first.store.outbox() if kind == "referral"][-1]
            )
            status = "accepted" if i != 1 else "rejected"
            extra = {"reason": "not-eligible"} if status == "rejected" else {}
            with first.store.begin() as tx:
                usecases.record_status(
                    ledger,
                    tx,
                    ReferralStatusChanged(
                        message_id=f"st-{i}",
                        occurred_at=now,
                        referral_id=referral["referral_id"],
                        partner=referral["partner"],
                        status=status,
                        **extra,
                    ),
                    "q",
                )
            answered.setdefault(referral["partner"], []).append(status == "accepted")

        assert all(second.directory.acceptance(p) == (0, 0) for p in answered)
        clock.advance(timedelta(hours=1))
        assert await second.refresh_answers() == len(answered)
        for partner, answers in answered.items():
            assert second.directory.acceptance(partner) == (sum(answers), len(answers))
            assert first.directory.acceptance(partner) == (sum(answers), len(answers))
        clock.advance(timedelta(hours=1))
        assert await second.refresh_answers() == 0, "nobody answered since the last pass"
        for partner, answers in answered.items():
            assert second.directory.acceptance(partner) == (sum(answers), len(answers))
    finally:
        for bus in (first, second):
            bus.executor.shutdown()
            bus.store.dispose()
