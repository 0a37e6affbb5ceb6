"""Dead letters, for ops: list them with their reasons, show one, replay after a fix, purge.

Every read of a message body, every replay (and every refused replay) and every purge
leaves an audit record: dead letters hold personal data like everything else on the bus.

A replay is a door into the bus, guarded like the first delivery:
- a message refused for authentication (no `user_id`, a sender who is not the partner it
  claims, an unknown partner) is never replayed, nor one whose sender is unknown: the bus
  would have to vouch for a sender nobody authenticated;
- what died in an intake queue goes back to it as the bus, with its first sender in our
  header, and is authenticated again there;
- what died in a partner's queue (the partner's system failed on it) goes through the
  outbox and the relay's send-time check (`usecases.replay_to_partner`): a referral leaves
  again only while it awaits that partner's answer under a consent valid now.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

import aio_pika
import typer
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from rich.console import Console
from rich.table import Table

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
    Topology,
)
from partnerbus.directory import Directory
from partnerbus.ledger.migrate import LedgerSchemaError, open_ledger
from partnerbus.ledger.store import Store
from partnerbus.settings import Settings, amqp_user

REPLAYED_BY_HEADER = "partnerbus-replayed-by"
_OUR_HEADERS = (
    REFUSAL_HEADER,
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
    """The AMQP user that first sent it, as RabbitMQ vouched; None when unknown."""
    size: int
    headers: dict[str, Any]
    body: bytes
    refusal: str | None = None
    """`authentication` when the bus refused it for its sender: never replayable."""
    died_at: datetime | None = None
    """When it died, by the bus's copy or RabbitMQ's `x-death` (retention's reading)."""


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
        elif first.get("reason") == "rejected":
            reason = (
                "refused while this dead-letter queue was full (the reason was not kept: see "
                "the service log, or replay it once to hear it again)"
            )
        died_in = str(first.get("queue", ""))
        exchange = str(first.get("exchange", ""))
        keys = first.get("routing-keys") or [""]
        routing_key = str(keys[0])
    if ours and ORIGINAL_USER_HEADER in headers:
        # The bus's copy says who first sent it; empty means nobody vouched for a sender
        # (no user_id): unknown, never the bus that published the copy.
        sender = str(headers[ORIGINAL_USER_HEADER] or "") or None
    else:
        sender = message.user_id
    refusal = str(headers[REFUSAL_HEADER]) if ours and headers.get(REFUSAL_HEADER) else None
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
        refusal=refusal,
        died_at=_died_at(message, own_user),
    )


def _died_at(message: AbstractIncomingMessage, own_user: str) -> datetime | None:
    from partnerbus.broker.retention import died_at  # retention reads dead letters too

    return died_at(message, own_user)


def why_not_replayable(letter: DeadLetter) -> str | None:
    """Why this dead letter may not go back to its intake queue, or None if it may."""
    if letter.refusal == AUTHENTICATION:
        return (
            f"refused for authentication ({letter.reason[:200]}): not replayable; "
            "the partner must send it again itself, authenticated"
        )
    if letter.sender is None:
        return "its sender is unknown (no user_id): not replayable"
    if not letter.died_in:
        return "where it died is unknown: not replayable"
    return None


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


@dataclass(frozen=True)
class ReplayOutcome:
    replayed: list[DeadLetter] = field(default_factory=list)
    refused: list[tuple[DeadLetter, str]] = field(default_factory=list)
    """Left in the dead-letter queue, with the reason."""


ToPartner = Callable[[str, DeadLetter], Awaitable[str | None]]
"""Put a partner's dead letter in the outbox (`usecases.replay_to_partner` in a
transaction): the partner id and the letter; returns why it is refused, or None."""


async def replay(
    connection: aio_pika.abc.AbstractConnection,
    queue_name: str,
    wanted: set[str] | None,
    own_user: str,
    by: str,
    *,
    topology: Topology,
    to_partner: ToPartner | None = None,
) -> ReplayOutcome:
    """Send each wanted dead letter back, removing it from the dead-letter queue once it
    is safe elsewhere; refused ones stay, with the reason.

    A letter that died in an intake queue is published straight into it (the default
    exchange), as the bus with the original sender kept in a header, so that it is
    authenticated as before; never one refused for authentication or whose sender is
    unknown. A letter that died in a partner's queue goes through `to_partner` (the
    outbox), never straight into the partner's queue; without it, it is refused."""
    outcome = ReplayOutcome()

    async def handle(
        channel: AbstractChannel, message: AbstractIncomingMessage, letter: DeadLetter
    ) -> bool:
        partner = topology.partner_of(letter.died_in)
        if partner is not None:
            why = (
                "a partner's dead letter goes back through the outbox, and none was given"
                if to_partner is None
                else await to_partner(partner, letter)
            )
        else:
            why = why_not_replayable(letter)
        if why is not None:
            outcome.refused.append((letter, why))
            return False
        if partner is not None:
            return True  # in the outbox, committed: the relay sends it
        headers = {
            k: v for k, v in letter.headers.items() if k not in _OUR_HEADERS and k != "x-death"
        }
        headers[ORIGINAL_USER_HEADER] = letter.sender
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

    outcome.replayed.extend(await take(connection, queue_name, wanted, handle, own_user))
    return outcome


