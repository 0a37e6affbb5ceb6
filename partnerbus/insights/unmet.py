"""Observed unmet demand: need × territory, from what the ledger recorded, beside the supply
gaps the directory alone shows (`directory check`).

Categories (each a need of a signal, counted once per category however many attempts):
- `no-partner`: routing found nobody (`signal_needs.state = 'no-partner'`): no supply;
- `unanswered`: a referral expired without an answer (`referrals.status = 'expired'`):
  supply exists on paper but does not answer;
- `full`: a partner refused it for `full` (`referrals.reason = 'full'`): supply saturated;
- `consent-not-obtained`: the need waited for consent and closed without it, never sent
  (`signal_needs.state = 'closed'`, once parked, with no referral).
A need is counted in the period its event happened (`signal_needs.updated_at`,
`referrals.closed_at`); its territory is its signal's commune.

Privacy: a cell (need × territory, and each category within it) counting fewer than
`MIN_PERSONS` distinct persons is never shown. A commune row below the threshold is rolled
into "other communes of <EPCI>" (or of the département, for a commune without EPCI), an
EPCI row into "other EPCIs of <département>"; the rolled-up row is shown when it reaches the
threshold, else hidden (counted in `hidden_cells`). A département row below it is hidden.
Category counts under the threshold inside a shown row are hidden (`null`). The persons of
a rolled-up row are its parent's persons less those of its shown children: a lower bound
(a person with needs in two communes), so the rule errs towards hiding.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from sqlalchemy import Engine, and_, case, distinct, exists, func, literal, select, union_all
from sqlalchemy.sql.elements import ColumnElement

from partnerbus.directory.check import WATCHED_NEEDS, find_gaps
from partnerbus.directory.model import Directory
from partnerbus.directory.territory import departement_of
from partnerbus.insights.common import MIN_PERSONS, Period, reading
from partnerbus.ledger import tables as t

By = Literal["commune", "epci", "departement"]
BY: tuple[str, ...] = ("commune", "epci", "departement")

CATEGORIES: tuple[str, ...] = ("no-partner", "unanswered", "full", "consent-not-obtained")
UNKNOWN = "?"
"""The EPCI of a commune the directory does not know."""


@dataclass(frozen=True)
class Supply:
    """What the directory alone says of a need in a territory (`directory check`)."""

    communes: int
    without_partner: int
    restricted_only: int

    @property
    def status(self) -> str:
        if not self.communes:
            return "unknown"
        if self.without_partner == self.communes:
            return "none"
        if self.without_partner:
            return "partial"
        if self.restricted_only:
            return "restricted"
        return "covered"

    def as_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "communes": self.communes,
            "without_partner": self.without_partner,
            "restricted_only": self.restricted_only,
        }


@dataclass(frozen=True)
class UnmetCell:
    need: str
    territory: str
    """The territory's code; a rolled-up row's is `other:<parent code>`."""
    name: str
    level: str
    units: int
    persons: int
    categories: dict[str, int | None]
    """Needs per category; None where fewer than the threshold's persons (hidden)."""
    rolled_up: bool = False
    supply: Supply | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "need": self.need,
            "level": self.level,
            "territory": self.territory,
            "name": self.name,
            "rolled_up": self.rolled_up,
            "needs": self.units,
            "persons": self.persons,
            "categories": {c: self.categories.get(c) for c in CATEGORIES},
            "supply": self.supply.as_json() if self.supply else None,
        }


@dataclass(frozen=True)
class SupplyGap:
    need: str
    territory: str
    name: str
    supply: Supply

    def as_json(self) -> dict[str, Any]:
        return {
            "need": self.need,
            "territory": self.territory,
            "name": self.name,
            **self.supply.as_json(),
        }


