"""The relay's own confirming channel, on the bus's connection, which it can renew.

Why a channel of its own rather than the broker's default one:

- RabbitMQ 3.10 keeps, in each channel, a client state per quorum queue it publishes to.
  When a channel first publishes to a queue whose leader's node has just died, that state
  can be built on the dead leader and stay there: every publish to that queue is nacked
  at once, for as long as the channel lives, although the queue has a new leader and a
  fresh channel's publishes are confirmed (seen in `tests/faults/test_cluster_node_kill.py`).
  The relay renews its channel (`renew`) after a window that the broker refused whole;
  the broker's default channel also carries the intake's consumers, which a renewal would
  interrupt.
- The relay's confirms do not queue behind the intake's traffic on one channel.

The message is built as FastStream builds it (persistent when asked, a correlation id, a
timestamp), so that partners see no difference. Hand-written because FastStream publishes
only through its cached channels and has no way to replace one.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import uuid
from collections.abc import Callable
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
from faststream.rabbit import RabbitExchange

from partnerbus.errors import PartnerbusError


class NotConnectedError(PartnerbusError, ConnectionError):
    """The bus has no connection to the broker yet (or any more)."""


class RelayChannel:
    """A publisher-confirms channel opened lazily on `connection()`'s connection."""

    def __init__(self, connection: Callable[[], AbstractConnection | None]) -> None:
        self._connection = connection
        self._channel: AbstractChannel | None = None
        self._on: AbstractConnection | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._lock = asyncio.Lock()

    async def _open(self) -> AbstractChannel:
        connection = self._connection()
        if connection is None or connection.is_closed:
            raise NotConnectedError("the bus is not connected to the broker")
        channel = self._channel
        if channel is not None and self._on is connection and not channel.is_closed:
            return channel
        async with self._lock:
            if self._channel is None or self._on is not connection or self._channel.is_closed:
                self._exchanges.clear()
                self._channel = await connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
                self._on = connection
            return self._channel

    async def _exchange(self, name: str) -> AbstractExchange:
        channel = await self._open()
        exchange = self._exchanges.get(name)
        if exchange is None:
            exchange = await channel.get_exchange(name, ensure=False)
            self._exchanges[name] = exchange
        return exchange

    async def publish(
        self,
        body: bytes,
        *,
        exchange: RabbitExchange,
        routing_key: str,
        persist: bool = False,
        mandatory: bool = True,
        message_id: str | None = None,
        message_type: str | None = None,
        content_type: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Publish and wait for the broker's confirm; raises `DeliveryError` on a nack or a
        return (unroutable), `TimeoutError` when no confirm came in `timeout` seconds."""
        target = await self._exchange(exchange.name)
        message = aio_pika.Message(
            body,
            delivery_mode=(
                aio_pika.DeliveryMode.PERSISTENT
                if persist
                else aio_pika.DeliveryMode.NOT_PERSISTENT
            ),
            message_id=message_id,
            type=message_type,
            content_type=content_type,
            correlation_id=str(uuid.uuid4()),
            timestamp=datetime.datetime.now(tz=datetime.UTC),
        )
        return await target.publish(
            message, routing_key=routing_key, mandatory=mandatory, timeout=timeout
        )

    async def renew(self) -> None:
        """Close this channel; the next publish opens a new one (fresh per-queue state on
        the broker's side). Call it when nothing is in flight on it."""
        async with self._lock:
            channel, self._channel = self._channel, None
            self._exchanges.clear()
        if channel is not None and not channel.is_closed:
            # already broken, maybe: a new one is opened anyway
            with contextlib.suppress(Exception):
                await channel.close()

    async def close(self) -> None:
        async with self._lock:
            channel, self._channel = self._channel, None
            self._exchanges.clear()
        if channel is not None and not channel.is_closed:
            await channel.close()
