"""Territories as they are: a commune lies in its own département, even when its EPCI is
filed under another. Real INSEE codes from `metropoles-communes.csv` (the fixture holds its
Métropole du Grand Paris and Aix-Marseille-Provence rows): the Grand Paris spans 75, 91,
92, 93, 94 and 95; Aix-Marseille-Provence has Pertuis in 84 and Saint-Zacharie in 83."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from partnerbus.directory import Directory, DirectoryError, load_directory, match
from partnerbus.directory.check import check, communes_within
from partnerbus.directory.datainclusion import load_data_inclusion
from partnerbus.directory.model import directory_from_records
from partnerbus.directory.render import neighbourhood
from partnerbus.directory.territory import Territory, ancestors
from partnerbus.entrypoints.directory_cli import app
from partnerbus.schemas import Partner

from .conftest import ARREARS, RIGHTS, needs
from .test_directory_match_reference import fast, reference

FIXTURES = Path(__file__).parent / "fixtures"
CSV = FIXTURES / "communes-mgp-amp.csv"
MGP, AMP = "200054781", "200054807"
PARIS, SAINT_DENIS, MONTREUIL, BOULOGNE, ARGENTEUIL, ATHIS_MONS, CRETEIL = (
    "75056",
    "93066",
    "93048",
    "92012",
    "95018",
    "91027",
    "94028",
)
MARSEILLE, PERTUIS, SAINT_ZACHARIE = "13055", "84089", "83120"
IDF_DEPS = ("75", "91", "92", "93", "94", "95")
PACA_DEPS = ("13", "83", "84")
CAF_DEPS = ("75", "92", "93", "13", "83", "84")
runner = CliRunner()


def rows() -> list[dict[str, str]]:
    with CSV.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def caf(dep: str) -> dict[str, Any]:
    return {
        "id": f"caf-{dep}",
        "name": f"CAF {dep}",
        "kind": "caf",
        "organisation": f"caf-{dep}",
        "needs": [RIGHTS],
        "coverage": [dep],
    }


def document(**territory: Any) -> dict[str, Any]:
    """Île-de-France and PACA, their départements (not their EPCIs: the CSV files each
    under its first commune's département), a CAF per département for some, a landlord
    agency in Seine-Saint-Denis and one in Paris, and a Grand Paris service also listed
    for 93."""
    doc: dict[str, Any] = {
        "format": "partnerbus-directory/1",
        "name": "Grand Paris and Aix-Marseille-Provence",
        "territory": {
            # INSEE région 93 (PACA) and département 93 (Seine-Saint-Denis) share a code
            "regions": {"11": "Île-de-France", "93": "Provence-Alpes-Côte d'Azur"},
            "departements": {
                **{d: {"name": f"Département {d}", "region": "11"} for d in IDF_DEPS},
                **{d: {"name": f"Département {d}", "region": "93"} for d in PACA_DEPS},
            },
            "communes_csv": str(CSV),
            **territory,
        },
        "partners": [
            *(caf(dep) for dep in CAF_DEPS),
            {
                "id": "pcb-grand-paris",
                "name": "Point conseil budget du Grand Paris",
                "kind": "points-conseil-budget",
                "organisation": "pcb",
                "needs": [ARREARS],
                "coverage": [MGP, "93"],
            },
            {
                "id": "bailleur-agence-93",
                "name": "Agence Seine-Saint-Denis",
                "kind": "bailleur-social",
                "organisation": "bailleur",
                "needs": [],
                "coverage": ["93"],
                "advisors": [{"id": "a.diallo", "name": "Awa Diallo"}],
            },
            {
                "id": "bailleur-agence-75",
                "name": "Agence Paris",
                "kind": "bailleur-social",
                "organisation": "bailleur",
                "needs": [],
                "coverage": ["75"],
                "advisors": [{"id": "p.leroy", "name": "Paul Leroy"}],
            },
        ],
        "agreements": [
            *({"from": "bailleur", "to": f"caf-{dep}"} for dep in CAF_DEPS),
            {"from": "bailleur", "to": "pcb"},
        ],
    }
    return doc


def write(tmp_path: Path, doc: dict[str, Any], name: str = "metropoles.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def metropoles(tmp_path_factory: pytest.TempPathFactory) -> Directory:
    return load_directory(write(tmp_path_factory.mktemp("metropoles"), document()))


def crossing_epcis() -> dict[str, set[str]]:
    """EPCI → its communes' départements, for those spanning more than one."""
    spans: dict[str, set[str]] = {}
    for row in rows():
        spans.setdefault(row["epci_siren"], set()).add(row["departement"])
    return {epci: deps for epci, deps in spans.items() if len(deps) > 1}


def test_the_fixture_holds_two_metropoles_crossing_departement_lines() -> None:
    """Computed from the reference rows: the Grand Paris (six départements) and
    Aix-Marseille-Provence (13, 83, 84)."""
    assert crossing_epcis() == {MGP: set(IDF_DEPS), AMP: set(PACA_DEPS)}


def test_each_commune_lies_in_its_own_departement(metropoles: Directory) -> None:
    """Every commune of the reference rows goes up through its EPCI, then through the
    département the INSEE data gives it, whichever département its EPCI is filed under."""
    d = metropoles
    assert d.territory(MGP).parent == "75"  # filed under its first row's (Paris)
    assert d.territory(AMP).parent == "13"
    for row in rows():
        code, dep = row["commune_insee"], row["departement"]
        assert d.territory(code).departement == dep
        chain = [c for c, _ in d.index.territory_chains[code]]
        region = "R11" if dep in IDF_DEPS else "R93"
        assert chain == [code, row["epci_siren"], dep, region, "france"], code
        assert d.departements_of(code) == (dep,)
    assert [t.code for t in ancestors(d.territories, SAINT_DENIS)] == [
        SAINT_DENIS,
        MGP,
        "93",
        "R11",
        "france",
    ]
    assert d.departements_of(MGP) == ("75", "91", "92", "93", "94", "95")
    assert d.departements_of(AMP) == ("13", "83", "84")
    assert d.departements_of("93") == ("93",)
    assert d.departements_of("R93") == ()


def test_a_tenant_is_sent_to_the_caf_of_their_own_departement(metropoles: Directory) -> None:
    """A Grand Paris tenant of 93 or 92 gets the CAF of 93 or 92, never the CAF of Paris
    where the EPCI is filed; the same for Aix-Marseille-Provence in 84 and 83."""
    d = metropoles
    expected = {
        PARIS: "caf-75",
        SAINT_DENIS: "caf-93",
        MONTREUIL: "caf-93",
        BOULOGNE: "caf-92",
        MARSEILLE: "caf-13",
        PERTUIS: "caf-84",
        SAINT_ZACHARIE: "caf-83",
    }
    for commune, caf_id in expected.items():
        found = match(d, RIGHTS, commune, sender="bailleur-agence-93")
        assert [c.partner_id for c in found] == [caf_id], commune
        assert found[0].reasons[0].startswith(f"covers {caf_id[4:]} (departement")
    # no CAF declared for 91, 94, 95: their communes find none, not Paris's
    for commune in (ATHIS_MONS, CRETEIL, ARGENTEUIL):
        assert match(d, RIGHTS, commune) == []


def test_matching_a_crossing_metropole_agrees_with_the_reference(metropoles: Directory) -> None:
    """The precomputed match, every commune of both metropoles, against the one-by-one
    reference; a partner listing both the Grand Paris and 93 comes once, at EPCI level."""
    d = metropoles
    for row in rows():
        for need in (RIGHTS, ARREARS):
            for sender in (None, "bailleur-agence-75"):
                code = row["commune_insee"]
                assert fast(d, need, code, sender=sender) == reference(
                    d, need, code, sender=sender
                ), (code, need, sender)
    (only,) = match(d, ARREARS, SAINT_DENIS)
    assert only.partner_id == "pcb-grand-paris"
    assert only.reasons[0] == f"covers {MGP} (epci Métropole du Grand Paris)"


def test_the_landlord_agency_is_the_one_of_the_communes_departement(
    metropoles: Directory,
) -> None:
    d = metropoles
    agency = d.agency_for(SAINT_DENIS)
    assert agency is not None and agency.id == "bailleur-agence-93"
    agency = d.agency_for(PARIS)
    assert agency is not None and agency.id == "bailleur-agence-75"
    assert d.agency_for(BOULOGNE) is None


def test_check_counts_a_commune_in_its_own_departement(metropoles: Directory) -> None:
    """`communes_within` a département holds its communes of the Grand Paris, and the
    Grand Paris holds them all; the check's gaps follow."""
    d = metropoles
    by_dep = {
        dep: {r["commune_insee"] for r in rows() if r["departement"] == dep} for dep in IDF_DEPS
    }
    for dep, communes in by_dep.items():
        assert set(communes_within(d, dep)) == communes, dep
    assert len(communes_within(d, "93")) == 39
    assert communes_within(d, "75") == [PARIS]
    assert communes_within(d, "84") == [PERTUIS]
    assert len(communes_within(d, MGP)) == sum(len(c) for c in by_dep.values()) == 130
    report = check(d, needs=[RIGHTS], communes=communes_within(d, "93"))
    assert report.gaps == []
    report = check(d, needs=[RIGHTS], communes=communes_within(d, "94"))
    (gap,) = report.gaps
    assert set(gap.communes) == by_dep["94"]


def test_cli_check_departement_counts_the_commune_where_it_lies(tmp_path: Path) -> None:
    """`directory check --departement 93` counts Saint-Denis and the 38 other communes of
    93, with no gap (the CAF of 93 covers them); `--departement 75` counts Paris alone;
    `--departement 84` counts Pertuis."""
    path = write(tmp_path, document())
    base = ["check", "--directory", str(path), "--need", RIGHTS, "--json"]
    counts = {"93": 39, "92": 36, "75": 1, "84": 1, "83": 1, "13": 90}
    for dep, count in counts.items():
        result = runner.invoke(app, [*base, "--departement", dep])
        assert result.exit_code == 0, result.output
        payload = json.loads(result.stdout)
        assert (payload["departement"], payload["communes"]) == (dep, count)
        assert payload["gaps"] == []
    payload = json.loads(runner.invoke(app, [*base, "--departement", "94"]).stdout)
    (gap,) = payload["gaps"]
    assert len(gap["communes"]) == payload["communes"] == 47
    assert all(c.startswith("94") for c in gap["communes"])


def test_show_draws_the_commune_in_its_own_departement(tmp_path: Path) -> None:
    """`directory show --commune 93066`: the picture holds 93 (and its CAF), not 75, and
    the Grand Paris lies within each of its départements."""
    d = load_directory(write(tmp_path, document()))
    g = neighbourhood(d, commune=SAINT_DENIS)
    assert {"t:93", "p:caf-93", f"t:{MGP}"} <= set(g.nodes)
    assert "t:75" not in g and "p:caf-75" not in g
    assert g.edges[f"t:{MGP}", "t:93"]["type"] == "within"
    assert {v for _, v, k in d.graph.out_edges(f"t:{MGP}", data="type") if k == "within"} == {
        f"t:{dep}" for dep in IDF_DEPS
    }
    graphml = tmp_path / "saint-denis.graphml"
    result = runner.invoke(
        app,
        [
            "show",
            "--directory",
            str(write(tmp_path, document())),
            "--commune",
            SAINT_DENIS,
            "--graphml",
            str(graphml),
        ],
    )
    assert result.exit_code == 0, result.output
    text = graphml.read_text(encoding="utf-8")
    assert 'id="t:93"' in text and 'id="t:75"' not in text


def test_compact_rows_and_a_csv_without_departement_column_still_load(tmp_path: Path) -> None:
    """Files written before: compact rows [code, name, epci] with the EPCI filed under 75,
    and a CSV without a `departement` column: the commune's INSEE code gives its
    département."""
    doc = document(
        communes_csv=None,
        epcis={MGP: {"name": "Métropole du Grand Paris", "departement": "75"}},
        communes=[
            [PARIS, "Paris", MGP],
            [SAINT_DENIS, "Saint-Denis", MGP],
            {"code": BOULOGNE, "name": "Boulogne-Billancourt", "epci": MGP},
        ],
    )
    doc["partners"] = [caf(dep) for dep in ("75", "92", "93")]
    doc["agreements"] = []
    d = load_directory(write(tmp_path, doc, "compact.yaml"))
    assert d.territory(SAINT_DENIS).departement == "93"
    assert [c.partner_id for c in match(d, RIGHTS, SAINT_DENIS)] == ["caf-93"]
    assert [c.partner_id for c in match(d, RIGHTS, BOULOGNE)] == ["caf-92"]
    assert communes_within(d, "93") == [SAINT_DENIS]

    no_column = tmp_path / "no-departement.csv"
    with no_column.open("w", encoding="utf-8", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["epci_siren", "epci_name", "commune_insee", "commune_name"])
        for row in rows():
            if row["epci_siren"] == MGP:
                out.writerow([MGP, row["epci_name"], row["commune_insee"], row["commune_name"]])
    d = load_directory(write(tmp_path, document(communes_csv=str(no_column)), "nocol.yaml"))
    assert [c.partner_id for c in match(d, RIGHTS, SAINT_DENIS)] == ["caf-93"]
    assert len(communes_within(d, "93")) == 39


def test_a_csv_row_whose_departement_contradicts_the_insee_code_is_refused(
    tmp_path: Path,
) -> None:
    """A row putting Saint-Denis (93066) in 75 is bad data: the load names the file, the
    line and both départements."""
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "epci_siren,epci_name,commune_insee,commune_name,departement\n"
        f"{MGP},Métropole du Grand Paris,{PARIS},Paris,75\n"
        f"{MGP},Métropole du Grand Paris,{SAINT_DENIS},Saint-Denis,75\n",
        encoding="utf-8",
    )
    with pytest.raises(DirectoryError, match=r"bad\.csv:3: commune 93066 is in département 93"):
        load_directory(write(tmp_path, document(communes_csv=str(bad))))


