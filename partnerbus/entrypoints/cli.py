"""The `partnerbus` command line."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from partnerbus.schemas import (
    ConsentGranted,
    ConsentRevoked,
    ConsentScope,
    NeedDirected,
    NeedReopened,
    OrientationRecorded,
    ReferralCancelled,
    ReferralTransferred,
)
from partnerbus.settings import BUNDLED_SAMPLE, Settings, amqp_user, open_directory

if TYPE_CHECKING:
    from collections.abc import Callable

    from partnerbus.directory import Directory
    from partnerbus.insights import Period, ResponseTimes, Unmet
    from partnerbus.ledger.store import ReferralRow, SignalRow, Store

app = typer.Typer(
    help="partnerbus: consented referrals between the organisations around social housing.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
consent_app = typer.Typer(help="Record, revoke and list consents (for the social advisor).")
ops_app = typer.Typer(help="Watch queues, dead letters, overdue and parked work.")
referrals_app = typer.Typer(help="Follow referrals and their audit trail.")
db_app = typer.Typer(help="The ledger's schema: its migrations (Alembic), applied and checked.")
insights_app = typer.Typer(
    help="What the network learns from its ledger: response times, unmet demand "
    "(organisations and territories, never persons)."
)
app.add_typer(consent_app, name="consent")
app.add_typer(referrals_app, name="referrals")
app.add_typer(ops_app, name="ops")
app.add_typer(db_app, name="db")
app.add_typer(insights_app, name="insights")

console = Console()
err = Console(stderr=True)

AgencyMessage = (
    ConsentGranted
    | ConsentRevoked
    | ReferralCancelled
    | NeedDirected
    | ReferralTransferred
    | NeedReopened
    | OrientationRecorded
)
"""What the CLI publishes in an agency's name, on the consents exchange."""


def _mount_optional() -> None:
    """Sub-apps that live beside their code."""
    from partnerbus.entrypoints.contract_cli import app as contract_app
    from partnerbus.entrypoints.directory_cli import app as directory_app

    app.add_typer(directory_app, name="directory")
    app.add_typer(contract_app, name="contract")
    try:
        from partnerbus.broker.access import app as access_app
    except ImportError:  # pragma: no cover - access is part of the package
        return
    app.add_typer(access_app, name="access")
    try:
        from partnerbus.broker.dlq import app as dlq_app
    except ImportError:  # pragma: no cover
        return
    app.add_typer(dlq_app, name="dlq")


@app.command()
def demo(
    timeout: Annotated[float, typer.Option(help="Seconds each step may take.")] = 60.0,
    out: Annotated[Path, typer.Option(help="Where the receipt and the charts are written.")] = Path(
        "demo-output"
    ),
) -> None:
    """Run the service and a scripted day from the field against the real broker."""
    from partnerbus.entrypoints.demo import main as demo_main

    settings = Settings()
    if settings.directory_path is not None:
        err.print(
            f"the demo's scripted day plays on the {BUNDLED_SAMPLE}: "
            "PARTNERBUS_DIRECTORY_PATH is not used by the demo",
            markup=False,
        )
    settings = settings.model_copy(update={"directory_path": None})
    open_directory(settings)
    raise typer.Exit(asyncio.run(demo_main(settings, timeout, out)))


@app.command()
def run(
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
) -> None:
    """Run the service (FastStream workers consuming the intake queues)."""
    from partnerbus.settings import pseudonym_key_of

    try:
        pseudonym_key_of(Settings())
    except ValueError as exc:
        _fail(f"{exc}; the service does not start without it")
    _directory(Settings())  # checked and named once here; each worker loads it the same way
    args = [
        sys.executable,
        "-m",
        "faststream",
        "run",
        "partnerbus.entrypoints.bootstrap:app_factory",
        "--factory",
        "--workers",
        str(workers),
    ]
    os.execv(sys.executable, args)  # noqa: S606 - replaces this process with the workers


def _fail(message: str) -> None:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


def _check_writable(*paths: Path | None) -> None:
    """What cannot be written is said before anything is read."""
    for path in paths:
        if path is None:
            continue
        if not path.parent.is_dir():
            _fail(f"cannot write {path}: {path.parent} is not a directory")
        if path.is_dir():
            _fail(f"cannot write {path}: it is a directory")
        if not os.access(path if path.exists() else path.parent, os.W_OK):
            _fail(f"cannot write {path}: permission denied")


async def _send_consent(settings: Settings, message: AgencyMessage) -> None:
    from partnerbus.client import PartnerClient

    async with PartnerClient(
        settings.amqp_url.get_secret_value(), message.agency, prefix=settings.prefix
    ) as client:
        await client.send_consent(message)


