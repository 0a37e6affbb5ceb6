"""`check` (problems, coverage gaps), `show` (PNG, GraphML) and the CLI sub-app."""

from __future__ import annotations

from pathlib import Path

import networkx as nx
from typer.testing import CliRunner

from partnerbus.directory import Directory
from partnerbus.directory.check import check, find_gaps, find_problems
from partnerbus.directory.cli import app
from partnerbus.directory.render import neighbourhood, render_png, write_graphml
from partnerbus.schemas import Advisor, Agreement, Eligibility

from .conftest import ARREARS, LILLE, MEL, RIGHTS, ROUBAIX, make_directory, partner

runner = CliRunner()


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


def test_the_neighbourhood_of_a_commune_and_need_holds_its_partners(
    sample_static: Directory,
) -> None:
    """The subgraph around Roubaix and arrears holds the candidates, their organisations and agreements."""
    g = neighbourhood(sample_static, commune=ROUBAIX, need=ARREARS, sender="lmh-recouvrement")
    assert {"p:ccas-roubaix", "p:caf-nord", "o:lmh", "t:59512", f"n:{ARREARS}"} <= set(g)
    assert "p:ccas-lille" not in g
    assert g.edges["o:lmh", "o:ccas-roubaix"]["type"] == "agreement"


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


def test_cli_check_reports_gaps_and_import_errors(tmp_path: Path) -> None:
    """`directory check --json` lists gaps; with a data·inclusion export, the row errors too."""
    result = runner.invoke(app, ["check", "--json"])
    assert result.exit_code == 0, result.output
    assert '"gaps"' in result.output
    fixtures = Path(__file__).parent / "fixtures"
    imported = runner.invoke(
        app,
        [
            "check",
            "--di-structures",
            str(fixtures / "di-structures.json"),
            "--di-services",
            str(fixtures / "di-services.json"),
        ],
        env={"COLUMNS": "200"},
    )
    assert imported.exit_code == 0, imported.output
    assert "import problems" in imported.output
    assert "dora--svc-orphan" in imported.output


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
