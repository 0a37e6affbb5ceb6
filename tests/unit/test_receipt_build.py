"""The receipt built from rows, without a database: what retention emptied or the
directory lost is said in words, never a crash; the renderers escape what they are given."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta

import pytest

from partnerbus.directory import load_sample
from partnerbus.ledger.repos.referrals import ReferralRow
from partnerbus.ledger.repos.signals import SignalRow
from partnerbus.receipt import (
    PdfUnavailableError,
    PersonRecord,
    build_receipt,
    check_pdf,
    render_html,
)
from partnerbus.receipt.build import JournalEntry, NeedRow
from partnerbus.rules import ConsentRecord
from partnerbus.schemas import ConsentScope

NOW = datetime(2027, 3, 1, 9, tzinfo=UTC)
DIRECTORY = load_sample()


def signal_row(body: str, **extra) -> SignalRow:
    values = {
        "signal_id": "sig-1",
        "source": "lmh-recouvrement",
        "person_ref": "T-UNIT-01",
        "commune": "59512",
        "urgency": "urgent",
        "agency": "lmh-agence-roubaix",
        "advisor": "s.benali",
        "body": body,
        "received_at": NOW - timedelta(days=200),
        "note_deleted_at": NOW - timedelta(days=100),
        "anonymised_at": None,
    }
    values.update(extra)
    return SignalRow(**values)


def referral_row(**extra) -> ReferralRow:
    at = NOW - timedelta(days=190)
    values = {
        "referral_id": "ref-1",
        "signal_id": "sig-1",
        "need": "logement-hebergement--reduire-les-impayes-de-loyer",
        "attempt": 1,
        "partner_id": "a-partner-that-left",
        "partner_kind": "some-new-kind",
        "consent_id": "c-gone",
        "status": "rejected",
        "reason": "not-eligible",
        "outcome": None,
        "urgency": "urgent",
        "created_at": at,
        "updated_at": at,
        "sent_at": at,
        "due_at": None,
        "remind_at": None,
        "reminded": False,
        "closed_at": at,
        "anonymised_at": None,
    }
    values.update(extra)
    return ReferralRow(**values)


def test_emptied_bodies_and_lost_partners_are_said_not_crashed_on() -> None:
    """A signal body retention emptied (or unreadable), a journal body `{}`, a partner gone from the directory, a consent anonymised since: each said in words."""
    record = PersonRecord(
        person_ref="T-UNIT-01",
        signals=[signal_row("not json at all")],
        needs={"sig-1": [NeedRow("an-unknown-need", "closed", NOW)]},
        referrals=[referral_row()],
        journal=[JournalEntry(None, "refused", "s.benali", NOW - timedelta(days=150), "{}")],
    )
    receipt = build_receipt(
        record, DIRECTORY, now=NOW, produced_by="s.benali", agency_id="lmh-agence-roubaix"
    )
    (signal,) = receipt.signals
    assert signal.data == ()
    assert signal.urgency == "urgente"
    (referral,) = signal.referrals
    assert referral.partner.startswith("un organisme qui n'est plus dans l'annuaire")
    assert referral.partner_kind == "organisme d'accompagnement"
    assert referral.reason == "votre situation ne correspondait pas aux conditions de ce service"
    assert referral.text_erased
    assert "anonymisé" in referral.consent
    assert any("texte libre du signalement" in e for e in receipt.erased)
    assert any("commentaires écrits par les partenaires" in e for e in receipt.erased)
    assert any("événements de consentement" in e for e in receipt.erased)
    assert "dont le détail a été effacé" in receipt.consent_events[0].text
    assert record.agencies() == frozenset({"lmh-agence-roubaix"})
    render_html(receipt)


def test_a_refusal_alone_still_names_its_agency() -> None:
    """A person whose signal was anonymised but whose refusal is still on record is followed by the agency the refusal names."""
    body = '{"agency": "lmh-agence-tourcoing", "needs": ["logement-hebergement"]}'
    record = PersonRecord(
        person_ref="T-UNIT-02",
        journal=[JournalEntry(None, "refused", "m.lefebvre", NOW, body)],
    )
    assert not record.empty
    assert record.agencies() == frozenset({"lmh-agence-tourcoing"})
    receipt = build_receipt(
        record, DIRECTORY, now=NOW, produced_by="m.lefebvre", agency_id="lmh-agence-tourcoing"
    )
    assert "Logement et hébergement" in receipt.consent_events[0].text


def test_a_consent_in_words_and_escaped_in_html() -> None:
    """Scope, method, validity in words; a revoker's free text (the person herself, by phone) escaped."""
    consent = ConsentRecord(
        consent_id="c-1",
        person_ref="T-UNIT-03",
        scope=ConsentScope(
            needs=("difficultes-financieres",), partner_kinds=("cresus",), partners=("caf-nord",)
        ),
        collected_by="s.benali",
        agency="lmh-agence-roubaix",
        method="sms",
        granted_at=NOW - timedelta(days=10),
        valid_until=NOW + timedelta(days=20),
        revoked_at=NOW - timedelta(days=1),
        revoked_by="<i>elle-même</i>",
    )
    record = PersonRecord(person_ref="T-UNIT-03", consents=[consent])
    receipt = build_receipt(
        record, DIRECTORY, now=NOW, produced_by="l.petit", agency_id="lmh-agence-roubaix"
    )
    (view,) = receipt.consents
    assert view.method == "par SMS"
    assert view.needs == ("Difficultés financières",)
    assert view.recipients == (
        "tout organisme de type « association d'aide contre le surendettement »",
        "CAF du Nord — accompagnement social (caisse d'allocations familiales (CAF))",
    )
    assert view.state.startswith("retiré le 28/02/2027")
    page = render_html(receipt)
    assert "<i>elle-même</i>" not in page
    assert "&lt;i&gt;elle-même&lt;/i&gt;" in page


def test_without_weasyprint_a_pdf_is_refused_with_advice(monkeypatch: pytest.MonkeyPatch) -> None:
    """WeasyPrint (or Pango) missing: `PdfUnavailableError` with the packages to install, never an ImportError."""
    monkeypatch.setitem(sys.modules, "weasyprint", None)
    with pytest.raises(PdfUnavailableError, match=r"libpango-1\.0-0"):
        check_pdf()
