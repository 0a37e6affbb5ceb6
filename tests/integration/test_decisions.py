"""The advisor's decisions from her agency: a referral cancelled with a reason, a need sent
to the partner she chose (SQLite and PostgreSQL, without a broker)."""

from __future__ import annotations

import pytest

from partnerbus import usecases
from partnerbus.directory import match
from partnerbus.ledger.store import Store
from partnerbus.schemas import (
    ConsentRefused,
    NeedDirected,
    NeedReopened,
    OrientationRecorded,
    ReferralCancelled,
    ReferralTransferred,
)
from partnerbus.usecases import Ledger, Refused
from tests.conftest import make_ledger
from tests.integration.test_usecases import (
    ARREARS,
    ROUBAIX,
    a_consent,
    a_signal,
    answer,
    claim_and_send,
    mid,
    run,
    sent,
)

AGENCY = "lmh-agence-roubaix"
SOURCE = "lmh-recouvrement"


@pytest.fixture
def ledger(store: Store) -> Ledger:
    return make_ledger(store)


def a_referral(ledger: Ledger, **consent) -> dict:
    run(ledger, usecases.grant_consent, a_consent(ledger, **consent))
    run(ledger, usecases.receive_signal, a_signal(ledger))
    return sent(ledger, "referral")[-1][1]


def cancellation(
    ledger: Ledger, referral_id: str, agency: str = AGENCY, by: str = "s.benali"
) -> ReferralCancelled:
    return ReferralCancelled(
        message_id=mid("cancel"),
        occurred_at=ledger.clock(),
        referral_id=referral_id,
        agency=agency,
        decided_by=by,
        reason="the person moved to Lille",
    )


def signal_of(ledger: Ledger, referral: dict) -> str:
    row = ledger.store.referral(referral["referral_id"])
    assert row is not None
    return row.signal_id


