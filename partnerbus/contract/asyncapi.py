"""The AsyncAPI 3.0.0 document of the bus (docs/asyncapi.yaml), generated from the code.

FastStream describes what the service's code declares: each intake queue from its typed
subscriber, and the outbound side from documentation publishers registered here on the
broker of an app built for the document only (the relay keeps publishing on its
own channel, `partnerbus.broker.publisher`; nothing here changes how a message
leaves). That document is then
completed in code, never by hand:

- every message is named by its contract type and its payload is the committed JSON Schema
  (`schemas/<type>.schema.json`, beside the document) instead of an inline copy;
- the RabbitMQ side: exchanges, routing keys, queues and their arguments (quorum, delivery
  limit, dead-letter route, bounds), the AMQP properties each message carries, the
  application headers of dead letters and retry copies;
- who may publish what, and the delivery guarantees.

The output is deterministic (sorted keys, no time, no random name), so that CI can
regenerate it and compare (`partnerbus contract asyncapi --check`).
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml
from faststream.rabbit import RabbitBroker, RabbitExchange
from faststream.specification import AsyncAPI
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from partnerbus.broker.topology import (
    ATTEMPT_HEADER,
    AUTHENTICATION,
    ERROR_HEADER,
    ERROR_QUEUE_HEADER,
    LAST_ERROR_HEADER,
    ORIGINAL_EXCHANGE_HEADER,
    ORIGINAL_KEY_HEADER,
    ORIGINAL_USER_HEADER,
    REFUSAL_HEADER,
    URGENT_SUFFIX,
    Topology,
)
from partnerbus.errors import PartnerbusError
from partnerbus.schemas import CapacityChanged
from partnerbus.schemas.base import SCHEMA_VERSION
from partnerbus.schemas.messages import OutboundMessage
from partnerbus.settings import Settings
from partnerbus.usecases import DIRECTORY_UPDATES_KEY

from .catalog import CATALOG, Contracted
from .schemas import SCHEMA_DIR, schema_file

Node = dict[str, Any]

ASYNCAPI_FILE = SCHEMA_DIR.parent / "asyncapi.yaml"
"""Where the committed document lives in a checkout (its `$ref`s are relative to it)."""
SCHEMA_REF_DIR = f"{SCHEMA_DIR.name}/"
PREFIX = "partnerbus"
"""The prefix the document names exchanges and queues with (`PARTNERBUS_PREFIX`'s default)."""
VHOST = "/"
BINDING_VERSION = "0.3.0"
PARTNER_USER = "pb-{partner}"
"""A partner's AMQP user (`Partner.username`), unless the directory names another."""


class _CodeSettings(Settings):
    """The settings' defaults, whatever the environment or a `.env` file say: the document
    describes the code, not one deployment."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


# ----------------------------------------------------------------------------------------
# What FastStream is told beyond the subscribers: the bus's outbound side.


def _document_publishers(broker: RabbitBroker, t: Topology) -> None:
    """Documentation publishers for what the bus sends (the relay on its own channel,
    the intake's dead-letter and retry copies with `broker.publish`), so that FastStream
    describes them too. They are registered on the document's own app only and never
    publish."""
    every_message: Any = Union[tuple(e.model for e in CATALOG)]  # noqa: UP007 (a runtime union of classes)
    broker.publisher(
        exchange=t.deliveries,
        routing_key="{partner}",
        title="deliveries",
        description="Referrals and notices the bus sends to each partner's queue.",
        schema=OutboundMessage,
        persist=True,
        mandatory=True,
    )
    broker.publisher(
        exchange=t.dead_letters,
        routing_key="{queue}",
        title="dead-letters",
        description="What a queue could not take, kept for ops with the reason.",
        schema=every_message,
        persist=True,
        mandatory=True,
    )
    broker.publisher(
        exchange=t.retries,
        routing_key="{queue}.retry.{step}",
        title="retries",
        description="Copies of intake messages that failed for a passing reason, delayed.",
        schema=every_message,
        persist=True,
        mandatory=True,
    )


def faststream_document() -> Node:
    """FastStream's AsyncAPI 3.0.0 document of the service built by `create_app` (nothing
    connects), with the documentation publishers."""
    from partnerbus.entrypoints.bootstrap import create_app

    settings = _CodeSettings(
        prefix=PREFIX,
        database_url="sqlite://",
        # Never used (no message is pseudonymised here); create_app refuses to build without one.
        pseudonym_key=secrets.token_urlsafe(32),
    )
    bus = create_app(settings, log_level=logging.DEBUG)
    try:
        _document_publishers(bus.broker, bus.topology)
        spec = AsyncAPI(
            bus.broker,
            title="partnerbus",
            version=str(SCHEMA_VERSION),
            description=DESCRIPTION,
            schema_version="3.0.0",
        ).to_specification()
        document: Node = spec.to_jsonable()
        return document
    finally:
        bus.store.dispose()


# ----------------------------------------------------------------------------------------
# The words of the document.

DESCRIPTION = f"""\
partnerbus routes consented referrals between social-housing partners over RabbitMQ
(AMQP 0-9-1). This document is generated from the code (`partnerbus contract asyncapi`):
FastStream describes the subscribers and the outbound side, the RabbitMQ details are added
from the topology. Each message's body is the JSON Schema beside it (`schemas/`). Names
are shown with the prefix `{PREFIX}` (`PARTNERBUS_PREFIX`). Operations are the bus's:
`receive` is what partners publish to the bus, `send` what the bus publishes.

## Who may publish what

RabbitMQ enforces it (docs/ACCESS.md, `partnerbus access`):

- each partner connects as its own AMQP user, `{PARTNER_USER}` unless the directory names
  another, with no configure right and no tags;
- it may publish to `{PREFIX}.signals` and `{PREFIX}.statuses`, and only a pivot (a partner
  with social advisors) to `{PREFIX}.consents`; only with its own partner id as the routing
  key (`<id>{URGENT_SUFFIX}` too on the signals exchange, for urgent and asap signals):
  topic permissions, refused with ACCESS_REFUSED otherwise;
- it must set the `user_id` property to its AMQP user: RabbitMQ refuses a `user_id` that
  is not the connection's user (PRECONDITION_FAILED), and the bus refuses a message
  without one, or whose claimed sender (`source`, `partner`, `agency`) is not that user's
  partner (dead letter, never replayed);
- it may read only its own queue `{PREFIX}.partner.<id>`; nothing else, no binding.

## Delivery guarantees

At least once, both ways:

- work queues and dead-letter queues are durable quorum queues (replicated, on disk); a
  work queue has a delivery limit and a dead-letter route; exchanges are durable;
- the bus publishes persistent messages (delivery mode 2), mandatory, with publisher
  confirms, and counts a message sent only once RabbitMQ confirmed it; partners should do
  the same (delivery mode 2, publisher confirms, mandatory);
- the bus acks a partner's message after recording it; a partner must ack a delivery only
  after handling it, and nack (requeue) on failure: after the queue's delivery limit
  RabbitMQ moves it to the dead-letter queue;
- a message may arrive more than once: every message carries a `message_id` (JSON), and
  both sides deduplicate on it. Set the AMQP `message-id` property equal to the JSON
  `message_id`, the `type` property to the message's `type` and `content-type` to
  `application/json`; the bus does so on everything it sends;
- a message the bus cannot take (bad JSON, schema, size, sender) is never dropped: it goes
  to the queue's dead-letter queue with the reason in the `{ERROR_HEADER}` header.
"""

_INTAKE_DOORS: dict[str, str] = {
    "signals": "Every partner, with its own id as the routing key.",
    "signals.urgent": (
        f"Every partner, with `<its id>{URGENT_SUFFIX}` as the routing key, for urgent and "
        "asap signals: their own queue and consumer, never behind a routine backlog."
    ),
    "statuses": "Every partner, with its own id as the routing key.",
    "consents": (
        "Only a pivot (a partner with social advisors), with its own id as the routing key: "
        "its consent events and its advisors' decisions (a referral cancelled or "
        "transferred, a need sent to the partner she chose or reopened, an orientation made "
        "outside the bus) on the signals it follows; the use case also checks that the "
        "advisor is one of that agency's."
    ),
}


@dataclass(frozen=True)
class _Channel:
    """One channel of the document and what FastStream does not know about it."""

    key: str
    address: str
    title: str
    description: str
    operation: str
    operation_summary: str
    parameters: dict[str, str] = field(default_factory=dict)
    queue: Node | None = None
    """The queue the messages end in (`x-queue` where the channel is an exchange's)."""
    exchange: RabbitExchange | None = None
    binding_key: str | None = None
    user_id: str | None = None
    internal: bool = False
    message: str | None = None
    """A message of its own (dead letters, retries) instead of one per contract type."""


def _exchange(exchange: RabbitExchange) -> Node:
    return {
        "name": exchange.name,
        "type": exchange.type.value,
        "durable": bool(exchange.durable),
        "autoDelete": bool(exchange.auto_delete),
        "vhost": VHOST,
    }


def _queue(name: str, arguments: dict[str, Any], **more: Any) -> Node:
    return {
        "name": name,
        "durable": True,
        "exclusive": False,
        "autoDelete": False,
        "vhost": VHOST,
        "x-arguments": dict(sorted(arguments.items())),
        **more,
    }


def _channels(t: Topology) -> list[_Channel]:
    partner = {"partner": "The partner's id in the directory (its AMQP user is pb-<id>)."}
    intake: list[_Channel] = []
    operations = {
        "signals": "receiveSignal",
        "signals.urgent": "receiveUrgentSignal",
        "statuses": "receiveStatus",
        "consents": "receiveConsent",
    }
    for queue, exchange in t.intake_queues():
        key = queue.name.removeprefix(t.queue_name("intake."))
        address = "{partner}" + (URGENT_SUFFIX if key.endswith(URGENT_SUFFIX) else "")
        intake.append(
            _Channel(
                key=key,
                address=address,
                title=f"{exchange.name} → {queue.name}",
                description=(
                    f"Partners publish to the `{exchange.name}` {exchange.type.value} exchange "
                    f"with the routing key `{address}`; the bus reads the quorum queue "
                    f"`{queue.name}` (bound with `{queue.routing_key}`).\n\n"
                    f"Who may publish: {_INTAKE_DOORS[key]}"
                ),
                operation=operations[key],
                operation_summary=(
                    "Validate, authenticate, deduplicate and record; ack after the commit. "
                    "A refused message goes to the dead letters with its reason."
                ),
                parameters=partner,
                queue=_queue(queue.name, t.work_queue_arguments(queue.name)),
                exchange=exchange,
                binding_key=queue.routing_key,
                user_id=PARTNER_USER,
            )
        )
    partner_queue = t.partner_queue_name("{partner}")
    retry_queue = t.retry_queue_name("{queue}", 0).removesuffix("0") + "{step}"
    retry_arguments = dict(t.retry_queue("{queue}", 0).arguments or {})
    retry_arguments.pop("x-message-ttl")
    return [
        *intake,
        _Channel(
            key="deliveries",
            address="{partner}",
            title=f"{t.deliveries.name} → {partner_queue}",
            description=(
                f"The bus publishes to the `{t.deliveries.name}` direct exchange with the "
                f"partner's id as the routing key; each partner consumes its own quorum queue "
                f"`{partner_queue}` (the only thing it may read) and acks each message after "
                "handling it. A message it nacks past the delivery limit goes to "
                f"`{partner_queue}.dlq`."
            ),
            operation="sendToPartner",
            operation_summary=(
                "Relay what the ledger committed (outbox): persistent, mandatory, confirmed; "
                "the same message_id again after a failure."
            ),
            parameters=partner,
            queue=_queue(partner_queue, t.work_queue_arguments(partner_queue)),
            exchange=t.deliveries,
            binding_key="{partner}",
        ),
        _Channel(
            key="directory-updates",
            address=DIRECTORY_UPDATES_KEY,
            title=f"{t.deliveries.name} → {t.prefix}.directory-updates.<worker>",
            description=(
                "Internal: a partner's capacity change, broadcast to every worker of the bus "
                f"(routing key `{DIRECTORY_UPDATES_KEY}` on `{t.deliveries.name}`; no partner "
                "id has a dot, so it reaches no partner), each on an exclusive queue of its "
                "own."
            ),
            operation="receiveDirectoryUpdate",
            operation_summary="Apply the capacity to this worker's directory.",
            exchange=t.deliveries,
            binding_key=DIRECTORY_UPDATES_KEY,
            internal=True,
        ),
        _Channel(
            key="dead-letters",
            address="{queue}",
            title=f"{t.dead_letters.name} → {{queue}}.dlq",
            description=(
                f"Each work queue `{{queue}}` dead-letters to `{t.dead_letters.name}` with its "
                "own name as the routing key, into the quorum queue `{queue}.dlq` (bounded: "
                "when full, new dead letters are refused and the original stays in its "
                "queue). Two ways in: the bus's intake publishes a copy of a message it "
                f"refuses, with the reason in `{ERROR_HEADER}`, then acks the original; "
                "RabbitMQ moves a message past the queue's delivery limit (a partner that "
                "kept nacking, a handler that kept failing) with its `x-death` record. Read "
                "and replayed by ops (`partnerbus dlq`); partners have no access."
            ),
            operation="sendDeadLetter",
            operation_summary="Keep what could not be taken, with the reason.",
            parameters={"queue": "The work queue the message died in (its full name)."},
            queue=_queue(t.dlq_name("{queue}"), t.dead_letter_queue_arguments()),
            exchange=t.dead_letters,
            binding_key="{queue}",
            internal=True,
            message="dead-letter",
        ),
        _Channel(
            key="retries",
            address="{queue}.retry.{step}",
            title=f"{t.retries.name} → {retry_queue}",
            description=(
                "Internal: a copy of an intake message whose handling failed for a passing "
                f"reason (the database down) waits in the delay queue `{retry_queue}` (step "
                f"0 to {len(t.retry_delays_ms) - 1}), then RabbitMQ puts it back in its work "
                "queue through the default exchange; after the last step it is "
                "dead-lettered. The original is acked once the copy is confirmed."
            ),
            operation="sendRetry",
            operation_summary="Try again later, after a fixed delay per step.",
            parameters={
                "queue": "The intake queue the message came from (its full name).",
                "step": f"The attempt, 0 to {len(t.retry_delays_ms) - 1}.",
            },
            queue=_queue(
                retry_queue, retry_arguments, **{"x-message-ttl-per-step": list(t.retry_delays_ms)}
            ),
            exchange=t.retries,
            binding_key="{queue}.retry.{step}",
            internal=True,
            message="retry",
        ),
    ]


def _header(description: str, **schema: Any) -> Node:
    return {"type": "string", **schema, "description": description}


_ORIGIN_HEADERS: Node = {
    ORIGINAL_USER_HEADER: _header(
        "The AMQP user that first sent the message, as RabbitMQ vouched (empty: unknown). "
        "Believed only on a message whose user_id is the bus's own user."
    ),
    ORIGINAL_EXCHANGE_HEADER: _header("The exchange the message was first published to."),
    ORIGINAL_KEY_HEADER: _header("The routing key it was first published with."),
}
_RETRY_HEADERS: Node = {
    ATTEMPT_HEADER: {
        "type": "integer",
        "minimum": 1,
        "description": "How many delayed retries this message has had.",
    },
    LAST_ERROR_HEADER: _header("Why the last attempt failed.", maxLength=2000),
}
DEAD_LETTER_HEADERS: Node = {
    "type": "object",
    "description": (
        "On a dead letter the bus published (a refusal): its headers below, set by the bus "
        f"(user_id is the bus's own user). On one RabbitMQ moved (delivery limit): no "
        f"`{ERROR_HEADER}`, RabbitMQ's `x-death` record instead. The original message's "
        "headers are kept."
    ),
    "properties": {
        ERROR_HEADER: _header("Why the message was refused.", maxLength=4000),
        ERROR_QUEUE_HEADER: _header("The work queue it was refused in."),
        REFUSAL_HEADER: _header(
            "Set when the sender could not be authenticated: such a dead letter is never replayed.",
            enum=[AUTHENTICATION],
        ),
        **_ORIGIN_HEADERS,
        **_RETRY_HEADERS,
        "x-death": {
            "type": "array",
            "items": {"type": "object"},
            "description": (
                "RabbitMQ's record of each time the message died (queue, reason such as "
                "delivery_limit, count, exchange, routing-keys)."
            ),
        },
    },
}
RETRY_HEADERS: Node = {
    "type": "object",
    "description": "Set by the bus on its delayed copy (user_id is the bus's own user).",
    "properties": {**_ORIGIN_HEADERS, **_RETRY_HEADERS},
    "required": [ATTEMPT_HEADER, LAST_ERROR_HEADER, ORIGINAL_USER_HEADER],
}


def _amqp_properties(message_type: str | None, user_id: str | None) -> Node:
    """The AMQP properties of a message (a message binding extension: the binding itself
    only has `messageType` and `contentEncoding`)."""
    properties: Node = {
        "content_type": "application/json",
        "delivery_mode": 2,
        "message_id": "equal to the JSON message_id",
    }
    if message_type is not None:
        properties["type"] = message_type
    if user_id is not None:
        properties["user_id"] = user_id
    return properties


PARTNER_USER_ID = (
    "required on what a partner publishes: its own AMQP user (RabbitMQ checks it); not set "
    "on what the bus relays"
)
COPY_USER_ID = (
    "the bus's own AMQP user on a copy the bus published; the sender's on what RabbitMQ "
    "moved (delivery limit)"
)


def _schema_ref(entry: Contracted) -> Node:
    return {"$ref": SCHEMA_REF_DIR + schema_file(entry.type)}


def _contract_message(entry: Contracted) -> Node:
    doc = (entry.model.__doc__ or "").strip()
    who = {
        "inbound": "Published by partners to the bus.",
        "outbound": "Sent by the bus to a partner's queue.",
        "both": (
            "Published by partners; the bus forwards a copy to the signal's source and the advisor."
        ),
    }[entry.direction]
    message: Node = {
        "name": entry.type,
        "title": entry.model.__name__,
        "description": f"{who} Body: `{SCHEMA_REF_DIR}{schema_file(entry.type)}`.",
        "contentType": "application/json",
        "payload": _schema_ref(entry),
        "bindings": {
            "amqp": {
                "messageType": entry.type,
                "bindingVersion": BINDING_VERSION,
                "x-properties": _amqp_properties(
                    entry.type, PARTNER_USER_ID if entry.inbound else None
                ),
            }
        },
        "x-direction": entry.direction,
    }
    if doc:  # a model without a docstring has its description in its schema only
        message["summary"] = " ".join(doc.split("\n\n", 1)[0].split())
    return message


def _copy_message(
    name: str, title: str, entries: list[Contracted], headers: Node, *, refused: bool
) -> Node:
    """A dead letter or retry copy: the original body, byte for byte, with our headers
    (`refused`: the body may be one the intake could not read)."""
    if refused:
        body = (
            "The body as it was published: one of these messages, or (for a refusal) "
            "whatever the sender published, invalid JSON included."
        )
        anything = [{"description": "A body the intake refused (not JSON, not a message)."}]
    else:
        body = "The body as it was published: one of these messages, already validated."
        anything = []
    return {
        "name": name,
        "title": title,
        "summary": "The original message, body and properties unchanged, with headers.",
        "contentType": "application/json",
        "headers": headers,
        "payload": {
            "description": body,
            "anyOf": [*(_schema_ref(e) for e in entries), *anything],
        },
        "bindings": {
            "amqp": {
                "bindingVersion": BINDING_VERSION,
                "x-properties": {
                    **_amqp_properties("the original's", COPY_USER_ID),
                    "timestamp": "when the copy was made (retention purges by it)",
                },
            }
        },
    }


# ----------------------------------------------------------------------------------------
# From FastStream's document to ours.


class AsyncAPIError(PartnerbusError):
    """The code declares something the document cannot describe."""


def _models_of(raw: Node, message: Node) -> list[str]:
    """The pydantic model names a FastStream message payload stands for (one, or a union)."""
    schemas: Node = raw["components"]["schemas"]
    name = message["payload"]["$ref"].rsplit("/", 1)[-1]
    schema: Node = schemas[name]
    union = schema.get("oneOf") or schema.get("anyOf")
    if union:
        return [ref["$ref"].rsplit("/", 1)[-1] for ref in union]
    return [name] if schema.get("type") == "object" else []


def _entries(models: Iterable[str], where: str) -> list[Contracted]:
    by_model = {e.model.__name__: e for e in CATALOG}
    entries = []
    for model in models:
        if model not in by_model:
            msg = f"{where}: {model} is not a message of the contract (contract/catalog.py)"
            raise AsyncAPIError(msg)
        entries.append(by_model[model])
    return entries


def _raw_key(raw: Node, channel: _Channel, t: Topology) -> str:
    """FastStream's key of the channel `channel` describes."""
    key: str
    for key, node in raw["channels"].items():
        queue = node.get("bindings", {}).get("amqp", {}).get("queue", {}).get("name", "")
        if key == channel.key:  # a documentation publisher, titled with our key
            return key
        if channel.queue is not None and queue == channel.queue["name"] and channel.exchange:
            return key
        if channel.key == "directory-updates" and queue.startswith(
            f"{t.prefix}.directory-updates."
        ):
            return key
    msg = f"FastStream's document has no channel for {channel.key!r}"
    raise AsyncAPIError(msg)


def build_document() -> Node:
    """The AsyncAPI 3.0.0 document, as committed in docs/asyncapi.yaml."""
    raw = faststream_document()
    t = Topology(PREFIX)
    channels: Node = {}
    operations: Node = {}
    messages: Node = {}
    seen: set[str] = set()
    for channel in _channels(t):
        key = _raw_key(raw, channel, t)
        seen.add(key)
        raw_channel: Node = raw["channels"][key]
        (raw_message_ref,) = raw_channel["messages"].values()
        raw_message = raw["components"]["messages"][raw_message_ref["$ref"].rsplit("/", 1)[-1]]
        models = _models_of(raw, raw_message)
        if channel.key == "directory-updates":
            # Its handler takes raw bytes (a malformed update is logged and ignored); what
            # is sent there is a capacity change.
            models = [CapacityChanged.__name__]
        entries = _entries(models, channel.key)
        if channel.message is None:
            names = [e.type for e in entries]
            for entry in entries:
                messages[entry.type] = _contract_message(entry)
        elif channel.message == "dead-letter":
            names = [channel.message]
            messages[channel.message] = _copy_message(
                "dead-letter", "Dead letter", entries, DEAD_LETTER_HEADERS, refused=True
            )
        else:
            names = [channel.message]
            inbound = [e for e in entries if e.inbound]
            messages[channel.message] = _copy_message(
                "retry", "Delayed retry copy", inbound, RETRY_HEADERS, refused=False
            )
        channels[channel.key] = _channel_node(channel, raw_channel, names)
        operations[channel.operation] = _operation_node(channel, raw["operations"], key, names)
    unknown = sorted(set(raw["channels"]) - seen)
    if unknown:
        msg = f"channels the document does not describe yet: {unknown} (contract/asyncapi.py)"
        raise AsyncAPIError(msg)
    return {
        "asyncapi": raw["asyncapi"],
        "info": {**raw["info"], "x-contract-version": SCHEMA_VERSION},
        "defaultContentType": raw["defaultContentType"],
        "servers": _servers(),
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "securitySchemes": _security_schemes()},
    }


def _channel_node(channel: _Channel, raw: Node, names: list[str]) -> Node:
    amqp: Node = dict(raw["bindings"]["amqp"])
    if amqp["is"] == "queue":
        if channel.queue is not None:
            amqp["queue"] = channel.queue
        else:  # the workers' exclusive queues: one per worker, a random name each
            queue = dict(amqp["queue"])
            queue["name"] = re.sub(r"\.[0-9a-f]+$", ".<worker>", queue["name"])
            amqp["queue"] = queue
        if channel.exchange is not None:
            amqp["x-exchange"] = _exchange(channel.exchange)
    else:
        amqp["exchange"] = _exchange(channel.exchange) if channel.exchange else amqp["exchange"]
        if channel.queue is not None:
            amqp["x-queue"] = channel.queue
    if channel.binding_key is not None:
        amqp["x-binding-key"] = channel.binding_key
    node: Node = {
        "address": channel.address,
        "title": channel.title,
        "description": channel.description,
        "messages": {name: {"$ref": f"#/components/messages/{name}"} for name in names},
        "bindings": {"amqp": amqp},
    }
    if raw.get("description"):
        node["summary"] = raw["description"]
    if channel.parameters:
        node["parameters"] = {
            name: {"description": text} for name, text in channel.parameters.items()
        }
    if channel.internal:
        node["x-internal"] = True
    return node


def _operation_node(
    channel: _Channel, raw_operations: Node, raw_key: str, names: list[str]
) -> Node:
    (raw,) = (
        op for op in raw_operations.values() if op["channel"]["$ref"] == f"#/channels/{raw_key}"
    )
    amqp: Node = dict(raw["bindings"]["amqp"])
    # FastStream gives a subscriber's binding key as its `cc`; the routing key a message is
    # published with is the channel's address (the binding key is the channel's).
    amqp["cc"] = [channel.address]
    amqp["deliveryMode"] = 2
    amqp["ack"] = True
    if channel.user_id is not None:
        amqp["userId"] = channel.user_id
    if raw["action"] == "send":
        amqp["mandatory"] = True
    if channel.message is not None:  # dead letters and retries: the copy's time
        amqp["timestamp"] = True
    return {
        "action": raw["action"],
        "channel": {"$ref": f"#/channels/{channel.key}"},
        "summary": channel.operation_summary,
        "messages": [{"$ref": f"#/channels/{channel.key}/messages/{name}"} for name in names],
        "bindings": {"amqp": amqp},
    }


def _servers() -> Node:
    return {
        "production": {
            "host": "{host}:5671",
            "protocol": "amqps",
            "protocolVersion": "0.9.1",
            "pathname": VHOST,
            "description": (
                "The operator's RabbitMQ over TLS (compose.tls.yaml). Each partner connects "
                "with its own user and password, handed over by the operator."
            ),
            "variables": {"host": {"description": "The host name partners dial."}},
            "security": [{"$ref": "#/components/securitySchemes/partner-user"}],
        },
        "development": {
            "host": "127.0.0.1:5672",
            "protocol": "amqp",
            "protocolVersion": "0.9.1",
            "pathname": VHOST,
            "description": "A local RabbitMQ (compose.yaml, `make demo`), without TLS.",
            "security": [{"$ref": "#/components/securitySchemes/partner-user"}],
        },
    }


def _security_schemes() -> Node:
    return {
        "partner-user": {
            "type": "userPassword",
            "description": (
                f"One RabbitMQ user per partner (`{PARTNER_USER}`), its rights from the "
                "directory (`partnerbus access apply|export`, docs/ACCESS.md)."
            ),
        }
    }


# ----------------------------------------------------------------------------------------
# The committed file.


class _Dumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks, so that the descriptions read as written; no
    anchors and aliases (a shared header schema is written out each time)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)


def render_asyncapi() -> str:
    """The document as committed (YAML, keys sorted, nothing that changes between runs)."""
    header = (
        "# Generated by `partnerbus contract asyncapi` from the code: do not edit.\n"
        "# Checked in CI (`partnerbus contract asyncapi --check`, and the AsyncAPI parser).\n"
    )
    body = yaml.dump(
        build_document(),
        Dumper=_Dumper,
        sort_keys=True,
        allow_unicode=True,
        width=100,
        default_flow_style=False,
    )
    return header + body


def write_asyncapi(path: Path = ASYNCAPI_FILE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_asyncapi(), encoding="utf-8")
    return path


def asyncapi_is_current(path: Path = ASYNCAPI_FILE) -> bool:
    return path.is_file() and path.read_text("utf-8") == render_asyncapi()
