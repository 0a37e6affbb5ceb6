"""The use cases against the durable record (SQLite and PostgreSQL), without a broker."""

from __future__ import annotations

import json
import re
from datetime import timedelta

import pytest

from partnerbus import usecases
from partnerbus.directory import match
from partnerbus.directory.match import NO_VISITS, VISITS
from partnerbus.ledger.store import Store
from partnerbus.schemas import (
    ConsentGranted,
    ConsentRefused,
    ConsentRevoked,
    ConsentScope,
    Contact,
    Facts,
    Preferences,
    ReferralStatusChanged,
    Signal,
)
from partnerbus.testing import FakeClock
from partnerbus.usecases import Ledger, Refused
from tests.conftest import make_ledger

ARREARS = "logement-hebergement--reduire-les-impayes-de-loyer"
ROUBAIX = "59512"
KINDS = ("ccas-cias", "points-conseil-budget", "cresus", "caf", "maisons-des-solidarites")
Q = "test.queue"


@pytest.fixture
def ledger(store: Store) -> Ledger:
    return make_ledger(store)


_counter = iter(range(1_000_000))


def mid(prefix: str) -> str:
    return f"{prefix}-{next(_counter)}"


def a_signal(ledger: Ledger, person: str = "T-0001", **extra) -> Signal:
    values = {
        "message_id": mid("sig"),
        "occurred_at": ledger.clock(),
        "source": "lmh-recouvrement",
        "person_ref": person,
        "commune": ROUBAIX,
        "needs": (ARREARS,),
        "facts": Facts(arrears_eur=1200, note="free text"),
        "contact": Contact(phone="0612345678"),
    }
    values.update(extra)
    return Signal(**values)


def a_consent(
    ledger: Ledger, person: str = "T-0001", kinds=KINDS, days: int = 30
) -> ConsentGranted:
    now = ledger.clock()
    return ConsentGranted(
        message_id=mid("msg"),
        occurred_at=now,
        consent_id=mid("c"),
        person_ref=person,
        scope=ConsentScope(needs=("logement-hebergement",), partner_kinds=kinds),
        collected_by="s.benali",
        agency="lmh-agence-roubaix",
        method="oral",
        granted_at=now,
        valid_until=now + timedelta(days=days),
    )


def a_revocation(
    ledger: Ledger, grant: ConsentGranted, revoked_by: str = "s.benali"
) -> ConsentRevoked:
    """The revocation of `grant`, recorded now by its agency."""
    return ConsentRevoked(
        message_id=mid("rev"),
        occurred_at=ledger.clock(),
        consent_id=grant.consent_id,
        revoked_by=revoked_by,
        agency=grant.agency,
        revoked_at=ledger.clock(),
    )


def run(ledger: Ledger, use_case, message):
    with ledger.store.begin() as tx:
        return use_case(ledger, tx, message, Q)


def sent(ledger: Ledger, kind: str) -> list[tuple[str, dict]]:
    return [(key, json.loads(body)) for key, t, body in ledger.store.outbox() if t == kind]


def claimed_referrals(ledger: Ledger) -> list:
    """The referral rows of the outbox, claimed as the relay claims them (the agency's
    `consent-recorded` answers are claimed beside them)."""
    rows = ledger.store.claim_pending(ledger.clock(), timedelta(minutes=1))
    return [row for row in rows if row.message_type == "referral"]


