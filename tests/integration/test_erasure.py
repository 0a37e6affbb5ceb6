"""Erasure by person across every table, on SQLite and PostgreSQL, without a broker.

After the retention period nothing in the record names the person: not the consent
journal's refusals, not the reads of her consents, not a message that never left."""

from __future__ import annotations

import json
from datetime import timedelta

from sqlalchemy import select

from partnerbus import usecases
from partnerbus.ledger import tables as t
from partnerbus.ledger.store import Store
from partnerbus.rules import disclose
from partnerbus.schemas import ConsentRefused, ConsentRevoked, Preferences, ReferralReminder
from partnerbus.testing import FakeClock
from partnerbus.usecases import Ledger
from tests.integration.test_usecases import Q, a_consent, a_signal, ledger, mid, run

__all__ = ["ledger"]  # the fixture, shared with the use cases' tests

KEEP = {"keep": timedelta(days=730), "keep_free_text": timedelta(days=90)}


def dump_database(store: Store) -> str:
    """Every row of every table, every column, as text."""
    lines = []
    with store.engine.connect() as conn:
        for table in t.metadata.sorted_tables:
            for row in conn.execute(select(table)):
                lines.append(f"{table.name}: " + " | ".join(str(v) for v in row))
    return "\n".join(lines)


def clock_of(ledger: Ledger) -> FakeClock:
    clock = ledger.clock
    assert isinstance(clock, FakeClock)
    return clock


def retain(ledger: Ledger) -> dict[str, int]:
    with ledger.store.begin() as tx:
        return usecases.apply_retention(ledger, tx, **KEEP)


def refused_signal(ledger: Ledger, person: str, **extra) -> str:
    """A signal about `person` parked for consent, then refused by her: closed, no referral."""
    signal = a_signal(ledger, person=person, **extra)
    run(ledger, usecases.receive_signal, signal)
    refusal = ConsentRefused(
        message_id=mid("refusal"),
        occurred_at=ledger.clock(),
        signal_id=signal.message_id,
        person_ref=person,
        collected_by="s.benali",
        agency="lmh-agence-roubaix",
    )
    run(ledger, usecases.refuse_consent, refusal)
    return signal.message_id


def read_consents(ledger: Ledger, person: str) -> None:
    """What `partnerbus consent list` and `referrals timeline` record about a read."""
    now = ledger.clock()
    with ledger.store.begin() as tx:
        tx.consents.of_person(person)
        tx.audit.record(
            "a.martin", "consents-read", person, now, person_ref=person, why="consent list"
        )
        tx.audit.record("ops.tester", "timeline-read", person, now, why="referrals timeline")


class TestForgetThePerson:
    def test_after_retention_no_table_names_a_person_who_refused(self, ledger: Ledger) -> None:
        """Her refusal (a journal row without consent), the reads of her consents and the request to her advisor that never left are all gone."""
        person = "T-GONE-0001"
        refused_signal(ledger, person, contact=None)
        read_consents(ledger, person)
        assert person in dump_database(ledger.store)

        clock_of(ledger).advance(timedelta(days=731))
        counts = retain(ledger)

        assert person not in dump_database(ledger.store)
        assert counts["persons-forgotten"] == 1
        assert counts["retention-failed"] == 0
        journal = ledger.store.count("consent_journal", event="refused")
        assert journal == 1, "the refusal stays as a fact, under a token"
        assert ledger.store.count("audit", action="consents-read") == 1

    def test_a_person_still_on_record_keeps_her_traces(self, ledger: Ledger) -> None:
        """A consent still running (or a signal still open) keeps her reads and refusals under her reference."""
        person = "T-KEPT-0001"
        run(ledger, usecases.grant_consent, a_consent(ledger, person=person, days=365))
        read_consents(ledger, person)
        clock_of(ledger).advance(timedelta(days=731))
        counts = retain(ledger)
        assert counts["persons-forgotten"] == 0
        assert [r.action for r in ledger.store.audit_trail(person)].count("consents-read") == 1

    def test_recent_traces_wait_for_the_retention_period(self, ledger: Ledger) -> None:
        """A read made yesterday is kept for the full period, even if the person has nothing else on record."""
        person = "T-READ-0001"
        read_consents(ledger, person)
        clock_of(ledger).advance(timedelta(days=1))
        assert retain(ledger)["persons-forgotten"] == 0
        assert person in dump_database(ledger.store)
        clock_of(ledger).advance(timedelta(days=730))
        assert retain(ledger)["persons-forgotten"] == 1
        assert person not in dump_database(ledger.store)

    def test_an_anonymised_signal_keeps_none_of_her_wishes(self, ledger: Ledger) -> None:
        """Her languages and how she wished to be approached go with her facts and contact."""
        wishes = Preferences(through_advisor=True, home_visit=True, languages=("kab",))
        sid = refused_signal(ledger, "T-WISH-0001", preferences=wishes)

        clock_of(ledger).advance(timedelta(days=731))
        counts = retain(ledger)

        assert counts["anonymised"] == 1
        with ledger.store.begin() as tx:
            row = tx.signals.get(sid)
            assert row is not None
            assert row.signal().preferences is None
        assert "kab" not in dump_database(ledger.store)