@dataclass(frozen=True)
class Unmet:
    period: Period
    by: str
    cells: list[UnmetCell]
    hidden_cells: int
    supply_gaps: list[SupplyGap]
    min_persons: int = MIN_PERSONS
    totals: dict[str, int | None] = field(default_factory=dict)
    """Needs per category in every territory; None under the threshold's persons."""

    def as_json(self) -> dict[str, Any]:
        return {
            "insight": "unmet",
            "version": 1,
            "period": self.period.as_json(),
            "by": self.by,
            "min_persons": self.min_persons,
            "categories": list(CATEGORIES),
            "totals": {c: self.totals.get(c, 0) for c in CATEGORIES},
            "cells": [c.as_json() for c in self.cells],
            "hidden_cells": self.hidden_cells,
            "supply_gaps": [g.as_json() for g in self.supply_gaps],
        }


# territories ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Territories:
    """Each directory commune's EPCI (or its département when it has none) and the
    département that EPCI is filed under; with every code's name."""

    epci: dict[str, str]
    epci_departement: dict[str, str]
    names: dict[str, str]
    departement_of_epci: dict[str, str]
    """Each EPCI key → the département it is filed under."""

    @classmethod
    def of(cls, d: Directory) -> Territories:
        epci: dict[str, str] = {}
        epci_dep: dict[str, str] = {}
        names: dict[str, str] = {}
        for commune in d.communes():
            territory = d.territories[commune]
            names[commune] = territory.name
            dep = territory.departement or departement_of(commune)
            parent = d.territories.get(territory.parent) if territory.parent else None
            if parent is not None and parent.level == "epci":
                epci[commune] = parent.code
                names[parent.code] = parent.name
                filed = parent.parent if parent.parent in d.territories else dep
                epci_dep[commune] = filed or dep
            else:
                epci[commune] = dep
                epci_dep[commune] = dep
        for code in set(epci_dep.values()) | set(epci.values()):
            found = d.territories.get(code)
            if found is not None:
                names.setdefault(code, found.name)
        seats = {code: epci_dep[commune] for commune, code in epci.items()}
        return cls(epci, epci_dep, names, seats)

    def name(self, code: str) -> str:
        if code == UNKNOWN:
            return "communes outside the directory"
        return self.names.get(code, code)

    def key(self, level: str, commune: ColumnElement[str]) -> ColumnElement[str]:
        """The SQL expression of a commune's territory at `level`: the commune itself, its
        EPCI (`epci`), the département its EPCI is filed under (`epci-departement`), its
        own département (`departement`, from its INSEE code)."""
        own_dep = case(
            (func.substr(commune, 1, 2) == "97", func.substr(commune, 1, 3)),
            else_=func.substr(commune, 1, 2),
        )
        if level == "commune":
            return commune
        if level == "departement":
            return own_dep
        mapping = self.epci if level == "epci" else self.epci_departement
        if not mapping:
            return literal(UNKNOWN) if level == "epci" else own_dep
        return case(mapping, value=commune, else_=literal(UNKNOWN) if level == "epci" else own_dep)

    def of_commune(self, level: str, commune: str) -> str:
        if level == "commune":
            return commune
        if level == "departement":
            return departement_of(commune)
        mapping = self.epci if level == "epci" else self.epci_departement
        return mapping.get(commune, UNKNOWN if level == "epci" else departement_of(commune))


PARENT: dict[str, str | None] = {
    "commune": "epci",
    "epci": "epci-departement",
    "departement": None,
}
ROLLED_NAME = {"commune": "other communes of {}", "epci": "other EPCIs of {}"}


# the query --------------------------------------------------------------------------------


def _units(period: Period) -> Any:
    """One row per need of a signal and category it fell in during the period."""
    sn, r = t.signal_needs.c, t.referrals.c
    in_needs = and_(sn.updated_at >= period.since, sn.updated_at < period.until)
    closed = and_(r.closed_at >= period.since, r.closed_at < period.until)
    never_sent = ~exists().where(r.signal_id == sn.signal_id, r.need == sn.need)
    return union_all(
        select(sn.signal_id, sn.need, literal("no-partner").label("category")).where(
            sn.state == "no-partner", in_needs
        ),
        select(sn.signal_id, sn.need, literal("consent-not-obtained").label("category")).where(
            sn.state == "closed", sn.parked_since.is_not(None), never_sent, in_needs
        ),
        select(r.signal_id, r.need, literal("unanswered").label("category")).where(
            r.status == "expired", closed
        ),
        select(r.signal_id, r.need, literal("full").label("category")).where(
            r.status == "rejected", r.reason == "full", closed
        ),
    ).cte("units")


