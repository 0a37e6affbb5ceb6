"""The tenant's receipt (GDPR art. 15) read from the real ledger, SQLite and PostgreSQL:
what it says, that it says nothing of anybody else, who may read it, and that every
reading (granted or refused) is audited.

The scripted history: person A consents (n° 1), a signal about her carries two needs; the
arrears go to the CCAS, which refuses for `full`, then to the Maison Nord Solidarités,
which accepts and completes (with a hostile outcome text); the other need goes to the CCAS
and is withdrawn when she revokes her consent. Person B, in the same ledger, has her own
signal and consent."""

from __future__ import annotations

import io
import os
from datetime import timedelta
from pathlib import Path

import pytest
from rich.console import Console
from sqlalchemy import select
from typer.testing import CliRunner

from partnerbus import usecases
from partnerbus.entrypoints.cli import app
from partnerbus.ledger import tables as t
from partnerbus.ledger.store import Store
from partnerbus.receipt import (
    READ,
    REFUSED,
    Receipt,
    ReceiptRefused,
    read_receipt,
    render_html,
    render_pdf,
    render_text,
)
from partnerbus.receipt.access import INVALID_SUBJECT
from partnerbus.schemas import Contact, Facts, OrientationRecorded, Preferences
from partnerbus.usecases import Ledger
from tests.conftest import make_ledger
from tests.integration.test_erasure import KEEP, clock_of, dump_database
from tests.integration.test_usecases import (
    ARREARS,
    a_consent,
    a_revocation,
    a_signal,
    answer,
    claim_and_send,
    ledger,
    mid,
    run,
    sent,
)

__all__ = ["ledger"]

KEEP_HOME = "logement-hebergement--se-maintenir-dans-le-logement"
A = "T-RCPT-A01"
B = "T-RCPT-B01"
HOSTILE = "<script>alert('x')</script><img src=x onerror=alert(1)> [red]rouge[/red] [link=http://evil]ici[/link]"
NOTE_A = "Retard depuis mars <b>gras</b> & perte d'emploi"
NOTE_B = "NOTE-DE-B confidentielle"
PHONE_B = "0799887766"


def history(ledger: Ledger) -> dict[str, dict]:
    """The scripted history above; returns the referrals as sent (by role in the story)."""
    clock = clock_of(ledger)
    grant = a_consent(ledger, person=A, days=90)
    run(ledger, usecases.grant_consent, grant)
    run(ledger, usecases.grant_consent, a_consent(ledger, person=B, days=90))
    clock.advance(timedelta(days=1))
    signal = a_signal(
        ledger,
        person=A,
        needs=(ARREARS, KEEP_HOME),
        facts=Facts(arrears_eur=1234.5, arrears_months=3, household_size=3, note=NOTE_A),
        contact=Contact(phone="0612345678"),
    )
    run(ledger, usecases.receive_signal, signal)
    other = a_signal(
        ledger,
        person=B,
        facts=Facts(arrears_eur=99, note=NOTE_B),
        contact=Contact(phone=PHONE_B),
        preferences=Preferences(languages=("kab",)),
    )
    run(ledger, usecases.receive_signal, other)
    claim_and_send(ledger)
    of_a = [b for _, b in sent(ledger, "referral") if b["signal_ref"]]
    by_need = {}
    for body in of_a:
        by_need.setdefault(body["need"], []).append(body)
    refused = next(
        b
        for _, b in sent(ledger, "referral")
        if b["need"] == ARREARS and b["partner"] == "ccas-roubaix"
    )
    clock.advance(timedelta(days=2))
    answer(ledger, refused, "rejected", reason="full")
    claim_and_send(ledger)
    taken = next(b for _, b in sent(ledger, "referral") if b["partner"] == "mds-roubaix")
    clock.advance(timedelta(days=1))
    answer(ledger, taken, "accepted")
    clock.advance(timedelta(days=5))
    answer(ledger, taken, "completed", outcome=HOSTILE)
    clock.advance(timedelta(days=1))
    run(
        ledger,
        usecases.revoke_consent,
        a_revocation(ledger, grant),
    )
    return {"refused": refused, "taken": taken}


