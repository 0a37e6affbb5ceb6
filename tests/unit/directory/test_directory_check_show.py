"""`check` (problems, coverage gaps), `show` (PNG, GraphML) and the CLI sub-app."""

from __future__ import annotations

import json
from pathlib import Path

import networkx as nx
from typer.testing import CliRunner

from bench.generate import MIX
from partnerbus.directory import Directory
from partnerbus.directory.check import check, communes_within, find_gaps, find_problems
from partnerbus.directory.kinds import DATA_INCLUSION_KINDS, is_known_kind
from partnerbus.directory.model import directory_from_records
from partnerbus.directory.render import neighbourhood, render_png, write_graphml
from partnerbus.entrypoints.directory_cli import app
from partnerbus.schemas import Advisor, Agreement, Eligibility

from .conftest import (
    ARREARS,
    LILLE,
    MEL,
    NORD,
    QPV_ROUBAIX,
    RIGHTS,
    ROUBAIX,
    TERRITORIES,
    make_directory,
    needs,
    partner,
)

runner = CliRunner()
DIGITAL = "numerique--acceder-a-des-services-en-ligne"


def test_a_gap_lists_the_communes_where_nobody_takes_the_need() -> None:
    """A need covered in Lille only is a gap in Roubaix and Arras."""
    d = make_directory([partner("ccas-lille")])
    (gap,) = find_gaps(d, [ARREARS])
    assert gap.need == ARREARS
    assert gap.communes == ("59512", "62041")


def test_a_commune_with_only_restricted_services_is_reported_apart() -> None:
    """Where only age- or public-restricted services exist, the gap is partial."""
    d = make_directory(
        [partner("seniors", coverage=(MEL,), eligibility=Eligibility(age_bands=("75-plus",)))]
    )
    (gap,) = find_gaps(d, [ARREARS])
    assert gap.restricted_only == (LILLE, ROUBAIX)
    assert gap.communes == ("62041",)


def test_gaps_seen_from_a_sender_count_only_reachable_partners() -> None:
    """With a sender, partners without an agreement do not fill the gap."""
    d = make_directory(
        [partner("lmh-rec", organisation="lmh", needs=()), partner("ccas-lille")],
        [Agreement(from_org="lmh", to_org="other")],
    )
    assert find_gaps(d, [ARREARS], communes=[LILLE]) == []
    (gap,) = find_gaps(d, [ARREARS], communes=[LILLE], sender="lmh-rec")
    assert gap.communes == (LILLE,)


def test_problems_name_what_to_fix() -> None:
    """Needless partners, advisors outside their agency and dangling agreements are reported."""
    d = make_directory(
        [
            partner("idle", needs=()),
            partner(
                "agency",
                kind="bailleur-social",
                advisors=(Advisor(id="a.martin", name="A", communes=(ROUBAIX,)),),
            ),
        ],
        [Agreement(from_org="agency", to_org="ghost")],
    )
    messages = {(p.subject, p.message) for p in find_problems(d)}
    assert ("idle", "serves no need: it can never be matched") in messages
    assert ("agency", f"advisor a.martin follows {ROUBAIX}, outside the agency") in messages
    assert (
        "agreement agency -> ghost",
        "organisation 'ghost' has no partner in the directory",
    ) in messages


def test_the_sample_has_no_data_error(sample_static: Directory) -> None:
    """The bundled sample checks clean (warnings and infos allowed) and reports its gaps."""
    report = check(sample_static)
    assert report.errors == []
    assert report.communes_checked == 95
    assert any(g.need == "sante--sante-mentale" for g in report.gaps)


def test_the_sample_and_the_benchmark_use_only_known_kinds(sample_static: Directory) -> None:
    """Every kind in the bundled sample and the benchmark generator is a data·inclusion code or a declared local kind."""
    kinds = {p.kind for p in sample_static.partners()} | {kind for kind, *_ in MIX}
    kinds.add("bailleur-social")  # the generator's landlords
    assert {k for k in kinds if not is_known_kind(k)} == set()
    assert {"adil", "association", "udaf"} <= kinds - DATA_INCLUSION_KINDS


def test_the_neighbourhood_of_a_commune_and_need_holds_its_partners(
    sample_static: Directory,
) -> None:
    """The subgraph around Roubaix and arrears holds the candidates, their organisations and agreements."""
    g = neighbourhood(sample_static, commune=ROUBAIX, need=ARREARS, sender="lmh-recouvrement")
    assert {"p:ccas-roubaix", "p:caf-nord", "o:lmh", "t:59512", f"n:{ARREARS}"} <= set(g)
    assert "p:ccas-lille" not in g
    assert g.edges["o:lmh", "o:ccas-roubaix"]["type"] == "agreement"