def test_records_without_a_departement_take_it_from_the_insee_code() -> None:
    """Records built by hand the old way (a commune's parent is its EPCI, filed under 75):
    the commune's code tells its département; one naming an unknown département is refused."""
    territories = [
        Territory("france", "France", "france", None),
        Territory("R11", "Île-de-France", "region", "france"),
        Territory("75", "Paris", "departement", "R11"),
        Territory("93", "Seine-Saint-Denis", "departement", "R11"),
        Territory(MGP, "Métropole du Grand Paris", "epci", "75"),
        Territory(PARIS, "Paris", "commune", MGP),
        Territory(SAINT_DENIS, "Saint-Denis", "commune", MGP),
    ]
    partners = [Partner.model_validate(caf(dep)) for dep in ("75", "93")]
    d = directory_from_records(territories=territories, needs=needs(), partners=partners)
    assert [c for c, _ in d.index.territory_chains[SAINT_DENIS]] == [
        SAINT_DENIS,
        MGP,
        "93",
        "R11",
        "france",
    ]
    assert [c.partner_id for c in match(d, RIGHTS, SAINT_DENIS)] == ["caf-93"]
    assert [c.partner_id for c in match(d, RIGHTS, PARIS)] == ["caf-75"]
    wrong = Territory(SAINT_DENIS, "Saint-Denis", "commune", MGP, departement="94")
    with pytest.raises(DirectoryError, match="names unknown département '94'"):
        directory_from_records(
            territories=[*territories[:-1], wrong], needs=needs(), partners=partners
        )


