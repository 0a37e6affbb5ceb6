"""The ops console's per-partner rows on both engines: the ledger's grouped reads (the
first answer of each referral, the oldest sent and unread, rejections by reason) are the
same on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from .test_ops_console import (  # noqa: F401 (the fixture and the test, collected here)
    console,
    test_the_partner_rows_match_an_independent_count_and_name_the_idle_queue,
)

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
def database_url(engine_url: str) -> str:
    """These run on both engines: SQLite and PostgreSQL."""
    return engine_url