class TestReceiveSignal:
    def test_a_signal_without_consent_is_parked_and_the_advisor_is_asked(
        self, ledger: Ledger
    ) -> None:
        """No consent: no referral, one ConsentRequested to the tenant's agency."""
        signal = a_signal(ledger)
        assert run(ledger, usecases.receive_signal, signal)
        assert ledger.store.count("referrals") == 0
        ((key, body),) = sent(ledger, "consent-requested")
        assert key == "lmh-agence-roubaix"
        assert body["reason"] == "missing"
        assert body["needs"] == [ARREARS]

    def test_a_consented_signal_becomes_a_minimised_pseudonymous_referral(
        self, ledger: Ledger
    ) -> None:
        """With consent the top candidate gets a referral carrying only its kind's share."""
        run(ledger, usecases.grant_consent, a_consent(ledger))
        signal = a_signal(ledger)
        run(ledger, usecases.receive_signal, signal)
        ((key, body),) = sent(ledger, "referral")
        top = match(ledger.directory, ARREARS, ROUBAIX, sender="lmh-recouvrement")[0]
        assert key == top.partner_id == body["partner"]
        assert body["person"] != signal.person_ref
        assert "T-0001" not in json.dumps(body)
        assert body["why"], "the directory's reasons travel with the referral"

    def test_a_duplicate_signal_is_recorded_once(self, ledger: Ledger) -> None:
        """The second delivery of a message id is a no-op."""
        run(ledger, usecases.grant_consent, a_consent(ledger))
        signal = a_signal(ledger)
        assert run(ledger, usecases.receive_signal, signal)
        assert not run(ledger, usecases.receive_signal, signal)
        assert ledger.store.count("referrals") == 1
        assert ledger.store.count("signals") == 1

    def test_an_unknown_commune_is_refused(self, ledger: Ledger) -> None:
        """A commune outside the territory is bad input, refused with the reason."""
        with pytest.raises(Refused, match="unknown commune"):
            usecases.check_signal(ledger, a_signal(ledger, commune="75056"))


class TestPreferences:
    """The person's wishes (Signal.preferences) travel with her referrals, and a refusal of
    direct contact takes the contact details off every one of them, reroutes included."""

    def test_through_the_advisor_only_the_referral_names_no_contact(self, ledger: Ledger) -> None:
        run(ledger, usecases.grant_consent, a_consent(ledger))
        wishes = Preferences(through_advisor=True, languages=("fr",))
        run(ledger, usecases.receive_signal, a_signal(ledger, preferences=wishes))
        ((_, body),) = sent(ledger, "referral")
        assert body["contact"] is None
        assert body["preferences"]["through_advisor"] is True
        assert body["preferences"]["languages"] == ["fr"]
        assert body["agency"] == "lmh-agence-roubaix"  # whom the partner calls instead

    def test_no_wish_keeps_the_contact_and_sends_no_preferences(self, ledger: Ledger) -> None:
        run(ledger, usecases.grant_consent, a_consent(ledger))
        run(ledger, usecases.receive_signal, a_signal(ledger))
        ((_, body),) = sent(ledger, "referral")
        assert body["contact"] == {"phone": "0612345678", "preferred_time": None}
        assert body["preferences"] is None

    def test_a_home_visit_goes_to_the_partner_that_visits_and_a_reroute_keeps_the_wishes(
        self, ledger: Ledger
    ) -> None:
        run(ledger, usecases.grant_consent, a_consent(ledger))
        wishes = Preferences(do_not_contact=True, home_visit=True)
        run(ledger, usecases.receive_signal, a_signal(ledger, preferences=wishes))
        ((key, first),) = sent(ledger, "referral")
        plain = match(ledger.directory, ARREARS, ROUBAIX, sender="lmh-recouvrement")
        assert plain[0].partner_id != key == "mds-roubaix"
        assert VISITS in first["why"]
        assert first["contact"] is None and first["preferences"]["home_visit"] is True
        claim_and_send(ledger)
        trail = [a.why for a in ledger.store.audit_trail(first["referral_id"])]
        assert any("shared: facts, preferences" in (why or "") for why in trail), trail

        answer(ledger, first, "rejected", reason="full")
        second = [body for _, body in sent(ledger, "referral") if body["partner"] != key]
        assert second, "the need went to the next partner"
        assert second[0]["contact"] is None
        assert second[0]["preferences"]["do_not_contact"] is True
        assert NO_VISITS in second[0]["why"] or VISITS in second[0]["why"]