def test_the_neighbourhood_of_a_commune_holds_partners_of_its_qpvs() -> None:
    """A partner covering only one of the commune's QPVs is drawn with the commune, not with another commune."""
    d = make_directory(
        [partner("cs-alma", coverage=(QPV_ROUBAIX,)), partner("ccas-roubaix", coverage=(ROUBAIX,))]
    )
    g = neighbourhood(d, commune=ROUBAIX)
    assert {"p:cs-alma", "p:ccas-roubaix", f"t:{QPV_ROUBAIX}"} <= set(g)
    assert g.edges["p:cs-alma", f"t:{QPV_ROUBAIX}"]["type"] == "covers"
    assert "p:cs-alma" in neighbourhood(d, commune=ROUBAIX, need=ARREARS)
    assert "p:cs-alma" not in neighbourhood(d, commune=LILLE)


def test_check_warns_about_a_kind_neither_data_inclusion_nor_local() -> None:
    """A kind outside data·inclusion's network codes and the declared local kinds is a warning; declared ones are not."""
    ps = [
        partner("ccas-lille"),
        partner("adil", kind="adil"),
        partner("agency", kind="bailleur-social"),
        partner("typo-1", kind="ccas"),
        partner("typo-2", kind="ccas"),
        partner("epicerie", kind="epicerie-solidaire"),
    ]
    kinds = {
        p.subject: p for p in find_problems(make_directory(ps)) if p.subject.startswith("kind")
    }
    assert set(kinds) == {"kind ccas", "kind epicerie-solidaire"}
    assert kinds["kind ccas"].severity == "warning"
    assert kinds["kind ccas"].message.endswith("2 partner(s): typo-1, typo-2")
    declared = directory_from_records(
        territories=TERRITORIES,
        needs=needs(),
        partners=ps,
        local_kinds={"epicerie-solidaire": "épicerie solidaire"},
    )
    kinds2 = {p.subject for p in find_problems(declared) if p.subject.startswith("kind")}
    assert kinds2 == {"kind ccas"}


def test_show_writes_a_png_and_a_graphml(sample_static: Directory, tmp_path: Path) -> None:
    """The picture is a PNG file; the GraphML reads back into networkx."""
    g = neighbourhood(sample_static, need=RIGHTS)
    png, graphml = tmp_path / "n.png", tmp_path / "n.graphml"
    render_png(g, png, title="rights")
    write_graphml(g, graphml)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert nx.read_graphml(graphml).number_of_nodes() == g.number_of_nodes()


