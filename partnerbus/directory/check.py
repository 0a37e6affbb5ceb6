"""What an ops team checks in a directory: problems in the data, and coverage gaps
(which needs have no partner in which communes)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from partnerbus.directory.kinds import is_known_kind
from partnerbus.directory.match import match
from partnerbus.directory.model import Directory

Severity = Literal["error", "warning", "info"]

WATCHED_NEEDS = (
    "logement-hebergement--changer-de-logement",
    "logement-hebergement--rechercher-une-solution-dhebergement-temporaire",
    "logement-hebergement--reduire-les-impayes-de-loyer",
    "logement-hebergement--se-maintenir-dans-le-logement",
    "logement-hebergement--sinformer-sur-les-demarches-liees-a-lacces-au-logement",
    "difficultes-financieres--ameliorer-sa-gestion-budgetaire",
    "difficultes-financieres--mettre-en-place-une-mesure-de-protection-financiere",
    "difficultes-financieres--prevenir-une-degradation-de-la-situation-financiere",
    "difficultes-financieres--situation-dendettement-surendettement",
    "difficultes-administratives-ou-juridiques--accompagnement-aux-demarches-administratives",
    "difficultes-administratives-ou-juridiques--accompagnement-pour-lacces-aux-droits",
    "famille--prise-en-charge-personne-dependante",
    "famille--soutien-a-la-parentalite-et-a-leducation",
    "famille--surmonter-conflits-separation-violence",
    "sante--acces-aux-soins",
    "sante--constituer-un-dossier-mdph-invalidite",
    "sante--sante-mentale",
    "remobilisation--lien-social",
    "equipement-et-alimentation--aide-menagere",
    "equipement-et-alimentation--alimentation",
    "numerique--acceder-a-des-services-en-ligne",
)
"""The housing and social-support needs a landlord's network is expected to cover."""


@dataclass(frozen=True, slots=True)
class Problem:
    severity: Severity
    subject: str
    message: str


@dataclass(frozen=True, slots=True)
class Gap:
    """A need without any partner open to everyone in these communes."""

    need: str
    communes: tuple[str, ...]
    restricted_only: tuple[str, ...] = ()
    """Communes where only restricted services (age, public, QPV…) exist."""


@dataclass(slots=True)
class Report:
    problems: list[Problem] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)
    needs_checked: int = 0
    communes_checked: int = 0

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]


def find_problems(d: Directory) -> list[Problem]:
    """Inconsistencies a person should fix in the directory data."""
    out: list[Problem] = []
    orgs_with_partners = {p.organisation for p in d.partners()}
    connected: set[str] = set()
    for a in d.agreements:
        connected.update((a.from_org, a.to_org))
        for org in (a.from_org, a.to_org):
            if org not in orgs_with_partners:
                out.append(
                    Problem(
                        "warning",
                        f"agreement {a.from_org} -> {a.to_org}",
                        f"organisation {org!r} has no partner in the directory",
                    )
                )
    agencies = [p for p in d.partners() if p.advisors and not p.is_creditor]
    for p in d.partners():
        if p.is_creditor and p.advisors:
            out.append(
                Problem(
                    "error",
                    p.id,
                    "is a creditor with advisors: a creditor is never the agency that follows "
                    "the person (docs/DISCLOSURE.md); set `creditor: false` if it is one",
                )
            )
        if not p.needs and p.kind != "bailleur-social":
            out.append(Problem("warning", p.id, "serves no need: it can never be matched"))
        if not p.coverage and p.needs:
            out.append(Problem("error", p.id, "has needs but no coverage"))
        if p.organisation not in connected and d.agreements and p.needs:
            out.append(
                Problem(
                    "info",
                    p.id,
                    f"organisation {p.organisation!r} has no agreement: only its own "
                    "organisation (or a sender-less match) can refer to it",
                )
            )
        if p.capacity_status == "no-capacity" or p.capacity == 0:
            out.append(Problem("info", p.id, "declared full at load"))
        covered = set(p.coverage)
        for adv in p.advisors:
            for commune in adv.communes:
                if not d.has_commune(commune):
                    out.append(
                        Problem(
                            "error", p.id, f"advisor {adv.id} follows unknown commune {commune}"
                        )
                    )
                elif covered.isdisjoint(c for c, _ in d.index.territory_chains[commune]):
                    out.append(
                        Problem(
                            "warning",
                            p.id,
                            f"advisor {adv.id} follows {commune}, outside the agency",
                        )
                    )
    if agencies:
        orphans = [c for c in d.communes() if not d.pivots_covering(c)]
        if orphans:
            shown = ", ".join(orphans[:10]) + (" …" if len(orphans) > 10 else "")
            out.append(
                Problem(
                    "warning",
                    "agencies",
                    f"{len(orphans)} communes have no agency (no partner with advisors): {shown}",
                )
            )
    out.extend(_unknown_kinds(d))
    used = {n for p in d.partners() for n in p.needs}
    for need in d.needs.values():
        if need.local and need.code not in used:
            out.append(Problem("info", need.code, "local need that no partner serves"))
    return out