class TestConsentAnswers:
    def test_a_recorded_grant_is_acknowledged_to_its_agency_once(self, ledger: Ledger) -> None:
        """A grant puts one ConsentRecorded in the outbox for its agency, naming the event; the same event again (a redelivery) changes nothing and adds no second answer."""
        run(ledger, usecases.receive_signal, a_signal(ledger))
        grant = a_consent(ledger)
        assert run(ledger, usecases.grant_consent, grant)
        assert not run(ledger, usecases.grant_consent, grant)
        ((key, ack),) = sent(ledger, "consent-recorded")
        assert key == grant.agency
        assert ack["event_id"] == grant.message_id
        assert ack["event"] == "consent-granted"
        assert (ack["consent_id"], ack["person_ref"]) == (grant.consent_id, grant.person_ref)
        assert ack["status"] == "recorded"
        assert ack["detail"] == "1 waiting need(s) of the person routed"

    def test_a_revocation_and_a_refusal_are_acknowledged(self, ledger: Ledger) -> None:
        """A revocation is answered with the consent's person and the referrals withdrawn; a person's refusal with its signal and the needs closed."""
        grant = a_consent(ledger)
        run(ledger, usecases.grant_consent, grant)
        run(ledger, usecases.receive_signal, a_signal(ledger))
        revocation = a_revocation(ledger, grant)
        run(ledger, usecases.revoke_consent, revocation)
        parked = a_signal(ledger, person="T-0002")
        run(ledger, usecases.receive_signal, parked)
        refusal = ConsentRefused(
            message_id=mid("ref"),
            occurred_at=ledger.clock(),
            signal_id=parked.message_id,
            person_ref="T-0002",
            collected_by="s.benali",
            agency=grant.agency,
        )
        run(ledger, usecases.refuse_consent, refusal)
        acks = {b["event_id"]: b for _, b in sent(ledger, "consent-recorded")}
        revoked, refused = acks[revocation.message_id], acks[refusal.message_id]
        assert (revoked["event"], revoked["consent_id"]) == ("consent-revoked", grant.consent_id)
        assert revoked["person_ref"] == "T-0001"
        assert revoked["detail"] == "1 open referral(s) withdrawn"
        assert (refused["event"], refused["signal_id"]) == ("consent-refused", parked.message_id)
        assert refused["detail"] == "1 waiting need(s) of the signal closed"

    def test_a_refused_event_is_answered_once_with_its_reason(self, ledger: Ledger) -> None:
        """`answer_refusal` puts one ConsentRejected for the agency, with the reason and no consent recorded; the same event refused again is not answered twice."""
        grant = a_consent(ledger)
        grant = grant.model_copy(update={"collected_by": "a.martin"})
        with pytest.raises(Refused, match=r"a\.martin") as refused:
            run(ledger, usecases.grant_consent, grant)
        for _ in range(2):
            with ledger.store.begin() as tx:
                usecases.answer_refusal(ledger, tx, grant, str(refused.value))
        ((key, answer),) = sent(ledger, "consent-rejected")
        assert key == grant.agency
        assert answer["event_id"] == grant.message_id
        assert answer["consent_id"] == grant.consent_id
        assert "a.martin" in answer["reason"]
        assert sent(ledger, "consent-recorded") == []
        assert ledger.store.count("consents") == 0

    def test_a_refusal_naming_an_agency_outside_the_directory_is_not_answered(
        self, ledger: Ledger
    ) -> None:
        """No queue to answer on: nothing is put in the outbox (the dead letter keeps it)."""
        grant = a_consent(ledger).model_copy(update={"agency": "nobody-here"})
        with ledger.store.begin() as tx:
            assert not usecases.answer_refusal(ledger, tx, grant, "unknown agency")
        assert sent(ledger, "consent-rejected") == []


