"""The tests' pseudonym key: one value for the bus the tests start (`settings`), the
use cases' ledger (`make_ledger`), the `partnerbus` processes they run and the helpers that
recompute a partner's references. Random for each test run: strong, and never a value
published anywhere, so the check the service makes at start passes it as it would a real key."""

from __future__ import annotations

import secrets

TEST_KEY = secrets.token_urlsafe(32)
TEST_KEY_BYTES = TEST_KEY.encode()
