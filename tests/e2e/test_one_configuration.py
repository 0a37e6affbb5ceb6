"""One configuration for every command: each reads the directory from the same place
(`--directory`, else PARTNERBUS_DIRECTORY_PATH, else the bundled sample) and says which."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from partnerbus.directory import load_sample
from partnerbus.entrypoints.cli import _mount_optional, app

_mount_optional()


def tiny_directory(path: Path) -> Path:
    """A network of two partners that the bundled sample does not have."""
    need = next(iter(load_sample().partners())).needs[0]
    doc = {
        "format": "partnerbus-directory/1",
        "name": "tiny network",
        "territory": {
            "regions": {"32": "Hauts-de-France"},
            "departements": {"59": {"name": "Nord", "region": "32"}},
            "epcis": {"200093201": {"name": "MEL", "departement": "59"}},
            "communes": [["59350", "Lille", "200093201"]],
        },
        "partners": [
            {
                "id": "tiny-agency",
                "name": "Tiny landlord agency",
                "kind": "bailleur-social",
                "organisation": "tiny-landlord",
                "needs": [need],
                "coverage": ["59350"],
                "advisors": [{"id": "t.advisor", "name": "T. Advisor"}],
            },
            {
                "id": "tiny-ccas",
                "name": "Tiny CCAS",
                "kind": "ccas-cias",
                "organisation": "tiny-ccas",
                "needs": [need],
                "coverage": ["59350"],
            },
        ],
        "agreements": [],
    }
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str | None]:
    """A clean PARTNERBUS_* environment naming the tiny directory; a broker that is not
    there (every command names its directory before it connects)."""
    base: dict[str, str | None] = {k: None for k in os.environ if k.startswith("PARTNERBUS_")}
    base.update(
        {
            "PARTNERBUS_DIRECTORY_PATH": str(tiny_directory(tmp_path / "tiny.yaml")),
            "PARTNERBUS_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/",
            "PARTNERBUS_DATABASE_URL": f"sqlite:///{tmp_path / 'bus.db'}",
            "PARTNERBUS_PREFIX": "pbt-oneconfig",
            "PARTNERBUS_PSEUDONYM_KEY": "one-configuration-test-key-0123456789",
            "PARTNERBUS_ACCESS_SECRET": "one-configuration-access-secret",
            "COLUMNS": "200",
            "NO_COLOR": "1",
        }
    )
    return base


def run(env: dict[str, str | None], *args: str):  # type: ignore[no-untyped-def]
    return CliRunner(env=env).invoke(app, list(args))


def test_access_export_exports_the_configured_network_not_the_sample(env, tmp_path) -> None:
    """With PARTNERBUS_DIRECTORY_PATH set, `access export` writes that network's users only."""
    out = tmp_path / "definitions.json"
    result = run(env, "access", "export", "--out", str(out))
    assert result.exit_code == 0, result.output
    users = sorted(u["name"] for u in json.loads(out.read_text())["users"])
    assert users == ["pb-tiny-agency", "pb-tiny-ccas"]
    assert f"directory: {Path(env['PARTNERBUS_DIRECTORY_PATH']).resolve()} (2 partners)" in (
        result.stderr
    )


def test_access_apply_applies_the_configured_network(env, tmp_path) -> None:
    """`access apply` creates the configured network's users (a stand-in rabbitmqctl logs
    its calls)."""
    log = tmp_path / "ctl.log"
    ctl = tmp_path / "rabbitmqctl"
    ctl.write_text(f'#!/bin/sh\necho "$@" >> {log}\necho "[]"\n')
    ctl.chmod(0o755)
    result = run(env, "access", "apply", "--rabbitmqctl", str(ctl))
    assert result.exit_code == 0, result.output
    calls = log.read_text()
    assert "add_user pb-tiny-agency" in calls
    assert "add_user pb-tiny-ccas" in calls
    assert calls.count("add_user") == 2
    assert "directory: " in result.stderr and "(2 partners)" in result.stderr


def test_the_override_still_wins_and_is_named(env, tmp_path) -> None:
    """`--directory` overrides the environment, and the command says so."""
    other = tiny_directory(tmp_path / "other.yaml")
    out = tmp_path / "d.json"
    result = run(env, "access", "export", "--out", str(out), "--directory", str(other))
    assert result.exit_code == 0, result.output
    assert f"directory: {other.resolve()} (2 partners)" in result.stderr


def test_without_a_configured_directory_the_sample_is_named(env, tmp_path) -> None:
    env = env | {"PARTNERBUS_DIRECTORY_PATH": None}
    result = run(env, "access", "export", "--out", str(tmp_path / "d.json"))
    assert result.exit_code == 0, result.output
    assert "directory: bundled Lille/Nord sample" in result.stderr
    assert f"({len(load_sample())} partners)" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("directory", "check"),
        ("directory", "match", "--need", "x", "--commune", "59350"),
        (
            "consent",
            "grant",
            "--person",
            "T-1",
            "--agency",
            "tiny-agency",
            "--by",
            "t.advisor",
            "--needs",
            "x",
        ),
        ("dlq", "list"),
        ("ops", "status"),
        ("health",),
    ],
    ids=lambda a: " ".join(a[:2]),
)
def test_every_command_names_the_directory_it_uses(env, args, monkeypatch) -> None:
    """Each command that reads the directory says which (and reads the configured one),
    even when it then fails on a broker that is not there."""
    result = run(env, *args)
    assert f"directory: {Path(env['PARTNERBUS_DIRECTORY_PATH']).resolve()} (2 partners)" in (
        result.stderr
    ), (result.exit_code, result.output)


def test_run_gateway_and_ops_serve_name_the_directory(env, monkeypatch) -> None:
    """The long-running commands say it too before they start serving."""
    import os as os_module

    import uvicorn

    monkeypatch.setattr(os_module, "execv", lambda *a: None)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    env = env | {"PARTNERBUS_OPS_PASSWORD": "a-long-enough-ops-password"}
    for args in (("run",), ("gateway",), ("ops", "serve")):
        result = run(env, *args)
        where = f"directory: {Path(env['PARTNERBUS_DIRECTORY_PATH']).resolve()} (2 partners)"
        assert where in result.stderr, (args, result.output)


def test_the_demo_says_it_plays_on_the_sample(env) -> None:
    """The demo's scripted day needs the sample: it says so instead of silently swapping."""
    result = run(env, "demo", "--timeout", "1")
    assert "directory: bundled Lille/Nord sample" in result.stderr


def test_a_bad_configured_directory_is_a_clear_error(env, tmp_path) -> None:
    """A directory file that cannot be used stops the command with its reason, no trace."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1, 2", encoding="utf-8")
    env = env | {"PARTNERBUS_DIRECTORY_PATH": str(broken)}
    for args in (("ops", "status"), ("health",), ("run",)):
        result = run(env, *args)
        assert result.exit_code == 2, (args, result.output)
        assert "directory error" in result.output
        assert "Traceback" not in result.output