class TestCancel:
    def test_the_advisor_cancels_a_sent_referral_and_the_partner_drops_it(
        self, ledger: Ledger
    ) -> None:
        """Sent and accepted: cancelled, the partner gets ReferralWithdrawn (signal-cancelled, never the advisor's words), the source and agency hear `cancelled` (the reason only to the agency), the need closes, the audit names the advisor."""
        referral = a_referral(ledger)
        claim_and_send(ledger)
        answer(ledger, referral, "accepted")
        assert run(ledger, usecases.cancel_referral, cancellation(ledger, referral["referral_id"]))
        rid = referral["referral_id"]
        assert ledger.store.referral(rid).status == "cancelled"
        ((key, withdrawn),) = sent(ledger, "referral-withdrawn")
        assert key == referral["partner"]
        assert withdrawn["reason"] == "signal-cancelled"
        assert "Lille" not in str(withdrawn)
        told = {
            key: body
            for key, body in sent(ledger, "referral-status-changed")
            if body["status"] == "cancelled"
        }
        assert set(told) == {SOURCE, AGENCY}
        assert "moved to Lille" in told[AGENCY]["note"]
        assert "moved to Lille" not in str(told[SOURCE])
        history = ledger.store.history(rid)
        assert history[-1]["to_status"] == "cancelled"
        assert history[-1]["actor"] == "s.benali"
        (audit,) = [a for a in ledger.store.audit_trail(rid) if a.action == "referral-cancelled"]
        assert audit.actor == "s.benali"
        assert "Lille" not in (audit.why or "")
        with ledger.store.begin() as tx:
            assert tx.signals.need_states(signal_of(ledger, referral))[ARREARS] == "closed"

    def test_a_referral_cancelled_before_it_left_is_withheld(self, ledger: Ledger) -> None:
        """Not yet picked up by a relay: its outbox row is dropped, the partner never hears of it."""
        referral = a_referral(ledger)
        run(ledger, usecases.cancel_referral, cancellation(ledger, referral["referral_id"]))
        assert sent(ledger, "referral") == []
        assert sent(ledger, "referral-withdrawn") == []
        actions = [a.why for a in ledger.store.audit_trail(referral["referral_id"])]
        assert any("never received it" in (why or "") for why in actions)

    def test_another_agency_may_not_cancel(self, ledger: Ledger) -> None:
        referral = a_referral(ledger)
        other = cancellation(ledger, referral["referral_id"], "lmh-agence-lille-sud", "a.martin")
        with pytest.raises(Refused, match="not followed by 'lmh-agence-lille-sud'"):
            run(ledger, usecases.cancel_referral, other)
        assert ledger.store.referral(referral["referral_id"]).status == "requested"

    def test_a_partner_without_advisors_may_not_cancel(self, ledger: Ledger) -> None:
        referral = a_referral(ledger)
        partner = cancellation(ledger, referral["referral_id"], referral["partner"], "x.someone")
        with pytest.raises(Refused, match="no social advisors"):
            run(ledger, usecases.cancel_referral, partner)

    def test_another_agency_s_advisor_may_not_cancel(self, ledger: Ledger) -> None:
        referral = a_referral(ledger)
        with pytest.raises(Refused, match="not one of the advisors"):
            run(
                ledger,
                usecases.cancel_referral,
                cancellation(ledger, referral["referral_id"], by="a.martin"),
            )

    def test_an_unknown_referral_is_refused(self, ledger: Ledger) -> None:
        with pytest.raises(Refused, match="unknown referral"):
            run(ledger, usecases.cancel_referral, cancellation(ledger, "r-nowhere"))

    def test_a_closed_referral_cannot_be_cancelled(self, ledger: Ledger) -> None:
        """Completed: the state machine refuses, and so does a second cancellation."""
        referral = a_referral(ledger)
        claim_and_send(ledger)
        answer(ledger, referral, "accepted")
        answer(ledger, referral, "completed", outcome="plan d'apurement signé")
        with pytest.raises(Refused, match="closed \\(completed\\)"):
            run(ledger, usecases.cancel_referral, cancellation(ledger, referral["referral_id"]))
        assert ledger.store.referral(referral["referral_id"]).status == "completed"

    def test_a_repeated_message_is_done_once(self, ledger: Ledger) -> None:
        referral = a_referral(ledger)
        claim_and_send(ledger)
        decision = cancellation(ledger, referral["referral_id"])
        assert run(ledger, usecases.cancel_referral, decision)
        assert not run(ledger, usecases.cancel_referral, decision)
        assert len(sent(ledger, "referral-withdrawn")) == 1


def directed(
    ledger: Ledger, signal_id: str, partner: str, agency: str = AGENCY, by: str = "s.benali"
) -> NeedDirected:
    return NeedDirected(
        message_id=mid("direct"),
        occurred_at=ledger.clock(),
        signal_id=signal_id,
        need=ARREARS,
        partner=partner,
        agency=agency,
        decided_by=by,
        note="she knows the CESF there",
    )