def receipt_of(
    ledger: Ledger, person: str = A, by: str = "l.petit", output: str = "html"
) -> Receipt:
    return read_receipt(
        ledger.store, ledger.directory, person, by, output=output, now=ledger.clock()
    )


def audit_rows(store: Store, action: str) -> list:
    with store.engine.connect() as conn:
        return list(conn.execute(select(t.audit).where(t.audit.c.action == action)))


def text_of(receipt: Receipt) -> str:
    buffer = io.StringIO()
    render_text(receipt, Console(file=buffer, width=200, color_system=None))
    return buffer.getvalue()


class TestWhatTheReceiptSays:
    def test_it_names_the_partners_their_answers_the_dates_and_the_consent(
        self, ledger: Ledger
    ) -> None:
        """Both partners by name and kind, the refusal for `full` in words, the acceptance and completion with their dates, the revoked consent; categories of data, no values a partner did not get."""
        history(ledger)
        page = render_html(receipt_of(ledger))
        assert "CCAS de Roubaix" in page
        assert "Maison Nord Solidarités de Roubaix" in page
        assert "service social du Département" in page
        assert "le service n&#39;avait plus de place disponible" in page
        assert "acceptée par le partenaire" in page
        assert "terminée : l&#39;accompagnement a eu lieu" in page
        # the dates: consent 23/11, signal 24/11, refusal 26/11, acceptance 27/11,
        # completion 02/12, revocation 03/12 (the fake clock starts 2026-11-23 10:00 Paris)
        for day in ("24/11/2026", "26/11/2026", "27/11/2026", "02/12/2026", "03/12/2026"):
            assert day in page, day
        assert "Consentement n° 1" in page
        assert "retiré le 03/12/2026" in page
        assert "à l&#39;oral" in page
        assert "Samira Benali" in page
        # what each received: the CCAS the arrears and contact, never the note; the MDS all
        ccas, mds = (
            page.split("Orientation vers CCAS de Roubaix")[1],
            page.split("Orientation vers Maison Nord Solidarités de Roubaix")[1],
        )
        assert "le montant et la durée de votre dette de loyer" in ccas.split("</table>")[0]
        assert "le texte libre du signalement" not in ccas.split("</table>")[0]
        assert "le texte libre du signalement" in mds.split("</table>")[0]
        assert "1\u202f234,50\u00a0€" in page
        assert "retirée" in page, "the second need's referral, withdrawn on revocation"
        assert "CNIL" in page
        assert "730 jours" in page
        assert "90 jours" in page

    def test_it_holds_no_internal_id_and_nothing_of_another_person(self, ledger: Ledger) -> None:
        """No referral, signal or consent id, no partner's pseudonym; B's note, phone and reference appear nowhere, in any format."""
        sent_to = history(ledger)
        receipt = receipt_of(ledger)
        outputs = (render_html(receipt), text_of(receipt))
        with ledger.store.engine.connect() as conn:
            ids = [r[0] for r in conn.execute(select(t.referrals.c.referral_id))]
            ids += [r[0] for r in conn.execute(select(t.signals.c.signal_id))]
            ids += [r[0] for r in conn.execute(select(t.consents.c.consent_id))]
        ids += [body["person"] for body in sent_to.values()]
        for out in outputs:
            for value in (*ids, B, NOTE_B, PHONE_B, "kab"):
                assert value not in out, value
            assert A in out

    def test_each_reading_is_audited_with_who_whom_and_format(self, ledger: Ledger) -> None:
        """One `receipt-read` per reading, in the reading's transaction: the advisor, the person, her agency, the format; a second reading lists the first among the consultations."""
        history(ledger)
        receipt_of(ledger, output="html+pdf")
        (row,) = audit_rows(ledger.store, READ)
        assert (row.actor, row.subject, row.person_ref, row.partner_id) == (
            "l.petit",
            A,
            A,
            "lmh-agence-roubaix",
        )
        assert row.why.endswith("format html+pdf")
        again = receipt_of(ledger, by="s.benali", output="text")
        assert len(audit_rows(ledger.store, READ)) == 2
        assert any("Laure Petit a produit un relevé" in e.text for e in again.reads)
        assert audit_rows(ledger.store, REFUSED) == []

    def test_partner_and_source_text_cannot_inject_markup(self, ledger: Ledger) -> None:
        """The completion's outcome and the signal's note are escaped in HTML; rich's markup in them stays text at the terminal."""
        history(ledger)
        receipt = receipt_of(ledger)
        page = render_html(receipt)
        assert "<script>" not in page
        assert "<img" not in page
        assert "<b>gras</b>" not in page
        assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page
        assert "&lt;b&gt;gras&lt;/b&gt; &amp; perte" in page
        text = text_of(receipt)
        assert "[red]rouge[/red]" in text
        assert "[link=http://evil]ici[/link]" in text
        assert "<script>alert('x')</script>" in text

    def test_what_never_left_and_what_the_advisor_did_outside_the_bus(self, ledger: Ledger) -> None:
        """A referral withheld before it left (consent revoked first) says the partner received nothing and does not count it as a recipient; an orientation recorded by the advisor says the bus sent nothing, in French, without the bus's English note."""
        grant = a_consent(ledger, person="T-RCPT-C01", days=90)
        run(ledger, usecases.grant_consent, grant)
        run(ledger, usecases.receive_signal, a_signal(ledger, person="T-RCPT-C01"))
        revocation = a_revocation(ledger, grant, revoked_by="la locataire, par téléphone")
        run(ledger, usecases.revoke_consent, revocation)
        withheld = receipt_of(ledger, person="T-RCPT-C01")
        (referral,) = withheld.signals[0].referrals
        assert referral.not_sent is not None
        assert "n'a rien reçu" in referral.not_sent
        assert referral.shared == ()
        assert not any("CCAS de Roubaix" in x for x in withheld.recipients)
        assert "la locataire, par téléphone" in withheld.consents[0].state

        run(ledger, usecases.grant_consent, a_consent(ledger, person="T-RCPT-D01", days=90))
        signal = a_signal(ledger, person="T-RCPT-D01")
        run(ledger, usecases.receive_signal, signal)
        claim_and_send(ledger)
        with ledger.store.engine.connect() as conn:
            own = conn.execute(
                select(t.referrals).where(t.referrals.c.signal_id == signal.message_id)
            ).one()
        assert own.partner_id == "ccas-roubaix"
        first = {"referral_id": own.referral_id, "partner": own.partner_id}
        answer(ledger, first, "rejected", reason="unreachable")
        run(
            ledger,
            usecases.record_orientation,
            OrientationRecorded(
                message_id=mid("orient"),
                occurred_at=ledger.clock(),
                signal_id=signal.message_id,
                need=ARREARS,
                partner="mds-roubaix",
                agency="lmh-agence-roubaix",
                decided_by="s.benali",
                oriented_at=ledger.clock(),
            ),
        )
        oriented = receipt_of(ledger, person="T-RCPT-D01")
        rejected, outside = oriented.signals[0].referrals
        assert rejected.reason == "le partenaire n'a pas réussi à vous joindre"
        assert outside.partner == "Maison Nord Solidarités de Roubaix"
        assert outside.not_sent is not None
        assert "hors du réseau" in outside.not_sent
        assert outside.partner_text is None
        assert "oriented outside the bus" not in render_html(oriented)

    def test_the_pdf_is_a_pdf(self, ledger: Ledger) -> None:
        """The same page through WeasyPrint: a PDF header, several kilobytes, an EOF."""
        history(ledger)
        pdf = render_pdf(receipt_of(ledger))
        assert pdf.startswith(b"%PDF-")
        assert len(pdf) > 10_000
        assert pdf.rstrip().endswith(b"%%EOF")


