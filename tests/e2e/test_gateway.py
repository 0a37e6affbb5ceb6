"""The HTTP gateway, over real HTTP, into the real broker and the running bus: the same rights
as over AMQP, tokens that are not AMQP passwords, bodies bounded while read, a rate limit."""

from __future__ import annotations

import asyncio
import json
import stat

import pytest

from partnerbus.broker.access import grants_for
from partnerbus.entrypoints.gateway import revoke_token, token_digest
from partnerbus.testing import Inbox

from .gateway_fixtures import Door, gateway_fixture, serve_gateway  # noqa: F401 - `gateway`
from .helpers import ROUBAIX, consent, new_id, signal

pytestmark = pytest.mark.rabbitmq
ROUTES = {"signals": "/v1/signals", "statuses": "/v1/statuses", "consents": "/v1/consents"}


async def test_a_signal_posted_over_http_flows_like_an_amqp_one(bus, channel, gateway: Door):
    """202 means the broker has it; the bus authenticates it as its partner and asks the advisor for consent."""
    agency = bus.directory.agency_for(ROUBAIX).id
    advisor = await Inbox.open(channel, bus.topology.partner_queue_name(agency))
    body = signal()
    response = await gateway.post(
        "/v1/signals", json=body, headers=gateway.auth("lmh-recouvrement")
    )
    assert response.status_code == 202, response.text
    assert response.json() == {"accepted": body["message_id"]}
    request = await advisor.expect_kind("consent-requested")
    assert request.body["signal_id"] == body["message_id"]


async def test_the_gateway_refuses_strangers_impostors_and_bad_bodies_with_clear_errors(
    bus, gateway: Door
):
    """No token: 401; another partner's token for this source (a forged sender): 403; a wrong field: 422 naming it; nothing reaches the bus."""
    body = signal()
    assert (await gateway.post("/v1/signals", json=body)).status_code == 401
    wrong = {"Authorization": "Bearer not-a-token"}
    assert (await gateway.post("/v1/signals", json=body, headers=wrong)).status_code == 401
    impostor = await gateway.post("/v1/signals", json=body, headers=gateway.auth("lmh-proximite"))
    assert impostor.status_code == 403
    assert "lmh-recouvrement" in impostor.json()["detail"]
    forged_status = {
        "type": "referral-status-changed",
        "message_id": new_id("st"),
        "occurred_at": body["occurred_at"],
        "referral_id": new_id("r"),
        "partner": "ccas-roubaix",
        "status": "accepted",
    }
    forged = await gateway.post(
        "/v1/statuses", json=forged_status, headers=gateway.auth("ccas-tourcoing")
    )
    assert forged.status_code == 403
    bad = await gateway.post(
        "/v1/signals", json={**body, "commune": "Lille"}, headers=gateway.auth("lmh-recouvrement")
    )
    assert bad.status_code == 422
    assert bad.json()["detail"].startswith("invalid message: commune")
    assert bus.verdicts == []


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer tökén-ñon-ascii-tökén-ñon-ascii".encode(),
        "Bearer \u00e9\u00e8\u00e9\u00e8\u00e9\u00e8\u00e9\u00e8\u00e9\u00e8\u00e9\u00e8".encode(
            "latin-1"
        ),
        b"Bearer ",
        b"Bearer",
        b"",
        b"Basic bG1oOnNlY3JldA==",
        b"Token abcdefabcdefabcdefabcdefabcdef",
        b"Bearer " + b"A" * 6000,
        b"Bearer two words",
        b"Bearer  " + b"A" * 43,
    ],
    ids=[
        "utf8",
        "latin1",
        "empty-token",
        "scheme-only",
        "empty",
        "basic",
        "other-scheme",
        "huge",
        "spaces",
        "double-space",
    ],
)
async def test_any_malformed_token_is_a_401_never_a_500(bus, gateway: Door, authorization):
    """Whatever the Authorization header holds, a token that is not one gets 401 with a Bearer challenge (sent by hand: HTTP clients refuse to send some of these)."""
    body = json.dumps(signal()).encode()
    head = [
        b"POST /v1/signals HTTP/1.1",
        b"Host: gateway",
        b"Authorization: " + authorization,
        b"Content-Type: application/json",
        b"Content-Length: " + str(len(body)).encode(),
    ]
    status, headers = await _raw_post(gateway.port, head, [body])
    assert status == 401
    assert "www-authenticate: bearer" in headers.lower()
    assert bus.verdicts == []


