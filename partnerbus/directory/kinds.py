"""Partner kinds: data·inclusion's network codes (`reseaux_porteurs`), the local kinds this
project declares where the taxonomy has none, and which network names a structure that
belongs to several."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

KIND_PATTERN = re.compile(r"[a-z0-9-]{2,60}")
"""What a kind looks like (the `Partner.kind` field's pattern)."""

DATA_INCLUSION_KINDS = frozenset(
    {
        "60000-rebonds",
        "action-logement",
        "adie",
        "afpa",
        "agefiph",
        "aidants-connect",
        "alliance-villes-emploi",
        "anlci",
        "apprentis-dauteuil",
        "ase",
        "banques-alimentaires",
        "caarud",
        "cada",
        "caf",
        "campus-connecte",
        "cap-emploi-reseau-cheops",
        "cava",
        "ccas-cias",
        "chambres-consulaires",
        "chantier-ecole",
        "chrs",
        "chu",
        "cidff",
        "cmp",
        "cms",
        "cnam",
        "collectif-emploi",
        "communes",
        "conseillers-numeriques",
        "coorace",
        "cph",
        "cpam",
        "creches-avip",
        "crepi",
        "cresus",
        "croix-rouge",
        "csapa",
        "departements",
        "duo-for-a-job",
        "ecoles-de-la-deuxieme-chance",
        "egee",
        "emmaus",
        "epide",
        "espaces-publics-numeriques",
        "etcld",
        "fabrique-de-territoire",
        "face",
        "fcsf",
        "federation-des-acteurs-de-la-solidarite",
        "federation-professionnelle-femmes",
        "france-active",
        "france-service",
        "france-travail",
        "french-tech",
        "geiq",
        "grandes-ecoles-du-numerique",
        "huda",
        "hup",
        "inae",
        "initiative-france",
        "konexio",
        "la-cravate-solidaire",
        "la-poste",
        "les-premieres",
        "maison-departementale-de-lautonomie",
        "maisons-de-l-emploi",
        "maisons-des-solidarites",
        "mission-locale",
        "mjc",
        "mobin",
        "msap",
        "mutualite-sociale-agricole",
        "nqt",
        "pimms-mediation",
        "pjj",
        "plie",
        "points-conseil-budget",
        "points-justice",
        "positive-planet",
        "regions",
        "reseau-app",
        "reseau-bge",
        "reseau-entreprendre",
        "reseau-information-jeunesse",
        "residences-fjt",
        "ressourceries",
        "restos-du-coeur",
        "secours-populaire",
        "siae",
        "siao",
        "simplon",
        "singa",
        "snc",
        "spip",
        "tous-tes-possibles",
        "unaf",
        "unccas",
        "unea",
        "unis-cite",
        "wimoov",
    }
)
"""data·inclusion schema v1 `reseaux_porteurs` codes (gip-inclusion/data-inclusion-schema,
`src/data_inclusion/schema/v1/reseaux_porteurs.py`; both `ccas-cias` and its later name
`unccas` are kept)."""

LOCAL_KINDS: Mapping[str, str] = {
    "bailleur-social": "social landlord (its agencies, recovery service, proximity team)",
    "adil": "Agence départementale d'information sur le logement",
    "association": "local association outside any data·inclusion network",
    "udaf": "Union départementale des associations familiales (data·inclusion: departements)",
    "mdph": "Maison départementale des personnes handicapées (data·inclusion: departements)",
    "autre": "imported structure without a usable network code",
}
"""Kinds the data·inclusion taxonomy lacks, declared here and used by this project (the
disclosure rules, the sample, the benchmark). A directory file may declare more under
`local_kinds`. `udaf` and `mdph` are data·inclusion `departements` services: kept as local
kinds because a referral to them carries what those services need, not a département's."""

KIND_PRECEDENCE = (
    # départemental services, before `departements`
    "maisons-des-solidarites",
    "maison-departementale-de-lautonomie",
    "ase",
    "cms",
    # health
    "cmp",
    "csapa",
    "caarud",
    # municipal social action, before `communes` and `unccas`
    "ccas-cias",
    # shelter and housing
    "siao",
    "chrs",
    "chu",
    "cada",
    "huda",
    "cph",
    "residences-fjt",
    "action-logement",
    # budget, debt, rights
    "points-conseil-budget",
    "cresus",
    "cidff",
    "points-justice",
    "pimms-mediation",
    # benefits and health insurance
    "caf",
    "cpam",
    "mutualite-sociale-agricole",
    # neighbourhood
    "fcsf",
    "mjc",
    # aid networks
    "croix-rouge",
    "secours-populaire",
    "restos-du-coeur",
    "banques-alimentaires",
    "emmaus",
    # justice
    "spip",
    "pjj",
    # general public-service and digital help desks
    "france-service",
    "msap",
    "aidants-connect",
    "conseillers-numeriques",
    "espaces-publics-numeriques",
)
"""When a structure belongs to several networks, the most specific social-support network
names its kind: a Maison Nord Solidarités (`maisons-des-solidarites`, `departements`) is a
Maison des solidarités, a CCAS (`ccas-cias`, `communes`) a CCAS."""

UMBRELLA_KINDS = (
    "federation-des-acteurs-de-la-solidarite",
    "unaf",
    "unccas",
    "communes",
    "departements",
    "regions",
)
"""Federations and local authorities as a whole: chosen only when nothing narrower is given,
narrowest first."""


def is_known_kind(kind: str, local_kinds: Iterable[str] = LOCAL_KINDS) -> bool:
    """A data·inclusion network code or a declared local kind."""
    return kind in DATA_INCLUSION_KINDS or kind in local_kinds


def pick_kind(codes: Iterable[str], default: str = "autre") -> str:
    """The kind of a structure from its network codes: the first in `KIND_PRECEDENCE`;
    else another known code (alphabetically); else an umbrella (`UMBRELLA_KINDS` order);
    else an unknown but well-formed code (alphabetically); else `default`."""
    valid = {c for c in codes if KIND_PATTERN.fullmatch(c)}
    if not valid:
        return default
    return min(valid, key=_kind_rank)


_PRECEDENCE = {code: i for i, code in enumerate(KIND_PRECEDENCE)}
_UMBRELLA = {code: i for i, code in enumerate(UMBRELLA_KINDS)}


def _kind_rank(code: str) -> tuple[int, int, str]:
    if code in _PRECEDENCE:
        return (0, _PRECEDENCE[code], code)
    if code in _UMBRELLA:
        return (2, _UMBRELLA[code], code)
    if is_known_kind(code):
        return (1, 0, code)
    return (3, 0, code)
