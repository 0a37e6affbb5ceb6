"""Dead letters, for ops: list them with their reasons, show one, replay after a fix, purge.

Every read of a message body, every replay and every purge leaves an audit record: dead
letters hold personal data like everything else on the bus.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

import aio_pika
import typer
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from rich.console import Console
from rich.table import Table

from partnerbus.ledger.store import Store

from .settings import Settings, amqp_user
from .topology import (
    ATTEMPT_HEADER,
    ERROR_HEADER,
    ERROR_QUEUE_HEADER,
    LAST_ERROR_HEADER,
    ORIGINAL_EXCHANGE_HEADER,
    ORIGINAL_KEY_HEADER,
    ORIGINAL_USER_HEADER,
    Topology,
)

REPLAYED_BY_HEADER = "partnerbus-replayed-by"
_OUR_HEADERS = (
    ERROR_HEADER,
    ERROR_QUEUE_HEADER,
    ORIGINAL_EXCHANGE_HEADER,
    ORIGINAL_KEY_HEADER,
    ATTEMPT_HEADER,
    LAST_ERROR_HEADER,
)


@dataclass(frozen=True)
class DeadLetter:
    queue: str
    """The dead-letter queue it sits in."""
    message_id: str | None
    type: str | None
    reason: str
    died_in: str
    exchange: str
    routing_key: str
    sender: str | None
    size: int
    headers: dict[str, Any]
    body: bytes


def describe(queue: str, message: AbstractIncomingMessage, own_user: str) -> DeadLetter:
    """Where it came from and why it died, whether we refused it or RabbitMQ dead-lettered it.

    Our headers (reason, first sender, origin) are believed only on a message the bus
    published itself (`user_id` is the bus's user, which RabbitMQ verifies): a partner
    could have set them on its own message, which then died by the delivery limit."""
    headers: dict[str, Any] = dict(message.headers or {})
    ours = message.user_id == own_user
    deaths = headers.get("x-death") or []
    first = deaths[0] if deaths else {}
    if ours and ERROR_HEADER in headers:
        reason = str(headers[ERROR_HEADER])
        died_in = str(headers.get(ERROR_QUEUE_HEADER, ""))
        exchange = str(headers.get(ORIGINAL_EXCHANGE_HEADER, ""))
        routing_key = str(headers.get(ORIGINAL_KEY_HEADER, ""))
    else:
        reason = (
            f"{first.get('reason', 'unknown')} (RabbitMQ, after {first.get('count', '?')} deaths)"
        )
        if first.get("reason") == "delivery_limit":
            reason = (
                "delivery limit reached: the handler failed on every delivery (see the service log)"
            )
        died_in = str(first.get("queue", ""))
        exchange = str(first.get("exchange", ""))
        keys = first.get("routing-keys") or [""]
        routing_key = str(keys[0])
    sender = (ours and headers.get(ORIGINAL_USER_HEADER)) or message.user_id
    return DeadLetter(
        queue=queue,
        message_id=message.message_id,
        type=message.type,
        reason=reason,
        died_in=died_in,
        exchange=exchange,
        routing_key=routing_key,
        sender=str(sender) if sender else None,
        size=len(message.body),
        headers=headers,
        body=message.body,
    )


async def dead_letter_queues(
    connection: aio_pika.abc.AbstractConnection, topology: Topology, partner_ids: Iterable[str]
) -> list[str]:
    """The dead-letter queues that exist for this prefix."""
    names = []
    for work in topology.all_work_queue_names(partner_ids):
        name = topology.dlq_name(work)
        probe = await connection.channel()  # a failed passive declare closes its channel
        try:
            await probe.declare_queue(name, passive=True)
            names.append(name)
        except aio_pika.exceptions.ChannelClosed:
            continue
        finally:
            if not probe.is_closed:
                await probe.close()
    return names


async def peek(
    connection: aio_pika.abc.AbstractConnection,
    queue_name: str,
    own_user: str,
    limit: int = 1000,
) -> list[DeadLetter]:
    """Read up to `limit` messages without removing them: they are taken unacked, then the
    channel closes and RabbitMQ puts them back."""
    channel = await connection.channel()
    try:
        queue = await channel.declare_queue(queue_name, passive=True)
        found: list[DeadLetter] = []
        while len(found) < limit:
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            found.append(describe(queue_name, message, own_user))
        return found
    finally:
        await channel.close()


async def take(
    connection: aio_pika.abc.AbstractConnection,
    queue_name: str,
    wanted: set[str] | None,
    handle: Any,
    own_user: str,
) -> list[DeadLetter]:
    """Get messages one by one; `handle(message, letter)` returns True to ack (remove) it.
    Those not wanted, or not handled, go back when the channel closes.

    Only the messages present at the start are looked at: a replayed message that fails
    again comes back to this queue meanwhile, and must not be replayed in a loop."""
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    done: list[DeadLetter] = []
    try:
        queue = await channel.declare_queue(queue_name, passive=True)
        present = int(queue.declaration_result.message_count or 0)
        for _ in range(present):
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            letter = describe(queue_name, message, own_user)
            if wanted is not None and letter.message_id not in wanted:
                continue
            if await handle(channel, message, letter):
                await message.ack()
                done.append(letter)
    finally:
        await channel.close()
    return done


async def replay(
    connection: aio_pika.abc.AbstractConnection,
    queue_name: str,
    wanted: set[str] | None,
    own_user: str,
    by: str,
) -> list[DeadLetter]:
    """Publish each wanted dead letter straight into the work queue it died in (the default
    exchange), as the bus with the original sender kept in a header, so that it is
    authenticated as before; remove it from the dead-letter queue after the confirm."""

    async def handle(
        channel: AbstractChannel, message: AbstractIncomingMessage, letter: DeadLetter
    ) -> bool:
        if not letter.died_in:
            return False
        headers = {
            k: v for k, v in letter.headers.items() if k not in _OUR_HEADERS and k != "x-death"
        }
        headers[ORIGINAL_USER_HEADER] = letter.sender or ""
        headers[REPLAYED_BY_HEADER] = by
        await channel.default_exchange.publish(
            aio_pika.Message(
                letter.body,
                headers=headers,
                content_type=message.content_type,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=message.message_id,
                type=message.type,
                user_id=own_user,
            ),
            routing_key=letter.died_in,
        )
        return True

    return await take(connection, queue_name, wanted, handle, own_user)


# the command line ----------------------------------------------------------------------
app = typer.Typer(help="Dead letters: list them with their reasons, show, replay, purge.")
console = Console()


def _context() -> tuple[Settings, Topology, list[str], Store]:
    from .settings import open_directory

    settings = Settings()
    directory = open_directory(settings)
    store = Store(settings.database_url)
    store.create_all()
    return settings, Topology(settings.prefix), [p.id for p in directory.partners()], store


def _own_user(settings: Settings) -> str:
    """The bus's AMQP user: only its dead letters carry headers worth believing."""
    return amqp_user(settings.amqp_url.get_secret_value())


def _audit(store: Store, by: str, action: str, letters: Iterable[DeadLetter]) -> None:
    now = datetime.now(UTC)
    with store.begin() as tx:
        for letter in letters:
            tx.audit(
                by,
                action,
                letter.message_id or "-",
                now,
                why=f"{letter.queue}: {letter.reason[:200]}",
            )


async def _connect(settings: Settings) -> aio_pika.abc.AbstractConnection:
    return await aio_pika.connect(settings.amqp_url.get_secret_value())


@app.command("list")
def list_command() -> None:
    """Every dead letter, with where it died and why (bodies are not shown)."""

    async def main() -> None:
        settings, topology, partners, _ = _context()
        async with await _connect(settings) as connection:
            queues = await dead_letter_queues(connection, topology, partners)
            table = Table(title=f"dead letters under {settings.prefix}")
            for column in ("message id", "type", "died in", "sender", "bytes", "reason"):
                table.add_column(column)
            count = 0
            for name in queues:
                for letter in await peek(connection, name, _own_user(settings)):
                    count += 1
                    table.add_row(
                        letter.message_id or "-",
                        letter.type or "-",
                        letter.died_in,
                        letter.sender or "-",
                        str(letter.size),
                        letter.reason,
                    )
            console.print(table if count else "no dead letters")

    asyncio.run(main())


@app.command()
def show(
    message_id: Annotated[str, typer.Argument(help="The dead letter's message id.")],
    by: Annotated[str, typer.Option(help="Who reads (recorded in the audit trail).")],
) -> None:
    """One dead letter with its headers and body (this read is audited)."""

    async def main() -> None:
        settings, topology, partners, store = _context()
        async with await _connect(settings) as connection:
            for name in await dead_letter_queues(connection, topology, partners):
                for letter in await peek(connection, name, _own_user(settings)):
                    if letter.message_id == message_id:
                        _audit(store, by, "dead-letter-read", [letter])
                        console.print(f"[bold]{letter.message_id}[/bold] in {letter.queue}")
                        console.print(f"reason: {letter.reason}")
                        console.print(
                            f"from {letter.exchange} / {letter.routing_key} by {letter.sender}"
                        )
                        console.print_json(
                            json.dumps({k: str(v) for k, v in letter.headers.items()})
                        )
                        console.print(letter.body.decode("utf-8", "replace"))
                        return
        console.print(f"[red]no dead letter {message_id}[/red]")
        raise typer.Exit(1)

    asyncio.run(main())


@app.command("replay")
def replay_command(
    by: Annotated[str, typer.Option(help="Who replays (recorded in the audit trail).")],
    message_ids: Annotated[
        list[str] | None, typer.Argument(help="Message ids; none with --all.")
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="Replay every dead letter.")] = False,
) -> None:
    """Send dead letters back where they first went, after a fix (audited)."""
    if not message_ids and not all_:
        console.print("[red]name message ids, or pass --all[/red]")
        raise typer.Exit(2)

    async def main() -> int:
        settings, topology, partners, store = _context()
        wanted = None if all_ else set(message_ids or [])
        total = 0
        async with await _connect(settings) as connection:
            for name in await dead_letter_queues(connection, topology, partners):
                letters = await replay(connection, name, wanted, _own_user(settings), by)
                _audit(store, by, "dead-letter-replayed", letters)
                total += len(letters)
        console.print(f"replayed {total} message(s)")
        return total

    asyncio.run(main())


@app.command()
def purge(
    by: Annotated[str, typer.Option(help="Who purges (recorded in the audit trail).")],
    yes: Annotated[
        bool, typer.Option("--yes", help="Confirm: the messages are gone for good.")
    ] = False,
) -> None:
    """Delete every dead letter (audited, one record per message)."""
    if not yes:
        console.print("[red]purge deletes the messages for good: pass --yes[/red]")
        raise typer.Exit(2)

    async def main() -> None:
        settings, topology, partners, store = _context()
        async with await _connect(settings) as connection:
            total = 0
            for name in await dead_letter_queues(connection, topology, partners):

                async def remove(*_: Any) -> bool:
                    return True

                letters = await take(connection, name, None, remove, _own_user(settings))
                total += len(letters)
                _audit(store, by, "dead-letter-purged", letters)
        console.print(f"purged {total} message(s)")

    asyncio.run(main())