class TestUndeliverable:
    def test_a_message_that_never_left_is_deleted_after_the_free_text_period_and_audited(
        self, ledger: Ledger
    ) -> None:
        """An unroutable row is kept (the relay retries) for 90 days, then deleted; the audit says what was dropped, without its body."""
        person = "T-UNSENT-0001"
        run(ledger, usecases.receive_signal, a_signal(ledger, person=person))
        (row,) = ledger.store.claim_pending(ledger.clock(), timedelta(minutes=1))
        ledger.store.release(row.id, "unroutable: NO_ROUTE")  # what the relay records
        clock_of(ledger).advance(timedelta(days=60))
        now = ledger.clock()
        younger = ReferralReminder(
            message_id=mid("rem"),
            occurred_at=now,
            referral_id=mid("ref"),
            partner="ghost-partner",
            due_by=now,
        )
        with ledger.store.begin() as tx:
            tx.outbox.enqueue(disclose(younger, {"partner"}), "ghost-partner", now)

        clock_of(ledger).advance(timedelta(days=31))
        counts = retain(ledger)

        assert counts["outbox-expired"] == 1
        assert [m for _, m, _ in ledger.store.outbox()] == ["referral-reminder"]
        assert person not in json.dumps(ledger.store.outbox())
        (expired,) = ledger.store.audit_trail(row.message_id)
        assert expired.action == "outbox-expired"
        assert expired.partner_id == "lmh-agence-roubaix"
        assert "consent-requested" in (expired.why or "")
        assert person not in (expired.why or "") and expired.person_ref is None

    def test_a_row_a_relay_keeps_retrying_is_expired_all_the_same(self, ledger: Ledger) -> None:
        """An undeliverable row is claimed at every sweep: a claim does not keep it past the period."""
        run(ledger, usecases.receive_signal, a_signal(ledger, person="T-CLAIM-0001"))
        clock_of(ledger).advance(timedelta(days=91))
        (row,) = ledger.store.claim_pending(ledger.clock(), timedelta(minutes=1))
        assert retain(ledger)["outbox-expired"] == 1
        assert ledger.store.pending_count() == 0
        ledger.store.release(row.id, "unroutable")  # the relay's failed try, after: no row
        with ledger.store.begin() as tx:
            tx.outbox.mark_sent(row.id, ledger.clock())
        assert ledger.store.pending_count() == 0


