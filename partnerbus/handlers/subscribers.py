"""The FastStream subscribers: one short typed handler per intake queue, its intake as
middleware.

`IntakeMiddleware` (one per queue's router) does decoding, size, authentication,
dead-lettering and retries (`Intake.run`); the handler gets the validated message as its
typed argument (`Signal`, a status or a consent: FastStream's AsyncAPI document is built
from these signatures) and records it through the queue's `Batcher` (group commit, each
message's use case in its own savepoint, answered after the commit; FastStream acks then).
The relay sends what was committed. Urgent and asap signals have their own queue and
consumer, so that they never wait behind a routine backlog.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from faststream import AckPolicy, BaseMiddleware
from faststream.message import StreamMessage
from faststream.rabbit import Channel, RabbitQueue, RabbitRouter
from pydantic import TypeAdapter

from partnerbus import usecases
from partnerbus.broker.topology import Topology
from partnerbus.errors import Refused
from partnerbus.handlers.batch import Batcher
from partnerbus.handlers.delivery import Held, Intake, Publish, Verdict
from partnerbus.handlers.outbox import Relay
from partnerbus.ledger.store import LedgerTx
from partnerbus.schemas import (
    CapacityChanged,
    ConsentGranted,
    ConsentRefused,
    ConsentRevoked,
    NeedDirected,
    NeedReopened,
    OrientationRecorded,
    ReferralCancelled,
    ReferralStatusChanged,
    ReferralTransferred,
    Signal,
)
from partnerbus.schemas.messages import ConsentMessage, StatusMessage
from partnerbus.usecases import Ledger

SIGNAL = TypeAdapter(Signal)
STATUS: TypeAdapter[Any] = TypeAdapter(StatusMessage)
CONSENT: TypeAdapter[Any] = TypeAdapter(ConsentMessage)
CAPACITY = TypeAdapter(CapacityChanged)
CONSENT_EVENTS = (ConsentGranted, ConsentRevoked, ConsentRefused)


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
    batch_budget_s: float = 0.0
    """Time a batch's transaction should take, about (`Sizer`); 0: always `batch_size`."""
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
            budget_s=self.batch_budget_s,
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
    if isinstance(message, ReferralCancelled):
        return usecases.cancel_referral(ledger, tx, message, queue)
    if isinstance(message, NeedDirected):
        return usecases.direct_need(ledger, tx, message, queue)
    if isinstance(message, ReferralTransferred):
        return usecases.transfer_referral(ledger, tx, message, queue)
    if isinstance(message, NeedReopened):
        return usecases.reopen_need(ledger, tx, message, queue)
    if isinstance(message, OrientationRecorded):
        return usecases.record_orientation(ledger, tx, message, queue)
    assert isinstance(message, ConsentRefused)
    return usecases.refuse_consent(ledger, tx, message, queue)


def _status_sender(message: ReferralStatusChanged | CapacityChanged) -> str:
    return message.partner


_VALIDATED: ContextVar[Any] = ContextVar("partnerbus_validated")
"""The message the intake middleware validated, handed to FastStream's decoder so that the
handler's typed argument is that object (the body is parsed and validated once)."""

_SENDER: ContextVar[str | None] = ContextVar("partnerbus_sender", default=None)
"""The AMQP user that sent the delivery being handled, as the intake vouches for it."""


async def validated_body(message: StreamMessage[Any]) -> Any:
    """The subscribers' decoder: what `IntakeMiddleware` validated for this delivery."""
    return _VALIDATED.get()


@dataclass(frozen=True)
class Door:
    """What the intake middleware needs to know of one queue."""

    queue: str
    intake: Intake
    adapter: TypeAdapter[Any]
    sender_of: Callable[[Any], str]
    on_verdict: Callable[[str, Verdict], None]


class IntakeMiddleware(BaseMiddleware):
    """Around a queue's handler: size and JSON checks, schema validation, sender
    authentication, dead-lettering with a reason and delayed retries (`Intake.run`). The
    handler runs only for a message that passed them, with that message as its typed
    argument; what it raises is judged by the intake (a refusal is dead-lettered, a
    database outage retried)."""

    def __init__(self, msg: Any, /, *, context: Any, door: Door) -> None:
        super().__init__(msg, context=context)
        self.door = door

    async def consume_scope(self, call_next: Any, msg: StreamMessage[Any]) -> Any:
        door = self.door

        async def handler(message: Any) -> bool:
            token = _VALIDATED.set(message)
            sender = _SENDER.set(door.intake.vouched_sender(msg.raw_message))
            try:
                return bool(await call_next(msg))
            finally:
                _SENDER.reset(sender)
                _VALIDATED.reset(token)

        raw = msg.raw_message
        verdict = await door.intake.run(raw, msg.body, door.adapter, door.sender_of, handler)
        if verdict.outcome == "held":
            # Not acked: RabbitMQ keeps it, dead-lettered, until its dead letters have room.
            await msg.reject()
        door.on_verdict(door.queue, verdict)
        return None