def _publish_consent(settings: Settings, message: AgencyMessage) -> None:
    """Publish with confirms; a broker that cannot be reached is a clear error, not a trace."""
    import aio_pika

    try:
        asyncio.run(_send_consent(settings, message))
    except (OSError, aio_pika.exceptions.AMQPError) as exc:
        _fail(
            f"the broker did not take the message ({type(exc).__name__}: {exc}); nothing was "
            "recorded. Is RabbitMQ running (rabbitmq-server -detached) and "
            "PARTNERBUS_AMQP_URL right?"
        )


def _directory(settings: Settings) -> Directory:
    """The one directory of the settings, named on stderr; a bad file is a clear error."""
    from partnerbus.directory import DirectoryError

    try:
        return open_directory(settings)
    except DirectoryError as exc:
        _fail(f"directory error: {exc}")
        raise  # unreachable: _fail exits


def _check_pivot(directory: Directory, agency: str, by: str, what: str = "records consent") -> None:
    """Say at once what the bus would refuse: only a pivot's own advisor records consent
    (or decides on a referral)."""
    from partnerbus.directory.rights import advisor_ids

    own = advisor_ids(directory.partner(agency))
    if not own:
        _fail(f"{agency!r} has no social advisors: only a pivot {what}")
    if by not in own:
        _fail(f"{by!r} is not an advisor of {agency}; its advisors: {', '.join(sorted(own))}")


@consent_app.command("grant")
def consent_grant(
    person: Annotated[str, typer.Option(help="Pseudonymous person reference.")],
    agency: Annotated[str, typer.Option(help="The agency (partner id) collecting consent.")],
    by: Annotated[str, typer.Option(help="The advisor who collected it.")],
    needs: Annotated[
        str, typer.Option(help="Comma-separated need codes (a parent covers its children).")
    ],
    kinds: Annotated[str, typer.Option(help="Comma-separated partner kinds.")] = "",
    partners: Annotated[str, typer.Option(help="Comma-separated partner ids.")] = "",
    method: Annotated[str, typer.Option(help="oral, paper or sms.")] = "oral",
    duration: Annotated[str, typer.Option(help="1d, 1m, 6m or 1y.")] = "6m",
) -> None:
    """Record a consent the person gave; parked signals it covers leave at once."""
    from partnerbus.rules import valid_until_for

    settings = Settings()
    directory = _directory(settings)

    def split(s: str) -> tuple[str, ...]:
        return tuple(x.strip() for x in s.split(",") if x.strip())

    unknown = [n for n in split(needs) if not directory.has_need(n)]
    if unknown:
        _fail(f"unknown need(s): {', '.join(unknown)}")
    if agency not in directory:
        _fail(f"unknown agency {agency!r}: not a partner of the directory")
    _check_pivot(directory, agency, by)
    strangers = [p for p in split(partners) if p not in directory]
    if strangers:
        _fail(f"unknown partner(s): {', '.join(strangers)}")
    known_kinds = {p.kind for p in directory.partners()}
    odd = [k for k in split(kinds) if k not in known_kinds]
    if odd:
        _fail(
            f"no partner of the directory has the kind(s) {', '.join(odd)}; "
            f"known kinds: {', '.join(sorted(known_kinds))}"
        )
    now = datetime.now(UTC)
    try:
        until = valid_until_for(now, duration)
        message = ConsentGranted(
            message_id=str(uuid.uuid4()),
            occurred_at=now,
            consent_id=f"consent-{uuid.uuid4().hex[:12]}",
            person_ref=person,
            scope=ConsentScope(
                needs=split(needs), partner_kinds=split(kinds), partners=split(partners)
            ),
            collected_by=by,
            agency=agency,
            method=method,
            granted_at=now,
            valid_until=until,
        )
    except (ValidationError, ValueError) as exc:
        _fail(str(exc))
        return
    _publish_consent(settings, message)
    console.print(f"consent [bold]{message.consent_id}[/bold] sent, valid until {until:%Y-%m-%d}")


@consent_app.command("revoke")
def consent_revoke(
    consent_id: Annotated[str, typer.Argument(help="The consent to revoke.")],
    agency: Annotated[str, typer.Option(help="The agency that collected it.")],
    by: Annotated[str, typer.Option(help="Who records the revocation.")],
    reason: Annotated[str, typer.Option(help="Why, in a few words.")] = "",
) -> None:
    """Revoke a consent: every open referral under it is withdrawn from its partner."""
    settings = Settings()
    store = _store()
    try:
        with store.read() as tx:  # a lookup: no write lock
            known = tx.consents.get(consent_id)
    finally:
        store.dispose()
    if known is None:
        _fail(f"no consent {consent_id} in the ledger ({settings.database_url})")
        return
    if known.agency != agency:
        _fail(f"consent {consent_id} was collected by {known.agency}, not {agency}")
    if known.revoked_at is not None:
        _fail(f"consent {consent_id} was already revoked on {known.revoked_at:%Y-%m-%d %H:%M}")
    now = datetime.now(UTC)
    try:
        message = ConsentRevoked(
            message_id=str(uuid.uuid4()),
            occurred_at=now,
            consent_id=consent_id,
            revoked_by=by,
            agency=agency,
            revoked_at=now,
            reason=reason or None,
        )
    except ValidationError as exc:
        _fail(str(exc))
        return
    _publish_consent(settings, message)
    console.print(f"revocation of [bold]{consent_id}[/bold] sent")