class TestConsent:
    def test_a_grant_releases_the_parked_signal(self, ledger: Ledger) -> None:
        """The referral leaves when the consent arrives, not before."""
        run(ledger, usecases.receive_signal, a_signal(ledger))
        assert ledger.store.count("referrals") == 0
        run(ledger, usecases.grant_consent, a_consent(ledger))
        assert ledger.store.count("referrals") == 1

    def test_a_grant_out_of_scope_leaves_the_signal_parked(self, ledger: Ledger) -> None:
        """A consent for other partner kinds releases nothing."""
        run(ledger, usecases.receive_signal, a_signal(ledger))
        run(ledger, usecases.grant_consent, a_consent(ledger, kinds=("siao",)))
        assert ledger.store.count("referrals") == 0

    def test_a_refusal_closes_the_signal_and_tells_the_source(self, ledger: Ledger) -> None:
        """The person said no: the source and the agency hear the outcome."""
        signal = a_signal(ledger)
        run(ledger, usecases.receive_signal, signal)
        refusal = ConsentRefused(
            message_id=mid("msg"),
            occurred_at=ledger.clock(),
            signal_id=signal.message_id,
            person_ref=signal.person_ref,
            collected_by="s.benali",
            agency="lmh-agence-roubaix",
        )
        run(ledger, usecases.refuse_consent, refusal)
        closed = sent(ledger, "signal-closed")
        assert {key for key, _ in closed} == {"lmh-recouvrement", "lmh-agence-roubaix"}
        assert all(body["outcome"] == "consent-refused" for _, body in closed)
        run(ledger, usecases.grant_consent, a_consent(ledger))
        assert ledger.store.count("referrals") == 0, "a refused need is not released later"

    def _revoke(self, ledger: Ledger, consent: ConsentGranted) -> None:
        run(ledger, usecases.revoke_consent, a_revocation(ledger, consent))

    def test_a_revocation_withdraws_the_open_referral(self, ledger: Ledger) -> None:
        """Revoking after the relay picked the referral up sends ReferralWithdrawn to the partner and marks the referral withdrawn."""
        consent = a_consent(ledger)
        run(ledger, usecases.grant_consent, consent)
        run(ledger, usecases.receive_signal, a_signal(ledger))
        ((partner, referral),) = sent(ledger, "referral")
        claim_and_send(ledger)
        self._revoke(ledger, consent)
        ((key, withdrawn),) = sent(ledger, "referral-withdrawn")
        assert key == partner
        assert withdrawn["referral_id"] == referral["referral_id"]
        assert withdrawn["reason"] == "consent-revoked"
        assert ledger.store.referral(referral["referral_id"]).status == "withdrawn"

    def test_a_revocation_before_the_referral_left_withholds_it(self, ledger: Ledger) -> None:
        """Revoked before any relay picked the referral up: its outbox row is dropped, the partner hears nothing, the source and advisor hear 'withdrawn', the audit says 'withheld'."""
        consent = a_consent(ledger)
        run(ledger, usecases.grant_consent, consent)
        run(ledger, usecases.receive_signal, a_signal(ledger))
        ((_, referral),) = sent(ledger, "referral")
        self._revoke(ledger, consent)
        assert sent(ledger, "referral") == []
        assert sent(ledger, "referral-withdrawn") == []
        told = {
            key
            for key, body in sent(ledger, "referral-status-changed")
            if body["status"] == "withdrawn"
        }
        assert told == {"lmh-recouvrement", "lmh-agence-roubaix"}
        assert ledger.store.referral(referral["referral_id"]).status == "withdrawn"
        actions = [a.action for a in ledger.store.audit_trail(referral["referral_id"])]
        assert "referral-withheld" in actions
        assert "referral-withdrawn" not in actions

    def test_a_referral_whose_consent_ran_out_before_sending_is_not_sent(
        self, ledger: Ledger
    ) -> None:
        """The last check before publishing refuses a referral whose consent expired while it waited: withdrawn unsent, and the advisor is asked for consent again."""
        run(ledger, usecases.grant_consent, a_consent(ledger, days=1))
        run(ledger, usecases.receive_signal, a_signal(ledger))
        ((_, referral),) = sent(ledger, "referral")
        assert isinstance(ledger.clock, FakeClock)
        ledger.clock.advance(timedelta(days=2))  # the broker was down meanwhile
        (row,) = claimed_referrals(ledger)
        with ledger.store.begin() as tx:
            assert not usecases.clear_to_send(ledger, tx, referral["referral_id"], row.attempts)
        assert ledger.store.referral(referral["referral_id"]).status == "withdrawn"
        assert sent(ledger, "referral-withdrawn") == [], "it never left: nothing to withdraw"
        ((_, again),) = [(k, b) for k, b in sent(ledger, "consent-requested")]
        assert again["needs"] == [ARREARS]

    def test_a_referral_still_consented_is_cleared_to_send(self, ledger: Ledger) -> None:
        """The last check lets a referral leave while its consent holds."""
        run(ledger, usecases.grant_consent, a_consent(ledger))
        run(ledger, usecases.receive_signal, a_signal(ledger))
        ((_, referral),) = sent(ledger, "referral")
        (row,) = claimed_referrals(ledger)
        with ledger.store.begin() as tx:
            assert usecases.clear_to_send(ledger, tx, referral["referral_id"], row.attempts)
        assert ledger.store.referral(referral["referral_id"]).status == "requested"

    def test_an_expired_consent_withdraws_what_the_partner_has_not_taken_up(
        self, ledger: Ledger
    ) -> None:
        """When a consent runs out, a delivered but unanswered referral is withdrawn (reason consent-expired) and the advisor is asked again; an accepted one goes on."""
        run(ledger, usecases.grant_consent, a_consent(ledger, person="T-EXP-A", days=5))
        run(ledger, usecases.grant_consent, a_consent(ledger, person="T-EXP-B", days=5))
        run(ledger, usecases.receive_signal, a_signal(ledger, person="T-EXP-A"))
        run(ledger, usecases.receive_signal, a_signal(ledger, person="T-EXP-B"))
        (_, waiting), (_, taken) = sent(ledger, "referral")
        claim_and_send(ledger)
        answer(ledger, taken, "accepted")
        assert isinstance(ledger.clock, FakeClock)
        ledger.clock.advance(timedelta(days=6))
        with ledger.store.begin() as tx:
            counts = usecases.watch_deadlines(ledger, tx)
        assert counts["withdrawn-consent-expired"] == 1
        assert ledger.store.referral(waiting["referral_id"]).status == "withdrawn"
        assert ledger.store.referral(taken["referral_id"]).status == "accepted"
        ((key, withdrawn),) = sent(ledger, "referral-withdrawn")
        assert (key, withdrawn["reason"]) == (waiting["partner"], "consent-expired")
        asked = [b for _, b in sent(ledger, "consent-requested") if b["person_ref"] == "T-EXP-A"]
        assert len(asked) == 1


