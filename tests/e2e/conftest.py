"""Fixtures of the end-to-end tier."""

from __future__ import annotations

import pytest


@pytest.fixture
def cli_env(monkeypatch, bus):
    """The command line reads the same settings as the running bus."""
    monkeypatch.setenv("PARTNERBUS_AMQP_URL", bus.settings.amqp_url.get_secret_value())
    monkeypatch.setenv("PARTNERBUS_PREFIX", bus.settings.prefix)
    monkeypatch.setenv("PARTNERBUS_PSEUDONYM_KEY", bus.settings.pseudonym_key.get_secret_value())
    monkeypatch.setenv("PARTNERBUS_DATABASE_URL", bus.settings.database_url)
    return bus
