"""The broker topology as data: every exchange, queue and routing key, named in one place.

Work queues are quorum queues with an explicit delivery limit and a dead-letter route to
`<queue>.dlq`, so a poison message ends there with RabbitMQ's `x-death` record instead of
looping. Messages that we refuse ourselves (bad JSON, spoofed source) are published to the
same dead-letter queue with the reason in a header, and the original is acked.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from faststream.rabbit import ExchangeType, QueueType, RabbitExchange, RabbitQueue

if TYPE_CHECKING:
    from faststream.rabbit.schemas.queue import QuorumQueueArgs

# Header names we add; the `x-` prefix is RabbitMQ's own and is avoided.
ERROR_HEADER = "partnerbus-error"
ERROR_QUEUE_HEADER = "partnerbus-error-queue"
ATTEMPT_HEADER = "partnerbus-attempt"
LAST_ERROR_HEADER = "partnerbus-last-error"
ORIGINAL_USER_HEADER = "partnerbus-original-user"
ORIGINAL_EXCHANGE_HEADER = "partnerbus-original-exchange"
ORIGINAL_KEY_HEADER = "partnerbus-original-routing-key"
REFUSAL_HEADER = "partnerbus-refusal"
"""On the bus's dead-letter copy of a message refused for authentication: `authentication`.
Such a dead letter is never replayed (its sender is unknown or not who it claims)."""
AUTHENTICATION = "authentication"
URGENT_SUFFIX = ".urgent"
"""Routing key suffix of an urgent or asap signal: `<partner id>.urgent`."""
URGENT_LEVELS = frozenset({"urgent", "asap"})


@dataclass(frozen=True)
class Topology:
    """Names and declarations derived from a prefix; pure, nothing connects."""

    prefix: str
    delivery_limit: int = 5
    retry_delays_ms: tuple[int, ...] = (1_000, 5_000, 30_000)
    dead_letter_max_messages: int | None = 10_000
    dead_letter_max_bytes: int | None = 256 * 1024 * 1024
    retry_max_messages: int | None = 10_000
    retry_max_bytes: int | None = 64 * 1024 * 1024
    """Bounds of each dead-letter and delay queue (None: unbounded). Past them RabbitMQ
    refuses the publish (`reject-publish`): nothing is dropped, the publisher is told."""

    # exchanges -----------------------------------------------------------------------
    def exchange_name(self, role: str) -> str:
        return f"{self.prefix}.{role}"

    @property
    def signals(self) -> RabbitExchange:
        """Partners publish `Signal`s here: routing key their partner id, or
        `<partner id>.urgent` for an urgent or asap signal (`URGENT_SUFFIX`)."""
        return RabbitExchange(self.exchange_name("signals"), type=ExchangeType.TOPIC, durable=True)

    @property
    def statuses(self) -> RabbitExchange:
        """Partners publish `ReferralStatusChanged` and `CapacityChanged` here."""
        return RabbitExchange(self.exchange_name("statuses"), type=ExchangeType.TOPIC, durable=True)

    @property
    def consents(self) -> RabbitExchange:
        """Advisors' systems (and `partnerbus consent`) publish consent events here."""
        return RabbitExchange(self.exchange_name("consents"), type=ExchangeType.TOPIC, durable=True)

    @property
    def deliveries(self) -> RabbitExchange:
        """The bus publishes to partners here; routing key: the partner id."""
        return RabbitExchange(
            self.exchange_name("deliveries"), type=ExchangeType.DIRECT, durable=True
        )

    @property
    def dead_letters(self) -> RabbitExchange:
        """Dead-letter exchange; routing key: the work queue the message died in."""
        return RabbitExchange(self.exchange_name("dlx"), type=ExchangeType.DIRECT, durable=True)

    @property
    def retries(self) -> RabbitExchange:
        """Retry exchange; routing key `<queue>.retry.<n>` puts a message in a delay queue."""
        return RabbitExchange(self.exchange_name("retry"), type=ExchangeType.DIRECT, durable=True)

    def exchanges(self) -> tuple[RabbitExchange, ...]:
        return (
            self.signals,
            self.statuses,
            self.consents,
            self.deliveries,
            self.dead_letters,
            self.retries,
        )

    # queues --------------------------------------------------------------------------
    def queue_name(self, role: str) -> str:
        return f"{self.prefix}.{role}"

    def partner_queue_name(self, partner_id: str) -> str:
        return f"{self.prefix}.partner.{partner_id}"

    def partner_of(self, queue_name: str) -> str | None:
        """The partner whose queue this is, or None for any other queue."""
        head = self.partner_queue_name("")
        rest = queue_name[len(head) :] if queue_name.startswith(head) else ""
        return rest if rest and "." not in rest else None

    @staticmethod
    def dlq_name(queue_name: str) -> str:
        return f"{queue_name}.dlq"

    @staticmethod
    def retry_queue_name(queue_name: str, step: int) -> str:
        return f"{queue_name}.retry.{step}"

    def work_queue(self, name: str, routing_key: str = "#") -> RabbitQueue:
        """A quorum queue with a delivery limit and its dead-letter route."""
        return RabbitQueue(
            name,
            queue_type=QueueType.QUORUM,
            durable=True,
            routing_key=routing_key,
            arguments=cast("QuorumQueueArgs", self.work_queue_arguments(name)),
        )

    def work_queue_arguments(self, name: str) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": self.delivery_limit,
            "x-dead-letter-exchange": self.dead_letters.name,
            "x-dead-letter-routing-key": name,
            # At-least-once dead-lettering: the dead letter is confirmed by the DLQ before
            # the source queue forgets it (needs overflow=reject-publish, RabbitMQ ≥ 3.10).
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }

    @property
    def signal_queue(self) -> RabbitQueue:
        """Routine signals: routing key a bare partner id (`*`: one word, no suffix)."""
        return self.work_queue(self.queue_name("intake.signals"), routing_key="*")

    @property
    def urgent_signal_queue(self) -> RabbitQueue:
        """Urgent and asap signals (`<partner>.urgent`): their own queue and consumer, so
        that one is never behind a routine backlog (RabbitMQ 3.10's quorum queues have
        no priorities)."""
        return self.work_queue(
            self.queue_name("intake.signals.urgent"), routing_key="*" + URGENT_SUFFIX
        )

    @staticmethod
    def signal_routing_key(partner_id: str, urgency: str) -> str:
        """The key a partner publishes a signal with: urgent and asap ones go first."""
        return partner_id + URGENT_SUFFIX if urgency in URGENT_LEVELS else partner_id

    @property
    def status_queue(self) -> RabbitQueue:
        return self.work_queue(self.queue_name("intake.statuses"))

    @property
    def consent_queue(self) -> RabbitQueue:
        return self.work_queue(self.queue_name("intake.consents"))

    def intake_queues(self) -> tuple[tuple[RabbitQueue, RabbitExchange], ...]:
        return (
            (self.signal_queue, self.signals),
            (self.urgent_signal_queue, self.signals),
            (self.status_queue, self.statuses),
            (self.consent_queue, self.consents),
        )

    def partner_queue(self, partner_id: str) -> RabbitQueue:
        return self.work_queue(self.partner_queue_name(partner_id), routing_key=partner_id)

    @staticmethod
    def _bounds(max_messages: int | None, max_bytes: int | None) -> dict[str, Any]:
        """A length limit that refuses the publish when reached: the publisher gets a nack
        (the bus's own copies), or RabbitMQ keeps the message in its source quorum queue
        and tries again later (at-least-once dead-lettering). Never `drop-head`."""
        bounds: dict[str, Any] = {"x-overflow": "reject-publish"}
        if max_messages is not None:
            bounds["x-max-length"] = max_messages
        if max_bytes is not None:
            bounds["x-max-length-bytes"] = max_bytes
        return bounds

    def dead_letter_queue_arguments(self) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            **self._bounds(self.dead_letter_max_messages, self.dead_letter_max_bytes),
        }

    def dead_letter_queue(self, queue_name: str) -> RabbitQueue:
        # Classic-or-quorum does not matter for reading; quorum keeps it replicated.
        return RabbitQueue(
            self.dlq_name(queue_name),
            queue_type=QueueType.QUORUM,
            durable=True,
            routing_key=queue_name,
            arguments=cast("QuorumQueueArgs", self.dead_letter_queue_arguments()),
        )

    def retry_queue(self, queue_name: str, step: int) -> RabbitQueue:
        """A delay queue: no consumer; on TTL expiry its messages go back to the work queue
        through the default exchange. The TTL is per queue, not per message, because
        RabbitMQ only expires messages at the head of a queue."""
        delay = self.retry_delays_ms[step]
        return RabbitQueue(
            self.retry_queue_name(queue_name, step),
            queue_type=QueueType.QUORUM,
            durable=True,
            routing_key=self.retry_queue_name(queue_name, step),
            arguments=cast(
                "QuorumQueueArgs",
                {
                    "x-queue-type": "quorum",
                    "x-message-ttl": delay,
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": queue_name,
                    "x-dead-letter-strategy": "at-least-once",
                    **self._bounds(self.retry_max_messages, self.retry_max_bytes),
                },
            ),
        )

    def all_work_queue_names(self, partner_ids: Iterable[str]) -> list[str]:
        return [q.name for q, _ in self.intake_queues()] + [
            self.partner_queue_name(p) for p in partner_ids
        ]