def answer(ledger: Ledger, referral: dict, status: str, **extra) -> None:
    """The referral's partner sends this status."""
    run(
        ledger,
        usecases.record_status,
        ReferralStatusChanged(
            message_id=mid("st"),
            occurred_at=ledger.clock(),
            referral_id=referral["referral_id"],
            partner=referral["partner"],
            status=status,
            **extra,
        ),
    )


def claim_and_send(ledger: Ledger) -> None:
    """What the relay does: claim what is pending and record each confirm."""
    for row in ledger.store.claim_pending(ledger.clock(), timedelta(minutes=1)):
        with ledger.store.begin() as tx:
            tx.outbox.mark_sent(row.id, ledger.clock())
            if row.message_type == "referral" and row.referral_id:
                usecases.mark_delivered(ledger, tx, row.referral_id)


class TestStatuses:
    def _referral(self, ledger: Ledger) -> dict:
        run(ledger, usecases.grant_consent, a_consent(ledger))
        run(ledger, usecases.receive_signal, a_signal(ledger))
        return sent(ledger, "referral")[-1][1]

    def _status(
        self, ledger: Ledger, referral: dict, status: str, **extra
    ) -> ReferralStatusChanged:
        return ReferralStatusChanged(
            message_id=mid("st"),
            occurred_at=ledger.clock(),
            referral_id=referral["referral_id"],
            partner=referral["partner"],
            status=status,
            **extra,
        )

    def test_a_partners_completion_without_outcome_is_refused_even_posing_as_a_copy(
        self, ledger: Ledger
    ) -> None:
        """Only the bus's forwarded copy may go without an outcome: a partner that sets `signal_id` itself is still refused."""
        first = self._referral(ledger)
        run(ledger, usecases.record_status, self._status(ledger, first, "accepted"))
        posing = self._status(ledger, first, "completed", signal_id="s-posing", need=ARREARS)
        with pytest.raises(Refused, match="carries its outcome"):
            run(ledger, usecases.record_status, posing)

    def test_a_rejection_for_lack_of_room_reroutes_to_the_next_best(self, ledger: Ledger) -> None:
        """`full` sends the need to the next candidate, never back to the one that declined."""
        first = self._referral(ledger)
        run(ledger, usecases.record_status, self._status(ledger, first, "rejected", reason="full"))
        referrals = sent(ledger, "referral")
        assert len(referrals) == 2
        second = referrals[-1][1]
        assert second["partner"] != first["partner"]
        assert second["attempt"] == 2

    def test_a_rejection_because_the_person_is_unreachable_goes_to_the_advisor(
        self, ledger: Ledger
    ) -> None:
        """`unreachable` does not reroute: the advisor decides."""
        first = self._referral(ledger)
        run(
            ledger,
            usecases.record_status,
            self._status(ledger, first, "rejected", reason="unreachable"),
        )
        assert len(sent(ledger, "referral")) == 1
        told = [k for k, b in sent(ledger, "referral-status-changed") if b["status"] == "rejected"]
        assert set(told) == {"lmh-recouvrement", "lmh-agence-roubaix"}
        closed = sent(ledger, "signal-closed")
        assert {k for k, _ in closed} == {"lmh-recouvrement", "lmh-agence-roubaix"}
        assert {b["outcome"] for _, b in closed} == {"advisor-decides"}
        details = {k: b["detail"] for k, b in closed}
        assert "unreachable" in details["lmh-agence-roubaix"]
        # the source is the landlord's recovery service: a creditor never learns why
        assert details["lmh-recouvrement"] is None
        reasons = {
            k: b["reason"]
            for k, b in sent(ledger, "referral-status-changed")
            if b["status"] == "rejected"
        }
        assert reasons == {"lmh-agence-roubaix": "unreachable", "lmh-recouvrement": None}

    def test_a_completion_closes_the_need_for_the_source_and_the_advisor(
        self, ledger: Ledger
    ) -> None:
        """`completed` (with its outcome) ends the need: SignalClosed(completed) to both."""
        first = self._referral(ledger)
        for status, extra in (("accepted", {}), ("completed", {"outcome": "FSL granted"})):
            run(ledger, usecases.record_status, self._status(ledger, first, status, **extra))
        closed = sent(ledger, "signal-closed")
        assert {k for k, _ in closed} == {"lmh-recouvrement", "lmh-agence-roubaix"}
        assert {b["outcome"] for _, b in closed} == {"completed"}
        signal_id = ledger.store.referral(first["referral_id"]).signal_id
        with ledger.store.begin() as tx:
            assert tx.signals.need_states(signal_id) == {ARREARS: "closed"}

    def test_what_the_partner_wrote_reaches_the_advisor_not_the_source(
        self, ledger: Ledger
    ) -> None:
        """A completion's outcome and note go to the advisor's agency; the source hears the status alone."""
        first = self._referral(ledger)
        run(
            ledger,
            usecases.record_status,
            self._status(
                ledger, first, "completed", outcome="FSL granted", note="son helps with rent"
            ),
        )
        told = {
            key: body
            for key, body in sent(ledger, "referral-status-changed")
            if body["status"] == "completed"
        }
        assert told["lmh-agence-roubaix"]["outcome"] == "FSL granted"
        assert told["lmh-agence-roubaix"]["note"] == "son helps with rent"
        assert told["lmh-recouvrement"]["outcome"] is None
        assert told["lmh-recouvrement"]["note"] is None

    def test_an_illegal_transition_is_refused_and_recorded(self, ledger: Ledger) -> None:
        """completed → accepted is refused, recorded in history, not applied."""
        first = self._referral(ledger)
        run(ledger, usecases.record_status, self._status(ledger, first, "accepted"))
        run(
            ledger, usecases.record_status, self._status(ledger, first, "completed", outcome="done")
        )
        run(ledger, usecases.record_status, self._status(ledger, first, "accepted"))
        assert ledger.store.referral(first["referral_id"]).status == "completed"
        outcomes = [h["outcome"] for h in ledger.store.history(first["referral_id"])]
        assert outcomes[-1] == "refused"

    def test_a_status_about_another_partners_referral_is_refused(self, ledger: Ledger) -> None:
        """A partner cannot move a referral it did not receive."""
        first = self._referral(ledger)
        other = ReferralStatusChanged(
            message_id=mid("st"),
            occurred_at=ledger.clock(),
            referral_id=first["referral_id"],
            partner="caf-nord" if first["partner"] != "caf-nord" else "ccas-lille",
            status="accepted",
        )
        with pytest.raises(Refused, match="was not sent to"):
            run(ledger, usecases.record_status, other)


