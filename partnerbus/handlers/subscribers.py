"""The FastStream subscribers: receive, decide (a use case), record, and let the relay send.

Each is short: the `Intake` does decoding, authentication, dead-lettering and retries; the
queue's `Batcher` records what the queue has prefetched in one transaction (group commit,
each message's use case in its own savepoint) and answers each handler after the commit;
the relay sends what it committed. Urgent and asap signals have their own queue and
consumer, so that they never wait behind a routine backlog.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from faststream import AckPolicy
from faststream.message import StreamMessage
from faststream.rabbit import Channel, RabbitQueue, RabbitRouter
from faststream.rabbit.annotations import RabbitMessage
from pydantic import TypeAdapter

from partnerbus import usecases
from partnerbus.broker.topology import Topology
from partnerbus.handlers.batch import Batcher
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
    """The intake's own database thread(s): never shared with the relay."""
    publish: Publish
    trusted_senders: tuple[str, ...]
    own_user: str
    max_bytes: int
    publish_timeout_s: float = 10.0
    on_verdict: Callable[[str, Verdict], None] = lambda _queue, _verdict: None
    on_held: Held | None = None
    """Told of each dead-letter copy refused (full); the ledger's count when None."""
    batch_size: int = 128
    """Most messages recorded in one transaction (a batch is also at most the prefetch)."""
    batch_wait_s: float = 0.0
    """Extra wait for stragglers before a batch is recorded (0: flush when nothing more
    is ready)."""
    urgent_prefetch: int = 32
    """Prefetch of the urgent signals' consumer, on a channel of its own."""
    batchers: dict[str, Batcher] = field(default_factory=dict)

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

    def batcher(self, queue: RabbitQueue) -> Batcher:
        """The queue's group commit, in the intake's database thread."""
        batcher = Batcher(
            self.ledger.store,
            self.executor,
            max_size=self.batch_size,
            max_wait_s=self.batch_wait_s,
            on_commit=self.then_send,
        )
        self.batchers[queue.name] = batcher
        return batcher

    async def count_held(self, raw: Any, queue: str) -> None:
        """A dead-letter copy refused by a full dead-letter queue: counted in the ledger,
        where every worker's count adds up and the monitor reads it."""

        def work() -> None:
            with self.ledger.store.begin() as tx:
                usecases.count_refused_dead_letter(self.ledger, tx, raw.message_id or "-", queue)

        await asyncio.get_running_loop().run_in_executor(self.executor, work)

    def then_send(self, done: list[bool]) -> None:
        """After a commit: the relay sends what it recorded."""
        if any(done):
            self.relay.kick()


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
        **extra: Any,
    ) -> None:
        intake = w.intake(queue)
        batcher = w.batcher(queue)
        name = queue.name

        async def work(message: Any) -> bool:
            # Acked (by FastStream, when the handler returns) only after the batch that
            # holds this message has committed.
            return await batcher.record(lambda tx: use_case(w.ledger, tx, message, name))

        async def handle(body: bytes, message: RabbitMessage) -> None:
            verdict = await intake.run(message.raw_message, body, adapter, sender_of, work)
            if verdict.outcome == "held":
                # Not acked: RabbitMQ keeps it, dead-lettered, until its dead letters have room.
                await message.reject(requeue=False)
            w.on_verdict(name, verdict)

        handle.__name__ = "on_" + name.removeprefix(t.queue_name("intake.")).replace(".", "_")
        router.subscriber(queue, exchange, **options, **extra)(handle)

    receive = _checked(usecases.receive_signal)
    subscribe(t.signal_queue, t.signals, SIGNAL, lambda s: s.source, receive)
    # Its own channel and prefetch: never behind the routine queue's deliveries. A routine
    # signal published with an urgent key is accepted there (it is only recorded sooner).
    subscribe(
        t.urgent_signal_queue,
        t.signals,
        SIGNAL,
        lambda s: s.source,
        receive,
        channel=Channel(prefetch_count=w.urgent_prefetch),
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