def _store() -> Store:
    """The ledger, opened (its schema checked or upgraded): a database that cannot be
    reached or opened ends the command with one line saying so, not a traceback."""
    from sqlalchemy.exc import DBAPIError

    from partnerbus.ledger.migrate import LedgerSchemaError, open_ledger
    from partnerbus.ledger.store import Store

    settings = Settings()
    store = Store(settings.database_url)
    try:
        open_ledger(store, auto_upgrade=settings.ledger_auto_upgrade)
    except LedgerSchemaError as exc:
        store.dispose()
        _fail(str(exc))
    except DBAPIError as exc:
        store.dispose()
        _database_failed(exc, store)
    return store


@consent_app.command("list")
def consent_list(
    person: Annotated[str, typer.Option(help="Pseudonymous person reference.")],
    by: Annotated[str, typer.Option(help="Who reads (recorded in the audit trail).")],
) -> None:
    """The person's consents, valid or not (this read is audited)."""
    store = _store()
    now = datetime.now(UTC)
    with store.begin() as tx:
        rows = tx.consents.of_person(person)
        tx.audit.record(
            by, "consents-read", person, now, person_ref=person, why="partnerbus consent list"
        )
    table = Table(title=f"consents of {person}")
    for column in ("consent", "needs", "to", "method", "by", "from", "until", "state"):
        table.add_column(column)
    for c in rows:
        state = "revoked" if c.revoked_at else ("expired" if c.valid_until <= now else "valid")
        table.add_row(
            c.consent_id,
            ", ".join(c.scope.needs),
            ", ".join((*c.scope.partner_kinds, *c.scope.partners)),
            c.method,
            c.collected_by,
            f"{c.granted_at:%Y-%m-%d}",
            f"{c.valid_until:%Y-%m-%d}",
            state,
        )
    console.print(table)


@referrals_app.command("timeline")
def referrals_timeline(
    subject: Annotated[
        str, typer.Argument(help="A person reference, a signal id or a referral id.")
    ],
    by: Annotated[str, typer.Option(help="Who reads (recorded in the audit trail).")],
) -> None:
    """Everything the bus did about a person or a referral, in order (this read is audited)."""
    store = _store()
    rows = store.audit_trail(subject)
    with store.begin() as tx:
        tx.audit.record(
            by, "timeline-read", subject, datetime.now(UTC), why="partnerbus referrals timeline"
        )
    if not rows:
        _fail(f"nothing recorded about {subject!r}")
    console.print(f"[bold]timeline of {subject}[/bold] ({len(rows)} records)")
    for r in rows:
        partner = f" → {r.partner_id}" if r.partner_id else ""
        console.print(
            f"{r.at:%Y-%m-%d %H:%M:%S}  [bold]{r.action}[/bold]  by {r.actor}{partner}  "
            f"[dim]{r.subject}[/dim]  {r.why or ''}",
            soft_wrap=True,
        )


@referrals_app.command("receipt")
def referrals_receipt(
    person: Annotated[str, typer.Argument(help="The person reference, as the ledger stores it.")],
    by: Annotated[str, typer.Option(help="The advisor who reads (one of the person's agency's).")],
    html: Annotated[
        Path | None, typer.Option(help="Write a printable HTML page to this file.")
    ] = None,
    pdf: Annotated[Path | None, typer.Option(help="Write the same page as a PDF file.")] = None,
) -> None:
    """The tenant's receipt (GDPR art. 15), in French: what was shared about her, with
    whom, when, under which consent, what each partner answered. Only an advisor of her
    agency reads it; every reading, and every refused one, is audited."""
    from partnerbus.receipt import (
        PdfUnavailableError,
        ReceiptRefused,
        Retention,
        check_pdf,
        read_receipt,
        render_text,
        write_html,
        write_pdf,
    )

    _check_writable(html, pdf)
    if pdf is not None:
        try:
            check_pdf()
        except PdfUnavailableError as exc:
            _fail(str(exc))
    settings = Settings()
    directory = _directory(settings)
    output = "+".join(f for f, path in (("html", html), ("pdf", pdf)) if path) or "text"
    store = _store()
    try:
        receipt = read_receipt(
            store,
            directory,
            person,
            by,
            output=output,
            now=datetime.now(UTC),
            retention=Retention.of(settings),
        )
    except ReceiptRefused as exc:
        _fail(f"receipt refused: {exc} (this attempt is recorded in the audit)")
        return
    finally:
        store.dispose()
    if html is None and pdf is None:
        render_text(receipt, console)
        return
    try:
        if html is not None:
            write_html(receipt, html)
            console.print(f"receipt written to {html}")
        if pdf is not None:
            write_pdf(receipt, pdf)
            console.print(f"receipt written to {pdf}")
    except PdfUnavailableError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"could not write the receipt ({type(exc).__name__}: {exc.strerror or exc})")


