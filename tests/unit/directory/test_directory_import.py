"""Loading: directory files (YAML, JSON) and data·inclusion exports with row-level errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from partnerbus.directory import DirectoryError, RowError, load_directory, match
from partnerbus.directory.datainclusion import load_data_inclusion, slug
from partnerbus.directory.kinds import pick_kind

from .conftest import ARREARS, RIGHTS

FIXTURES = Path(__file__).parent / "fixtures"
SAMPLE = Path(__file__).parents[3] / "partnerbus" / "directory" / "data" / "lille.yaml"


def minimal(**overrides: object) -> dict:
    doc: dict = {
        "format": "partnerbus-directory/1",
        "name": "mini",
        "territory": {
            "regions": {"32": "Hauts-de-France"},
            "departements": {"59": {"name": "Nord", "region": "32"}},
            "epcis": {"200093201": {"name": "MEL", "departement": "59"}},
            "communes": [["59350", "Lille", "200093201"], {"code": "59512", "name": "Roubaix"}],
        },
        "partners": [
            {
                "id": "ccas-lille",
                "name": "CCAS",
                "kind": "ccas-cias",
                "organisation": "ccas-lille",
                "needs": [ARREARS],
                "coverage": ["59350"],
            },
        ],
        "agreements": [],
    }
    doc.update(overrides)
    return doc


def write(tmp_path: Path, doc: object, name: str = "dir.yaml") -> Path:
    path = tmp_path / name
    if name.endswith(".json"):
        path.write_text(json.dumps(doc), encoding="utf-8")
    else:
        path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    return path


def test_a_json_file_of_the_same_format_loads(tmp_path: Path) -> None:
    """JSON and YAML share the format; compact commune rows and mappings both work."""
    d = load_directory(write(tmp_path, minimal(), "dir.json"))
    assert d.has_commune("59350") and d.has_commune("59512")
    assert [c.partner_id for c in match(d, ARREARS, "59350")] == ["ccas-lille"]


def test_the_sample_round_trips_through_json(tmp_path: Path) -> None:
    """The bundled sample, dumped to JSON next to its CSV, loads to the same partners."""
    doc = yaml.safe_load(SAMPLE.read_text(encoding="utf-8"))
    (tmp_path / "communes-mel.csv").write_bytes((SAMPLE.parent / "communes-mel.csv").read_bytes())
    d = load_directory(write(tmp_path, doc, "lille.json"))
    assert len(d.partners()) == len(doc["partners"])


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("just a string", "a directory file is a mapping"),
        ({"format": "other/2"}, "`format` must be"),
        (
            minimal(
                partners=[{"id": "X bad", "name": "n", "kind": "ccas-cias", "organisation": "o1"}]
            ),
            "partners[0] (X bad): id",
        ),
        (
            minimal(
                partners=[
                    {
                        "id": "p1",
                        "name": "n",
                        "kind": "ccas-cias",
                        "organisation": "o1",
                        "coverage": ["59999"],
                    }
                ]
            ),
            "coverage code '59999' is not a known",
        ),
        (
            minimal(
                partners=[
                    {
                        "id": "p1",
                        "name": "n",
                        "kind": "ccas-cias",
                        "organisation": "o1",
                        "needs": ["logement-hebergement--nope"],
                    }
                ]
            ),
            "is not in the taxonomy",
        ),
        (
            minimal(partners=[{"id": "p1", "name": "n", "kind": "k1", "organisation": "o1"}] * 2),
            "declared twice",
        ),
        (minimal(agreements=[{"from": "a1"}]), "agreements[0]: to_org"),
        (minimal(local_needs={"logement--x": "no prefix"}), "starts with 'local-'"),
        (minimal(local_kinds={"caf": "CAF"}), "local_kinds.caf: a data·inclusion network code"),
        (minimal(local_kinds={"Bad Kind": "x"}), "local_kinds.Bad Kind: a kind is"),
        (minimal(local_kinds=["epicerie"]), "`local_kinds` must map"),
    ],
)
def test_a_bad_file_raises_a_clear_directory_error(
    tmp_path: Path, doc: object, message: str
) -> None:
    """Each kind of bad file names the file, the place and the reason."""
    path = write(tmp_path, doc)
    with pytest.raises(DirectoryError) as err:
        load_directory(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "doc",
    [
        minimal(territory={"regions": ["32"]}),
        minimal(partners="not a list"),
        minimal(agreements={"from": "a"}),
        minimal(territory={"communes": [["59350", "Lille", "000000000"]]}),
    ],
)
def test_a_file_of_the_wrong_shape_is_a_directory_error(tmp_path: Path, doc: object) -> None:
    """Sections of the wrong shape are reported as a DirectoryError naming the file."""
    path = write(tmp_path, doc)
    with pytest.raises(DirectoryError, match=re.escape(str(path))):
        load_directory(path)


def test_a_file_declares_its_own_local_kinds(tmp_path: Path) -> None:
    """`local_kinds` in a directory file adds to the project's declared local kinds."""
    d = load_directory(write(tmp_path, minimal(local_kinds={"epicerie-solidaire": "Épicerie"})))
    assert d.local_kinds["epicerie-solidaire"] == "Épicerie"
    assert {"bailleur-social", "adil", "association"} <= set(d.local_kinds)