class TestWhoMayRead:
    @pytest.mark.parametrize(
        ("advisor", "agency"),
        [
            ("a.martin", "lmh-agence-lille-sud"),  # same landlord, another agency
            ("k.mercier", "vilogia-agence-roubaix"),  # another landlord, same commune
        ],
    )
    def test_an_advisor_of_another_agency_is_refused_and_audited(
        self, ledger: Ledger, advisor: str, agency: str
    ) -> None:
        """Refused with the same words as for a stranger, audited as refused with who and why; no read recorded."""
        history(ledger)
        with pytest.raises(ReceiptRefused) as refused:
            receipt_of(ledger, by=advisor)
        with pytest.raises(ReceiptRefused) as unknown:
            receipt_of(ledger, person="T-NOBODY-99", by=advisor)
        assert str(refused.value) == str(unknown.value), "the door is no oracle"
        assert "lmh-agence-roubaix" not in str(refused.value)
        rows = audit_rows(ledger.store, REFUSED)
        assert [(r.actor, r.subject, r.partner_id) for r in rows] == [
            (advisor, A, agency),
            (advisor, "T-NOBODY-99", agency),
        ]
        assert "followed by lmh-agence-roubaix" in rows[0].why
        assert "unknown person" in rows[1].why
        assert audit_rows(ledger.store, READ) == []

    @pytest.mark.parametrize(
        "advisor",
        [
            "",
            "   ",
            "s.benali ",
            "S.BENALI",
            "s.benali' OR '1'='1",
            "x" * 300,
            "lmh-agence-roubaix",
            "s.benali\x00",
            "s.benali\nl.petit",
        ],
    )
    def test_a_forged_or_empty_advisor_is_refused_and_audited(
        self, ledger: Ledger, advisor: str
    ) -> None:
        """Only an advisor id of the directory passes, exactly as written; the attempt is audited (actor cut to the column's 80 characters, `(empty)` for nothing)."""
        history(ledger)
        with pytest.raises(ReceiptRefused, match="not an advisor"):
            receipt_of(ledger, by=advisor)
        (row,) = audit_rows(ledger.store, REFUSED)
        expected = advisor[:80].replace("\x00", "?").replace("\n", "?")
        assert row.actor == (expected if advisor.strip() else "(empty)")
        assert row.person_ref == A
        assert "unknown advisor" in row.why
        assert audit_rows(ledger.store, READ) == []

    @pytest.mark.parametrize(
        "person",
        [
            "Marie Dupont",
            "marie@example.org",
            "<script>",
            "T-RCPT-A01'; DROP TABLE audit; --",
            "T-RCPT-A01%",
            "T-RCPT-%",
            "T-RCPT-A0_",
            "x" * 500,
            "",
            "T-RCPT-A01\n",
            "T-RCPT-A01\x00",
            "T-RCPT-Aé01",
        ],
    )
    def test_an_odd_person_reference_is_refused_and_never_written(
        self, ledger: Ledger, person: str
    ) -> None:
        """Not a pseudonymous reference (a name typed by mistake, markup, SQL, wildcards): refused, audited as refused without the text itself; A's data is not matched by a wildcard."""
        history(ledger)
        with pytest.raises(ReceiptRefused):
            receipt_of(ledger, person=person)
        (row,) = audit_rows(ledger.store, REFUSED)
        assert row.subject in (INVALID_SUBJECT, person)
        if row.subject == INVALID_SUBJECT:
            assert row.person_ref is None
            if person.strip():
                assert person.strip() not in " | ".join(str(v) for v in row)
        assert "Marie Dupont" not in dump_database(ledger.store)
        assert audit_rows(ledger.store, READ) == []
        assert ledger.store.count("audit", action="referral-disclosed") > 0, "nothing dropped"

    def test_an_anonymised_token_is_no_person(self, ledger: Ledger) -> None:
        """After anonymisation a signal keeps its agency under a random token: reading the token as a person is refused, although the agency matches."""
        history(ledger)
        clock_of(ledger).advance(timedelta(days=731))
        with ledger.store.begin() as tx:
            usecases.apply_retention(ledger, tx, **KEEP)
        with ledger.store.engine.connect() as conn:
            token = conn.execute(
                select(t.signals.c.person_ref).where(t.signals.c.person_ref.startswith("anon-"))
            ).scalar_one()
        with pytest.raises(ReceiptRefused, match="anonymised token"):
            receipt_of(ledger, person=token)
        (row,) = audit_rows(ledger.store, REFUSED)
        assert row.why.endswith("anonymised token")

    def test_no_audit_no_receipt(self, ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
        """The audit row is written in the reading's transaction: if it cannot be written, the reading fails and nothing is returned."""
        history(ledger)
        from partnerbus.ledger.repos.audit import AuditRepository

        def broken(self, actor, action, *args, **kwargs):
            if action == READ:
                raise RuntimeError("audit unavailable")

        monkeypatch.setattr(AuditRepository, "record", broken)
        with pytest.raises(RuntimeError, match="audit unavailable"):
            receipt_of(ledger)


class TestErasedData:
    def test_erased_text_is_said_erased_then_a_forgotten_person_is_refused_cleanly(
        self, ledger: Ledger
    ) -> None:
        """After the free-text period the note and the partner's outcome are said erased (never shown); after the full period she is forgotten, and a reading is refused as for nobody, audited, no crash."""
        history(ledger)
        clock = clock_of(ledger)
        clock.advance(timedelta(days=91))
        with ledger.store.begin() as tx:
            usecases.apply_retention(ledger, tx, **KEEP)
        receipt = receipt_of(ledger)
        page = render_html(receipt)
        assert "Retard depuis mars" not in page
        assert "alert" not in page
        assert "a été effacé le" in page
        assert "commentaire éventuel du partenaire effacé" in page
        assert "CCAS de Roubaix" in page, "the facts of who received what stay"
        text_of(receipt)

        clock.advance(timedelta(days=731))
        with ledger.store.begin() as tx:
            usecases.apply_retention(ledger, tx, **KEEP)
        with ledger.store.begin() as tx:
            usecases.apply_retention(ledger, tx, **KEEP)
        with pytest.raises(ReceiptRefused, match="erased after the retention period"):
            receipt_of(ledger)
        refused = audit_rows(ledger.store, REFUSED)
        assert refused[-1].why.endswith("unknown person: nothing on record")


class TestCommandLine:
    def test_the_command_prints_writes_html_and_pdf_and_refuses_with_a_nonzero_code(
        self, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """`partnerbus referrals receipt PERSON --by ADVISOR`: text by default, `--html`/`--pdf` files; a file that cannot be written is said before anything is read (nothing audited); a refusal exits 2 with the reason; each reading audited with its format."""
        ledger = make_ledger(store)
        history(ledger)
        url = store.engine.url.render_as_string(hide_password=False)
        schema = store.engine.dialect.default_schema_name if not store.is_sqlite else None
        if schema and schema != "public":
            url = f"{url}?options=-csearch_path%3D{schema}"
        for key in [k for k in os.environ if k.startswith("PARTNERBUS_")]:
            monkeypatch.delenv(key)
        monkeypatch.setenv("PARTNERBUS_DATABASE_URL", url)
        runner = CliRunner()
        shown = runner.invoke(app, ["referrals", "receipt", A, "--by", "l.petit"])
        assert shown.exit_code == 0, shown.output
        assert "Maison Nord Solidarités de Roubaix" in shown.output
        html, pdf = tmp_path / "r.html", tmp_path / "r.pdf"
        written = runner.invoke(
            app,
            ["referrals", "receipt", A, "--by", "s.benali", "--html", str(html), "--pdf", str(pdf)],
        )
        assert written.exit_code == 0, written.output
        assert "CCAS de Roubaix" in html.read_text(encoding="utf-8")
        assert pdf.read_bytes().startswith(b"%PDF-")
        nowhere = runner.invoke(
            app, ["referrals", "receipt", A, "--by", "l.petit", "--pdf", str(tmp_path / "no/x.pdf")]
        )
        assert nowhere.exit_code == 2
        assert "is not a directory" in " ".join(nowhere.output.split())
        a_directory = runner.invoke(
            app, ["referrals", "receipt", A, "--by", "l.petit", "--html", str(tmp_path)]
        )
        assert a_directory.exit_code == 2
        assert "is a directory" in " ".join(a_directory.output.split())
        refused = runner.invoke(app, ["referrals", "receipt", A, "--by", "k.mercier"])
        assert refused.exit_code == 2
        assert "receipt refused" in refused.output
        formats = [r.why.rsplit(" ", 1)[-1] for r in audit_rows(store, READ)]
        assert formats == ["text", "html+pdf"]
        assert len(audit_rows(store, REFUSED)) == 1