def build_router(w: Wiring) -> RabbitRouter:
    """One router per intake queue, its intake as middleware, one typed handler each: the
    handler records its message through the queue's group commit and returns whether it
    did something (acked by FastStream after that commit)."""
    t = w.topology
    options: dict[str, Any] = {"ack_policy": AckPolicy.NACK_ON_ERROR, "decoder": validated_body}
    routers: list[RabbitRouter] = []

    def door(
        queue: RabbitQueue, adapter: TypeAdapter[Any], sender_of: Callable[[Any], str]
    ) -> RabbitRouter:
        entry = Door(queue.name, w.intake(queue), adapter, sender_of, w.on_verdict)
        routers.append(RabbitRouter(middlewares=[partial(IntakeMiddleware, door=entry)]))
        return routers[-1]

    def recorder(
        queue: RabbitQueue, use_case: Callable[..., bool]
    ) -> Callable[[Any], Awaitable[bool]]:
        batcher, name = w.batcher(queue), queue.name

        def record(message: Any) -> Awaitable[bool]:
            return batcher.record(lambda tx: use_case(w.ledger, tx, message, name))

        return record

    receive = _checked(usecases.receive_signal)
    routine = recorder(t.signal_queue, receive)
    urgent = recorder(t.urgent_signal_queue, receive)
    statuses = recorder(t.status_queue, _status_use_case)
    answering = ConsentRecorder(w.ledger, w.batcher(t.consent_queue), t.consent_queue.name)

    def consents(message: Any) -> Awaitable[bool]:
        return answering.record(message, _SENDER.get())

    @door(t.signal_queue, SIGNAL, _signal_sender).subscriber(t.signal_queue, t.signals, **options)
    async def on_signal(signal: Signal) -> bool:
        """A partner's signal: checked against the directory, routed, recorded."""
        return await routine(signal)

    # Its own channel and prefetch: never behind the routine queue's deliveries. A routine
    # signal published with an urgent key is accepted there (it is only recorded sooner).
    @door(t.urgent_signal_queue, SIGNAL, _signal_sender).subscriber(
        t.urgent_signal_queue,
        t.signals,
        channel=Channel(prefetch_count=w.urgent_prefetch),
        **options,
    )
    async def on_urgent_signal(signal: Signal) -> bool:
        """An urgent or asap signal, on the urgent queue."""
        return await urgent(signal)

    @door(t.status_queue, STATUS, _status_sender).subscriber(t.status_queue, t.statuses, **options)
    async def on_status(status: StatusMessage) -> bool:
        """A partner's answer on a referral, or its capacity."""
        return await statuses(status)

    @door(t.consent_queue, CONSENT, _consent_sender).subscriber(
        t.consent_queue, t.consents, **options
    )
    async def on_consent(consent: ConsentMessage) -> bool:
        """An agency's consent (granted, refused or revoked) or an advisor's decision
        (a referral cancelled or transferred, a need sent to the partner she chose or
        reopened, an orientation made outside the bus)."""
        return await consents(consent)

    # Included once their subscribers are declared: one router per queue, its own intake.
    root = RabbitRouter()
    for router in routers:
        root.include_router(router)
    return root


def _signal_sender(signal: Signal) -> str:
    return signal.source


def _consent_sender(
    consent: ConsentGranted
    | ConsentRefused
    | ConsentRevoked
    | ReferralCancelled
    | NeedDirected
    | ReferralTransferred
    | NeedReopened
    | OrientationRecorded,
) -> str:
    return consent.agency


@dataclass(frozen=True)
class ConsentRecorder:
    """The consents' recorder: an event the use case refuses is answered to its agency
    when the agency itself sent it (its own AMQP user, directly or through the gateway), in
    the batch's transaction, the event's own changes rolled back alone (a savepoint); the
    refusal is raised once that has committed, so that the intake dead-letters it as
    before. An event a trusted sender (the bus's CLI) sent in an agency's name is not
    answered to that agency: nothing goes to a partner on the strength of a claim the
    partner did not make itself."""

    ledger: Ledger
    batcher: Batcher
    queue: str

    async def record(self, message: Any, sender: str | None) -> bool:
        """Record `message` (a consent event) sent by the AMQP user `sender`, as the intake
        vouches for it; raises the use case's refusal after the answer is committed."""
        ledger, queue = self.ledger, self.queue
        # Consent events are answered (`ConsentRejected`); a refused decision is only
        # dead-lettered with its reason.
        answer = isinstance(message, CONSENT_EVENTS) and _sent_by_agency(ledger, message, sender)
        refused: list[Refused] = []

        def work(tx: LedgerTx) -> bool:
            refused.clear()  # the batch may run again (a conflict)
            try:
                with tx.savepoint():
                    return _consent_use_case(ledger, tx, message, queue)
            except Refused as refusal:
                if not answer:
                    raise
                refused.append(refusal)
                return usecases.answer_refusal(ledger, tx, message, str(refusal))

        done = await self.batcher.record(work)
        if refused:
            raise refused[0]
        return done


def _sent_by_agency(ledger: Ledger, consent: Any, sender: str | None) -> bool:
    """Whether the AMQP user that sent this consent event is its agency's own."""
    if sender is None or consent.agency not in ledger.directory:
        return False
    return sender == ledger.directory.partner(consent.agency).username


def _checked(use_case: Callable[..., bool]) -> Callable[..., bool]:
    """Signals are checked against the directory before anything is recorded."""

    def run(ledger: Ledger, tx: LedgerTx, signal: Signal, queue: str) -> bool:
        usecases.check_signal(ledger, signal)
        return use_case(ledger, tx, signal, queue)

    return run
