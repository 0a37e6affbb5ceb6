"""The HTTP gateway, over real HTTP, into the real broker and the running bus."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest
import uvicorn

from partnerbus.broker.access import derive_password
from partnerbus.broker.gateway import create_gateway
from partnerbus.testing import Inbox

from .helpers import ROUBAIX, signal

pytestmark = pytest.mark.rabbitmq
SECRET = "gateway-test-secret"


@pytest.fixture
async def gateway(bus):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    server = uvicorn.Server(
        uvicorn.Config(create_gateway(bus.settings, bus.directory, SECRET), log_level="warning")
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=10
    ) as client:
        yield client
    server.should_exit = True
    await task
    sock.close()


def token(bus, partner_id: str) -> dict[str, str]:
    username = bus.directory.partner(partner_id).username
    return {"Authorization": f"Bearer {derive_password(SECRET, username)}"}


async def test_a_signal_posted_over_http_flows_like_an_amqp_one(bus, channel, gateway):
    """202 means the broker has it; the bus authenticates it as its partner and asks the advisor for consent."""
    agency = bus.directory.agency_for(ROUBAIX).id
    advisor = await Inbox.open(channel, bus.topology.partner_queue_name(agency))
    body = signal()
    response = await gateway.post("/v1/signals", json=body, headers=token(bus, "lmh-recouvrement"))
    assert response.status_code == 202, response.text
    assert response.json() == {"accepted": body["message_id"]}
    request = await advisor.expect_kind("consent-requested")
    assert request.body["signal_id"] == body["message_id"]


async def test_the_gateway_refuses_strangers_impostors_and_bad_bodies_with_clear_errors(
    bus, gateway
):
    """No token: 401; another partner's source: 403; a wrong field: 422 naming it; nothing reaches the bus."""
    body = signal()
    assert (await gateway.post("/v1/signals", json=body)).status_code == 401
    wrong = {"Authorization": "Bearer not-a-token"}
    assert (await gateway.post("/v1/signals", json=body, headers=wrong)).status_code == 401
    impostor = await gateway.post("/v1/signals", json=body, headers=token(bus, "lmh-proximite"))
    assert impostor.status_code == 403
    assert "lmh-recouvrement" in impostor.json()["detail"]
    bad = await gateway.post(
        "/v1/signals", json={**body, "commune": "Lille"}, headers=token(bus, "lmh-recouvrement")
    )
    assert bad.status_code == 422
    assert bad.json()["detail"].startswith("invalid message: commune")
    assert bus.verdicts == []