def test_a_data_inclusion_service_for_a_departement_reaches_its_communes_only(
    tmp_path: Path, metropoles: Directory
) -> None:
    """Imported on the metropoles' territories, a service whose zone is 93 is matched in
    Saint-Denis and Montreuil, not in Paris nor Boulogne."""
    structures = [
        {
            "id": "dora--caf-93",
            "nom": "CAF de la Seine-Saint-Denis",
            "reseaux_porteurs": ["caf"],
            "code_insee": "93008",
        }
    ]
    services = [
        {
            "id": "dora--svc-caf-93-impayes",
            "structure_id": "dora--caf-93",
            "nom": "Impayés de loyer",
            "thematiques": [ARREARS],
            "zone_eligibilite": ["93"],
            "publics": ["tous-publics"],
            "modes_accueil": ["en-presentiel"],
        }
    ]
    s_path, v_path = tmp_path / "s.json", tmp_path / "v.json"
    s_path.write_text(json.dumps(structures), encoding="utf-8")
    v_path.write_text(json.dumps(services), encoding="utf-8")
    d, errors = load_data_inclusion(s_path, v_path, base=metropoles)
    assert errors == []
    for commune in (SAINT_DENIS, MONTREUIL):
        assert "dora-svc-caf-93-impayes" in [c.partner_id for c in match(d, ARREARS, commune)]
    for commune in (PARIS, BOULOGNE):
        assert "dora-svc-caf-93-impayes" not in [c.partner_id for c in match(d, ARREARS, commune)]