class TestFreeTextOfTheBus:
    def test_a_revocation_reason_and_dead_letter_reasons_go_with_the_free_text(
        self, ledger: Ledger
    ) -> None:
        """The advisor's reason for a revocation and a dead letter's quoted reason are free text: gone after 90 days."""
        granted = a_consent(ledger, person="T-REV-0001", days=365)
        run(ledger, usecases.grant_consent, granted)
        revocation = ConsentRevoked(
            message_id=mid("rev"),
            occurred_at=ledger.clock(),
            consent_id=granted.consent_id,
            revoked_by="s.benali",
            agency="lmh-agence-roubaix",
            revoked_at=ledger.clock(),
            reason="she moved in with her son in Lens",
        )
        run(ledger, usecases.revoke_consent, revocation)
        with ledger.store.begin() as tx:
            tx.audit.record(
                "ops.tester",
                "dead-letter-read",
                "m-1",
                ledger.clock(),
                why="x.dlq: no signal s-1 about T-REV-0001",
            )
        assert "son in Lens" in dump_database(ledger.store)

        clock_of(ledger).advance(timedelta(days=91))
        counts = retain(ledger)

        dump = dump_database(ledger.store)
        assert "son in Lens" not in dump
        assert "about T-REV-0001" not in dump
        assert counts["bus-text-deleted"] == 3
        assert ledger.store.count("consent_journal", event="revoked") == 1


class TestOneBadRow:
    def test_one_bad_row_does_not_stop_the_retention_pass(self, ledger: Ledger) -> None:
        """A signal whose stored body cannot be read fails alone (counted); every other item of the pass is done."""
        bad = refused_signal(ledger, "T-BAD-0001")
        good = refused_signal(ledger, "T-GOOD-0001")
        with ledger.store.begin() as tx:
            tx.signals.rewrite(bad, body="{not json")

        clock_of(ledger).advance(timedelta(days=731))
        counts = retain(ledger)

        assert counts["retention-failed"] >= 1
        assert counts["anonymised"] == 1
        dump = dump_database(ledger.store)
        assert "T-GOOD-0001" not in dump
        assert "T-BAD-0001" in dump, "kept for the next pass, not half-erased"
        with ledger.store.begin() as tx:
            row = tx.signals.get(good)
            assert row is not None
            assert row.anonymised_at is not None


class TestStore:
    def test_persons_to_forget_are_those_with_nothing_left_on_record(self, ledger: Ledger) -> None:
        """Old traces of a person without signal or consent are due; a person with either is not."""
        now = ledger.clock()
        with ledger.store.begin() as tx:
            tx.journal.record(None, "T-J-0001", "refused", "a.martin", now, "{}")
            tx.audit.record("a.martin", "consents-read", "T-A-0001", now, person_ref="T-A-0001")
            tx.audit.record("a.martin", "consents-read", "T-S-0001", now, person_ref="T-S-0001")
            tx.journal.record(None, "anon-0123456789abcdef", "refused", "a.martin", now, "{}")
        run(ledger, usecases.receive_signal, a_signal(ledger, person="T-S-0001"))
        cutoff = now + timedelta(seconds=1)
        with ledger.store.begin() as tx:
            assert tx.retention.persons_to_forget(now) == []
            assert tx.retention.persons_to_forget(cutoff) == ["T-A-0001", "T-J-0001"]
            changed = tx.retention.forget_person("T-A-0001", "anon-x", cutoff)
            assert changed == 2, "the audit row names her as person and as subject"
            assert tx.retention.persons_to_forget(cutoff) == ["T-J-0001"]

    def test_forget_person_empties_the_journal_bodies_and_leaves_others(
        self, ledger: Ledger
    ) -> None:
        """Only her rows change; the bodies of her journal rows are emptied."""
        now = ledger.clock()
        with ledger.store.begin() as tx:
            tx.journal.record(
                None, "T-F-0001", "refused", "a.martin", now, '{"person_ref":"T-F-0001"}'
            )
            tx.journal.record(
                None, "T-F-0002", "refused", "a.martin", now, '{"person_ref":"T-F-0002"}'
            )
            tx.retention.forget_person("T-F-0001", "anon-f", now + timedelta(seconds=1))
        dump = dump_database(ledger.store)
        assert "T-F-0001" not in dump
        assert dump.count("T-F-0002") == 2

    def test_undeliverable_rows_are_listed_oldest_first_without_their_bodies(
        self, ledger: Ledger
    ) -> None:
        """Unsent rows older than the cutoff, oldest first; sent rows never."""
        now = ledger.clock()
        reminders = [
            ReferralReminder(
                message_id=mid("rem"),
                occurred_at=now,
                referral_id=mid("ref"),
                partner="ghost-partner",
                due_by=now,
            )
            for _ in range(3)
        ]
        with ledger.store.begin() as tx:
            for reminder in reminders:
                tx.outbox.enqueue(disclose(reminder, {"partner"}), "ghost-partner", now)
        first, *_ = ledger.store.claim_pending(now, timedelta(minutes=1), limit=1)
        with ledger.store.begin() as tx:
            tx.outbox.mark_sent(first.id, now)
        later = now + timedelta(days=1)
        with ledger.store.begin() as tx:
            rows = tx.outbox.undeliverable_before(later)
            assert [r.message_id for r in rows] == [m.message_id for m in reminders[1:]]
            assert not hasattr(rows[0], "body")
            assert tx.outbox.expire_unsent(rows[0].id, later)
            assert not tx.outbox.expire_unsent(rows[0].id, later)
            assert not tx.outbox.expire_unsent(first.id, later), "a sent row is not expired"
        assert ledger.store.pending_count() == 1