def test_cli_match_prints_ranked_candidates_and_reasons() -> None:
    """`directory match` prints each candidate with its reasons, and the agency."""
    result = runner.invoke(
        app,
        ["match", "--need", ARREARS, "--commune", "59512", "--sender", "lmh-recouvrement"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "ccas-roubaix" in result.output
    assert "agreement lmh -> ccas-roubaix" in result.output
    assert "agency: lmh-agence-roubaix, advisor s.benali" in result.output


def test_cli_match_ranks_home_visits_first_when_asked() -> None:
    """`--home-visit`: the Roubaix MDS, which visits at home, before the CCAS, and says why."""
    args = ["match", "--need", ARREARS, "--commune", "59512", "--sender", "lmh-recouvrement"]
    result = runner.invoke(app, [*args, "--home-visit"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert result.output.index("mds-roubaix") < result.output.index("ccas-roubaix")
    assert "visits at home (home visit wanted)" in result.output
    plain = runner.invoke(app, args, env={"COLUMNS": "200"}).output
    assert plain.index("ccas-roubaix") < plain.index("mds-roubaix")
    assert "home visit" not in plain


def test_cli_match_takes_a_profile_and_rejects_unknown_codes() -> None:
    """A JSON profile reaches eligibility; an unknown commune exits with code 2."""
    senior = runner.invoke(
        app,
        ["match", "--need", RIGHTS, "--commune", LILLE, "--profile", '{"age_band": "75-plus"}'],
        env={"COLUMNS": "200"},
    )
    assert senior.exit_code == 0
    assert "ccas-lille-seniors" in senior.output
    unknown = runner.invoke(app, ["match", "--need", RIGHTS, "--commune", "00000"])
    assert unknown.exit_code == 2


FIXTURES = Path(__file__).parent / "fixtures"
DI_EXPORT = [
    "--di-structures",
    str(FIXTURES / "di-structures.json"),
    "--di-services",
    str(FIXTURES / "di-services.json"),
]


def test_cli_check_json_lists_gaps_and_exits_0_on_clean_data() -> None:
    """`directory check --json` on the sample prints parseable JSON with gaps and no import errors, exit 0."""
    result = runner.invoke(app, ["check", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["communes"] == 95
    assert payload["import_errors"] == []
    assert any(g["need"] == "sante--sante-mentale" for g in payload["gaps"])


def test_cli_check_json_with_an_import_is_valid_json_with_row_errors() -> None:
    """With a data·inclusion export, `check --json` prints only JSON on stdout, lists every row error and exits 1."""
    result = runner.invoke(app, ["check", "--json", *DI_EXPORT], env={"COLUMNS": "200"})
    assert result.exit_code == 1, result.output
    payload = json.loads(result.stdout)
    errors = payload["import_errors"]
    assert {
        "file": "di-services.json",
        "row": 4,
        "record_id": "dora--svc-orphan",
        "field": "structure_id",
        "why": "unknown or rejected structure 'dora--nowhere'",
        "dropped": True,
    } in errors
    assert {(e["file"], e["row"], e["field"]) for e in errors} >= {
        ("di-structures.json", 3, "nom"),
        ("di-services.json", 1, "publics"),
    }
    assert "import problems" in result.stderr  # the human table, kept off stdout


def test_cli_check_prints_import_errors_and_exits_1_when_rows_were_dropped() -> None:
    """Without --json, `check` on a data·inclusion export prints the import problems table and exits 1."""
    imported = runner.invoke(app, ["check", *DI_EXPORT], env={"COLUMNS": "200"})
    assert imported.exit_code == 1, imported.output
    assert "import problems (10 rows dropped)" in imported.stdout
    assert "dora--svc-orphan" in imported.stdout
    assert "the import left out 10 rows and 5 values" in imported.stdout


def test_check_can_be_limited_to_one_departement(tmp_path: Path) -> None:
    """`check --departement 62` looks for gaps in the Pas-de-Calais communes only; a code that is not a département exits 2."""
    doc = {
        "format": "partnerbus-directory/1",
        "territory": {
            "regions": {"32": "Hauts-de-France"},
            "departements": {
                "59": {"name": "Nord", "region": "32"},
                "62": {"name": "Pas-de-Calais", "region": "32"},
            },
            "communes": [["59350", "Lille"], ["62041", "Arras"], ["62193", "Calais"]],
        },
        "partners": [
            {
                "id": "ccas-arras",
                "name": "CCAS d'Arras",
                "kind": "ccas-cias",
                "organisation": "ccas-arras",
                "needs": [ARREARS],
                "coverage": ["62041"],
            }
        ],
    }
    path = tmp_path / "two.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    base = ["check", "--directory", str(path), "--need", ARREARS]
    result = runner.invoke(app, [*base, "--departement", "62", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert (payload["departement"], payload["communes"]) == ("62", 2)
    assert payload["gaps"] == [{"need": ARREARS, "communes": ["62193"], "restricted_only": []}]
    human = runner.invoke(app, [*base, "--departement", "62"], env={"COLUMNS": "200"})
    assert "2 communes in département 62" in human.stdout
    for bad in ("63", "59350"):
        refused = runner.invoke(app, [*base, "--departement", bad])
        assert refused.exit_code == 2
        assert f"unknown département '{bad}'" in refused.output


def test_communes_within_a_territory_and_check_limited_to_them() -> None:
    """`communes_within` lists a département's communes and `check(communes=…)` reports gaps there only."""
    d = make_directory([partner("ccas-lille")])
    assert communes_within(d, NORD) == [LILLE, ROUBAIX]
    report = check(d, needs=[ARREARS], communes=communes_within(d, NORD))
    assert report.communes_checked == 2
    assert [(g.need, g.communes) for g in report.gaps] == [(ARREARS, (ROUBAIX,))]


def test_cli_match_rejects_a_malformed_profile_with_the_reason() -> None:
    """A --profile that is not JSON or breaks the schema exits 2 with the reason, not a traceback."""
    cases = {
        "not json": "invalid --profile: Invalid JSON",
        '{"qpv": 5}': "invalid --profile: qpv: Input should be a valid string",
        '{"age": 80}': "invalid --profile: age: Extra inputs are not permitted",
    }
    for profile, reason in cases.items():
        result = runner.invoke(
            app,
            ["match", "--need", RIGHTS, "--commune", LILLE, "--profile", profile],
            env={"COLUMNS": "200"},
        )
        assert result.exit_code == 2, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert reason in result.output
        assert "Traceback" not in result.output


def test_cli_match_says_when_a_qpv_is_ignored() -> None:
    """A profile QPV unknown to the directory is reported as ignored, and the QPV-only service is not offered."""
    result = runner.invoke(
        app,
        ["match", "--need", DIGITAL, "--commune", ROUBAIX, "--profile", '{"qpv": "QN9999999"}'],
        env={"COLUMNS": "200"},
    )
    assert "QPV QN9999999 ignored (not a known QPV of 59512)" in result.output
    assert "cs-alma-numerique" not in result.output
    known = runner.invoke(
        app,
        ["match", "--need", DIGITAL, "--commune", ROUBAIX, "--profile", '{"qpv": "QN0590121"}'],
        env={"COLUMNS": "200"},
    )
    assert known.exit_code == 0, known.output
    assert "cs-alma-numerique" in known.output


def test_cli_show_writes_the_files(tmp_path: Path) -> None:
    """`directory show --commune --out --graphml` writes both files."""
    png, graphml = tmp_path / "r.png", tmp_path / "r.graphml"
    result = runner.invoke(
        app, ["show", "--commune", ROUBAIX, "--out", str(png), "--graphml", str(graphml)]
    )
    assert result.exit_code == 0, result.output
    assert png.exists() and graphml.exists()


def test_cli_reports_a_bad_directory_file(tmp_path: Path) -> None:
    """A broken --directory file exits 1 with the reason, not a traceback."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("format: nope\n", encoding="utf-8")
    result = runner.invoke(app, ["check", "--directory", str(bad)])
    assert result.exit_code == 1
    assert "directory error" in result.output
