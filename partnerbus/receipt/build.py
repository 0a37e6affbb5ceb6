"""From the ledger's rows about one person to her receipt, in plain French: a pure function
(`build_receipt`), so what the tenant reads is tested without a database.

What each partner received is computed by the rules that decided it when the referral
left (`rules.visible_fields` on the `referral` message for the partner's roles, then
`rules.minimise` for its kind), applied to what the signal held; only categories are
named, never an internal id. Whatever retention erased is said to be erased; a body that
retention emptied is read as empty, never as an error."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import ValidationError

from partnerbus.directory import Directory
from partnerbus.ledger.repos.referrals import ReferralRow
from partnerbus.ledger.repos.signals import SignalRow
from partnerbus.ledger.store import AuditRow
from partnerbus.receipt.model import (
    ConsentView,
    Dated,
    NeedView,
    Receipt,
    ReferralView,
    Retention,
    SignalView,
)
from partnerbus.rules import ConsentRecord, minimise
from partnerbus.rules.disclosure import (
    Role,
    disclosed_parts,
    minimise_preferences,
    visible_fields,
)
from partnerbus.schemas import Contact, Facts, Preferences, Profile
from partnerbus.usecases.context import BUS
from partnerbus.usecases.delivery import recipient_roles_of_partner

try:
    PARIS: Any = ZoneInfo("Europe/Paris")
except ZoneInfoNotFoundError:  # pragma: no cover - a system without tzdata
    from datetime import UTC

    PARIS = UTC


def when(at: datetime | None) -> str:
    """A date as the tenant reads it (Paris time)."""
    return "—" if at is None else at.astimezone(PARIS).strftime("%d/%m/%Y")


def when_time(at: datetime | None) -> str:
    return "—" if at is None else at.astimezone(PARIS).strftime("%d/%m/%Y à %H:%M")


STATUS_WORDS: Mapping[str, str] = {
    "requested": "demande enregistrée, en cours d'envoi",
    "delivered": "transmise au partenaire",
    "received": "reçue par le partenaire",
    "accepted": "acceptée par le partenaire",
    "rejected": "refusée par le partenaire",
    "in-progress": "accompagnement en cours",
    "on-hold": "mise en attente par le partenaire",
    "failed": "n'a pas pu aboutir",
    "completed": "terminée : l'accompagnement a eu lieu",
    "cancelled": "annulée par votre conseillère",
    "withdrawn": "retirée : le partenaire a été prié d'effacer la demande",
    "expired": "restée sans réponse dans le délai prévu",
}

REASON_WORDS: Mapping[str, str] = {
    "unreachable": "le partenaire n'a pas réussi à vous joindre",
    "not-eligible": "votre situation ne correspondait pas aux conditions de ce service",
    "not-interested": "vous n'avez pas souhaité donner suite",
    "full": "le service n'avait plus de place disponible",
    "duplicate": "une demande identique était déjà en cours",
    "other": "autre raison, donnée à votre conseillère",
    "consent-revoked": "vous avez retiré votre consentement",
    "consent-expired": "votre consentement était arrivé à son terme",
    "signal-cancelled": "la demande a été annulée",
    "no-news": "sans nouvelles du partenaire",
}

NEED_STATE_WORDS: Mapping[str, str] = {
    "parked": "en attente de votre consentement",
    "routed": "confié à un partenaire",
    "no-partner": "aucun partenaire disponible n'a été trouvé",
    "refused": "vous avez refusé qu'il soit transmis",
    "withdrawn": "retiré (consentement retiré ou expiré)",
    "closed": "clos",
}

URGENCY_WORDS: Mapping[str, str] = {
    "routine": "normale",
    "urgent": "urgente",
    "asap": "très urgente",
}

METHOD_WORDS: Mapping[str, str] = {
    "oral": "à l'oral, auprès de votre conseillère",
    "paper": "sur un formulaire papier signé",
    "sms": "par SMS",
}

KIND_WORDS: Mapping[str, str] = {
    "bailleur-social": "bailleur social",
    "maisons-des-solidarites": "service social du Département",
    "departements": "Département",
    "ccas-cias": "centre communal d'action sociale (CCAS)",
    "unccas": "centre communal d'action sociale (CCAS)",
    "caf": "caisse d'allocations familiales (CAF)",
    "mutualite-sociale-agricole": "Mutualité sociale agricole (MSA)",
    "siao": "service d'hébergement d'urgence (SIAO)",
    "chrs": "centre d'hébergement et de réinsertion sociale",
    "chu": "centre d'hébergement d'urgence",
    "action-logement": "Action Logement",
    "points-conseil-budget": "point conseil budget",
    "cresus": "association d'aide contre le surendettement",
    "udaf": "union départementale des associations familiales",
    "unaf": "association familiale",
    "points-justice": "point justice (aide juridique)",
    "fcsf": "centre social",
    "residences-fjt": "foyer de jeunes travailleurs",
    "mdph": "maison départementale des personnes handicapées",
    "maison-departementale-de-lautonomie": "maison départementale de l'autonomie",
    "croix-rouge": "Croix-Rouge",
    "secours-populaire": "Secours populaire",
    "restos-du-coeur": "Restos du cœur",
    "banques-alimentaires": "banque alimentaire",
    "cms": "centre médico-social",
    "cmp": "centre médico-psychologique",
    "csapa": "centre de soins en addictologie",
    "cpam": "caisse primaire d'assurance maladie (CPAM)",
    "cidff": "centre d'information sur les droits des femmes et des familles",
    "france-service": "espace France services",
    "pimms-mediation": "point de médiation (PIMMS)",
    "communes": "mairie",
    "adil": "agence départementale d'information sur le logement (ADIL)",
    "association": "association",
}

HOUSING_WORDS: Mapping[str, str] = {
    "substandard": "logement dégradé",
    "hoarding": "logement encombré",
    "overcrowded": "logement suroccupé",
    "unfit": "logement insalubre",
}
AGE_WORDS: Mapping[str, str] = {
    "under-25": "moins de 25 ans",
    "25-59": "25 à 59 ans",
    "60-74": "60 à 74 ans",
    "75-plus": "75 ans et plus",
}
HOUSEHOLD_WORDS: Mapping[str, str] = {
    "single": "personne seule",
    "couple": "couple",
    "family": "famille",
    "single-parent": "famille monoparentale",
    "other": "autre",
}

WITHHELD = "la demande a été retenue avant son envoi : l'organisme n'a rien reçu"
OUTSIDE_THE_BUS = (
    "orientation faite directement par votre conseillère, hors du réseau : le réseau n'a "
    "rien transmis à cet organisme"
)

READ_WORDS: Mapping[str, str] = {
    "consents-read": "a consulté la liste de vos consentements",
    "timeline-read": "a consulté l'historique de votre dossier",
    "receipt-read": "a produit un relevé comme celui-ci",
}
"""The audit's reads of a person's file, in words."""


def _loads(text: str | None) -> dict[str, Any]:
    """A stored JSON body as a dict; what retention emptied or anything unreadable: {}."""
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class JournalEntry:
    """A consent journal row (`consent_journal`)."""

    consent_id: str | None
    event: str
    by: str
    at: datetime
    body: str


@dataclass(frozen=True)
class NeedRow:
    need: str
    state: str
    updated_at: datetime


@dataclass(frozen=True)
class PersonRecord:
    """Every row of the ledger about one person, as `access.load_person` reads them."""

    person_ref: str
    signals: Sequence[SignalRow] = ()
    needs: Mapping[str, Sequence[NeedRow]] = field(default_factory=dict)
    referrals: Sequence[ReferralRow] = ()
    history: Mapping[str, Sequence[Mapping[str, Any]]] = field(default_factory=dict)
    withheld: frozenset[str] = frozenset()
    """Referrals withheld before they left (the audit's `referral-withheld`)."""
    consents: Sequence[ConsentRecord] = ()
    journal: Sequence[JournalEntry] = ()
    reads: Sequence[AuditRow] = ()

    @property
    def empty(self) -> bool:
        """Nothing about her under this reference (never recorded, or erased)."""
        return not (self.signals or self.consents or self.journal)

    def agencies(self) -> frozenset[str]:
        """The agencies that follow her: of her signals, her consents, her consent journal."""
        found = {s.agency for s in self.signals if s.agency}
        found |= {c.agency for c in self.consents}
        for entry in self.journal:  # a refusal outlives its signal (until she is forgotten)
            agency = _loads(entry.body).get("agency")
            if isinstance(agency, str):
                found.add(agency)
        return frozenset(found)


class _Names:
    """The directory's words for ids; an id the directory lost is said as such."""

    def __init__(self, directory: Directory) -> None:
        self.directory = directory
        self.advisors = {a.id: a.name for p in directory.partners() for a in p.advisors}

    def partner(self, partner_id: str | None) -> str:
        if partner_id is None:
            return "—"
        if partner_id in self.directory:
            return self.directory.partner(partner_id).name
        return f"un organisme qui n'est plus dans l'annuaire ({partner_id})"

    def kind(self, kind: str) -> str:
        return KIND_WORDS.get(kind, "organisme d'accompagnement")

    def partner_with_kind(self, partner_id: str, kind: str | None = None) -> str:
        if kind is None and partner_id in self.directory:
            kind = self.directory.partner(partner_id).kind
        return f"{self.partner(partner_id)} ({self.kind(kind or '')})"

    def advisor(self, advisor_id: str | None) -> str | None:
        if advisor_id is None:
            return None
        return self.advisors.get(advisor_id, advisor_id)

    def need(self, code: str) -> str:
        found = self.directory.needs.get(code)
        return found.label if found else code

    def commune(self, code: str) -> str:
        try:
            return f"{self.directory.territory(code).name} ({code})"
        except LookupError:
            return code


def _signal_parts(
    body: Mapping[str, Any],
) -> tuple[Profile, Facts, Contact | None, Preferences | None]:
    """The signal's parts as the models read them; what retention emptied (or anything
    unreadable) reads as empty."""

    def part(model: Any, value: Any) -> Any:
        try:
            return model.model_validate(value or {})
        except ValidationError:
            return model()

    contact = body.get("contact")
    preferences = body.get("preferences")
    return (
        part(Profile, body.get("profile")),
        part(Facts, body.get("facts")),
        part(Contact, contact) if contact else None,
        part(Preferences, preferences) if preferences else None,
    )


def _euros(amount: float) -> str:
    """1 200,50 € (French grouping, a narrow no-break space before the thousands)."""
    text = f"{amount:,.2f}".replace(",", "\u202f").replace(".", ",")
    return f"{text}\u00a0€"


def _said(
    profile: Profile, facts: Facts, contact: Contact | None, prefs: Preferences | None
) -> list[str]:
    """What the signal said about her, with the values (her copy of the data)."""
    out: list[str] = []
    if facts.arrears_eur is not None:
        out.append(f"Montant de la dette de loyer : {_euros(facts.arrears_eur)}")
    if facts.arrears_months is not None:
        out.append(f"Nombre de mois d'impayés : {facts.arrears_months}")
    if facts.household_size is not None:
        out.append(f"Nombre de personnes au foyer : {facts.household_size}")
    if facts.housing_condition is not None:
        out.append(f"État du logement : {HOUSING_WORDS.get(facts.housing_condition, '—')}")
    if profile.age_band is not None:
        out.append(f"Tranche d'âge : {AGE_WORDS.get(profile.age_band, '—')}")
    if profile.household is not None:
        out.append(f"Composition du foyer : {HOUSEHOLD_WORDS.get(profile.household, '—')}")
    if profile.qpv is not None:
        out.append("Vous habitez un quartier prioritaire de la politique de la ville")
    if profile.publics:
        out.append(f"Publics : {', '.join(profile.publics)}")
    if contact is not None and contact.phone:
        out.append(f"Numéro de téléphone : {contact.phone}")
    if contact is not None and contact.preferred_time:
        out.append(f"Moment préféré pour vous joindre : {contact.preferred_time}")
    if prefs is not None:
        out.extend(_wishes(prefs))
    return out


def _wishes(prefs: Preferences) -> list[str]:
    out = []
    if prefs.through_advisor:
        out.append("Souhait : être contactée seulement par l'intermédiaire de votre conseillère")
    if prefs.do_not_contact:
        out.append("Souhait : ne pas être contactée directement")
    if prefs.home_visit:
        out.append("Souhait : une visite à domicile")
    if prefs.languages:
        out.append(f"Langues parlées : {', '.join(prefs.languages)}")
    return out


def _shared(
    directory: Directory,
    referral: ReferralRow,
    parts: tuple[Profile, Facts, Contact | None, Preferences | None],
    note_erased: bool,
    advisor_named: bool,
) -> tuple[str, ...]:
    """The categories of data the referral carried to its partner: the referral's fields
    its roles may see (`visible_fields`), cut to its kind's share (`minimise`)."""
    profile, facts, contact, prefs = parts
    roles = recipient_roles_of_partner(directory.is_creditor(referral.partner_id))
    fields = visible_fields("referral", roles)
    out = [
        "le besoin pour lequel vous êtes orientée",
        "votre commune",
        "le degré d'urgence",
        "un numéro de dossier propre à ce partenaire (jamais votre nom ni votre référence)",
    ]
    if "agency" in fields:
        out.append("le nom de votre agence, à contacter pour ce dossier")
    if "advisor" in fields and advisor_named:
        out.append("le nom de votre conseillère")
    shown_profile, shown_facts, shown_contact = minimise(
        referral.partner_kind, profile, facts, contact, prefs
    )
    if "profile" in fields and shown_profile is not None:
        out.append("votre profil (tranche d'âge, composition du foyer, quartier, publics)")
    if "facts" in fields:
        shown = shown_facts.model_dump(exclude_none=True) if shown_facts else {}
        if "arrears_eur" in shown or "arrears_months" in shown:
            out.append("le montant et la durée de votre dette de loyer")
        if "household_size" in shown:
            out.append("le nombre de personnes de votre foyer")
        if "housing_condition" in shown:
            out.append("l'état de votre logement")
        if "note" in shown:
            out.append("le texte libre du signalement")
        elif note_erased and "facts.note" in disclosed_parts(referral.partner_kind):
            out.append("le texte libre du signalement, s'il y en avait un (effacé depuis)")
    if "contact" in fields and shown_contact is not None:
        out.append("vos coordonnées (téléphone, moment pour vous joindre)")
    if "preferences" in fields and minimise_preferences(referral.partner_kind, prefs):
        out.append("vos souhaits sur la manière d'être contactée")
    return tuple(out)


def _source_learns(directory: Directory, source: str) -> str:
    roles: set[Role] = {"source"}
    if directory.is_creditor(source):
        roles.add("creditor")
    fields = visible_fields("referral-status-changed", roles)
    text = (
        "l'avancement de chaque orientation (acceptée, refusée, terminée…) et la clôture "
        "de chaque besoin"
    )
    if "reason" in fields:
        text += ", avec le motif d'un refus"
    else:
        text += ", sans les motifs ni les commentaires des partenaires"
    return text


def _history(names: _Names, rows: Sequence[Mapping[str, Any]]) -> tuple[Dated, ...]:
    out = []
    for row in rows:
        if row.get("outcome") != "applied":
            continue
        status = STATUS_WORDS.get(str(row["to_status"]), str(row["to_status"]))
        actor = str(row["actor"])
        who = (
            "constaté par le réseau"
            if actor == BUS
            else f"par {names.advisor(actor) if actor in names.advisors else names.partner(actor)}"
        )
        out.append(Dated(row["at"], f"{status} ({who})"))
    return tuple(out)


def _consent_state(c: ConsentRecord, now: datetime, names: _Names) -> str:
    if c.revoked_at is not None:
        by = names.advisor(c.revoked_by) if c.revoked_by else None
        return f"retiré le {when(c.revoked_at)}" + (f" (enregistré par {by})" if by else "")
    if c.valid_until <= now:
        return f"arrivé à son terme le {when(c.valid_until)}"
    return f"valable jusqu'au {when(c.valid_until)}"


def _journal_text(entry: JournalEntry, names: _Names, numbers: Mapping[str, int]) -> str:
    body = _loads(entry.body)
    by = names.advisor(entry.by) or entry.by
    number = numbers.get(entry.consent_id or "")
    which = f"consentement n° {number}" if number else "consentement"
    if entry.event == "granted":
        return f"Vous avez donné votre consentement ({which}, recueilli par {by})"
    if entry.event == "revoked":
        return f"Vous avez retiré {'le' if number else 'un'} {which} (enregistré par {by})"
    if entry.event == "refused":
        needs = body.get("needs")
        if not body:
            what = "des besoins dont le détail a été effacé"
        elif needs:
            what = ", ".join(names.need(n) for n in needs)
        else:
            what = "les besoins signalés"
        return f"Vous avez refusé que soient transmis : {what} (recueilli par {by})"
    return f"{entry.event} ({by})"


def build_receipt(
    record: PersonRecord,
    directory: Directory,
    *,
    now: datetime,
    produced_by: str,
    agency_id: str,
    retention: Retention | None = None,
) -> Receipt:
    """The receipt of what the ledger holds about `record.person_ref`, in plain French."""
    retention = retention or Retention()
    names = _Names(directory)
    consents = sorted(record.consents, key=lambda c: (c.granted_at, c.consent_id))
    numbers = {c.consent_id: i for i, c in enumerate(consents, start=1)}
    consent_views = tuple(
        ConsentView(
            number=numbers[c.consent_id],
            granted_at=c.granted_at,
            valid_until=c.valid_until,
            collected_by=names.advisor(c.collected_by) or c.collected_by,
            agency=names.partner(c.agency),
            method=METHOD_WORDS.get(c.method, c.method),
            needs=tuple(names.need(n) for n in c.scope.needs),
            recipients=(
                *(f"tout organisme de type « {names.kind(k)} »" for k in c.scope.partner_kinds),
                *(names.partner_with_kind(p) for p in c.scope.partners),
            ),
            state=_consent_state(c, now, names),
        )
        for c in consents
    )
    erased: list[str] = []
    recipients: dict[str, None] = {}
    signal_views = []
    for row in sorted(record.signals, key=lambda s: (s.received_at, s.signal_id)):
        body = _loads(row.body)
        parts = _signal_parts(body)
        note = parts[1].note
        note_erased = row.note_deleted_at is not None
        if note_erased:
            erased.append(
                f"Le texte libre du signalement du {when(row.received_at)} a été effacé le "
                f"{when(row.note_deleted_at)} (durée de conservation des textes : "
                f"{retention.free_text_days} jours)."
            )
        referrals = []
        for r in sorted(
            (r for r in record.referrals if r.signal_id == row.signal_id),
            key=lambda r: (r.created_at, r.need, r.attempt),
        ):
            steps = record.history.get(r.referral_id, ())
            outside = r.sent_at is None and any(
                h.get("from_status") == "requested" and h.get("to_status") == "completed"
                for h in steps
            )
            not_sent: str | None = None
            if r.referral_id in record.withheld:
                not_sent = WITHHELD
            elif outside:
                not_sent = OUTSIDE_THE_BUS
            partner_text = None if outside else r.outcome
            text_erased = (
                not outside
                and r.outcome is None
                and (now - r.updated_at).days >= retention.free_text_days
            )
            number = numbers.get(r.consent_id)
            consent = (
                f"consentement n° {number}, donné le {when(consents[number - 1].granted_at)}"
                if number
                else "un consentement anonymisé depuis (sa durée de conservation est passée)"
            )
            if not_sent is None:
                recipients[names.partner_with_kind(r.partner_id, r.partner_kind)] = None
            referrals.append(
                ReferralView(
                    need=names.need(r.need),
                    partner=names.partner(r.partner_id),
                    partner_kind=names.kind(r.partner_kind),
                    created_at=r.created_at,
                    sent_at=r.sent_at,
                    shared=()
                    if not_sent
                    else _shared(directory, r, parts, note_erased, row.advisor is not None),
                    not_sent=not_sent,
                    status=STATUS_WORDS.get(r.status, r.status),
                    reason=REASON_WORDS.get(r.reason, r.reason) if r.reason else None,
                    partner_text=partner_text,
                    text_erased=text_erased,
                    consent=consent,
                    history=_history(names, steps),
                )
            )
        if any(r.text_erased for r in referrals):
            erased.append(
                f"Les commentaires écrits par les partenaires sur le signalement du "
                f"{when(row.received_at)} ont été effacés après {retention.free_text_days} jours."
            )
        source = names.partner_with_kind(row.source)
        recipients[source] = None
        if row.agency:
            recipients[names.partner_with_kind(row.agency)] = None
        signal_views.append(
            SignalView(
                received_at=row.received_at,
                source=source,
                source_learns=_source_learns(directory, row.source),
                agency=names.partner(row.agency) if row.agency else None,
                advisor=names.advisor(row.advisor),
                commune=names.commune(row.commune),
                urgency=URGENCY_WORDS.get(row.urgency, row.urgency),
                needs=tuple(
                    NeedView(names.need(n.need), NEED_STATE_WORDS.get(n.state, n.state))
                    for n in record.needs.get(row.signal_id, ())
                ),
                data=tuple(_said(*parts)),
                note=note,
                note_erased_at=row.note_deleted_at,
                referrals=tuple(referrals),
            )
        )
    if any(not e.body or e.body == "{}" for e in record.journal):
        erased.append("Le détail de certains événements de consentement a été effacé.")
    events = tuple(
        Dated(e.at, _journal_text(e, names, numbers))
        for e in sorted(record.journal, key=lambda e: e.at)
    )
    reads = tuple(
        Dated(a.at, f"{names.advisor(a.actor) or a.actor} {READ_WORDS[a.action]}")
        for a in record.reads
        if a.action in READ_WORDS
    )
    return Receipt(
        person_ref=record.person_ref,
        produced_at=now,
        produced_by=names.advisor(produced_by) or produced_by,
        agency=names.partner(agency_id),
        network=directory.name or "partnerbus",
        signals=tuple(signal_views),
        consents=consent_views,
        consent_events=events,
        recipients=tuple(recipients),
        reads=reads,
        erased=tuple(erased),
        retention=retention,
    )