class TestDirect:
    def _cancelled(self, ledger: Ledger) -> tuple[dict, str]:
        referral = a_referral(ledger)
        claim_and_send(ledger)
        run(ledger, usecases.cancel_referral, cancellation(ledger, referral["referral_id"]))
        return referral, signal_of(ledger, referral)

    def test_the_advisor_sends_the_need_to_the_partner_she_chose(self, ledger: Ledger) -> None:
        """Not the directory's first choice: the referral goes to hers, the ranking given as advice in `why`, the audit names her."""
        first, signal_id = self._cancelled(ledger)
        candidates = match(ledger.directory, ARREARS, ROUBAIX, sender=SOURCE)
        chosen = candidates[1]
        assert chosen.partner_id != first["partner"]
        assert run(ledger, usecases.direct_need, directed(ledger, signal_id, chosen.partner_id))
        key, referral = sent(ledger, "referral")[-1]
        assert key == referral["partner"] == chosen.partner_id
        assert referral["attempt"] == 2
        assert referral["why"][0] == "chosen by the advisor s.benali"
        assert f"ranked it {chosen.rank} of {len(candidates)}" in referral["why"][1]
        assert candidates[0].partner_id in referral["why"][1]
        assert "CESF" not in str(referral)
        audit = ledger.store.audit_trail(signal_id)
        assert any(a.action == "need-directed" and a.actor == "s.benali" for a in audit)

    def test_the_partner_may_be_chosen_again(self, ledger: Ledger) -> None:
        """The same partner as the cancelled referral: a new attempt, a new referral id."""
        first, signal_id = self._cancelled(ledger)
        run(ledger, usecases.direct_need, directed(ledger, signal_id, first["partner"]))
        referral = sent(ledger, "referral")[-1][1]
        assert referral["partner"] == first["partner"]
        assert referral["referral_id"] != first["referral_id"]

    def test_a_need_with_an_open_referral_is_refused(self, ledger: Ledger) -> None:
        referral = a_referral(ledger)
        signal_id = signal_of(ledger, referral)
        other = match(ledger.directory, ARREARS, ROUBAIX, sender=SOURCE)[1].partner_id
        with pytest.raises(Refused, match=r"open referral .*cancel it first"):
            run(ledger, usecases.direct_need, directed(ledger, signal_id, other))

    def test_a_partner_without_an_agreement_for_the_need_is_refused(self, ledger: Ledger) -> None:
        _, signal_id = self._cancelled(ledger)
        with pytest.raises(Refused, match="no agreement covering"):
            run(ledger, usecases.direct_need, directed(ledger, signal_id, "siao-nord"))
        with pytest.raises(Refused, match="unknown partner"):
            run(ledger, usecases.direct_need, directed(ledger, signal_id, "nobody-here"))

    def test_a_partner_the_consent_does_not_cover_is_refused(self, ledger: Ledger) -> None:
        """Consent still gates: a consent to CCAS only does not let the advisor send it to the CAF."""
        run(ledger, usecases.grant_consent, a_consent(ledger, kinds=("ccas-cias",)))
        run(ledger, usecases.receive_signal, a_signal(ledger))
        referral = sent(ledger, "referral")[-1][1]
        claim_and_send(ledger)
        run(ledger, usecases.cancel_referral, cancellation(ledger, referral["referral_id"]))
        candidates = match(ledger.directory, ARREARS, ROUBAIX, sender=SOURCE)
        outside = next(c for c in candidates if c.partner.kind != "ccas-cias")
        with pytest.raises(Refused, match="consent does not cover"):
            run(
                ledger,
                usecases.direct_need,
                directed(ledger, signal_of(ledger, referral), outside.partner_id),
            )

    def test_another_agency_may_not_direct(self, ledger: Ledger) -> None:
        first, signal_id = self._cancelled(ledger)
        with pytest.raises(Refused, match="not followed by"):
            run(
                ledger,
                usecases.direct_need,
                directed(ledger, signal_id, first["partner"], "lmh-agence-lille-sud", "a.martin"),
            )

    def test_an_unknown_signal_is_refused(self, ledger: Ledger) -> None:
        with pytest.raises(Refused, match="unknown signal"):
            run(ledger, usecases.direct_need, directed(ledger, "s-nowhere", "ccas-roubaix"))


def transferral(ledger: Ledger, referral_id: str, partner: str, **extra) -> ReferralTransferred:
    values = {
        "message_id": mid("transfer"),
        "occurred_at": ledger.clock(),
        "referral_id": referral_id,
        "partner": partner,
        "agency": AGENCY,
        "decided_by": "s.benali",
        "reason": "the person prefers the CCAS near her work",
    }
    values.update(extra)
    return ReferralTransferred(**values)