@referrals_app.command("cancel")
def referrals_cancel(
    referral_id: Annotated[str, typer.Argument(help="The referral to cancel.")],
    agency: Annotated[str, typer.Option(help="The agency that follows the signal.")],
    by: Annotated[str, typer.Option(help="The advisor who decides (one of the agency's).")],
    reason: Annotated[str, typer.Option(help="Why (kept in the history, told to the agency).")],
) -> None:
    """Cancel a referral: its partner is told to drop it, the source and the agency hear
    `cancelled`, the need closes (published as the agency's decision)."""
    settings = Settings()
    referral = _followed_referral(settings, agency, by, referral_id)
    _decide(
        settings,
        lambda now: ReferralCancelled(
            message_id=str(uuid.uuid4()),
            occurred_at=now,
            referral_id=referral_id,
            agency=agency,
            decided_by=by,
            reason=reason,
        ),
    )
    console.print(
        f"cancellation of [bold]{referral_id}[/bold] ({referral.status}, to "
        f"{referral.partner_id}) sent"
    )


@referrals_app.command("send")
def referrals_send(
    signal_id: Annotated[str, typer.Argument(help="The signal whose need is sent.")],
    need: Annotated[str, typer.Option(help="The need code.")],
    partner: Annotated[str, typer.Option(help="The partner the advisor chose.")],
    agency: Annotated[str, typer.Option(help="The agency that follows the signal.")],
    by: Annotated[str, typer.Option(help="The advisor who decides (one of the agency's).")],
    note: Annotated[str, typer.Option(help="Why this partner (kept in the history).")] = "",
) -> None:
    """Send a need of the signal to the partner the advisor chose, among those with an
    agreement covering it; the directory's ranking is shown as advice, with its reasons."""
    from partnerbus.directory import match

    settings = Settings()
    row = _followed_signal(settings, agency, by, signal_id)
    signal = row.signal()
    candidates = match(
        _directory(settings), need, signal.commune, profile=signal.profile, sender=row.source
    )
    table = Table(title=f"the directory's advice for {need} in {signal.commune}")
    for column in ("rank", "partner", "why"):
        table.add_column(column)
    for c in candidates:
        mark = " [bold](chosen)[/bold]" if c.partner_id == partner else ""
        table.add_row(str(c.rank), c.partner_id + mark, "; ".join(c.reasons))
    console.print(table)
    if partner not in {c.partner_id for c in candidates}:
        _fail(f"{partner!r} has no agreement covering {need} in {signal.commune}")
    _decide(
        settings,
        lambda now: NeedDirected(
            message_id=str(uuid.uuid4()),
            occurred_at=now,
            signal_id=signal_id,
            need=need,
            partner=partner,
            agency=agency,
            decided_by=by,
            note=note or None,
        ),
    )
    console.print(f"{need} of [bold]{signal_id}[/bold] sent to [bold]{partner}[/bold]")


def _followed_signal(settings: Settings, agency: str, by: str, signal_id: str) -> SignalRow:
    """The signal, read from the ledger, and a check that `agency` (one of whose advisors
    is `by`) follows it: what the bus would refuse is said at once."""
    directory = _directory(settings)
    if agency not in directory:
        _fail(f"unknown agency {agency!r}: not a partner of the directory")
    _check_pivot(directory, agency, by, "decides")
    store = _store()
    try:
        with store.read() as tx:
            row = tx.signals.get(signal_id)
    finally:
        store.dispose()
    if row is None:
        _fail(f"no signal {signal_id} in the ledger ({settings.database_url})")
        raise AssertionError  # unreachable: _fail exits
    if row.agency != agency:
        _fail(f"signal {signal_id} is not followed by {agency}: only its agency decides")
    return row


def _followed_referral(settings: Settings, agency: str, by: str, referral_id: str) -> ReferralRow:
    store = _store()
    try:
        with store.read() as tx:
            referral = tx.referrals.get(referral_id)
    finally:
        store.dispose()
    if referral is None:
        _fail(f"no referral {referral_id} in the ledger ({settings.database_url})")
        raise AssertionError  # unreachable: _fail exits
    _followed_signal(settings, agency, by, referral.signal_id)
    return referral