async def test_tokens_are_random_stored_as_hashes_only_and_revocable(bus, gateway: Door):
    """An issued token is not the AMQP password, the file holds only its SHA-256 (mode 0600), and a revoked token gets 401 at once."""
    headers = gateway.auth("lmh-recouvrement")
    token = gateway.issued["lmh-recouvrement"]
    raw = gateway.tokens_path.read_text()
    assert token not in raw
    assert json.loads(raw)["lmh-recouvrement"] == token_digest(token)
    assert stat.S_IMODE(gateway.tokens_path.stat().st_mode) == 0o600
    assert (await gateway.post("/v1/signals", json={}, headers=headers)).status_code == 422
    assert revoke_token(gateway.tokens_path, "lmh-recouvrement")
    assert (await gateway.post("/v1/signals", json={}, headers=headers)).status_code == 401


async def test_the_gateway_grants_each_partner_exactly_its_amqp_rights(bus, gateway: Door):
    """For every partner of the sample directory, each route is allowed over HTTP (422 on an empty body) exactly when RabbitMQ lets it write that exchange; otherwise 403 before the body is read."""
    partners = list(bus.directory.partners())
    grants = {g.partner_id: g for g in grants_for(partners, bus.topology)}
    seen_refused = 0
    for partner in partners:
        amqp = {
            intake
            for intake in ROUTES
            if getattr(bus.topology, intake).name in grants[partner.id].topic_exchanges
        }
        http = set()
        for intake, path in ROUTES.items():
            response = await gateway.post(path, content=b"{}", headers=gateway.auth(partner.id))
            assert response.status_code in (403, 422), (partner.id, path, response.text)
            if response.status_code == 422:
                http.add(intake)
            else:
                seen_refused += 1
        assert http == amqp, partner.id
    assert seen_refused, "the sample has partners without advisors"
    assert bus.verdicts == []


async def test_a_partner_without_advisors_cannot_post_a_consent(bus, gateway: Door):
    """A CCAS has no advisors: POST /v1/consents is 403 with the reason, as ACCESS_REFUSED over AMQP."""
    body = consent(person=new_id("T"), agency="ccas-roubaix", kinds=("ccas-cias",))
    body["collected_by"] = "ccas-roubaix"
    response = await gateway.post("/v1/consents", json=body, headers=gateway.auth("ccas-roubaix"))
    assert response.status_code == 403
    assert "advisors" in response.json()["detail"]
    assert bus.verdicts == []