class TestDeadlines:
    def test_a_silent_partner_is_reminded_then_the_referral_expires_and_reroutes(
        self, ledger: Ledger
    ) -> None:
        """Half the deadline: a reminder; past it: expired, the next-best partner gets it."""
        run(ledger, usecases.grant_consent, a_consent(ledger))
        run(ledger, usecases.receive_signal, a_signal(ledger, urgency="urgent"))
        first = sent(ledger, "referral")[0][1]
        clock = ledger.clock
        assert isinstance(clock, FakeClock)
        clock.advance(timedelta(days=2))
        with ledger.store.begin() as tx:
            assert usecases.watch_deadlines(ledger, tx)["reminded"] == 1
        clock.advance(timedelta(days=2))
        with ledger.store.begin() as tx:
            assert usecases.watch_deadlines(ledger, tx)["expired"] == 1
        assert ledger.store.referral(first["referral_id"]).status == "expired"
        second = sent(ledger, "referral")[-1][1]
        assert second["partner"] != first["partner"]


class TestRetention:
    def test_free_text_goes_first_then_closed_referrals_are_anonymised(
        self, ledger: Ledger
    ) -> None:
        """After 90 days the note is gone; after 730 days of closure the person's reference is too."""
        run(ledger, usecases.grant_consent, a_consent(ledger, person="T-RET-1", days=30))
        signal = a_signal(ledger, person="T-RET-1")
        run(ledger, usecases.receive_signal, signal)
        referral = sent(ledger, "referral")[0][1]
        completed = ReferralStatusChanged(
            message_id=mid("st"),
            occurred_at=ledger.clock(),
            referral_id=referral["referral_id"],
            partner=referral["partner"],
            status="completed",
            outcome="repayment plan signed",
            note="Mme X said her son pays from March",
        )
        run(ledger, usecases.record_status, completed)
        assert ledger.store.referral(referral["referral_id"]).outcome == "repayment plan signed"
        for row in ledger.store.claim_pending(ledger.clock(), timedelta(minutes=1)):
            with ledger.store.begin() as tx:  # what the relay does after each confirm
                tx.outbox.mark_sent(row.id, ledger.clock())
        clock = ledger.clock
        assert isinstance(clock, FakeClock)
        keep = {"keep": timedelta(days=730), "keep_free_text": timedelta(days=90)}

        clock.advance(timedelta(days=91))
        with ledger.store.begin() as tx:
            counts = usecases.apply_retention(ledger, tx, **keep)
            row = tx.signals.get(signal.message_id)
        assert counts["free-text-deleted"] == 1
        assert counts["anonymised"] == 0
        assert row is not None
        assert "free text" not in row.body
        assert row.person_ref == "T-RET-1"
        assert counts["partner-text-deleted"] >= 2, "the partner's note and outcome"
        assert ledger.store.referral(referral["referral_id"]).outcome is None
        assert ledger.store.referral(referral["referral_id"]).status == "completed"
        kept = json.dumps(
            [ledger.store.history(referral["referral_id"])]
            + [a.why for a in ledger.store.audit_trail(referral["referral_id"])],
            default=str,
        )
        assert "son pays" not in kept
        assert "repayment plan" not in kept
        assert counts["outbox-deleted"] >= 1, "sent copies are not kept"

        clock.advance(timedelta(days=730))
        with ledger.store.begin() as tx:
            counts = usecases.apply_retention(ledger, tx, **keep)
            row = tx.signals.get(signal.message_id)
        assert counts["anonymised"] == 1
        assert counts["consents-anonymised"] == 1
        assert row is not None
        assert row.person_ref.startswith("anon-")
        assert "T-RET-1" not in row.body
        assert "1200" not in row.body
        assert ledger.store.audit_trail("T-RET-1") == [], "no record names the person any more"
        assert ledger.store.referral(referral["referral_id"]).anonymised_at is not None

    def test_an_open_referral_is_never_anonymised(self, ledger: Ledger) -> None:
        """A referral still in progress keeps its person, however old."""
        run(ledger, usecases.grant_consent, a_consent(ledger, person="T-RET-2", days=365))
        signal = a_signal(ledger, person="T-RET-2")
        run(ledger, usecases.receive_signal, signal)
        clock = ledger.clock
        assert isinstance(clock, FakeClock)
        clock.advance(timedelta(days=1000))
        with ledger.store.begin() as tx:
            counts = usecases.apply_retention(
                ledger, tx, keep=timedelta(days=730), keep_free_text=timedelta(days=90)
            )
        assert counts["anonymised"] == 0
        assert ledger.store.audit_trail("T-RET-2") != []


