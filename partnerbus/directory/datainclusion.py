"""Importing a data·inclusion v1 export (structures and services, JSON).

Each structure becomes an organisation, each service a partner. A bad row is reported
(file, row, field, why) and left out; the good rows are kept. A bad value inside a good row
(an unknown thématique, zone code, public or reception mode, a malformed network code) is
reported and only that value is left out. A structure in several networks takes the kind of
the most specific one (`kinds.pick_kind`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from partnerbus.directory.errors import DirectoryError, RowError
from partnerbus.directory.kinds import KIND_PATTERN, pick_kind
from partnerbus.directory.load import load_sample
from partnerbus.directory.model import Directory
from partnerbus.directory.territory import FRANCE, FRANCE_ALIASES
from partnerbus.schemas import Eligibility, Partner

PUBLICS = frozenset(
    {
        "actifs",
        "beneficiaires-des-minimas-sociaux",
        "demandeurs-emploi",
        "etudiants",
        "familles",
        "femmes",
        "jeunes",
        "personnes-en-situation-de-handicap",
        "personnes-en-situation-durgence",
        "personnes-en-situation-juridique-specifique",
        "personnes-exilees",
        "residents-qpv-frr",
        "seniors",
        "tous-publics",
    }
)
"""data·inclusion publics kept (the others are reported and dropped from the row)."""
MODES = frozenset({"en-presentiel", "a-distance"})
DEFAULT_KIND = "autre"
_SLUG = re.compile(r"[^a-z0-9]+")
_MAX_ID = 63


def slug(value: str) -> str:
    """A partner/organisation id from a data·inclusion id: lowercase, hyphens, ≤ 63 chars
    (a short hash keeps long ids unique)."""
    text = _SLUG.sub("-", value.lower()).strip("-") or "x"
    if len(text) < 2:
        text = f"di-{text}"
    if len(text) > _MAX_ID:
        digest = hashlib.sha1(value.encode(), usedforsecurity=False).hexdigest()[:8]
        text = f"{text[: _MAX_ID - 9].rstrip('-')}-{digest}"
    return text


def _read_rows(path: Path) -> list[Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        msg = f"{path}: cannot read ({exc.strerror or exc})"
        raise DirectoryError(msg) from exc
    except json.JSONDecodeError as exc:
        msg = f"{path}: not valid JSON: {exc}"
        raise DirectoryError(msg) from exc
    if isinstance(raw, dict) and isinstance(raw.get("items"), list):
        raw = raw["items"]  # a page of the data·inclusion API
    if not isinstance(raw, list):
        msg = f"{path}: expected a JSON list of records"
        raise DirectoryError(msg)
    return raw


def _strings(value: Any) -> list[str] | None:
    if value is None:
        return []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def load_data_inclusion(
    structures_path: str | Path,
    services_path: str | Path,
    *,
    base: Directory | None = None,
) -> tuple[Directory, list[RowError]]:
    """Load a data·inclusion v1 export into a directory.

    `base` gives the territory graph, the needs (incl. local ones), and any partners and
    agreements to keep alongside the import; by default the bundled sample's territories
    and needs, without its partners. Returns the directory and the row errors.
    """
    structures_path, services_path = Path(structures_path), Path(services_path)
    if base is None:
        sample = load_sample()
        territories, needs, partners, agreements, orgs = (
            sample.territories,
            sample.needs,
            [],
            [],
            {},
        )
    else:
        territories, needs = base.territories, base.needs
        partners, agreements = base.partners(), list(base.agreements)
        orgs = dict(base.organisations)
    errors: list[RowError] = []
    s_file, v_file = structures_path.name, services_path.name

    structures: dict[str, tuple[str, str, str | None]] = {}
    """structure id -> (organisation id, kind, code_insee)"""
    for i, row in enumerate(_read_rows(structures_path)):
        if not isinstance(row, dict):
            errors.append(RowError(s_file, i, "(record)", "not a JSON object"))
            continue
        sid = row.get("id")
        if not isinstance(sid, str) or not sid.strip():
            errors.append(RowError(s_file, i, "id", "missing or not a string"))
            continue
        if sid in structures:
            errors.append(RowError(s_file, i, "id", "duplicate structure id", sid))
            continue
        nom = row.get("nom")
        if not isinstance(nom, str) or len(nom.strip()) < 3:
            errors.append(RowError(s_file, i, "nom", "missing or shorter than 3 characters", sid))
            continue
        reseaux = _strings(row.get("reseaux_porteurs"))
        if reseaux is None:
            errors.append(
                RowError(s_file, i, "reseaux_porteurs", "not a list of codes", sid, dropped=False)
            )
            reseaux = []
        for code in reseaux:
            if not KIND_PATTERN.fullmatch(code):
                errors.append(
                    RowError(
                        s_file,
                        i,
                        "reseaux_porteurs",
                        f"network code {code!r} is not a code (2-60 lowercase letters, "
                        "digits, hyphens)",
                        sid,
                        dropped=False,
                    )
                )
        org = slug(sid)
        structures[sid] = (org, pick_kind(reseaux, DEFAULT_KIND), row.get("code_insee"))
        orgs.setdefault(org, nom.strip())

    taken = {p.id for p in partners}
    for i, row in enumerate(_read_rows(services_path)):
        if not isinstance(row, dict):
            errors.append(RowError(v_file, i, "(record)", "not a JSON object"))
            continue
        vid = row.get("id")
        if not isinstance(vid, str) or not vid.strip():
            errors.append(RowError(v_file, i, "id", "missing or not a string"))
            continue
        sid = row.get("structure_id")
        if sid not in structures:
            errors.append(
                RowError(v_file, i, "structure_id", f"unknown or rejected structure {sid!r}", vid)
            )
            continue
        org, kind, structure_insee = structures[sid]

        thematiques = _strings(row.get("thematiques"))
        if thematiques is None:
            errors.append(RowError(v_file, i, "thematiques", "not a list of codes", vid))
            continue
        known = [t for t in thematiques if t in needs]
        for t in thematiques:
            if t not in needs:
                errors.append(
                    RowError(v_file, i, "thematiques", f"unknown thématique {t!r}", vid, False)
                )
        if not known:
            errors.append(RowError(v_file, i, "thematiques", "no known thématique", vid))
            continue

        zone = _strings(row.get("zone_eligibilite"))
        if zone is None:
            errors.append(RowError(v_file, i, "zone_eligibilite", "not a list of codes", vid))
            continue
        coverage: list[str] = []
        for code in zone:
            code = FRANCE if code in FRANCE_ALIASES else code
            if code in territories:
                coverage.append(code)
            else:
                errors.append(
                    RowError(
                        v_file,
                        i,
                        "zone_eligibilite",
                        f"code {code!r} is not in the territory graph",
                        vid,
                        dropped=False,
                    )
                )
        if not zone:
            # no zone: data·inclusion leaves it open; the service's own commune is the
            # narrowest honest reading
            fallback = row.get("code_insee") or structure_insee
            if isinstance(fallback, str) and fallback in territories:
                coverage.append(fallback)
        if not coverage:
            errors.append(RowError(v_file, i, "zone_eligibilite", "no usable territory code", vid))
            continue

        publics = _strings(row.get("publics"))
        if publics is None:
            errors.append(RowError(v_file, i, "publics", "not a list of codes", vid))
            continue
        for public in publics:
            if public not in PUBLICS:
                errors.append(
                    RowError(v_file, i, "publics", f"unknown public {public!r}", vid, False)
                )
        kept_publics = tuple(p for p in publics if p in PUBLICS)

        modes = _strings(row.get("modes_accueil"))
        if modes is None:
            errors.append(
                RowError(v_file, i, "modes_accueil", "not a list of modes", vid, dropped=False)
            )
            modes = []
        for mode in modes:
            if mode not in MODES:
                errors.append(
                    RowError(v_file, i, "modes_accueil", f"unknown mode {mode!r}", vid, False)
                )
        kept_modes = tuple(m for m in modes if m in MODES) or ("en-presentiel",)

        pid = slug(vid)
        if pid in taken:
            errors.append(RowError(v_file, i, "id", f"duplicate service id ({pid})", vid))
            continue
        try:
            partner = Partner(
                id=pid,
                name=str(row.get("nom") or vid)[:150],
                kind=kind,
                organisation=org,
                needs=tuple(dict.fromkeys(known)),
                coverage=tuple(dict.fromkeys(coverage)),
                eligibility=Eligibility(publics=kept_publics),
                modes=kept_modes,
                external_id=vid,
            )
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(x) for x in err["loc"]) or "(record)"
            errors.append(RowError(v_file, i, field, err["msg"], vid))
            continue
        taken.add(pid)
        partners.append(partner)

    directory = Directory(
        territories=territories,
        needs=needs,
        partners=partners,
        agreements=agreements,
        organisations=orgs,
        name=f"data·inclusion import ({services_path.name})",
        source=str(services_path),
        local_kinds=base.local_kinds if base is not None else None,
    )
    return directory, errors


def summarise(errors: list[RowError]) -> Mapping[str, int]:
    """Count errors per (file, field): what an import report leads with."""
    counts: dict[str, int] = {}
    for e in errors:
        key = f"{e.file}:{e.field}"
        counts[key] = counts.get(key, 0) + 1
    return counts