def _level_query(period: Period, territories: Territories, level: str) -> Any:
    """Needs and distinct persons per need × territory at `level`, per category and for
    all categories (`category` = '*')."""
    units = _units(period)
    s = t.signals.c
    key = territories.key(level, s.commune).label("territory")
    joined = (
        select(
            units.c.need,
            units.c.category,
            key,
            (units.c.signal_id + literal("|") + units.c.need).label("unit"),
            s.person_ref,
        )
        .join_from(units, t.signals, s.signal_id == units.c.signal_id)
        .subquery("joined")
    )
    j = joined.c
    per_category = select(
        j.need,
        j.territory,
        j.category,
        func.count(distinct(j.unit)).label("units"),
        func.count(distinct(j.person_ref)).label("persons"),
    ).group_by(j.need, j.territory, j.category)
    overall = select(
        j.need,
        j.territory,
        literal("*").label("category"),
        func.count(distinct(j.unit)).label("units"),
        func.count(distinct(j.person_ref)).label("persons"),
    ).group_by(j.need, j.territory)
    return union_all(per_category, overall)


def _totals_query(period: Period) -> Any:
    units = _units(period)
    u = units.c
    return (
        select(
            u.category,
            func.count(distinct(u.signal_id + literal("|") + u.need)).label("units"),
            func.count(distinct(t.signals.c.person_ref)).label("persons"),
        )
        .join_from(units, t.signals, t.signals.c.signal_id == u.signal_id)
        .group_by(u.category)
    )


Counted = dict[tuple[str, str], dict[str, tuple[int, int]]]
"""(need, territory) → category (or '*') → (needs, persons)."""


def _fetch(
    engine: Engine, period: Period, territories: Territories, levels: Iterable[str]
) -> tuple[dict[str, Counted], dict[str, tuple[int, int]]]:
    """Each level's counts and the network-wide totals per category, in one reading."""
    out: dict[str, Counted] = {}
    with reading(engine) as conn:
        for level in levels:
            counted: Counted = defaultdict(dict)
            for row in conn.execute(_level_query(period, territories, level)).mappings():
                counted[(row["need"], row["territory"])][row["category"]] = (
                    int(row["units"]),
                    int(row["persons"]),
                )
            out[level] = counted
        totals = {
            row["category"]: (int(row["units"]), int(row["persons"]))
            for row in conn.execute(_totals_query(period)).mappings()
        }
    return out, totals


# the insight ------------------------------------------------------------------------------


def unmet(
    engine: Engine,
    directory: Directory,
    period: Period,
    *,
    by: str = "commune",
    needs: Iterable[str] | None = None,
    min_persons: int = MIN_PERSONS,
) -> Unmet:
    """The unmet-demand insight over `period`, by commune, EPCI or département, beside the
    directory's supply gaps for the watched needs and every need observed."""
    if by not in BY:
        msg = f"--by is one of {', '.join(BY)}, not {by!r}"
        raise ValueError(msg)
    if min_persons < MIN_PERSONS:
        msg = f"the privacy threshold is at least {MIN_PERSONS} persons"
        raise ValueError(msg)
    territories = Territories.of(directory)
    parent = PARENT[by]
    levels = [by] + ([parent] if parent else [])
    counted, totals = _fetch(engine, period, territories, levels)
    cells, hidden = _privacy(
        counted[by], counted.get(parent or "", {}), by, territories, min_persons
    )
    observed = {need for need, _ in counted[by]}
    watched = list(needs) if needs is not None else list(WATCHED_NEEDS)
    checked = [n for n in dict.fromkeys([*watched, *sorted(observed)]) if directory.has_need(n)]
    supply = _supply(directory, territories, by, checked)
    cells = [replace(cell, supply=supply.get((cell.need, cell.territory))) for cell in cells]
    gaps = [
        SupplyGap(need, code, territories.name(code), s)
        for (need, code), s in sorted(supply.items())
        if s.without_partner
    ]
    shown_totals = _categories(totals, min_persons)
    return Unmet(period, by, cells, hidden, gaps, min_persons, shown_totals)


