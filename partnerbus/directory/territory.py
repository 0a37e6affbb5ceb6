"""Territories as a hierarchy of INSEE codes:
QPV → commune → EPCI → département → région → France.

A commune lies in its own département (its INSEE code carries it: `93066` is in 93), even
when its EPCI is filed under another: the Métropole du Grand Paris spans six départements,
Aix-Marseille-Provence three. A commune's chain therefore goes up through its EPCI, then
through its own département, not through the EPCI's."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Level = Literal["qpv", "commune", "epci", "departement", "region", "france"]

LEVEL_RANK: dict[str, int] = {
    "qpv": 0,
    "commune": 1,
    "epci": 2,
    "departement": 3,
    "region": 4,
    "france": 5,
}
"""Smaller is more specific: the first rule of ranking."""

FRANCE = "france"
FRANCE_ALIASES = frozenset({"france", "99100"})
"""data·inclusion allows `france` or the INSEE country code 99100 for the whole country."""


@dataclass(frozen=True, slots=True)
class Territory:
    code: str
    name: str
    level: Level
    parent: str | None
    """Code of the enclosing territory; None only for France. A commune's parent is its
    EPCI when it has one (else its département); an EPCI's is the département it is filed
    under (its seat), though its communes may lie in others."""
    departement: str | None = None
    """A commune's own département (the loaders always set it, from the INSEE data). None
    on other levels, and on a commune built without one: its INSEE code then tells it."""


REGION_PREFIX = "R"


def region_key(code: str) -> str:
    """A région's key in the graph: `R` + its INSEE code. INSEE région codes (11, 24, 32…)
    collide with département codes, and a bare 2-digit coverage code is a département
    (data·inclusion lists a région's départements), so régions get a prefix."""
    return code if code.startswith(REGION_PREFIX) else f"{REGION_PREFIX}{code}"


def departement_of(commune: str) -> str:
    """The département code of a commune code (three characters overseas)."""
    return commune[:3] if commune.startswith("97") else commune[:2]


def own_departement(territories: Mapping[str, Territory], territory: Territory) -> str | None:
    """The département a commune lies in, when the territories know it: the one it names,
    else the one its INSEE code carries. None for any other level, or when that département
    is not a known one (the commune then goes up through its parent alone)."""
    if territory.level != "commune":
        return None
    code = territory.departement or departement_of(territory.code)
    found = territories.get(code)
    return code if found is not None and found.level == "departement" else None


def level_of_code(code: str) -> Level | None:
    """Guess the level of a `zone_eligibilite` code from its shape."""
    if code in FRANCE_ALIASES:
        return "france"
    if code.startswith("QN"):
        return "qpv"
    if code.startswith(REGION_PREFIX):
        return "region"
    if len(code) == 9 and code.isdigit():
        return "epci"
    if len(code) == 5:
        return "commune"
    if len(code) in (2, 3):
        return "departement"
    return None


def ancestors(territories: Mapping[str, Territory], code: str) -> tuple[Territory, ...]:
    """The territory and every territory enclosing it, most specific first. Past its most
    specific commune, the chain goes through that commune's own département (see
    `own_departement`), whichever département its EPCI is filed under."""
    out: list[Territory] = []
    current: str | None = code
    departement: str | None = None
    while current is not None:
        territory = territories.get(current)
        if territory is None or territory in out:
            break
        if departement is not None and LEVEL_RANK[territory.level] >= LEVEL_RANK["departement"]:
            current, departement = departement, None
            continue
        out.append(territory)
        if departement is None and not any(t.level == "commune" for t in out[:-1]):
            departement = own_departement(territories, territory)
        current = territory.parent
    if departement is not None:
        # the chain stopped below the département level: the commune still lies in it
        out.extend(t for t in ancestors(territories, departement) if t not in out)
    return tuple(out)