def _unknown_kinds(d: Directory) -> list[Problem]:
    """One warning per kind that is neither a data·inclusion network code nor a declared
    local kind (a typo, or a local kind the file should declare under `local_kinds`)."""
    unknown: defaultdict[str, list[str]] = defaultdict(list)
    for p in d.partners():
        if not is_known_kind(p.kind, d.local_kinds):
            unknown[p.kind].append(p.id)
    out = []
    for kind, ids in sorted(unknown.items()):
        shown = ", ".join(ids[:5]) + (" …" if len(ids) > 5 else "")
        out.append(
            Problem(
                "warning",
                f"kind {kind}",
                "neither a data·inclusion network code nor a declared local kind "
                f"(declare it under local_kinds): {len(ids)} partner(s): {shown}",
            )
        )
    return out


def communes_within(d: Directory, code: str) -> list[str]:
    """The communes inside a territory (EPCI, département, région…), sorted; KeyError for
    an unknown territory code."""
    code = d.territory(code).code
    return [c for c in d.communes() if any(t == code for t, _ in d.index.territory_chains[c])]


def find_gaps(
    d: Directory,
    needs: Iterable[str] | None = None,
    communes: Iterable[str] | None = None,
    sender: str | None = None,
) -> list[Gap]:
    """For each need, the communes where nobody can take it. With a sender, only partners
    reachable along its agreements count (the gaps that sender will actually hit)."""
    needs = [n for n in (needs if needs is not None else WATCHED_NEEDS) if d.has_need(n)]
    communes = list(communes) if communes is not None else d.communes()
    gaps: list[Gap] = []
    for need in needs:
        missing: list[str] = []
        restricted: list[str] = []
        for commune in communes:
            if sender is None:
                status = _coverage_status(d, need, commune)
            else:
                status = "ok" if match(d, need, commune, sender=sender, limit=1) else "none"
            if status == "none":
                missing.append(commune)
            elif status == "restricted":
                restricted.append(commune)
        if missing or restricted:
            gaps.append(Gap(need, tuple(missing), tuple(restricted)))
    return gaps


def _coverage_status(d: Directory, need: str, commune: str) -> str:
    """ "ok" (someone open to all), "restricted" (only restricted services) or "none"."""
    found_restricted = False
    index = d.index
    chain = index.need_chains.get(need, ())
    for code, _ in index.territory_chains.get(commune, ()):
        for level, need_code in enumerate(chain):
            for entry in d.entries_at(need_code, code):
                if entry.bailleur and level:
                    continue
                if entry.open_to_all:
                    return "ok"
                found_restricted = True
    return "restricted" if found_restricted else "none"


def check(
    d: Directory,
    needs: Iterable[str] | None = None,
    sender: str | None = None,
    communes: Iterable[str] | None = None,
) -> Report:
    """The full report: problems (in the whole directory), then coverage gaps (in
    `communes`, by default every commune)."""
    needs = list(needs) if needs is not None else list(WATCHED_NEEDS)
    communes = list(communes) if communes is not None else d.communes()
    report = Report(
        problems=find_problems(d), gaps=find_gaps(d, needs, communes=communes, sender=sender)
    )
    report.needs_checked = sum(1 for n in needs if d.has_need(n))
    report.communes_checked = len(communes)
    return report


def gaps_by_parent(d: Directory, gaps: list[Gap]) -> dict[str, list[str]]:
    """Group commune codes of gaps by EPCI (or département): where the holes are."""
    out: defaultdict[str, set[str]] = defaultdict(set)
    for gap in gaps:
        for commune in gap.communes:
            parent = d.territories[commune].parent or "france"
            out[parent].add(commune)
    return {k: sorted(v) for k, v in sorted(out.items())}
