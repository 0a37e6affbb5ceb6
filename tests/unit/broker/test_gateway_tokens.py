"""The gateway's tokens: random, shown once, kept only as SHA-256 digests in a 0600 file."""

from __future__ import annotations

import json
import stat

import pytest
from typer.testing import CliRunner

from partnerbus.entrypoints.cli import app
from partnerbus.entrypoints.gateway import (
    TokenFile,
    bearer_token,
    issue_token,
    load_token_hashes,
    revoke_token,
    token_digest,
)

runner = CliRunner()


def test_issue_shows_the_token_once_and_keeps_only_its_hash(tmp_path, monkeypatch):
    """`partnerbus gateway token issue` prints a fresh random token; the file (0600) holds its digest; `revoke` forgets it."""
    path = tmp_path / "tokens.json"
    monkeypatch.setenv("PARTNERBUS_GATEWAY_TOKENS_PATH", str(path))
    first = runner.invoke(app, ["gateway", "token", "issue", "ccas-roubaix"])
    assert first.exit_code == 0, first.output
    token = first.stdout.strip().splitlines()[-1]
    assert len(token) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert token not in path.read_text()
    assert json.loads(path.read_text()) == {"ccas-roubaix": token_digest(token)}
    assert TokenFile(path).partner_id(token) == "ccas-roubaix"

    second = runner.invoke(app, ["gateway", "token", "issue", "ccas-roubaix"])
    assert second.stdout.strip().splitlines()[-1] != token, "a new token replaces the old"
    assert TokenFile(path).partner_id(token) is None

    revoked = runner.invoke(app, ["gateway", "token", "revoke", "ccas-roubaix"])
    assert revoked.exit_code == 0, revoked.output
    assert load_token_hashes(path) == {}
    again = runner.invoke(app, ["gateway", "token", "revoke", "ccas-roubaix"])
    assert again.exit_code == 2
    stranger = runner.invoke(app, ["gateway", "token", "issue", "ghost-partner"])
    assert stranger.exit_code == 2
    assert "unknown partner" in stranger.output


def test_a_token_file_others_can_read_is_refused(tmp_path):
    path = tmp_path / "tokens.json"
    issue_token(path, "caf-nord")
    path.chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        load_token_hashes(path)


def test_a_token_file_that_is_not_digests_is_refused(tmp_path):
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"caf-nord": "the-token-in-clear"}))
    path.chmod(0o600)
    with pytest.raises(ValueError, match="SHA-256"):
        load_token_hashes(path)
    assert not revoke_token(tmp_path / "none.json", "caf-nord")


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Bearer ", "Basic abc", "Bearer tökén" * 4, "Bearer " + "a" * 300],
)
def test_anything_but_a_bearer_token_of_our_shape_is_no_token(header):
    assert bearer_token(header) is None


def test_a_bearer_token_is_read_whatever_the_scheme_s_case():
    token = "A" * 43
    assert bearer_token(f"Bearer {token}") == token
    assert bearer_token(f"bearer {token}") == token
