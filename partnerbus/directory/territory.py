"""Territories as a hierarchy of INSEE codes:
QPV → commune → EPCI → département → région → France."""

from __future__ import annotations

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
    """Code of the enclosing territory; None only for France."""


REGION_PREFIX = "R"


def region_key(code: str) -> str:
    """A région's key in the graph: `R` + its INSEE code. INSEE région codes (11, 24, 32…)
    collide with département codes, and a bare 2-digit coverage code is a département
    (data·inclusion lists a région's départements), so régions get a prefix."""
    return code if code.startswith(REGION_PREFIX) else f"{REGION_PREFIX}{code}"


def departement_of(commune: str) -> str:
    """The département code of a commune code (three characters overseas)."""
    return commune[:3] if commune.startswith("97") else commune[:2]


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


def ancestors(territories: dict[str, Territory], code: str) -> tuple[Territory, ...]:
    """The territory and every territory enclosing it, most specific first."""
    out: list[Territory] = []
    current: str | None = code
    while current is not None:
        territory = territories.get(current)
        if territory is None or territory in out:
            break
        out.append(territory)
        current = territory.parent
    return tuple(out)