@referrals_app.command("transfer")
def referrals_transfer(
    referral_id: Annotated[str, typer.Argument(help="The accepted referral to move.")],
    partner: Annotated[str, typer.Option(help="The partner that takes it over.")],
    agency: Annotated[str, typer.Option(help="The agency that follows the signal.")],
    by: Annotated[str, typer.Option(help="The advisor who decides (one of the agency's).")],
    reason: Annotated[str, typer.Option(help="Why (kept in the history, told to the agency).")],
) -> None:
    """Transfer an accepted referral to another partner: the first drops it, the other
    receives a new referral (published as the agency's decision)."""
    settings = Settings()
    referral = _followed_referral(settings, agency, by, referral_id)
    _decide(
        settings,
        lambda now: ReferralTransferred(
            message_id=str(uuid.uuid4()),
            occurred_at=now,
            referral_id=referral_id,
            partner=partner,
            agency=agency,
            decided_by=by,
            reason=reason,
        ),
    )
    console.print(
        f"transfer of [bold]{referral_id}[/bold] from {referral.partner_id} to "
        f"[bold]{partner}[/bold] sent"
    )


@referrals_app.command("reopen")
def referrals_reopen(
    signal_id: Annotated[str, typer.Argument(help="The signal whose need reopens.")],
    need: Annotated[str, typer.Option(help="The need code.")],
    agency: Annotated[str, typer.Option(help="The agency that follows the signal.")],
    by: Annotated[str, typer.Option(help="The advisor who decides (one of the agency's).")],
    note: Annotated[str, typer.Option(help="Why it reopens (kept with the need).")],
) -> None:
    """Reopen a need whose road ended: the directory routes it again (consent still gates
    it), published as the agency's decision."""
    settings = Settings()
    _followed_signal(settings, agency, by, signal_id)
    _decide(
        settings,
        lambda now: NeedReopened(
            message_id=str(uuid.uuid4()),
            occurred_at=now,
            signal_id=signal_id,
            need=need,
            agency=agency,
            decided_by=by,
            note=note,
        ),
    )
    console.print(f"reopening of {need} of [bold]{signal_id}[/bold] sent")


@referrals_app.command("oriented")
def referrals_oriented(
    signal_id: Annotated[str, typer.Argument(help="The signal whose need was oriented.")],
    need: Annotated[str, typer.Option(help="The need code.")],
    partner: Annotated[str, typer.Option(help="The partner the person was oriented to.")],
    agency: Annotated[str, typer.Option(help="The agency that follows the signal.")],
    by: Annotated[str, typer.Option(help="The advisor who made the orientation.")],
    channel: Annotated[str, typer.Option(help="phone, in-person, email or letter.")] = "phone",
    note: Annotated[str, typer.Option(help="What was agreed (told to the agency).")] = "",
) -> None:
    """Record an orientation made outside the bus: nothing is sent to the partner; the
    closed loop and the figures include it (published as the agency's record)."""
    settings = Settings()
    _followed_signal(settings, agency, by, signal_id)
    _decide(
        settings,
        lambda now: OrientationRecorded(
            message_id=str(uuid.uuid4()),
            occurred_at=now,
            signal_id=signal_id,
            need=need,
            partner=partner,
            agency=agency,
            decided_by=by,
            channel=channel,  # validated by the model
            oriented_at=now,
            note=note or None,
        ),
    )
    console.print(f"orientation of {need} of [bold]{signal_id}[/bold] to {partner} recorded")


def _decide(settings: Settings, build: Callable[[datetime], AgencyMessage]) -> None:
    """Build the decision (a bad field is a clear error) and publish it as the agency's."""
    try:
        message = build(datetime.now(UTC))
    except ValidationError as exc:
        _fail(str(exc))
        return
    _publish_consent(settings, message)


def _ops_context() -> tuple[Settings, Directory, Store]:
    settings = Settings()
    return settings, _directory(settings), _store()


