"""Configuration: the environment and a `.env` file, for every setting the README lists."""

from __future__ import annotations

import asyncio
import os
import secrets
from datetime import timedelta

import pytest

from partnerbus.entrypoints.bootstrap import create_app, parked_policy, stalled_policy
from partnerbus.rules import (
    PARKED_FOLLOW_UP,
    STALLED_FOLLOW_UP,
    FollowUpSteps,
    PseudonymKeyError,
    check_pseudonym_key,
)
from partnerbus.settings import Settings
from tests.keys import TEST_KEY


def test_a_dotenv_file_sets_the_deadlines_too(tmp_path, monkeypatch) -> None:
    """`PARTNERBUS_DEADLINE_*` in a `.env` file reaches the nested deadline settings, like the other variables."""
    monkeypatch.chdir(tmp_path)
    for name in ("PARTNERBUS_PREFIX", "PARTNERBUS_DEADLINE_URGENT_HOURS"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / ".env").write_text(
        "PARTNERBUS_PREFIX=from-dotenv\nPARTNERBUS_DEADLINE_URGENT_HOURS=12\n"
    )
    settings = Settings()
    assert settings.prefix == "from-dotenv"
    assert settings.deadlines.urgent_hours == 12


def test_the_environment_wins_over_the_dotenv_file(tmp_path, monkeypatch) -> None:
    """A variable set in the environment overrides the same one in `.env`."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("PARTNERBUS_DEADLINE_ASAP_HOURS=6\n")
    monkeypatch.setenv("PARTNERBUS_DEADLINE_ASAP_HOURS", "3")
    assert Settings().deadlines.asap_hours == 3


def test_the_defaults_are_the_documented_ones(tmp_path, monkeypatch) -> None:
    """Without environment or `.env`, the defaults are those of the README's table."""
    monkeypatch.chdir(tmp_path)
    import os

    for name in list(os.environ):
        if name.startswith("PARTNERBUS_"):
            monkeypatch.delenv(name)
    s = Settings()
    assert s.amqp_url.get_secret_value() == "amqp://guest:guest@127.0.0.1:5672/"
    assert s.database_url == "sqlite:///partnerbus.db"
    assert s.prefix == "partnerbus"
    assert s.delivery_limit == 5
    assert s.prefetch == 256
    assert s.intake_batch_size == 128
    assert s.intake_batch_wait_ms == 0
    assert s.urgent_prefetch == 32
    assert s.retry_delays_ms == (1000, 5000, 30000)
    assert (s.deadlines.routine_hours, s.deadlines.urgent_hours, s.deadlines.asap_hours) == (
        240,
        72,
        24,
    )
    assert (s.retention_days, s.free_text_retention_days) == (730, 90)
    assert parked_policy(s) == PARKED_FOLLOW_UP
    assert stalled_policy(s) == STALLED_FOLLOW_UP


def test_the_follow_up_periods_come_from_the_environment(bare_environment, monkeypatch) -> None:
    """`PARTNERBUS_PARKED_*` and `PARTNERBUS_STALLED_*` set the follow-ups per urgency; steps out of order are refused, naming the variables."""
    monkeypatch.setenv("PARTNERBUS_PARKED_ASAP_REMIND_HOURS", "6")
    monkeypatch.setenv("PARTNERBUS_PARKED_ASAP_CLOSE_HOURS", "48")
    monkeypatch.setenv("PARTNERBUS_STALLED_URGENT_REPORT_HOURS", "400")
    s = Settings()
    assert parked_policy(s).asap == FollowUpSteps(timedelta(hours=6), timedelta(hours=48))
    assert stalled_policy(s).urgent == FollowUpSteps(timedelta(days=14), timedelta(hours=400))
    monkeypatch.setenv("PARTNERBUS_STALLED_ROUTINE_REPORT_HOURS", "100")
    with pytest.raises(ValueError, match="PARTNERBUS_STALLED_ROUTINE_"):
        stalled_policy(Settings())