def second_candidate(ledger: Ledger, first: dict) -> str:
    return next(
        c.partner_id
        for c in match(ledger.directory, ARREARS, ROUBAIX, sender=SOURCE)
        if c.partner_id != first["partner"]
    )


class TestTransfer:
    def _accepted(self, ledger: Ledger) -> dict:
        referral = a_referral(ledger)
        claim_and_send(ledger)
        answer(ledger, referral, "accepted")
        return referral

    def test_an_accepted_referral_moves_to_the_partner_she_chose(self, ledger: Ledger) -> None:
        """The first partner drops it (ReferralWithdrawn), the referral closes as cancelled, a new referral goes to the other partner with the advisor's choice in `why`; both audited."""
        first = self._accepted(ledger)
        other = second_candidate(ledger, first)
        assert run(
            ledger, usecases.transfer_referral, transferral(ledger, first["referral_id"], other)
        )
        assert ledger.store.referral(first["referral_id"]).status == "cancelled"
        ((key, withdrawn),) = sent(ledger, "referral-withdrawn")
        assert key == first["partner"]
        assert withdrawn["reason"] == "signal-cancelled"
        key, second = sent(ledger, "referral")[-1]
        assert key == other == second["partner"]
        assert second["attempt"] == 2
        assert second["why"][0] == "chosen by the advisor s.benali"
        told = [b for k, b in sent(ledger, "referral-status-changed") if k == AGENCY]
        assert any(b["status"] == "cancelled" and other in b["note"] for b in told)
        actions = {a.action for a in ledger.store.audit_trail(first["referral_id"])}
        assert "referral-transferred" in actions
        with ledger.store.begin() as tx:
            assert tx.signals.need_states(signal_of(ledger, first))[ARREARS] == "routed"

    def test_a_referral_not_yet_accepted_is_not_transferred(self, ledger: Ledger) -> None:
        """Still waiting for its answer: cancel it and send the need instead."""
        first = a_referral(ledger)
        other = second_candidate(ledger, first)
        with pytest.raises(Refused, match="cancel it and send the need instead"):
            run(
                ledger,
                usecases.transfer_referral,
                transferral(ledger, first["referral_id"], other),
            )
        assert ledger.store.referral(first["referral_id"]).status == "requested"

    def test_a_transfer_to_a_partner_without_agreement_changes_nothing(
        self, ledger: Ledger
    ) -> None:
        """Refused as a whole: the first referral stays accepted, its partner hears nothing."""
        first = self._accepted(ledger)
        with pytest.raises(Refused, match="no agreement covering"):
            run(
                ledger,
                usecases.transfer_referral,
                transferral(ledger, first["referral_id"], "siao-nord"),
            )
        assert ledger.store.referral(first["referral_id"]).status == "accepted"
        assert sent(ledger, "referral-withdrawn") == []

    def test_a_transfer_to_the_same_partner_or_by_another_agency_is_refused(
        self, ledger: Ledger
    ) -> None:
        first = self._accepted(ledger)
        with pytest.raises(Refused, match="already with"):
            run(
                ledger,
                usecases.transfer_referral,
                transferral(ledger, first["referral_id"], first["partner"]),
            )
        with pytest.raises(Refused, match="not followed by"):
            run(
                ledger,
                usecases.transfer_referral,
                transferral(
                    ledger,
                    first["referral_id"],
                    second_candidate(ledger, first),
                    agency="lmh-agence-lille-sud",
                    decided_by="a.martin",
                ),
            )


def reopening(ledger: Ledger, signal_id: str, **extra) -> NeedReopened:
    values = {
        "message_id": mid("reopen"),
        "occurred_at": ledger.clock(),
        "signal_id": signal_id,
        "need": ARREARS,
        "agency": AGENCY,
        "decided_by": "s.benali",
        "note": "reached her by phone: she wants the help now",
    }
    values.update(extra)
    return NeedReopened(**values)