@ops_app.command("status")
def ops_status(
    watch: Annotated[
        bool, typer.Option("--watch", help="Keep the figures on screen, refreshed (Ctrl-C stops).")
    ] = False,
    interval: Annotated[
        float, typer.Option(min=0.5, help="Seconds between two snapshots with --watch.")
    ] = 5.0,
    all_partners: Annotated[
        bool, typer.Option("--all", help="Every partner, even those with nothing to show.")
    ] = False,
) -> None:
    """Alerts, a row per partner, needs waiting for consent, queues and the ledger's
    totals, now (or, with --watch, kept on screen: the same figures as the ops page)."""
    from rich.console import Group
    from rich.live import Live

    from partnerbus.broker.topology import Topology
    from partnerbus.ops import terminal
    from partnerbus.ops.monitor import BrokerProbe, PartnerInfo, Snapshot, Thresholds, snapshot
    from partnerbus.ops.terminal import status_view

    settings, directory, store = _ops_context()
    topology = Topology(settings.prefix)
    infos = [PartnerInfo(p.id, p.name, p.kind, p.username) for p in directory.partners()]
    url = settings.amqp_url.get_secret_value()
    thresholds = Thresholds(settings.ops_oldest_message_alert_s, settings.ops_scheduler_alert_s)

    async def take(probe: BrokerProbe, previous: Snapshot | None) -> Snapshot:
        return await snapshot(
            probe,
            topology,
            infos,
            store,
            datetime.now(UTC),
            own_user=amqp_user(url),
            previous=previous,
            thresholds=thresholds,
        )

    async def once() -> Snapshot:
        probe = BrokerProbe(url)
        try:
            return await take(probe, None)
        finally:
            await probe.close()

    if not watch:
        snap = asyncio.run(once())
        if snap.broker_error:
            err.print(f"[red]broker unreachable:[/red] {snap.broker_error}")
        console.print(Group(*status_view(snap, settings.prefix, all_partners)))
        return

    async def follow() -> None:
        probe = BrokerProbe(url)  # one connection for the whole watch
        previous: Snapshot | None = None
        try:
            with Live(console=console, auto_refresh=False, screen=False) as live:
                while True:
                    previous = await take(probe, previous)
                    live.update(
                        Group(*status_view(previous, settings.prefix, all_partners)),
                        refresh=True,
                    )
                    await terminal.pause(interval)
        finally:
            await probe.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(follow())


@app.command()
def health() -> None:
    """Exit 0 when the broker and the database answer and every intake queue has a consumer
    (the service is running); 1 otherwise, saying what is wrong. For container health checks."""
    import aio_pika

    from partnerbus.broker.topology import Topology
    from partnerbus.ops.monitor import QueueFigure, queue_figures

    settings, directory, store = _ops_context()

    async def queues_or_error() -> tuple[list[QueueFigure], str | None]:
        try:
            figures = await queue_figures(
                settings.amqp_url.get_secret_value(),
                Topology(settings.prefix),
                [p.id for p in directory.partners()],
            )
        except (OSError, aio_pika.exceptions.AMQPError) as exc:
            return [], f"{type(exc).__name__}: {exc}"
        return figures, None

    # the queues and one small ledger read, not the ops page's whole snapshot (per-partner
    # rows, charts, parked needs): compose runs this every 30 s
    try:
        queues, broker_error = asyncio.run(queues_or_error())
        store.pending_count()
    except Exception as exc:
        err.print(f"unhealthy: {type(exc).__name__}: {exc}")
        raise typer.Exit(1) from None
    problems = [broker_error] if broker_error else []
    intake = [q for q in queues if q.role == "intake"]
    if not broker_error and len(intake) < 3:
        problems.append("the intake queues are not declared: the service never started")
    problems += [f"no consumer on {q.name}" for q in intake if q.consumers == 0]
    if problems:
        err.print("unhealthy: " + "; ".join(problems))
        raise typer.Exit(1)
    console.print(f"healthy: {sum(q.consumers for q in intake)} consumers on the intake queues")


@ops_app.command("serve")
def ops_serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the page and /metrics.")] = 8090,
) -> None:
    """Serve the monitor page, Prometheus metrics (/metrics) and a health check (/health)."""
    import uvicorn

    from partnerbus.entrypoints.web import create_ops_app

    settings, directory, store = _ops_context()
    try:
        web = create_ops_app(settings, directory, store)
    except ValueError as exc:
        _fail(str(exc))
        return
    uvicorn.run(web, host=host, port=port, log_level="warning")


gateway_app = typer.Typer(
    help="HTTP door for partners that cannot speak AMQP (POST /v1/signals, statuses, "
    "consents): serve it, issue and revoke its tokens."
)
token_app = typer.Typer(help="The gateway's bearer tokens (random; only their hashes are kept).")
gateway_app.add_typer(token_app, name="token")
app.add_typer(gateway_app, name="gateway")


def _tokens_path(settings: Settings) -> Path:
    if settings.gateway_tokens_path is None:
        _fail("set PARTNERBUS_GATEWAY_TOKENS_PATH: the file that keeps the tokens' hashes")
    assert settings.gateway_tokens_path is not None
    return settings.gateway_tokens_path


@gateway_app.callback(invoke_without_command=True)
def gateway(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the HTTP gateway.")] = 8080,
    consent_writers: Annotated[
        bool,
        typer.Option(help="Let partners with advisors post consent events (as `access apply`)."),
    ] = True,
) -> None:
    """Serve the gateway (without a sub-command); tokens from PARTNERBUS_GATEWAY_TOKENS_PATH."""
    if ctx.invoked_subcommand is not None:
        return
    import uvicorn

    from partnerbus.entrypoints.gateway import create_gateway

    settings = Settings()
    directory = _directory(settings)
    try:
        web = create_gateway(settings, directory, consent_writers=consent_writers)
    except (OSError, ValueError) as exc:
        _fail(str(exc))
        return
    uvicorn.run(web, host=host, port=port, log_level="info")


