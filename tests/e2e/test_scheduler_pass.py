"""The service's scheduled pass on the real broker: the deadline pass and retention fail
alone, are counted on the service's metrics port, and are tried again at the next pass."""

from __future__ import annotations

import asyncio
import logging
import socket
import urllib.request
from datetime import timedelta

import pytest

from partnerbus import usecases
from partnerbus.entrypoints.bootstrap import create_app
from partnerbus.testing import FakeClock, wait_until

pytestmark = pytest.mark.rabbitmq


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def failures(text: str, task: str) -> float:
    for line in text.splitlines():
        if line.startswith(f'partnerbus_scheduled_item_failures_total{{task="{task}"}}'):
            return float(line.split()[-1])
    return 0.0


async def test_a_failing_retention_pass_does_not_stop_the_deadline_pass_and_is_retried(
    settings, monkeypatch, caplog
):
    """Retention raises: the deadline pass still runs, the failure is counted on `metrics_port`, and retention runs again at the next pass (not marked done); then the deadline pass raises and retention still runs."""
    port = free_port()
    clock = FakeClock()
    bus = create_app(settings.model_copy(update={"metrics_port": port}), clock=clock)
    await bus.start()
    try:
        # the service's own first pass runs at start; wait for it, then move a day on so
        # that retention is due again at our passes
        await wait_until(lambda: bus._retention_at is not None, what="the first pass")
        clock.advance(timedelta(days=2))
        real_retention, real_deadlines = usecases.apply_retention, usecases.watch_deadlines

        def broken(*_args, **_kwargs):
            raise RuntimeError("T-SECRET-PERSON")

        caplog.set_level(logging.DEBUG)
        before = await asyncio.to_thread(scrape, port)
        monkeypatch.setattr(usecases, "apply_retention", broken)
        counts = await bus.tick()
        assert "expired" in counts, "the deadline pass ran"
        assert "anonymised" not in counts
        after = await asyncio.to_thread(scrape, port)
        assert failures(after, "retention") == failures(before, "retention") + 1

        monkeypatch.setattr(usecases, "apply_retention", real_retention)
        monkeypatch.setattr(usecases, "watch_deadlines", broken)
        counts = await bus.tick()
        assert "anonymised" in counts, "retention was tried again, and ran"
        again = await asyncio.to_thread(scrape, port)
        assert failures(again, "deadlines") == failures(after, "deadlines") + 1
        monkeypatch.setattr(usecases, "watch_deadlines", real_deadlines)
        clock.advance(timedelta(days=2))
        assert {"expired", "anonymised"} <= set(await bus.tick())
        assert "retention pass failed" in caplog.text or "the retention pass" in caplog.text
        assert "T-SECRET-PERSON" not in caplog.text
    finally:
        await bus.stop()
        await bus.teardown()
