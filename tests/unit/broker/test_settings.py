"""Configuration: the environment and a `.env` file, for every setting the README lists."""

from __future__ import annotations

from partnerbus.broker.settings import Settings


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
    assert s.prefetch == 16
    assert s.retry_delays_ms == (1000, 5000, 30000)
    assert (s.deadlines.routine_hours, s.deadlines.urgent_hours, s.deadlines.asap_hours) == (
        240,
        72,
        24,
    )
    assert (s.retention_days, s.free_text_retention_days) == (730, 90)