@token_app.command("issue")
def gateway_token_issue(
    partner: Annotated[str, typer.Argument(help="The partner id the token authenticates.")],
) -> None:
    """Make a new random token for the partner (replacing its old one) and print it once:
    only its SHA-256 is written to the token file (mode 0600)."""
    from partnerbus.entrypoints.gateway import issue_token

    settings = Settings()
    if partner not in _directory(settings):
        _fail(f"unknown partner {partner!r}: not a partner of the directory")
    path = _tokens_path(settings)
    try:
        token = issue_token(path, partner)
    except (OSError, ValueError) as exc:
        _fail(str(exc))
        return
    err.print(f"token of {partner} (shown once; hand it over a separate channel); hash in {path}")
    print(token)  # the token alone on stdout, for a pipe


@token_app.command("revoke")
def gateway_token_revoke(
    partner: Annotated[str, typer.Argument(help="The partner whose token stops working.")],
) -> None:
    """Forget the partner's token: the running gateway refuses it at its next request."""
    from partnerbus.entrypoints.gateway import revoke_token

    path = _tokens_path(Settings())
    try:
        found = revoke_token(path, partner)
    except (OSError, ValueError) as exc:
        _fail(str(exc))
        return
    if not found:
        _fail(f"{partner} has no gateway token in {path}")
    console.print(f"token of {partner} revoked")


@gateway_app.command("openapi")
def gateway_openapi(
    check: Annotated[
        Path | None,
        typer.Option(help="Compare with this file instead of printing; exit 1 when it differs."),
    ] = None,
) -> None:
    """Print the gateway's OpenAPI document (the one it serves at /openapi.json), e.g.
    `partnerbus gateway openapi > docs/gateway-openapi.json`; needs no settings."""
    from partnerbus.entrypoints.gateway import openapi_document

    document = openapi_document()
    if check is None:
        sys.stdout.write(document)
        return
    try:
        current = check.read_text(encoding="utf-8")
    except OSError as exc:
        _fail(f"cannot read {check}: {exc.strerror}")
        return
    if current != document:
        err.print(
            f"{check} is not the gateway's document: regenerate it with "
            f"`partnerbus gateway openapi > {check}`",
            markup=False,
        )
        raise typer.Exit(1)
    console.print(f"{check} is up to date")


# the ledger's schema -------------------------------------------------------------------
def _ledger_of(settings: Settings) -> Store:
    from partnerbus.ledger.store import Store

    return Store(settings.database_url)


def _database_failed(exc: Exception, store: Store) -> None:
    """End the command: the ledger's database (named without its password) failed."""
    from partnerbus.errors import describe_error

    where = store.engine.url.render_as_string(hide_password=True)
    _fail(f"the ledger's database at {where} failed: {describe_error(exc)}")


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Option(help="The revision to reach.")] = "head",
) -> None:
    """Bring the ledger's schema (PARTNERBUS_DATABASE_URL) to this version's, one migrator
    at a time; a ledger created before migrations is adopted at 0001 first."""
    from alembic.util import CommandError
    from sqlalchemy.exc import SQLAlchemyError

    from partnerbus.ledger.migrate import upgrade

    store = _ledger_of(Settings())
    try:
        done = upgrade(store, revision)
    except SQLAlchemyError as exc:
        _database_failed(exc, store)
        return
    except CommandError as exc:  # an unknown revision, or one below the ledger's
        _fail(str(exc))
        return
    finally:
        store.dispose()
    if done.adopted:
        console.print("ledger created before migrations: adopted at 0001")
    if done.before == done.after:
        console.print(f"ledger schema at {done.after}: nothing to do")
    else:
        console.print(f"ledger schema upgraded from {done.before or 'nothing'} to {done.after}")


@db_app.command("current")
def db_current() -> None:
    """The ledger's schema revision, and this version's (head)."""
    from sqlalchemy.exc import SQLAlchemyError

    from partnerbus.ledger.migrate import current, head

    store = _ledger_of(Settings())
    try:
        found = current(store)
    except SQLAlchemyError as exc:
        _database_failed(exc, store)
        return
    finally:
        store.dispose()
    wanted = head()
    if found == wanted:
        console.print(f"{found} (head)")
    else:
        console.print(f"{found or 'no revision'} (head is {wanted}: run partnerbus db upgrade)")