def _privacy(
    cells: Counted,
    parents: Counted,
    level: str,
    territories: Territories,
    min_persons: int,
) -> tuple[list[UnmetCell], int]:
    """The cells shown at `level`, small ones rolled into their parent's "other" row."""
    shown: list[UnmetCell] = []
    hidden = 0
    # what the shown children of each (need, parent) take from it
    taken: dict[tuple[str, str], dict[str, list[int]]] = defaultdict(
        lambda: defaultdict(lambda: [0, 0])
    )
    small: set[tuple[str, str]] = set()
    parent_level = PARENT[level]
    for (need, code), counts in sorted(cells.items()):
        units, persons = counts["*"]
        parent_code = _parent_code(territories, level, code) if parent_level is not None else None
        if persons >= min_persons:
            shown.append(
                UnmetCell(
                    need,
                    code,
                    territories.name(code),
                    level,
                    units,
                    persons,
                    _categories(counts, min_persons),
                )
            )
            if parent_code is not None:
                for category, (u, p) in counts.items():
                    taken[(need, parent_code)][category][0] += u
                    taken[(need, parent_code)][category][1] += p
        elif parent_code is None:
            hidden += 1
        else:
            small.add((need, parent_code))
    for need, parent_code in sorted(small):
        totals = parents.get((need, parent_code), {})
        rest: dict[str, tuple[int, int]] = {}
        for category, (u, p) in totals.items():
            used_u, used_p = taken[(need, parent_code)][category]
            rest[category] = (max(u - used_u, 0), max(p - used_p, 0))
        units, persons = rest.get("*", (0, 0))
        if persons >= min_persons:
            shown.append(
                UnmetCell(
                    need,
                    f"other:{parent_code}",
                    ROLLED_NAME[level].format(territories.name(parent_code)),
                    level,
                    units,
                    persons,
                    _categories(rest, min_persons),
                    rolled_up=True,
                )
            )
        else:
            hidden += 1
    shown.sort(key=lambda c: (-c.units, c.need, c.rolled_up, c.territory))
    return shown, hidden


def _parent_code(territories: Territories, level: str, code: str) -> str | None:
    """The parent territory of a territory code at `level` (commune → EPCI, EPCI → its
    département)."""
    if level == "commune":
        return territories.of_commune("epci", code)
    if level == "epci":
        return territories.departement_of_epci.get(code, UNKNOWN)
    return None


def _categories(counts: Mapping[str, tuple[int, int]], min_persons: int) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for category in CATEGORIES:
        units, persons = counts.get(category, (0, 0))
        out[category] = units if units == 0 or persons >= min_persons else None
    return out


def _supply(
    d: Directory, territories: Territories, level: str, needs: list[str]
) -> dict[tuple[str, str], Supply]:
    """The directory's coverage of each need at `level`: communes in the territory, those
    without any partner open to all, those with restricted services only."""
    communes_of: dict[str, list[str]] = defaultdict(list)
    for commune in d.communes():
        communes_of[territories.of_commune(level, commune)].append(commune)
    gaps = {g.need: g for g in find_gaps(d, needs)}
    out: dict[tuple[str, str], Supply] = {}
    for need in needs:
        gap = gaps.get(need)
        missing = set(gap.communes) if gap else set()
        restricted = set(gap.restricted_only) if gap else set()
        for code, communes in communes_of.items():
            out[(need, code)] = Supply(
                len(communes),
                sum(1 for c in communes if c in missing),
                sum(1 for c in communes if c in restricted),
            )
    return out
