"""The ops monitor over real HTTP: page, Prometheus metrics, liveness and readiness, from the broker and the ledger."""

from __future__ import annotations

import asyncio
import base64

import httpx
import pytest
from pydantic import SecretStr

from partnerbus.entrypoints.web import create_ops_app
from partnerbus.ops import monitor
from partnerbus.testing import Inbox

from .helpers import publish, signal
from .ops_scenario import serving

pytestmark = pytest.mark.rabbitmq


OPS_USER = "ops"
OPS_PASSWORD = "ops-test-password-0123456789"
AUTH = httpx.BasicAuth(OPS_USER, OPS_PASSWORD)


def ops_settings(bus, **changes):  # type: ignore[no-untyped-def]
    return bus.settings.model_copy(
        update={"ops_user": OPS_USER, "ops_password": SecretStr(OPS_PASSWORD), **changes}
    )


@pytest.fixture
async def ops_url(bus):
    async with serving(create_ops_app(ops_settings(bus), bus.directory, bus.store)) as url:
        yield url


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

    async with httpx.AsyncClient(base_url=ops_url, timeout=30, auth=AUTH) as client:
        metrics = (await client.get("/metrics")).text
        page = (await client.get("/")).text
        health = await client.get("/health")
    assert "partnerbus_dead_letters 1.0" in metrics
    assert "partnerbus_needs_parked 1.0" in metrics
    assert "partnerbus_broker_up 1.0" in metrics
    assert (
        f'partnerbus_queue_consumers{{queue="{t.signal_queue.name}",role="intake"}} 1.0' in metrics
    )
    assert '<b id="dead-letters">1</b>' in page
    assert f"<td>{t.signal_queue.name}</td>" in page
    assert health.status_code == 200
    assert health.json() == {"status": "up"}


def basic(raw: bytes) -> dict[str, bytes]:
    return {"Authorization": b"Basic " + raw}


@pytest.mark.parametrize("path", ["/", "/metrics"])
async def test_the_page_and_metrics_refuse_a_missing_wrong_or_malformed_credential(
    bus, ops_url, path
):
    """401 with a Basic challenge with a wrong user or password, and with malformed headers
    (not base64, non-ASCII, no colon); without any credential, the page sends to its login
    form and /metrics says 401; 200 with the right ones."""
    wrong = [
        {"Authorization": "Basic " + base64.b64encode(b"ops:not-the-password").decode()},
        {"Authorization": "Basic " + base64.b64encode(f"root:{OPS_PASSWORD}".encode()).decode()},
        basic(base64.b64encode(f"ops:{OPS_PASSWORD}é".encode())),  # UTF-8 inside
        basic("opsé:pässwörd".encode("latin-1")),  # raw non-ASCII bytes, not base64
        basic(b"%%%not-base64%%%"),
        basic(base64.b64encode(b"no-colon-here")),
        {"Authorization": f"Bearer {OPS_PASSWORD}"},
    ]
    async with httpx.AsyncClient(base_url=ops_url, timeout=30) as client:
        bare = await client.get(path)
        if path == "/":
            assert bare.status_code == 303 and bare.headers["location"] == "/login"
        else:
            assert bare.status_code == 401
            assert bare.headers["www-authenticate"].startswith("Basic")
        assert "partnerbus_" not in bare.text and bus.settings.prefix not in bare.text
        for headers in wrong:
            refused = await client.get(path, headers=headers)
            assert refused.status_code == 401, (headers, refused.text)
            assert refused.headers["www-authenticate"].startswith("Basic")
            assert "partnerbus_" not in refused.text and bus.settings.prefix not in refused.text
        assert (await client.get(path, auth=AUTH)).status_code == 200


async def test_health_and_ready_are_open_and_say_only_up_or_down(bus):
    """/health (liveness) and /ready (the broker and the ledger answer) need no credential
    and tell nothing but up or down: with the broker unreachable the process is up and not
    ready (no error text, no address)."""
    down = ops_settings(bus, amqp_url=SecretStr("amqp://guest:guest@127.0.0.1:1/"))
    async with (
        serving(create_ops_app(down, bus.directory, bus.store)) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        health = await client.get("/health")
        ready = await client.get("/ready")
    assert health.status_code == 200
    assert health.json() == {"status": "up"}
    assert ready.status_code == 503
    assert ready.json() == {"status": "down"}


async def test_ready_is_up_when_the_broker_and_the_ledger_answer(bus, ops_url):
    async with httpx.AsyncClient(base_url=ops_url, timeout=30) as client:
        ready = await client.get("/ready")
    assert ready.status_code == 200 and ready.json() == {"status": "up"}


def test_the_ops_app_refuses_to_start_without_a_strong_password(bus):
    """No password, a short one, or a non-ASCII one: the app (and `ops serve`) refuse."""
    for bad in ("", "short", "é" * 20):
        with pytest.raises(ValueError, match="PARTNERBUS_OPS_PASSWORD"):
            create_ops_app(
                bus.settings.model_copy(update={"ops_password": SecretStr(bad)}),
                bus.directory,
                bus.store,
            )


async def test_many_viewers_share_one_snapshot_and_one_connection(bus, monkeypatch):
    """Forty concurrent hits on the page and /metrics: one snapshot of the ledger, one AMQP
    connection (the monitor's own: the service's retention pass connects too); a later hit,
    once the snapshot is old, reuses that connection."""
    ledger_reads = 0
    real_figures = monitor.ledger_figures

    def counting_figures(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal ledger_reads
        ledger_reads += 1
        return real_figures(*args, **kwargs)

    monkeypatch.setattr(monitor, "ledger_figures", counting_figures)
    web = create_ops_app(ops_settings(bus, ops_refresh_s=3600), bus.directory, bus.store)
    async with (
        serving(web) as url,
        httpx.AsyncClient(base_url=url, timeout=60, auth=AUTH) as client,
    ):
        hits = await asyncio.gather(*(client.get("/" if i % 2 else "/metrics") for i in range(40)))
        assert [h.status_code for h in hits] == [200] * 40
        assert ledger_reads == 1
        assert web.state.probe.connections == 1
        assert "partnerbus_broker_up 1.0" in hits[0].text

        web.state.snapshots._max_age_s = 0  # every hit now takes a new snapshot
        again = await client.get("/metrics", auth=AUTH)
        assert again.status_code == 200 and "partnerbus_broker_up 1.0" in again.text
        assert ledger_reads == 2
        assert web.state.probe.connections == 1  # the same connection and channel, kept open