@db_app.command("check")
def db_check() -> None:
    """Exit 1 unless the ledger is at head and its schema is exactly what tables.py declares
    (Alembic's autogenerate comparison finds nothing)."""
    from sqlalchemy.exc import SQLAlchemyError

    from partnerbus.ledger.migrate import current, describe, differences, head

    store = _ledger_of(Settings())
    try:
        found, diff = current(store), differences(store)
    except SQLAlchemyError as exc:
        _database_failed(exc, store)
        return
    finally:
        store.dispose()
    wanted = head()
    ok = found == wanted and not diff
    if found != wanted:
        console.print(f"ledger at {found or 'no revision'}, head is {wanted}")
    for item in diff:
        console.print(f"differs from tables.py: {describe(item)}", markup=False)
    if not ok:
        raise typer.Exit(1)
    console.print(f"ledger at {found}, its schema is tables.py's")


@db_app.command("revision")
def db_revision(
    message: Annotated[str, typer.Option("-m", "--message", help="What the revision does.")],
    empty: Annotated[
        bool, typer.Option(help="Write an empty revision (data migrations, hand-written ops).")
    ] = False,
    against: Annotated[
        str | None,
        typer.Option(
            help="Compare tables.py with this database (at head) instead of a scratch "
            "SQLite file brought to head, e.g. a PostgreSQL URL."
        ),
    ] = None,
) -> None:
    """Write the next revision into the package's migrations (for developers): its
    operations autogenerated from what tables.py declares beyond head. Read it, fix it,
    commit it."""
    from partnerbus.ledger.migrate import new_revision

    path = new_revision(message, autogenerate=not empty, url=against)
    console.print(f"wrote {path}", markup=False)


SinceOption = Annotated[
    str | None, typer.Option(help="Start of the period (ISO date or date-time, UTC).")
]
UntilOption = Annotated[
    str | None, typer.Option(help="End of the period, excluded (default: now).")
]
PeriodOption = Annotated[
    str | None,
    typer.Option(help="Length of the period before --until: 30d, 12w, 48h (default 90d)."),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print JSON (docs/INSIGHTS.md) instead of tables.")
]
PngOption = Annotated[
    Path | None, typer.Option("--png", help="Also draw the chart to this PNG file.")
]


def _insight_period(
    since: str | None, until: str | None, period: str | None, png: Path | None
) -> Period:
    """The period of the options; a bad one, or a chart that cannot be written, is a clear
    error before anything is read."""
    from partnerbus.insights import resolve_period

    _check_writable(png)
    try:
        return resolve_period(since, until, period)
    except ValueError as exc:
        _fail(str(exc))
        raise  # unreachable: _fail exits


Insight = TypeVar("Insight", "ResponseTimes", "Unmet")


def _show_insight(
    result: Insight,
    tables: Callable[[Insight], list[Table]],
    draw: Callable[[Insight, Path], Path],
    as_json: bool,
    png: Path | None,
) -> None:
    """An insight as JSON or tables on stdout, and its chart when asked."""
    import json

    from partnerbus.insights import print_tables

    if as_json:
        sys.stdout.write(json.dumps(result.as_json(), ensure_ascii=False, indent=2) + "\n")
    else:
        print_tables(tables(result), console)
    if png is not None:
        try:
            draw(result, png)
        except OSError as exc:
            _fail(f"could not write the chart ({type(exc).__name__}: {exc.strerror or exc})")
        err.print(f"chart written to {png}")


@insights_app.command("response-times")
def insights_response_times(
    since: SinceOption = None,
    until: UntilOption = None,
    period: PeriodOption = None,
    as_json: JsonOption = False,
    png: PngOption = None,
) -> None:
    """Per partner and per agreement (source → partner): time to answer, to accept, to
    complete (median / 90th percentile, with their counts); partners whose times grew
    against the previous period of the same length first."""
    from partnerbus.insights import response_times, response_times_png, response_times_tables

    window = _insight_period(since, until, period, png)
    store = _store()
    try:
        result = response_times(store.engine, window)
    finally:
        store.dispose()
    _show_insight(result, response_times_tables, response_times_png, as_json, png)


@insights_app.command("unmet")
def insights_unmet(
    by: Annotated[str, typer.Option(help="commune, epci or departement.")] = "commune",
    since: SinceOption = None,
    until: UntilOption = None,
    period: PeriodOption = None,
    as_json: JsonOption = False,
    png: PngOption = None,
) -> None:
    """Observed unmet demand, need × territory: no partner found, expired unanswered,
    refused as full, closed without consent; beside the directory's supply gaps."""
    from partnerbus.insights import unmet, unmet_png, unmet_tables
    from partnerbus.insights.unmet import BY

    if by not in BY:
        _fail(f"--by is one of {', '.join(BY)}, not {by!r}")
    window = _insight_period(since, until, period, png)
    _, directory, store = _ops_context()
    try:
        result = unmet(store.engine, directory, window, by=by)
    finally:
        store.dispose()
    _show_insight(result, unmet_tables, unmet_png, as_json, png)


def main() -> None:
    _mount_optional()
    app()


if __name__ == "__main__":
    main()