def test_a_consent_the_bus_could_not_honour_is_refused(ledger: Ledger) -> None:
    """An unknown agency, an unknown named partner or a period beyond a year is refused with its reason, and nothing is recorded."""
    good = a_consent(ledger, person="T-BAD-1")
    cases = {
        "unknown agency 'nowhere'": good.model_copy(update={"agency": "nowhere"}),
        "unknown partner(s) ghost": good.model_copy(
            update={"scope": ConsentScope(needs=("logement-hebergement",), partners=("ghost",))}
        ),
        "at most 366 days": good.model_copy(
            update={"valid_until": good.granted_at + timedelta(days=400)}
        ),
    }
    for expected, consent in cases.items():
        with pytest.raises(Refused, match=re.escape(expected)):
            run(ledger, usecases.grant_consent, consent)
    assert ledger.store.count("consents") == 0


def test_the_advisor_is_told_of_a_consent_about_to_expire_once(ledger: Ledger) -> None:
    """Two weeks before its end a consent is reported to its agency, and only once."""
    run(ledger, usecases.grant_consent, a_consent(ledger, person="T-EXP-1", days=30))
    clock = ledger.clock
    assert isinstance(clock, FakeClock)
    with ledger.store.begin() as tx:
        assert usecases.watch_deadlines(ledger, tx)["consents-expiring"] == 0
    clock.advance(timedelta(days=17))
    with ledger.store.begin() as tx:
        assert usecases.watch_deadlines(ledger, tx)["consents-expiring"] == 1
    with ledger.store.begin() as tx:
        assert usecases.watch_deadlines(ledger, tx)["consents-expiring"] == 0
    ((key, body),) = sent(ledger, "consent-expiring")
    assert key == "lmh-agence-roubaix"
    assert body["person_ref"] == "T-EXP-1"


