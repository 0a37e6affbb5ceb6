"""Test helpers shipped with partnerbus, for our tests and for partners testing against us.

- `FakeClock`: an injectable clock that moves only when told.
- `Inbox`: reads one queue of a real broker and waits for messages with a timeout
  (never a sleep).
- `wait_until`, `wait_for_status`: wait for a condition that another task or process
  completes (the relay confirming a referral, a consumer recording a status), polling it
  within a timeout instead of assuming it is already done.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue


class FakeClock:
    """Now is whatever the test says; `advance` moves it forward."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 11, 23, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> datetime:
        self.now += delta
        return self.now


@dataclass
class Received:
    """One message as a partner's consumer saw it."""

    body: dict[str, Any]
    headers: dict[str, Any]
    message_id: str | None
    type: str | None
    redelivered: bool
    raw: bytes

    @property
    def kind(self) -> str:
        return str(self.body.get("type", self.type or ""))


@dataclass
class Inbox:
    """Consume a queue into memory; `expect` waits for messages with a timeout."""

    queue: AbstractQueue
    items: asyncio.Queue[Received] = field(default_factory=asyncio.Queue)
    seen: list[Received] = field(default_factory=list)
    _tag: str | None = None

    @classmethod
    async def open(
        cls, channel: aio_pika.abc.AbstractChannel, queue_name: str, *, ack: bool = True
    ) -> Inbox:
        queue = await channel.get_queue(queue_name, ensure=True)
        inbox = cls(queue)

        async def on_message(message: AbstractIncomingMessage) -> None:
            try:
                body = json.loads(message.body)
            except ValueError:
                body = {"_raw": message.body.decode("utf-8", "replace")}
            item = Received(
                body=body if isinstance(body, dict) else {"_value": body},
                headers=dict(message.headers or {}),
                message_id=message.message_id,
                type=message.type,
                redelivered=bool(message.redelivered),
                raw=message.body,
            )
            inbox.seen.append(item)
            await inbox.items.put(item)
            if ack:
                await message.ack()

        inbox._tag = await queue.consume(on_message)
        return inbox

    async def expect(self, count: int = 1, timeout: float = 10.0) -> list[Received]:
        """The next `count` messages; fails with the ones seen if they do not come in time."""
        got: list[Received] = []
        try:
            async with asyncio.timeout(timeout):
                while len(got) < count:
                    got.append(await self.items.get())
        except TimeoutError:
            kinds = [g.kind for g in got]
            msg = f"expected {count} message(s) on {self.queue.name}, got {len(got)}: {kinds}"
            raise AssertionError(msg) from None
        return got

    async def expect_kind(self, kind: str, timeout: float = 10.0, **fields: Any) -> Received:
        """The next message of this type (and with these body fields, when given); others
        seen meanwhile stay in `seen`."""
        async with asyncio.timeout(timeout):
            while True:
                item = await self.items.get()
                if item.kind == kind and all(item.body.get(k) == v for k, v in fields.items()):
                    return item

    def drain(self) -> list[Received]:
        """What arrived and has not been expected yet, without waiting."""
        items = []
        while not self.items.empty():
            items.append(self.items.get_nowait())
        return items

    async def close(self) -> None:
        if self._tag is not None:
            await self.queue.cancel(self._tag)
            self._tag = None


async def wait_until(
    condition: Callable[[], Awaitable[bool] | bool],
    *,
    timeout: float = 30.0,
    poll: float = 0.05,
    what: str = "the condition",
) -> None:
    """Return as soon as `condition()` holds (a plain or an async callable); fail with
    `what` if it still does not after `timeout` seconds. Short polls inside a generous
    timeout: never a bet on how long the other side takes."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                held = condition()
                if not isinstance(held, bool):
                    held = await held
                if held:
                    return
                await asyncio.sleep(poll)
    except TimeoutError:
        msg = f"{what} did not hold within {timeout:.0f}s"
        raise AssertionError(msg) from None


async def wait_for_status(
    store: Any, referral_id: str, *statuses: str, timeout: float = 30.0
) -> str:
    """Wait until the ledger (a `Store`) records one of `statuses` for the referral, and
    return it: the relay and the consumers record states after the messages a test sees."""
    seen: list[str | None] = [None]

    async def reached() -> bool:
        row = await asyncio.to_thread(store.referral, referral_id)
        seen[0] = row.status if row is not None else None
        return seen[0] in statuses

    try:
        await wait_until(reached, timeout=timeout, what=f"referral {referral_id} {statuses}")
    except AssertionError:
        msg = f"referral {referral_id} is {seen[0]!r}, not {' or '.join(statuses)}"
        raise AssertionError(msg + f", after {timeout:.0f}s") from None
    assert seen[0] is not None
    return seen[0]


__all__ = ["FakeClock", "Inbox", "Received", "wait_for_status", "wait_until"]