async def _raw_post(port: int, head: list[bytes], chunks: list[bytes]) -> tuple[int, str]:
    """An HTTP/1.1 POST by hand: `head` lines, then `chunks` written as they are; returns
    the status code and the header lines of the answer (waiting at most 20 s for them)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"\r\n".join(head) + b"\r\n\r\n")
        for chunk in chunks:
            writer.write(chunk)
        await writer.drain()
        async with asyncio.timeout(20):
            answer = await reader.readuntil(b"\r\n\r\n")
        status_line, _, headers = answer.decode("latin-1").partition("\r\n")
        return int(status_line.split()[1]), headers
    finally:
        writer.close()


async def test_a_declared_length_over_the_limit_is_refused_before_any_body(bus, tmp_path):
    """Content-Length above the limit: 413 at once, without waiting for the body."""
    async with serve_gateway(bus, tmp_path / "t.json", max_message_bytes=2048) as door:
        token = door.auth("lmh-recouvrement")["Authorization"]
        head = [
            b"POST /v1/signals HTTP/1.1",
            b"Host: gateway",
            f"Authorization: {token}".encode(),
            b"Content-Type: application/json",
            b"Content-Length: 50000000",
        ]
        assert (await _raw_post(door.port, head, []))[0] == 413
    assert bus.verdicts == []


async def test_a_chunked_body_is_cut_at_the_limit_while_it_is_read(bus, tmp_path):
    """No Content-Length, a chunked body that goes on past the limit and never ends: 413 once the limit is passed, without waiting for the end."""
    async with serve_gateway(bus, tmp_path / "t.json", max_message_bytes=2048) as door:
        token = door.auth("lmh-recouvrement")["Authorization"]
        head = [
            b"POST /v1/signals HTTP/1.1",
            b"Host: gateway",
            f"Authorization: {token}".encode(),
            b"Content-Type: application/json",
            b"Transfer-Encoding: chunked",
        ]
        chunk = b"x" * 1000
        chunks = [f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" for _ in range(4)]
        status, _ = await _raw_post(door.port, head, chunks)  # no final 0-chunk is sent
        assert status == 413
    assert bus.verdicts == []


async def test_each_partner_is_rate_limited_on_its_own_with_retry_after(bus, tmp_path):
    """Past the per-partner limit: 429 with Retry-After; another partner is not affected."""
    async with serve_gateway(bus, tmp_path / "t.json", gateway_rate_limit="3/minute") as door:
        flooder = door.auth("lmh-recouvrement")
        for _ in range(3):
            assert (await door.post("/v1/signals", json={}, headers=flooder)).status_code == 422
        limited = await door.post("/v1/signals", json=signal(), headers=flooder)
        assert limited.status_code == 429
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        other = door.auth("lmh-proximite")
        assert (await door.post("/v1/signals", json={}, headers=other)).status_code == 422
    assert bus.verdicts == []


async def test_an_urgent_signal_posted_over_http_takes_the_urgent_queue(
    bus, channel, gateway: Door
):
    """Over HTTP as over AMQP, an urgent signal is published with the `.urgent` key (the urgent intake queue) and a routine one with the partner's own key."""
    source = "lmh-recouvrement"
    spies = {}
    for key in (source, f"{source}.urgent"):
        spy = await channel.declare_queue(exclusive=True)
        await spy.bind(bus.topology.signals.name, routing_key=key)
        spies[key] = spy
    urgent, routine = signal(urgency="urgent"), signal(urgency="routine")
    for body in (urgent, routine):
        response = await gateway.post("/v1/signals", json=body, headers=gateway.auth(source))
        assert response.status_code == 202, response.text
    # 202 comes after the broker's confirm, which follows routing: both copies are there.
    took_urgent = await spies[f"{source}.urgent"].get(no_ack=True, fail=False)
    took_routine = await spies[source].get(no_ack=True, fail=False)
    assert (
        took_urgent is not None
        and json.loads(took_urgent.body)["message_id"] == urgent["message_id"]
    )
    assert (
        took_routine is not None
        and json.loads(took_routine.body)["message_id"] == routine["message_id"]
    )
    assert await spies[f"{source}.urgent"].get(no_ack=True, fail=False) is None


async def test_a_message_the_broker_does_not_confirm_is_a_503_never_a_500(bus, channel, tmp_path):
    """A gateway whose intake exchanges are not there (another prefix): the broker does not confirm the publish, and the partner gets 503 "send it again", not a 500 with a traceback."""
    absent = f"{bus.settings.prefix}-absent"
    try:
        async with serve_gateway(bus, tmp_path / "t.json", prefix=absent) as door:
            for _ in range(2):  # the channel the broker closed is not left broken
                response = await door.post(
                    "/v1/signals", json=signal(), headers=door.auth("lmh-recouvrement")
                )
                assert response.status_code == 503, response.text
                assert "send it again" in response.json()["detail"]
    finally:
        await channel.exchange_delete(f"{absent}.signals", if_unused=False)
    assert bus.verdicts == []