async def _queues(
    connection: aio_pika.abc.AbstractConnection,
    topology: Topology,
    partners: Iterable[str],
    queues: Iterable[str] | None,
) -> list[str]:
    """`queues`, or every dead-letter queue of the prefix when None."""
    if queues is not None:
        return list(queues)
    return await dead_letter_queues(connection, topology, partners)


async def replay_letters(
    connection: aio_pika.abc.AbstractConnection,
    settings: Settings,
    topology: Topology,
    partners: Iterable[str],
    store: Store,
    by: str,
    wanted: set[str] | None,
    *,
    include_partners: bool = False,
    queues: Iterable[str] | None = None,
) -> ReplayOutcome:
    """`partnerbus dlq replay` and the ops page's replay button: the wanted dead letters
    (every one with None; then the partners' only with `include_partners`) of `queues`
    (every dead-letter queue of the prefix with None) sent back through `replay`, each
    replay and each refusal audited."""
    to_partner = _to_partner(settings, store)
    total = ReplayOutcome()
    for name in await _queues(connection, topology, partners, queues):
        work = name.removesuffix(".dlq")
        if wanted is None and not include_partners and topology.partner_of(work):
            continue
        outcome = await replay(
            connection,
            name,
            wanted,
            _own_user(settings),
            by,
            topology=topology,
            to_partner=to_partner,
        )
        # off the event loop: a service in this process may hold the write lock while it
        # waits for the loop to publish
        await asyncio.to_thread(_audit, store, by, "dead-letter-replayed", outcome.replayed)
        await asyncio.to_thread(_audit_refused, store, by, outcome.refused)
        total.replayed.extend(outcome.replayed)
        total.refused.extend(outcome.refused)
    return total


async def purge_letters(
    connection: aio_pika.abc.AbstractConnection,
    settings: Settings,
    topology: Topology,
    partners: Iterable[str],
    store: Store,
    by: str,
    wanted: set[str] | None,
    *,
    queues: Iterable[str] | None = None,
) -> list[DeadLetter]:
    """`partnerbus dlq purge` and the ops page's purge button: delete the wanted dead
    letters (every one with None) of `queues` (all of the prefix with None), one audit
    record per message."""
    names = await _queues(connection, topology, partners, queues)

    async def remove(*_: Any) -> bool:
        return True

    purged: list[DeadLetter] = []
    for name in names:
        letters = await take(connection, name, wanted, remove, _own_user(settings))
        await asyncio.to_thread(_audit, store, by, "dead-letter-purged", letters)
        purged.extend(letters)
    return purged


# the command line ----------------------------------------------------------------------
app = typer.Typer(help="Dead letters: list them with their reasons, show, replay, purge.")
console = Console()


def _directory(settings: Settings) -> Directory:
    from partnerbus.settings import open_directory

    return open_directory(settings)


def _context() -> tuple[Settings, Topology, list[str], Store]:
    settings = Settings()
    store = Store(settings.database_url)
    try:
        open_ledger(store, auto_upgrade=settings.ledger_auto_upgrade)
    except LedgerSchemaError as exc:
        console.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
        raise typer.Exit(2) from None
    partners = [p.id for p in _directory(settings).partners()]
    return settings, Topology(settings.prefix), partners, store


def _own_user(settings: Settings) -> str:
    """The bus's AMQP user: only its dead letters carry headers worth believing."""
    return amqp_user(settings.amqp_url.get_secret_value())


def _audit(
    store: Store,
    by: str,
    action: str,
    letters: Iterable[DeadLetter],
    why: Callable[[DeadLetter], str] | None = None,
) -> None:
    now = datetime.now(UTC)
    with store.begin() as tx:
        for letter in letters:
            tx.audit.record(
                by[:80],
                action,
                (letter.message_id or "-")[:128],
                now,
                why=f"{letter.queue}: {(why(letter) if why else letter.reason)[:300]}",
            )


async def _connect(settings: Settings) -> aio_pika.abc.AbstractConnection:
    return await aio_pika.connect(settings.amqp_url.get_secret_value())


