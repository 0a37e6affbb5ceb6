"""The FastStream subscribers: receive, decide (a use case), record, and let the relay send.

Each is short: the `Intake` does decoding, authentication, dead-lettering and retries; the
use case does the work in one transaction; the relay sends what it committed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar

from faststream import AckPolicy
from faststream.message import StreamMessage
from faststream.rabbit import RabbitQueue, RabbitRouter
from faststream.rabbit.annotations import RabbitMessage
from pydantic import TypeAdapter

from partnerbus import usecases
from partnerbus.broker.topology import Topology
from partnerbus.handlers.delivery import Held, Intake, Publish, Verdict
from partnerbus.handlers.outbox import Relay
from partnerbus.ledger.store import LedgerTx
from partnerbus.schemas import (
    CapacityChanged,
    ConsentGranted,
    ConsentRefused,
    ConsentRevoked,
    ReferralStatusChanged,
    Signal,
)
from partnerbus.schemas.messages import ConsentMessage, StatusMessage
from partnerbus.usecases import Ledger

T = TypeVar("T")

SIGNAL = TypeAdapter(Signal)
STATUS: TypeAdapter[Any] = TypeAdapter(StatusMessage)
CONSENT: TypeAdapter[Any] = TypeAdapter(ConsentMessage)
CAPACITY = TypeAdapter(CapacityChanged)


async def raw_body(message: StreamMessage[Any]) -> bytes:
    """Keep the body as bytes: validation is ours, so a bad message gets a clear reason."""
    return message.body


@dataclass
class Wiring:
    ledger: Ledger
    topology: Topology
    relay: Relay
    executor: Executor
    publish: Publish
    trusted_senders: tuple[str, ...]
    own_user: str
    max_bytes: int
    publish_timeout_s: float = 10.0
    on_verdict: Callable[[str, Verdict], None] = lambda _queue, _verdict: None
    on_held: Held | None = None
    """Told of each dead-letter copy refused (full); the ledger's count when None."""

    def intake(self, queue: RabbitQueue) -> Intake:
        return Intake(
            queue=queue.name,
            topology=self.topology,
            directory=self.ledger.directory,
            publish=self.publish,
            trusted_senders=self.trusted_senders,
            max_bytes=self.max_bytes,
            own_user=self.own_user,
            publish_timeout_s=self.publish_timeout_s,
            on_held=self.on_held or self.count_held,
            clock=self.ledger.clock,
        )

    async def in_transaction(self, use_case: Callable[..., bool], message: Any, queue: str) -> bool:
        """Run the use case in one transaction, re-run whole when it met a concurrent change
        (a compare-and-set that found another status, a deadlock, a serialization failure)."""

        def work() -> bool:
            return self.ledger.store.run(lambda tx: use_case(self.ledger, tx, message, queue))

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, work)

    async def count_held(self, raw: Any, queue: str) -> None:
        """A dead-letter copy refused by a full dead-letter queue: counted in the ledger,
        where every worker's count adds up and the monitor reads it."""

        def work() -> None:
            with self.ledger.store.begin() as tx:
                usecases.count_refused_dead_letter(self.ledger, tx, raw.message_id or "-", queue)

        await asyncio.get_running_loop().run_in_executor(self.executor, work)

    def then_send(self, done: bool) -> bool:
        if done:
            self.relay.kick()
        return done


def _status_use_case(ledger: Ledger, tx: LedgerTx, message: Any, queue: str) -> bool:
    if isinstance(message, CapacityChanged):
        return usecases.record_capacity(ledger, tx, message, queue)
    return usecases.record_status(ledger, tx, message, queue)


def _consent_use_case(ledger: Ledger, tx: LedgerTx, message: Any, queue: str) -> bool:
    if isinstance(message, ConsentGranted):
        return usecases.grant_consent(ledger, tx, message, queue)
    if isinstance(message, ConsentRevoked):
        return usecases.revoke_consent(ledger, tx, message, queue)
    assert isinstance(message, ConsentRefused)
    return usecases.refuse_consent(ledger, tx, message, queue)


def _status_sender(message: ReferralStatusChanged | CapacityChanged) -> str:
    return message.partner


def build_router(w: Wiring) -> RabbitRouter:
    router = RabbitRouter()
    t = w.topology
    options: dict[str, Any] = {"ack_policy": AckPolicy.NACK_ON_ERROR, "decoder": raw_body}

    def subscribe(
        queue: RabbitQueue,
        exchange: Any,
        adapter: TypeAdapter[Any],
        sender_of: Callable[[Any], str],
        use_case: Callable[..., bool],
    ) -> None:
        intake = w.intake(queue)

        async def work(message: Any) -> bool:
            return w.then_send(await w.in_transaction(use_case, message, queue.name))

        async def handle(body: bytes, message: RabbitMessage) -> None:
            verdict = await intake.run(message.raw_message, body, adapter, sender_of, work)
            if verdict.outcome == "held":
                # Not acked: RabbitMQ keeps it, dead-lettered, until its dead letters have room.
                await message.reject(requeue=False)
            w.on_verdict(queue.name, verdict)

        handle.__name__ = f"on_{queue.name.rsplit('.', 1)[-1]}"
        router.subscriber(queue, exchange, **options)(handle)

    subscribe(
        t.signal_queue, t.signals, SIGNAL, lambda s: s.source, _checked(usecases.receive_signal)
    )
    subscribe(t.status_queue, t.statuses, STATUS, _status_sender, _status_use_case)
    subscribe(t.consent_queue, t.consents, CONSENT, lambda c: c.agency, _consent_use_case)
    return router


def _checked(use_case: Callable[..., bool]) -> Callable[..., bool]:
    """Signals are checked against the directory before anything is recorded."""

    def run(ledger: Ledger, tx: LedgerTx, signal: Signal, queue: str) -> bool:
        usecases.check_signal(ledger, signal)
        return use_case(ledger, tx, signal, queue)

    return run