class TestReopen:
    def test_a_need_closed_for_the_advisor_is_routed_again(self, ledger: Ledger) -> None:
        """Rejected as unreachable, the need closed for the advisor; she reached the person and reopens it: a new attempt goes out (the partner that declined is a candidate again), the note kept in the need's detail, the decision audited."""
        first = a_referral(ledger)
        claim_and_send(ledger)
        answer(ledger, first, "rejected", reason="unreachable")
        signal_id = signal_of(ledger, first)
        with ledger.store.begin() as tx:
            assert tx.signals.need_state(signal_id, ARREARS) == "closed"
        assert run(ledger, usecases.reopen_need, reopening(ledger, signal_id))
        second = sent(ledger, "referral")[-1][1]
        assert second["attempt"] == 2
        assert second["partner"] == first["partner"]
        with ledger.store.begin() as tx:
            assert tx.signals.need_state(signal_id, ARREARS) == "routed"
        actions = {a.action for a in ledger.store.audit_trail(signal_id)}
        assert "need-reopened" in actions

    def test_a_reopened_need_without_consent_waits_and_the_advisor_is_asked(
        self, ledger: Ledger
    ) -> None:
        """Consent still gates: the person refused, the advisor reopens; without a consent the need parks and a ConsentRequested goes to the agency."""
        run(ledger, usecases.receive_signal, a_signal(ledger, person="T-REOPEN"))
        ((_, asked),) = sent(ledger, "consent-requested")
        signal_id = asked["signal_id"]
        run(
            ledger,
            usecases.refuse_consent,
            ConsentRefused(
                message_id=mid("ref"),
                occurred_at=ledger.clock(),
                signal_id=signal_id,
                person_ref="T-REOPEN",
                collected_by="s.benali",
                agency=AGENCY,
            ),
        )
        run(ledger, usecases.reopen_need, reopening(ledger, signal_id))
        with ledger.store.begin() as tx:
            assert tx.signals.need_state(signal_id, ARREARS) == "parked"
        assert len(sent(ledger, "consent-requested")) == 2
        assert sent(ledger, "referral") == []

    def test_an_open_need_is_not_reopened(self, ledger: Ledger) -> None:
        first = a_referral(ledger)
        with pytest.raises(Refused, match="is routed, not closed"):
            run(ledger, usecases.reopen_need, reopening(ledger, signal_of(ledger, first)))

    def test_another_agency_may_not_reopen(self, ledger: Ledger) -> None:
        first = a_referral(ledger)
        claim_and_send(ledger)
        answer(ledger, first, "rejected", reason="unreachable")
        with pytest.raises(Refused, match="not followed by"):
            run(
                ledger,
                usecases.reopen_need,
                reopening(
                    ledger,
                    signal_of(ledger, first),
                    agency="lmh-agence-lille-sud",
                    decided_by="a.martin",
                ),
            )


def test_a_need_reopened_then_closed_again_tells_the_loop_again(ledger: Ledger) -> None:
    """Closed for the advisor, reopened, declined again as unreachable: a second SignalClosed (its own id), not a clash with the first."""
    first = a_referral(ledger)
    claim_and_send(ledger)
    answer(ledger, first, "rejected", reason="unreachable")
    signal_id = signal_of(ledger, first)
    run(ledger, usecases.reopen_need, reopening(ledger, signal_id))
    second = sent(ledger, "referral")[-1][1]
    claim_and_send(ledger)
    answer(ledger, second, "rejected", reason="unreachable")
    closed = [b for k, b in sent(ledger, "signal-closed") if k == AGENCY]
    assert [b["outcome"] for b in closed] == ["advisor-decides", "advisor-decides"]
    assert len({b["message_id"] for b in closed}) == 2


