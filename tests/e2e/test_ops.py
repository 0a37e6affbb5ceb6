"""The ops monitor over real HTTP: page, Prometheus metrics and health, from the broker and the ledger."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest
import uvicorn

from partnerbus.ops.web import create_ops_app
from partnerbus.testing import Inbox

from .helpers import publish, signal

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
async def ops_url(bus):
    # A socket listening before the server starts: requests wait in its backlog, so the
    # test needs no readiness poll.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            create_ops_app(bus.settings, bus.directory, bus.store),
            log_level="warning",
            lifespan="off",
        )
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    await task
    sock.close()


async def test_the_monitor_shows_dead_letters_parked_needs_and_queues(
    bus, channel, connection, ops_url
):
    """A dead letter and a parked signal appear on the page, in the metrics and leave health up."""
    t = bus.topology
    agency = bus.directory.agency_for("59512").id
    advisor = await Inbox.open(channel, t.partner_queue_name(agency))
    peek_channel = await connection.channel()
    dlq = await Inbox.open(peek_channel, t.dlq_name(t.signal_queue.name), ack=False)
    await publish(channel, t.signals.name, b"{not json", routing_key="x", message_id="bad-1")
    await publish(channel, t.signals.name, signal(), routing_key="lmh-recouvrement")
    await advisor.expect_kind("consent-requested")
    await dlq.expect(1)
    await peek_channel.close()  # unacked: it goes back to the dead-letter queue for ops

    async with httpx.AsyncClient(base_url=ops_url, timeout=10) as client:
        metrics = (await client.get("/metrics")).text
        page = (await client.get("/")).text
        health = await client.get("/health")
    assert "partnerbus_dead_letters 1.0" in metrics
    assert "partnerbus_needs_parked 1.0" in metrics
    assert "partnerbus_broker_up 1.0" in metrics
    assert (
        f'partnerbus_queue_consumers{{queue="{t.signal_queue.name}",role="intake"}} 1.0' in metrics
    )
    assert "1 dead letter(s)" in page
    assert t.signal_queue.name in page
    assert health.status_code == 200
    assert health.json()["broker"] == "up"


def _chromium() -> str:
    """The machine's Chromium; in CI its absence fails (`.ci/run` installs it)."""
    import os
    import shutil

    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("Chromium is not installed (CI must install it: see .ci/run)")
    pytest.skip("Chromium is not installed: apt-get install chromium to run the browser test")


async def test_the_ops_page_renders_in_a_real_browser(bus, channel, ops_url, tmp_path):
    """Headless Chromium renders the page: the attention list names the dead letter, the queue table lists the intake queues, and a screenshot is taken."""
    chromium = _chromium()
    t = bus.topology
    await publish(channel, t.signals.name, b"{oops", routing_key="x", message_id="browser-bad-1")
    await bus.wait_verdicts(1)

    shot = tmp_path / "ops.png"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dump = await asyncio.create_subprocess_exec(
        chromium,
        *flags,
        "--dump-dom",
        f"{ops_url}/",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    dom, _ = await asyncio.wait_for(dump.communicate(), 60)
    assert dump.returncode == 0
    html = dom.decode()
    assert "<title>partnerbus — " in html
    assert "1 dead letter(s)" in html
    assert f"<td>{t.signal_queue.name}</td><td>intake</td>" in html
    assert 'href="/metrics"' in html

    capture = await asyncio.create_subprocess_exec(
        chromium,
        *flags,
        f"--screenshot={shot}",
        "--window-size=1200,900",
        f"{ops_url}/",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await asyncio.wait_for(capture.wait(), 60)
    assert capture.returncode == 0
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
