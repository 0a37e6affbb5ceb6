"""The receipt rendered: plain text at the terminal (rich), a printable HTML page (Jinja2,
autoescaped: what a partner or a source wrote cannot inject markup), and a PDF of that
same page (WeasyPrint: HTML and CSS for print, pure Python over Pango, which Debian has).

Every renderer reads the same `Receipt`; none reads the ledger."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from rich.console import Console
from rich.markup import escape

from partnerbus.errors import PartnerbusError
from partnerbus.receipt.build import when, when_time
from partnerbus.receipt.model import Receipt


class PdfUnavailableError(PartnerbusError):
    """WeasyPrint or the system libraries it needs (Pango) are missing."""


@cache
def _environment() -> Environment:
    env = Environment(
        loader=PackageLoader("partnerbus.receipt", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["day"] = when
    env.filters["moment"] = when_time
    return env


def render_html(receipt: Receipt) -> str:
    """A self-contained printable page (its CSS inline, no external resource)."""
    return _environment().get_template("receipt.html.j2").render(r=receipt)


def check_pdf() -> None:
    """Raise `PdfUnavailableError` now if a PDF cannot be made here (WeasyPrint or Pango
    missing): the command says so before it reads (and audits) anything."""
    try:
        import weasyprint  # noqa: F401
    except (ImportError, OSError) as exc:  # OSError: Pango missing
        msg = (
            f"PDF output needs WeasyPrint and Pango ({type(exc).__name__}: {exc}); on Debian: "
            "apt-get install libpango-1.0-0 libpangoft2-1.0-0 fonts-dejavu-core. "
            "The HTML output (--html) needs neither."
        )
        raise PdfUnavailableError(msg) from exc


def render_pdf(receipt: Receipt) -> bytes:
    """The HTML page as a PDF (A4, page numbers)."""
    check_pdf()
    from weasyprint import HTML

    pdf = HTML(string=render_html(receipt)).write_pdf()
    assert isinstance(pdf, bytes)
    return pdf


def write_html(receipt: Receipt, path: Path) -> None:
    path.write_text(render_html(receipt), encoding="utf-8")


def write_pdf(receipt: Receipt, path: Path) -> None:
    path.write_bytes(render_pdf(receipt))


def render_text(receipt: Receipt, console: Console) -> None:
    """The receipt at the terminal. Every value is escaped for rich's markup, so a
    partner's `[link=…]` stays text."""
    r = receipt
    out = console.print

    def line(text: str, style: str = "") -> None:
        out(f"[{style}]{escape(text)}[/{style}]" if style else escape(text), soft_wrap=True)

    line("Relevé des informations partagées à votre sujet", "bold")
    line(f"Droit d'accès (article 15 du RGPD) — dossier {r.person_ref}")
    line(f"Établi le {when_time(r.produced_at)} par {r.produced_by}, {r.agency} ({r.network})")
    out()
    line("1. Vos consentements", "bold underline")
    if not r.consents:
        line("Aucun consentement n'est enregistré à votre nom.")
    for c in r.consents:
        line(f"Consentement n° {c.number} — donné le {when(c.granted_at)}, {c.method}", "bold")
        line(f"  recueilli par {c.collected_by} ({c.agency})")
        line(f"  besoins : {', '.join(c.needs)}")
        line(f"  organismes autorisés : {' ; '.join(c.recipients)}")
        line(f"  état : {c.state}")
    for e in r.consent_events:
        line(f"  {when(e.at)} : {e.text}")
    out()
    line("2. Les signalements et ce qui a été partagé", "bold underline")
    if not r.signals:
        line("Aucun signalement n'est enregistré à votre nom.")
    for s in r.signals:
        line(f"Signalement du {when(s.received_at)} — par {s.source}", "bold")
        line(f"  commune : {s.commune} — urgence : {s.urgency}")
        if s.agency:
            line(f"  suivi par : {s.agency}" + (f", {s.advisor}" if s.advisor else ""))
        for n in s.needs:
            line(f"  besoin : {n.label} ({n.state})")
        for d in s.data:
            line(f"  · {d}")
        if s.note:
            line(f"  texte du signalement : « {s.note} »", "italic")
        if s.note_erased_at:
            line(f"  texte libre effacé le {when(s.note_erased_at)}", "yellow")
        line(f"  l'organisme qui vous a signalée est informé de : {s.source_learns}")
        for o in s.referrals:
            line(f"  → {o.partner} ({o.partner_kind}) — {o.need}", "bold")
            sent = f", transmise le {when(o.sent_at)}" if o.sent_at else ""
            line(f"     créée le {when(o.created_at)}{sent} ; sous {o.consent}")
            if o.not_sent:
                line(f"     informations reçues : aucune ({o.not_sent})")
            else:
                line(f"     informations reçues : {' ; '.join(o.shared)}")
            line(f"     réponse : {o.status}" + (f" — motif : {o.reason}" if o.reason else ""))
            if o.partner_text:
                line(f"     « {o.partner_text} »", "italic")
            if o.text_erased:
                line("     (commentaire éventuel du partenaire effacé)", "yellow")
            for h in o.history:
                line(f"       {when(h.at)} : {h.text}", "dim")
    out()
    line("3. Destinataires", "bold underline")
    for x in r.recipients or ("aucun",):
        line(f"  · {x}")
    for e in r.reads:
        line(f"  consultation : {when(e.at)} : {e.text}")
    out()
    line("4. Données effacées", "bold underline")
    for erased in r.erased:
        line(f"  · {erased}", "yellow")
    line(
        "  Les informations plus anciennes que la durée de conservation sont anonymisées ou "
        "effacées et n'apparaissent pas ici."
    )
    out()
    line("5. Vos droits", "bold underline")
    line(
        "  Finalité : vous orienter vers les organismes qui peuvent vous aider et suivre leurs "
        "réponses, avec votre consentement (art. 6.1.a RGPD). Conservation : textes libres "
        f"{r.retention.free_text_days} jours ; le reste anonymisé {r.retention.days} jours "
        "après la clôture. Droits : accès, rectification, effacement, limitation, opposition, "
        f"retrait du consentement, auprès de {r.agency}. Réclamation : CNIL, 3 place de "
        "Fontenoy, TSA 80715, 75334 Paris Cedex 07, www.cnil.fr."
    )
