"""The seeds' own procedures as local needs of the bundled directory (issue 11): a DALO
file, the FSL, habitat indigne (AMELIO), an IML placement by the SIAO, the commission
d'attribution; each taken by a partner, and reachable through the CLI from the SIAO."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from partnerbus.directory import Directory
from partnerbus.directory.check import find_problems
from partnerbus.entrypoints.directory_cli import app

runner = CliRunner()
ROUBAIX = "59512"

SEEDS = {
    "local-logement--dalo": ("logement-hebergement--changer-de-logement", "dalo-mel"),
    "local-logement--fsl": ("logement-hebergement--reduire-les-impayes-de-loyer", "fsl-nord"),
    "local-logement--habitat-indigne": (
        "logement-hebergement--se-maintenir-dans-le-logement",
        "amelio-mel",
    ),
    "local-logement--iml": ("logement-hebergement--louer-un-logement", "hh-nord-iml"),
    "local-logement--commission-attribution": (
        "logement-hebergement--changer-de-logement",
        "dalo-mel",
    ),
}


@pytest.mark.parametrize("code", sorted(SEEDS))
def test_each_seed_procedure_is_a_local_need_a_partner_takes(
    sample_static: Directory, code: str
) -> None:
    """A French label, a parent in the data·inclusion taxonomy (so a partner serving the parent still matches), and a partner listing it."""
    parent, taker = SEEDS[code]
    need = sample_static.needs[code]
    assert need.local and need.parent == parent
    assert len(need.label) > 10
    assert code in sample_static.partner(taker).needs


def test_the_sample_serves_every_local_need_without_problems(sample_static: Directory) -> None:
    problems = find_problems(sample_static)
    assert [p for p in problems if p.severity == "error"] == []
    assert not [p for p in problems if p.message == "local need that no partner serves"]


@pytest.mark.parametrize(
    ("need", "partner", "reason"),
    [
        ("local-logement--iml", "hh-nord-iml", "agreement siao-nord -> habitat-humanisme-nord"),
        (
            "logement-hebergement--louer-un-logement",
            "hh-nord-iml",
            "agreement siao-nord -> habitat-humanisme-nord",
        ),
        ("local-logement--dalo", "dalo-mel", "agreement siao-nord -> dalo-mel"),
    ],
)
def test_directory_match_for_housing_from_the_siao_finds_a_partner(
    need: str, partner: str, reason: str
) -> None:
    """`partnerbus directory match` with the SIAO as sender: an IML placement goes to Habitat et Humanisme along the SIAO's agreement; a DALO file to the association accompanying it."""
    result = runner.invoke(
        app,
        ["match", "--need", need, "--commune", ROUBAIX, "--sender", "siao-nord"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "no partner found" not in result.output
    assert partner in result.output
    assert reason in result.output
