"""The HTTP gateway served over real HTTP (uvicorn on a free port) in front of the real bus,
with a token file of its own."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from partnerbus.entrypoints.bootstrap import Bus
from partnerbus.entrypoints.gateway import create_gateway, issue_token


@dataclass
class Door:
    """A running gateway: an HTTP client on it, and the tokens issued so far."""

    client: httpx.AsyncClient
    port: int
    tokens_path: Path
    issued: dict[str, str] = field(default_factory=dict)

    def auth(self, partner_id: str) -> dict[str, str]:
        """The partner's bearer header (its token is issued on first use)."""
        if partner_id not in self.issued:
            self.issued[partner_id] = issue_token(self.tokens_path, partner_id)
        return {"Authorization": f"Bearer {self.issued[partner_id]}"}

    async def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.client.post(path, **kwargs)


@asynccontextmanager
async def serve_gateway(bus: Bus, tokens_path: Path, **overrides: Any) -> AsyncIterator[Door]:
    settings = bus.settings.model_copy(
        update={"gateway_tokens_path": tokens_path, "gateway_rate_limit": "1000/minute"} | overrides
    )
    await asyncio.to_thread(tokens_path.touch, mode=0o600)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    server = uvicorn.Server(
        uvicorn.Config(create_gateway(settings, bus.directory), log_level="warning")
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    port = sock.getsockname()[1]
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as client:
            yield Door(client, port, tokens_path)
    finally:
        server.should_exit = True
        await task
        sock.close()


@pytest.fixture(name="gateway")
async def gateway_fixture(bus: Bus, tmp_path: Path) -> AsyncIterator[Door]:
    """A gateway in front of `bus` (import `gateway_fixture`, request `gateway`)."""
    async with serve_gateway(bus, tmp_path / "gateway-tokens.json") as door:
        yield door