def _replay_door(topology: Topology, letter: DeadLetter) -> str:
    """How `dlq replay` would treat it: back to its intake queue, through the outbox, or
    never (and why, in short)."""
    if topology.partner_of(letter.died_in):
        return "outbox"
    if letter.refusal:
        return f"never ({letter.refusal})"
    return "never" if why_not_replayable(letter) else "intake"


@app.command("list")
def list_command() -> None:
    """Every dead letter, with where it died and why (bodies are not shown)."""

    async def main() -> None:
        settings, topology, partners, _ = _context()
        async with await _connect(settings) as connection:
            queues = await dead_letter_queues(connection, topology, partners)
            table = Table(title=f"dead letters under {settings.prefix}")
            for column in ("message id", "type", "died in", "sender", "bytes", "replay", "reason"):
                table.add_column(column, overflow="fold")  # an id cut short cannot be replayed
            count = 0
            for name in queues:
                for letter in await peek(connection, name, _own_user(settings)):
                    count += 1
                    table.add_row(
                        letter.message_id or "-",
                        letter.type or "-",
                        letter.died_in,
                        letter.sender or "unknown",
                        str(letter.size),
                        _replay_door(topology, letter),
                        letter.reason,
                    )
            # Piped to a file or a program: whole lines, not the 80 columns of no terminal.
            out = console if console.is_terminal else Console(width=240)
            out.print(table if count else "no dead letters")

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


def _audit_refused(store: Store, by: str, refused: list[tuple[DeadLetter, str]]) -> None:
    reasons = {id(letter): why for letter, why in refused}
    _audit(
        store,
        by,
        "dead-letter-replay-refused",
        [letter for letter, _ in refused],
        lambda letter: reasons[id(letter)],
    )


def _to_partner(settings: Settings, store: Store) -> ToPartner:
    """The outbox door of a partner's dead letters: `usecases.replay_to_partner` in one
    transaction of the ledger."""
    from partnerbus.entrypoints.bootstrap import deadline_policy
    from partnerbus.schemas import utcnow
    from partnerbus.settings import pseudonym_key_of
    from partnerbus.usecases import Ledger, replay_to_partner

    ledgers: list[Ledger] = []

    def work(partner_id: str, body: bytes) -> str | None:
        # The ledger is built at the first partner letter: replaying intake letters needs
        # no pseudonym key.
        if not ledgers:
            try:
                key = pseudonym_key_of(settings)
            except ValueError as exc:
                return f"not replayed through the outbox: {exc}"
            ledgers.append(
                Ledger(
                    store=store,
                    directory=_directory(settings),
                    clock=utcnow,
                    pseudonym_key=key,
                    deadlines=deadline_policy(settings),
                )
            )
        with store.begin() as tx:
            return replay_to_partner(ledgers[0], tx, partner_id, body)

    async def to_partner(partner_id: str, letter: DeadLetter) -> str | None:
        return await asyncio.to_thread(work, partner_id, letter.body)

    return to_partner


@app.command("replay")
def replay_command(
    by: Annotated[str, typer.Option(help="Who replays (recorded in the audit trail).")],
    message_ids: Annotated[
        list[str] | None, typer.Argument(help="Message ids; none with --all.")
    ] = None,
    all_: Annotated[
        bool, typer.Option("--all", help="Replay every dead letter of the intake queues.")
    ] = False,
    include_partners: Annotated[
        bool,
        typer.Option(
            "--include-partners",
            help="With --all, the partners' dead letters too (through the outbox and its "
            "send-time checks). Named message ids are looked for everywhere.",
        ),
    ] = False,
) -> None:
    """Send dead letters back after a fix (audited). What died in an intake queue goes back
    to it and is authenticated again; what died in a partner's queue goes through the
    outbox. Refused, and left where they are: authentication refusals, unknown senders,
    referrals no longer awaiting that partner or no longer consented. Exit code 1 when any
    was refused."""
    if not message_ids and not all_:
        console.print("[red]name message ids, or pass --all[/red]")
        raise typer.Exit(2)

    async def main() -> int:
        settings, topology, partners, store = _context()
        wanted = None if all_ else set(message_ids or [])
        async with await _connect(settings) as connection:
            outcome = await replay_letters(
                connection,
                settings,
                topology,
                partners,
                store,
                by,
                wanted,
                include_partners=include_partners,
            )
        for letter, why in outcome.refused:
            console.print(f"[red]{letter.message_id or '-'} not replayed:[/red] {why}")
        console.print(f"replayed {len(outcome.replayed)} message(s)")
        if outcome.refused:
            console.print(f"[red]{len(outcome.refused)} refused, left in the dead letters[/red]")
        return len(outcome.refused)

    if asyncio.run(main()):
        raise typer.Exit(1)


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
            purged = await purge_letters(connection, settings, topology, partners, store, by, None)
        console.print(f"purged {len(purged)} message(s)")

    asyncio.run(main())