def orientation(ledger: Ledger, signal_id: str, partner: str, **extra) -> OrientationRecorded:
    values = {
        "message_id": mid("orient"),
        "occurred_at": ledger.clock(),
        "signal_id": signal_id,
        "need": ARREARS,
        "partner": partner,
        "agency": AGENCY,
        "decided_by": "s.benali",
        "channel": "phone",
        "oriented_at": ledger.clock(),
        "note": "appointment on Tuesday with the CESF",
    }
    values.update(extra)
    return OrientationRecorded(**values)


class TestOrientationOutsideTheBus:
    def _closed_for_the_advisor(self, ledger: Ledger) -> tuple[dict, str]:
        first = a_referral(ledger)
        claim_and_send(ledger)
        answer(ledger, first, "rejected", reason="unreachable")
        return first, signal_of(ledger, first)

    def test_an_orientation_by_phone_closes_the_loop_and_counts(self, ledger: Ledger) -> None:
        """Recorded as a referral completed at once: nothing sent to the partner, the source and the agency hear `completed` (the note to the agency only), the need closes, the figures count it, the audit names the advisor."""
        from partnerbus.ops.monitor import ledger_figures

        _, signal_id = self._closed_for_the_advisor(ledger)
        before = ledger_figures(ledger.store, ledger.clock()).referrals_by_status
        referrals_before = len(sent(ledger, "referral"))
        partner = match(ledger.directory, ARREARS, ROUBAIX, sender=SOURCE)[1].partner_id
        assert run(ledger, usecases.record_orientation, orientation(ledger, signal_id, partner))
        assert len(sent(ledger, "referral")) == referrals_before
        after = ledger_figures(ledger.store, ledger.clock()).referrals_by_status
        assert after.get("completed", 0) == before.get("completed", 0) + 1
        told = {
            key: body
            for key, body in sent(ledger, "referral-status-changed")
            if body["status"] == "completed"
        }
        assert set(told) == {SOURCE, AGENCY}
        assert "Tuesday" in told[AGENCY]["note"]
        assert "Tuesday" not in str(told[SOURCE])
        assert told[AGENCY]["partner"] == partner
        closed = [b for k, b in sent(ledger, "signal-closed") if k == AGENCY]
        assert closed[-1]["outcome"] == "completed"
        rid = told[AGENCY]["referral_id"]
        row = ledger.store.referral(rid)
        assert (row.status, row.partner_id, row.attempt) == ("completed", partner, 2)
        assert row.due_at is None
        audit = ledger.store.audit_trail(rid)
        assert any(a.action == "orientation-recorded" and a.actor == "s.benali" for a in audit)

    def test_an_orientation_the_consent_does_not_cover_is_refused(self, ledger: Ledger) -> None:
        _, signal_id = self._closed_for_the_advisor(ledger)
        with pytest.raises(Refused, match="consent does not cover"):
            run(ledger, usecases.record_orientation, orientation(ledger, signal_id, "adil-nord"))

    def test_an_orientation_while_a_referral_is_open_is_refused(self, ledger: Ledger) -> None:
        first = a_referral(ledger)
        with pytest.raises(Refused, match="cancel it first"):
            run(
                ledger,
                usecases.record_orientation,
                orientation(ledger, signal_of(ledger, first), first["partner"]),
            )

    def test_an_orientation_dated_in_the_future_or_by_another_agency_is_refused(
        self, ledger: Ledger
    ) -> None:
        first, signal_id = self._closed_for_the_advisor(ledger)
        from datetime import timedelta

        later = ledger.clock() + timedelta(days=2)
        with pytest.raises(Refused, match="in the future"):
            run(
                ledger,
                usecases.record_orientation,
                orientation(ledger, signal_id, first["partner"], oriented_at=later),
            )
        with pytest.raises(Refused, match="not followed by"):
            run(
                ledger,
                usecases.record_orientation,
                orientation(
                    ledger,
                    signal_id,
                    first["partner"],
                    agency="lmh-agence-lille-sud",
                    decided_by="a.martin",
                ),
            )
