"""A partner of partnerbus written with `pika` alone, from the message contracts.

Nothing here comes from partnerbus: JSON bodies by hand, plain AMQP. The wire facts:

- connect as the partner's own RabbitMQ user; set `user_id` to that user on every
  publish (RabbitMQ closes the channel if it is anyone else);
- signals go to `<prefix>.signals` with routing key the partner id (`<id>.urgent` when
  urgent or asap); statuses to `<prefix>.statuses` with routing key the partner id;
- messages are persistent JSON with a unique `message_id`; publisher confirms tell that
  the broker has them (a nack or an unroutable message raises);
- the partner reads only its queue `<prefix>.partner.<id>`; each body says its `type`.

Run: PARTNER_AMQP_URL=amqp://pb-ccas-roubaix:SECRET@localhost:5672/ PARTNER_ID=ccas-roubaix
python examples/pika_partner.py
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties

URGENT = ("urgent", "asap")


def envelope(kind: str) -> dict[str, Any]:
    """What every message carries: its type, a unique id, when it happened."""
    return {
        "type": kind,
        "message_id": str(uuid.uuid4()),
        "occurred_at": datetime.now(UTC).isoformat(),
        "schema_version": 2,
    }


class Partner:
    """One partner's side of the bus, on one blocking connection (one thread)."""

    def __init__(
        self, url: str, partner_id: str, *, prefix: str = "partnerbus", complete: bool = True
    ) -> None:
        self.user = unquote(urlsplit(url).username or "")
        self.partner_id = partner_id
        self.prefix = prefix
        self.complete = complete  # False: accept, and hold the referral while working on it
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()  # publishes now wait for the broker's confirm
        self.channel.basic_qos(prefetch_count=10)
        self.held: dict[str, dict[str, Any]] = {}  # referral id -> referral being worked on
        self.sent: list[dict[str, Any]] = []
        self.received: list[dict[str, Any]] = []

    def publish(self, exchange: str, routing_key: str, body: dict[str, Any]) -> None:
        self.channel.basic_publish(
            exchange=f"{self.prefix}.{exchange}",
            routing_key=routing_key,
            body=json.dumps(body).encode(),
            properties=BasicProperties(
                content_type="application/json",
                delivery_mode=pika.DeliveryMode.Persistent,
                message_id=body["message_id"],
                type=body["type"],
                user_id=self.user,  # the broker vouches for it: the bus trusts it
            ),
            mandatory=True,  # no queue bound: raised, not silently dropped
        )
        self.sent.append(body)

    def signal(
        self, person_ref: str, commune: str, needs: list[str], urgency: str = "routine"
    ) -> dict[str, Any]:
        """Raise a signal about a person (our own pseudonymous reference of them)."""
        body = envelope("signal") | {
            "source": self.partner_id,
            "person_ref": person_ref,
            "commune": commune,
            "needs": needs,
            "urgency": urgency,
        }
        urgent = urgency in URGENT
        self.publish("signals", self.partner_id + (".urgent" if urgent else ""), body)
        return body

    def status(self, referral_id: str, status: str, **extra: Any) -> None:
        body = envelope("referral-status-changed") | {
            "referral_id": referral_id,
            "partner": self.partner_id,
            "status": status,
            **extra,
        }
        self.publish("statuses", self.partner_id, body)

    def take(self, referral: dict[str, Any]) -> None:
        """Accept the referral; complete it at once unless told to hold it."""
        referral_id = referral["referral_id"]
        self.held[referral_id] = referral
        self.status(referral_id, "accepted")
        if self.complete:
            outcome = f"{referral['need']}: met the person, a plan is agreed"
            self.status(referral_id, "completed", outcome=outcome)
            del self.held[referral_id]

    def on_message(
        self, channel: BlockingChannel, method: Basic.Deliver, _: BasicProperties, raw: bytes
    ) -> None:
        try:
            body = json.loads(raw)
            kind = body["type"]
            if kind == "referral":
                self.take(body)
            elif kind == "referral-withdrawn":
                self.held.pop(body["referral_id"], None)  # consent gone: drop the data
        except (ValueError, TypeError, KeyError):
            # Not a message we understand: to the queue's dead-letter queue, kept visible.
            channel.basic_nack(method.delivery_tag, requeue=False)
            return
        self.received.append(body)  # statuses forwarded to us, reminders... are noted
        channel.basic_ack(method.delivery_tag)  # only once handled: else it comes again

    def serve(self) -> None:
        """Consume our queue until `stop` (or Ctrl-C)."""
        queue = f"{self.prefix}.partner.{self.partner_id}"
        self.channel.basic_consume(queue, self.on_message)
        self.channel.start_consuming()

    def stop(self) -> None:
        """Callable from any thread: ends `serve`."""
        self.connection.add_callback_threadsafe(self.channel.stop_consuming)

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


def main() -> None:
    partner = Partner(
        os.environ["PARTNER_AMQP_URL"],
        os.environ["PARTNER_ID"],
        prefix=os.environ.get("PARTNERBUS_PREFIX", "partnerbus"),
    )
    try:
        partner.signal("T-000123", "59512", ["logement-hebergement--reduire-les-impayes-de-loyer"])
        partner.serve()
    except KeyboardInterrupt:
        pass
    finally:
        partner.close()


if __name__ == "__main__":
    main()