def test_the_dump_sees_every_table(ledger: Ledger) -> None:
    """The erasure tests' dump reads every table of the record (a new table is not missed)."""
    run(ledger, usecases.receive_signal, a_signal(ledger, person="T-DUMP-0001"))
    dump = dump_database(ledger.store)
    assert {line.split(":")[0] for line in dump.splitlines()} >= {
        "signals",
        "signal_needs",
        "outbox",
        "audit",
        "processed_messages",
    }
    assert Q in dump


class TestStoreConsents:
    def test_an_ended_consent_is_listed_then_kept_under_a_token(self, ledger: Ledger) -> None:
        """Only consents that ended before the cutoff are due; anonymising one keeps its dates and scope, empties its journal and drops its revocation reason."""
        ended = a_consent(ledger, person="T-END-0001", days=10)
        running = a_consent(ledger, person="T-RUN-0001", days=300)
        run(ledger, usecases.grant_consent, ended)
        run(ledger, usecases.grant_consent, running)
        later = ledger.clock() + timedelta(days=11)
        with ledger.store.begin() as tx:
            # The agency's `consent-recorded` answers (they name the person) left long ago:
            # a sent outbox copy is deleted after the free-text period, well before this.
            tx.outbox.mark_sent_many(
                [row.id for row in tx.conn.execute(select(t.outbox.c.id))], later
            )
            tx.outbox.delete_sent_before(later + timedelta(seconds=1))
            tx.audit.record(
                "a.martin", "consent-revoked", ended.consent_id, later, why="she said so"
            )
            assert tx.retention.ended_consents_before(later) == [ended.consent_id]
            tx.retention.anonymise_consent(ended.consent_id, "anon-end")
            assert tx.retention.ended_consents_before(later) == []
            row = tx.consents.get(ended.consent_id)
            assert row is not None
            assert (row.person_ref, row.valid_until) == ("anon-end", ended.valid_until)
        dump = dump_database(ledger.store)
        assert "T-END-0001" not in dump
        assert "she said so" not in dump
        assert "T-RUN-0001" in dump

    def test_bus_free_text_is_erased_only_before_the_cutoff(self, ledger: Ledger) -> None:
        """Reasons older than the cutoff go; younger ones and other actions' texts stay."""
        now = ledger.clock()
        with ledger.store.begin() as tx:
            tx.audit.record("ops", "dead-letter-replayed", "m-1", now, why="q: old reason")
            tx.audit.record(
                "ops", "dead-letter-purged", "m-2", now + timedelta(days=2), why="young"
            )
            tx.audit.record("bus", "signal-received", "s-1", now, why="needs x in 59512")
            assert tx.retention.delete_bus_free_text_before(now + timedelta(days=1)) == 1
        dump = dump_database(ledger.store)
        assert "old reason" not in dump
        assert "young" in dump and "needs x in 59512" in dump
