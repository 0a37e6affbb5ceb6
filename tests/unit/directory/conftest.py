"""Small hand-built directories: each ranking rule is pinned on the fewest partners."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from partnerbus.directory import Directory, load_sample
from partnerbus.directory.load import taxonomy
from partnerbus.directory.model import directory_from_records
from partnerbus.directory.needs import Need
from partnerbus.directory.territory import Territory
from partnerbus.schemas import Agreement, Partner

LILLE, ROUBAIX, ARRAS = "59350", "59512", "62041"
MEL, NORD, PAS_DE_CALAIS, HDF = "200093201", "59", "62", "R32"
QPV_ROUBAIX = "QN0590121"
ARREARS = "logement-hebergement--reduire-les-impayes-de-loyer"
HOUSING = "logement-hebergement"
KEEP_HOME = "logement-hebergement--se-maintenir-dans-le-logement"
RIGHTS = "difficultes-administratives-ou-juridiques--accompagnement-pour-lacces-aux-droits"
HOARDING = "local-logement--incurie"

TERRITORIES = (
    Territory("france", "France", "france", None),
    Territory(HDF, "Hauts-de-France", "region", "france"),
    Territory(NORD, "Nord", "departement", HDF),
    Territory(PAS_DE_CALAIS, "Pas-de-Calais", "departement", HDF),
    Territory(MEL, "Métropole Européenne de Lille", "epci", NORD),
    Territory(LILLE, "Lille", "commune", MEL),
    Territory(ROUBAIX, "Roubaix", "commune", MEL),
    Territory(ARRAS, "Arras", "commune", PAS_DE_CALAIS),
    Territory(QPV_ROUBAIX, "Roubaix QPV", "qpv", ROUBAIX),
)


def needs() -> list[Need]:
    out = list(taxonomy().values())
    out.append(Need(HOARDING, "Incurie", KEEP_HOME))
    return out


def partner(pid: str, **fields: Any) -> Partner:
    """A partner with sensible defaults: its own organisation, the arrears need, Lille."""
    fields.setdefault("name", pid.replace("-", " ").title())
    fields.setdefault("kind", "ccas-cias")
    fields.setdefault("organisation", pid)
    fields.setdefault("needs", (ARREARS,))
    fields.setdefault("coverage", (LILLE,))
    return Partner(id=pid, **fields)


def make_directory(partners: Sequence[Partner], agreements: Sequence[Agreement] = ()) -> Directory:
    return directory_from_records(
        territories=TERRITORIES, needs=needs(), partners=partners, agreements=agreements
    )


@pytest.fixture(scope="session")
def sample_static() -> Directory:
    """The bundled sample, loaded once; tests that mutate live state use `sample`."""
    return load_sample()


@pytest.fixture
def sample() -> Directory:
    return load_sample()