def test_a_persons_trail_includes_what_partners_did_with_her_referrals(ledger: Ledger) -> None:
    """The advisor's timeline of a person shows the partners' answers, not only the bus's acts."""
    run(ledger, usecases.grant_consent, a_consent(ledger, person="T-TRAIL-1"))
    run(ledger, usecases.receive_signal, a_signal(ledger, person="T-TRAIL-1"))
    referral = sent(ledger, "referral")[0][1]
    claim_and_send(ledger)  # disclosed when the broker confirms it, not when decided
    rejection = ReferralStatusChanged(
        message_id=mid("st"),
        occurred_at=ledger.clock(),
        referral_id=referral["referral_id"],
        partner=referral["partner"],
        status="rejected",
        reason="full",
    )
    run(ledger, usecases.record_status, rejection)
    claim_and_send(ledger)
    actions = [r.action for r in ledger.store.audit_trail("T-TRAIL-1")]
    assert actions[:3] == ["consent-granted", "signal-received", "referral-disclosed"]
    assert "referral-rejected" in actions
    assert actions.count("referral-disclosed") == 2, "the reroute is on the trail too"


def test_a_signals_trail_includes_what_partners_did_with_its_referrals(ledger: Ledger) -> None:
    """The timeline of a signal id shows its referrals' records too, and nothing of another signal."""
    run(ledger, usecases.grant_consent, a_consent(ledger, person="T-TRAIL-2"))
    signal = a_signal(ledger, person="T-TRAIL-2")
    other = a_signal(ledger, person="T-TRAIL-2")
    run(ledger, usecases.receive_signal, signal)
    run(ledger, usecases.receive_signal, other)
    first = sent(ledger, "referral")[0][1]
    claim_and_send(ledger)
    answer(ledger, first, "accepted")
    trail = ledger.store.audit_trail(signal.message_id)
    assert [r.action for r in trail] == [
        "signal-received",
        "referral-disclosed",
        "referral-accepted",
    ]
    assert {r.subject for r in trail} == {signal.message_id, first["referral_id"]}