@pytest.fixture
def bare_environment(tmp_path, monkeypatch) -> None:
    """No PARTNERBUS_* variable and no `.env` file."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("PARTNERBUS_"):
            monkeypatch.delenv(name)


def test_there_is_no_default_pseudonym_key_and_the_service_refuses_to_start_without_one(
    bare_environment,
) -> None:
    """No key set: `create_app` refuses, saying which variable to set and how to make a key."""
    assert Settings().pseudonym_key is None
    with pytest.raises(PseudonymKeyError, match="PARTNERBUS_PSEUDONYM_KEY") as refused:
        create_app(Settings())
    assert "token_urlsafe" in str(refused.value)


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("", "no pseudonym key"),
        ("   ", "no pseudonym key"),
        ("change-me-in-production", "too short"),
        ("test-key", "too short"),
        ("k", "too short"),
        ("correct-horse-battery", "too short"),
        ("change-me-in-production-change-me-now", "published example"),
        ("my-example-pseudonym-key-for-the-bus-1234", "published example"),
        ("a" * 48, "repeats a few characters"),
        ("ab12" * 12, "repeats a few characters"),
    ],
)
def test_a_missing_short_known_or_obvious_key_is_refused_at_start(key: str, why: str) -> None:
    """The service, and any ledger that pseudonymises, refuse a key that could be guessed."""
    with pytest.raises(PseudonymKeyError, match=why):
        create_app(Settings(pseudonym_key=key))
    with pytest.raises(PseudonymKeyError, match=why):
        check_pseudonym_key(key.encode())


def test_a_random_key_of_32_characters_or_more_is_accepted() -> None:
    """What `secrets.token_urlsafe(32)` makes passes; the service is built with it."""
    key = secrets.token_urlsafe(32)
    assert check_pseudonym_key(key) == key.encode()
    bus = create_app(Settings(pseudonym_key=key, database_url="sqlite://"))
    assert bus.ledger.pseudonym_key == key.encode()
    bus.executor.shutdown()
    bus.store.dispose()


def test_partnerbus_run_refuses_to_start_without_a_key(bare_environment) -> None:
    """`partnerbus run` says why and exits 2 before starting any worker."""
    from typer.testing import CliRunner

    from partnerbus.entrypoints.cli import app

    result = CliRunner().invoke(app, ["run", "--workers", "1"])
    assert result.exit_code == 2
    assert "no pseudonym key" in result.output
    assert "PARTNERBUS_PSEUDONYM_KEY" in result.output


def test_the_demo_makes_a_throwaway_key_when_none_is_set_and_says_so(
    bare_environment, capsys
) -> None:
    """`make demo` needs no set-up: without a key the demo uses a random one and says so; a weak key set is refused."""
    from partnerbus.entrypoints.demo import main as demo_main

    unreachable = "amqp://guest:guest@127.0.0.1:1/"
    assert asyncio.run(demo_main(Settings(amqp_url=unreachable))) == 2  # no broker there
    assert "throwaway random key" in capsys.readouterr().out
    assert asyncio.run(demo_main(Settings(amqp_url=unreachable, pseudonym_key="test-key"))) == 2
    said = capsys.readouterr().out
    assert "too short" in said
    assert "not reachable" not in said, "refused before anything else"


async def test_a_worker_keeps_its_last_verdicts_only(monkeypatch) -> None:
    """A service running for months keeps a constant footprint: past twice `VERDICTS_KEPT`, the oldest verdicts go (the waits see the last ones); asking to wait for more than it keeps is an error, not a wait that cannot end."""
    from partnerbus.entrypoints import bootstrap
    from partnerbus.handlers.delivery import Verdict

    monkeypatch.setattr(bootstrap, "VERDICTS_KEPT", 5)
    bus = create_app(Settings(pseudonym_key=TEST_KEY, database_url="sqlite://"))
    try:
        queue = bus.topology.signal_queue.name
        for n in range(23):
            bus.record_verdict(queue, Verdict("processed", reason=str(n)))
            assert len(bus.verdicts) <= 10
        assert [v.reason for _, v in bus.verdicts][-5:] == ["18", "19", "20", "21", "22"]
        found = await bus.wait_verdicts(5, queue="signals", timeout=1)
        assert [v.reason for v in found][-1] == "22"
        with pytest.raises(ValueError, match="last 5 verdicts"):
            await bus.wait_verdicts(6, timeout=1)
    finally:
        bus.executor.shutdown()
        bus.store.dispose()