def test_unreadable_or_malformed_files_raise_directory_errors(tmp_path: Path) -> None:
    """A missing file or broken YAML/JSON is a DirectoryError, not a traceback."""
    with pytest.raises(DirectoryError, match="cannot read"):
        load_directory(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.json"
    broken.write_text("{", encoding="utf-8")
    with pytest.raises(DirectoryError, match="not valid JSON"):
        load_directory(broken)
    bad_yaml = tmp_path / "broken.yaml"
    bad_yaml.write_text("a: [1, 2", encoding="utf-8")
    with pytest.raises(DirectoryError, match="not valid YAML"):
        load_directory(bad_yaml)


def test_data_inclusion_import_keeps_the_good_rows() -> None:
    """Valid structures and services become partners that match like any other."""
    d, _ = load_data_inclusion(FIXTURES / "di-structures.json", FIXTURES / "di-services.json")
    assert {p.id for p in d.partners()} == {
        "dora-svc-wattrelos-impayes",
        "dora-svc-hem-droits",
        "soliguide-svc-croix-alimentation",
        "dora-svc-departemental",
    }
    wattrelos = d.partner("dora-svc-wattrelos-impayes")
    assert wattrelos.kind == "ccas-cias"
    assert wattrelos.organisation == "dora-ccas-wattrelos"
    assert wattrelos.external_id == "dora--svc-wattrelos-impayes"
    assert [c.partner_id for c in match(d, ARREARS, "59650")] == ["dora-svc-wattrelos-impayes"]
    hem = d.partner("dora-svc-hem-droits")
    assert hem.coverage == ("59299", "59367")
    assert hem.eligibility.publics == ("familles",)
    assert hem.modes == ("en-presentiel", "a-distance")
    croix = d.partner("soliguide-svc-croix-alimentation")
    assert croix.coverage == ("59163",)
    assert croix.kind == "autre"
    assert match(d, RIGHTS, "59299") == []  # restricted to families, no profile given


def test_data_inclusion_import_reports_each_bad_row_with_file_row_field_and_why() -> None:
    """Every rejected row or value is reported as (file, row, field, why)."""
    _, errors = load_data_inclusion(FIXTURES / "di-structures.json", FIXTURES / "di-services.json")
    got = {(e.file, e.row, e.field, e.dropped) for e in errors}
    expected = {
        ("di-structures.json", 3, "nom", True),
        ("di-structures.json", 4, "id", True),
        ("di-structures.json", 5, "id", True),
        ("di-structures.json", 6, "(record)", True),
        ("di-services.json", 1, "thematiques", False),
        ("di-services.json", 1, "zone_eligibilite", False),
        ("di-services.json", 1, "publics", False),
        ("di-services.json", 4, "structure_id", True),
        ("di-services.json", 5, "thematiques", True),
        ("di-services.json", 6, "zone_eligibilite", True),
        ("di-services.json", 7, "thematiques", True),
        ("di-services.json", 8, "id", True),
        ("di-services.json", 9, "id", True),
    }
    assert expected <= got
    assert all(isinstance(e, RowError) and e.why for e in errors)
    orphan = next(e for e in errors if e.field == "structure_id")
    assert "dora--nowhere" in orphan.why
    assert str(orphan).startswith("di-services.json:4 (dora--svc-orphan): structure_id:")


def test_a_structure_in_several_networks_takes_the_most_specific_kind() -> None:
    """A Maison Nord Solidarités (`maisons-des-solidarites`, `departements`) is a Maison des solidarités, not a département."""
    d, _ = load_data_inclusion(FIXTURES / "di-structures.json", FIXTURES / "di-services.json")
    assert d.partner("dora-svc-hem-droits").kind == "maisons-des-solidarites"
    assert pick_kind(["departements", "maisons-des-solidarites"]) == "maisons-des-solidarites"
    assert pick_kind(["communes", "ccas-cias"]) == "ccas-cias"
    assert pick_kind(["unaf", "points-conseil-budget"]) == "points-conseil-budget"
    assert pick_kind(["regions", "departements"]) == "departements"
    assert pick_kind(["departements", "new-network"]) == "departements"  # known before unknown
    assert pick_kind(["new-network"]) == "new-network"
    assert pick_kind(["Not A Code", "x"]) == "autre"
    assert pick_kind([]) == "autre"


def test_bad_modes_and_network_codes_are_reported_and_the_row_kept(tmp_path: Path) -> None:
    """An unknown reception mode or a malformed network code is a row error (file, row, field, why) and the row stays."""
    structures, services = tmp_path / "s.json", tmp_path / "v.json"
    structures.write_text(
        json.dumps(
            [
                {
                    "id": "st-1",
                    "nom": "CCAS de Lille",
                    "reseaux_porteurs": ["CCAS Lille", "ccas-cias"],
                }
            ]
        ),
        encoding="utf-8",
    )
    services.write_text(
        json.dumps(
            [
                {
                    "id": "sv-1",
                    "structure_id": "st-1",
                    "nom": "Impayés",
                    "thematiques": [ARREARS],
                    "zone_eligibilite": ["59350"],
                    "modes_accueil": ["par-pigeon", "a-distance"],
                }
            ]
        ),
        encoding="utf-8",
    )
    d, errors = load_data_inclusion(structures, services)
    got = {(e.file, e.row, e.field, e.record_id, e.dropped): e.why for e in errors}
    assert got == {
        ("s.json", 0, "reseaux_porteurs", "st-1", False): (
            "network code 'CCAS Lille' is not a code (2-60 lowercase letters, digits, hyphens)"
        ),
        ("v.json", 0, "modes_accueil", "sv-1", False): "unknown mode 'par-pigeon'",
    }
    kept = d.partner("sv-1")
    assert (kept.kind, kept.modes) == ("ccas-cias", ("a-distance",))


def test_data_inclusion_ids_become_valid_partner_ids() -> None:
    """Source ids of any shape become lowercase-hyphen ids of at most 63 characters."""
    assert slug("dora--AidantsConnect:2024-47BXY") == "dora-aidantsconnect-2024-47bxy"
    long = slug("x" * 200)
    assert len(long) <= 63 and long != slug("x" * 199)


def test_a_data_inclusion_export_can_be_added_to_an_existing_directory(
    sample_static: object,
) -> None:
    """With a base directory, its partners and agreements stay next to the import."""
    d, _ = load_data_inclusion(
        FIXTURES / "di-structures.json", FIXTURES / "di-services.json", base=sample_static
    )
    assert "ccas-roubaix" in d and "dora-svc-hem-droits" in d


def test_a_malformed_export_file_is_a_directory_error(tmp_path: Path) -> None:
    """An export that is not a JSON list cannot be imported row by row."""
    path = tmp_path / "s.json"
    path.write_text('{"not": "a list"}', encoding="utf-8")
    with pytest.raises(DirectoryError, match="expected a JSON list"):
        load_data_inclusion(path, path)
