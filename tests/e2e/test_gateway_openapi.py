"""The gateway's OpenAPI document, served by the running gateway and committed in
docs/gateway-openapi.json, and the gateway checked against it by schemathesis: real HTTP,
the real broker and bus behind it, a real partner token."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import hypothesis
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from partnerbus.directory import load_sample
from partnerbus.directory.rights import is_pivot
from partnerbus.entrypoints.bootstrap import create_app
from partnerbus.entrypoints.gateway import openapi_document
from partnerbus.settings import Settings

from .gateway_fixtures import Door, serve_gateway

pytestmark = pytest.mark.rabbitmq
DOCUMENT = Path(__file__).parents[2] / "docs" / "gateway-openapi.json"
PARTNER = next(p.id for p in load_sample().partners() if is_pivot(p))
"""Posts as this partner, a pivot (it may post on every route); every route's claimed sender
is set to it, so that valid bodies go past the sender check to the broker (the forged-sender
403 has its own tests)."""
CLAIMED = {"/v1/signals": "source", "/v1/statuses": "partner", "/v1/consents": "agency"}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    # and: a body the document refuses is refused, the token is not ignored (schemathesis
    # sends the request again without it), an undocumented method is a 405.
    negative_data_rejection,
    ignored_auth,
    unsupported_method,
]


@pytest.fixture
def live_gateway(settings: Settings, tmp_path: Path) -> Iterator[Door]:
    """The bus and its gateway on an event loop of their own, in a thread: schemathesis
    calls them synchronously from the test, so the loop must go on running meanwhile."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="gateway-loop", daemon=True)
    thread.start()
    stack = AsyncExitStack()

    async def start() -> Door:
        bus = create_app(settings)
        await bus.start()
        stack.push_async_callback(bus.teardown)
        stack.push_async_callback(bus.stop)
        # The rate limit is not under test here (it has its own test): high enough for every case.
        return await stack.enter_async_context(
            serve_gateway(bus, tmp_path / "tokens.json", gateway_rate_limit="100000/minute")
        )

    started = asyncio.run_coroutine_threadsafe(start(), loop)
    try:
        yield started.result(timeout=60)
    finally:
        started.cancel()
        asyncio.run_coroutine_threadsafe(stack.aclose(), loop).result(timeout=60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


# The committed document drives the run (a schema fixture, `schemathesis.pytest.from_fixture`,
# fails under pytest 9 in schemathesis 4.32); the last test checks that the running gateway
# serves exactly this document.
schema = schemathesis.openapi.from_dict(json.loads(DOCUMENT.read_text(encoding="utf-8")))


@schema.parametrize()
@hypothesis.settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    # One bus and gateway per operation, for all its examples (function scope is meant).
    suppress_health_check=[
        hypothesis.HealthCheck.function_scoped_fixture,
        hypothesis.HealthCheck.too_slow,
        hypothesis.HealthCheck.filter_too_much,
    ],
)
def test_every_answer_of_the_running_gateway_is_as_documented(case, live_gateway: Door):
    """For requests generated from the document (valid and invalid bodies, other methods), with a valid token: never a 5xx; every status, content type, header and body is one the document gives for that route; invalid bodies refused; the token not ignored."""
    # A valid body claims the token's partner (else it is a 403); an invalid one is left as
    # generated, so that what made it invalid (the sender, perhaps) stays.
    if isinstance(case.body, dict) and (case.meta is None or case.meta.generation.mode.is_positive):
        case.body[CLAIMED[case.operation.path]] = PARTNER
    case.call_and_validate(
        base_url=f"http://127.0.0.1:{live_gateway.port}",
        headers=live_gateway.auth(PARTNER),
        checks=CHECKS,
    )


def test_the_committed_document_is_the_one_the_gateway_serves(live_gateway: Door):
    """docs/gateway-openapi.json is what `partnerbus gateway openapi` prints and what the running gateway serves; the interactive pages (CDN scripts) are not served."""
    assert DOCUMENT.read_text(encoding="utf-8") == openapi_document(), (
        "regenerate it: partnerbus gateway openapi > docs/gateway-openapi.json"
    )
    base = f"http://127.0.0.1:{live_gateway.port}"
    with httpx.Client(base_url=base, timeout=20) as client:
        served = client.get("/openapi.json")
        assert served.status_code == 200
        assert served.json() == json.loads(DOCUMENT.read_text(encoding="utf-8"))
        assert client.get("/docs").status_code == 404
        assert client.get("/redoc").status_code == 404
