"""`partnerbus demo`: the service and a scripted day from the field, on the real broker.

Six situations of a day in the Métropole Européenne de Lille:
1. the landlord's recovery service signals rent arrears in Roubaix; the tenant consented
   last week; a partner takes it and closes it;
2. the proximity team reports a hoarded flat in Tourcoing; no consent yet: the advisor of
   the Tourcoing agency is asked, visits, records a paper consent; the first partner is
   full and declines, the bus reroutes to the next best, which accepts;
3. the CCAS of Lille alerts about a tenant's rights; consent was given by SMS; the partner
   accepts;
4. the CCAS of Roubaix asks for the Fonds de solidarité logement for a tenant of Vilogia,
   the second landlord in Roubaix: it names the landlord, so Vilogia's advisor (not LMH's)
   is asked, collects the consent, and the Département's FSL service accepts;
5. Habitat et Humanisme's advisor, who follows a person housed in one of its IML flats in
   Roubaix, records her consent; the association signals her lost benefits; the first
   partner accepts, then the advisor transfers the referral to the partner she chooses:
   the first is told to drop it, the other receives it and accepts;
6. LMH's proximity team in Roubaix signals a need, but the tenant cannot be reached for
   her consent: LMH's Roubaix advisor is asked; the demo jumps forward in time (the bus's
   clock, then its scheduler pass): she is reminded, then the need closes
   `consent-not-obtained` and the source hears it.
Every partner is simulated by a consumer of its own queue; every message is printed.

Then what the network learns (issue 12): the tenant of situation 2 gets her receipt (her
right of access), read by her agency's advisor, as text and as HTML and PDF files; and the
insights — response times per partner and unmet demand — on the day's own ledger (too few
persons: its figures hidden) and on a synthetic year of the network's referrals, with
their charts. The files go to `--out` (default `demo-output/`).
"""

from __future__ import annotations

import asyncio
import socket
import tempfile
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from secrets import token_urlsafe
from typing import Any
from urllib.parse import urlsplit

import aio_pika
from pydantic import SecretStr
from rich.console import Console
from rich.table import Table

from partnerbus.broker.dlq import dead_letter_queues, peek
from partnerbus.client import PartnerClient
from partnerbus.client_store import ClientStore
from partnerbus.directory import match
from partnerbus.entrypoints.bootstrap import Bus, create_app
from partnerbus.schemas import ConsentGranted, ConsentScope, Facts, Profile, Signal
from partnerbus.settings import Settings, amqp_user, pseudonym_key_of

ARREARS = "logement-hebergement--reduire-les-impayes-de-loyer"
KEEP_HOME = "logement-hebergement--se-maintenir-dans-le-logement"
RIGHTS = "difficultes-administratives-ou-juridiques--accompagnement-pour-lacces-aux-droits"
FSL = "local-logement--fsl"
CONSENTED_KINDS = {FSL: ("departements",)}
"""What the person consents to, by need, when an advisor is asked (otherwise
`DEFAULT_KINDS`): for the FSL, the Département's fund itself."""
DEFAULT_KINDS = ("association", "ccas-cias", "maisons-des-solidarites")

console = Console()

IML_PERSON = "T-59512-0951"
UNREACHABLE = "T-59512-0588"
"""The tenant of situation 6, whom the advisor cannot reach for her consent."""


class DemoClock:
    """The bus's clock in the demo: the real time, plus the jumps the script makes (the
    follow-ups of parked needs take days; the demo does not wait them)."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def jump(self, delta: timedelta) -> datetime:
        self.offset += delta
        return self()


def _port(url: str) -> int:
    parts = urlsplit(url)
    return parts.port or (5671 if parts.scheme == "amqps" else 5672)


def broker_reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", _port(url)), 3):
            return True
    except OSError:
        return False


@dataclass
class Day:
    """The script's state: what happened, and the events the demo waits for."""

    bus: Bus
    url: str
    clock: DemoClock = field(default_factory=DemoClock)
    scene: str = ""
    """The situation being played: what partners answer may depend on it."""
    accepted: dict[str, asyncio.Queue[tuple[str, str]]] = field(
        default_factory=lambda: {"iml": asyncio.Queue()}
    )
    """Scene → (partner, referral id) of each referral accepted in it."""
    clients: dict[str, PartnerClient] = field(default_factory=dict)
    closed_for: set[str] = field(default_factory=set)
    """Partners told that a need closed `consent-not-obtained`."""
    declined: set[str] = field(default_factory=set)
    told: dict[tuple[str, str, str], asyncio.Event] = field(default_factory=dict)
    """(partner told, referral, status) → set when that loop notice arrived."""
    done: dict[str, asyncio.Event] = field(
        default_factory=lambda: {
            k: asyncio.Event()
            for k in (
                "arrears",
                "hoarding",
                "rights",
                "fsl",
                "iml",
                "redirected",
                "dropped",
                "asked",
                "reminded",
                "closed",
            )
        }
    )

    def say(self, who: str, text: str, style: str = "") -> None:
        stamp = datetime.now(UTC).strftime("%H:%M:%S")
        console.print(f"[dim]{stamp}[/dim] [bold]{who:<22}[/bold] {text}", style=style)

    async def on_message(self, partner_id: str, message: Any) -> None:
        kind = message.type
        client = self.clients[partner_id]
        if kind == "referral":
            self.say(
                partner_id,
                f"← referral {message.referral_id[:8]} for [cyan]{message.need}[/cyan] "
                f"(attempt {message.attempt}, person {message.person[:10]}…)",
            )
            await self.answer(client, message)
        elif kind == "consent-requested" and message.reminder:
            self.say(
                partner_id,
                f"← reminder: consent still awaited for {message.person_ref} "
                f"({', '.join(message.needs)})"
                + (
                    f"; the need closes on {message.closes_at:%a %d %b}"
                    if message.closes_at
                    else ""
                ),
                style="yellow",
            )
            self.say(partner_id, "→ calls again: still no answer", style="yellow")
            self.done["reminded"].set()
        elif kind == "consent-requested" and message.person_ref == UNREACHABLE:
            self.say(
                partner_id,
                f"← consent requested for {message.person_ref} ({', '.join(message.needs)}): "
                f"{message.reason}" + (f"; advisor {message.advisor}" if message.advisor else ""),
                style="yellow",
            )
            self.say(partner_id, "→ calls, knocks, leaves a note: the tenant cannot be reached")
            self.done["asked"].set()
        elif kind == "consent-requested":
            self.say(
                partner_id,
                f"← consent requested for {message.person_ref} ({', '.join(message.needs)}): "
                f"{message.reason}" + (f"; advisor {message.advisor}" if message.advisor else ""),
                style="yellow",
            )
            await self.advisor_collects_consent(client, message)
        elif kind == "referral-status-changed":
            self.heard(partner_id, message.referral_id, message.status).set()
            self.say(
                partner_id,
                f"← loop closed: referral {message.referral_id[:8]} is "
                f"[bold]{message.status}[/bold]"
                + (f" ({message.reason})" if message.reason else "")
                + (f" — {message.outcome}" if message.outcome else ""),
                style="green" if message.status in ("accepted", "completed") else "",
            )
        elif kind == "referral-withdrawn":
            self.say(
                partner_id,
                f"← referral {message.referral_id[:8]} withdrawn ({message.reason}): drops it",
                style="red",
            )
            self.done["dropped"].set()
        elif kind == "signal-closed":
            self.say(
                partner_id,
                f"← need closed: signal {message.signal_id[:8]} {message.need} is "
                f"[bold]{message.outcome}[/bold]",
            )
            if message.outcome == "consent-not-obtained":
                # the source and the advisor's agency each hear it
                self.closed_for.add(partner_id)
                if {"lmh-proximite", "lmh-agence-roubaix"} <= self.closed_for:
                    self.done["closed"].set()
        else:
            self.say(partner_id, f"← {kind}")

    def heard(self, partner_id: str, referral_id: str, status: str) -> asyncio.Event:
        return self.told.setdefault((partner_id, referral_id, status), asyncio.Event())

    async def answer(self, client: PartnerClient, referral: Any) -> None:
        need, partner = referral.need, client.partner_id
        if need == KEEP_HOME and not self.declined:
            self.declined.add(partner)
            self.say(partner, "→ declined: no room this month (full)", style="red")
            await client.send_status(referral.referral_id, "rejected", reason="full")
            return
        self.say(partner, "→ accepted")
        await client.send_status(referral.referral_id, "accepted")
        if self.scene == "iml":
            await self.accepted["iml"].put((partner, referral.referral_id))
        elif need == ARREARS:
            # Days later in real life: here, once the recovery service has heard `accepted`.
            await self.heard("lmh-recouvrement", referral.referral_id, "accepted").wait()
            await client.send_status(
                referral.referral_id, "completed", outcome="FSL file filed; repayment plan signed"
            )
            self.say(partner, "→ completed: FSL file filed; repayment plan signed")
            self.done["arrears"].set()
        elif need == KEEP_HOME:
            self.done["hoarding"].set()
        elif need == RIGHTS:
            self.done["rights"].set()
        elif need == FSL:
            self.done["fsl"].set()

    async def advisor_collects_consent(self, client: PartnerClient, request: Any) -> None:
        self.say(
            client.partner_id, "→ home visit; the tenant signs a paper consent", style="yellow"
        )
        now = datetime.now(UTC)
        await client.send_consent(
            ConsentGranted(
                message_id=str(uuid.uuid4()),
                occurred_at=now,
                consent_id=f"consent-{uuid.uuid4().hex[:8]}",
                person_ref=request.person_ref,
                scope=ConsentScope(
                    needs=request.needs,
                    partner_kinds=CONSENTED_KINDS.get(request.needs[0], DEFAULT_KINDS),
                ),
                collected_by=request.advisor or _first_advisor(self.bus, request.agency),
                agency=request.agency,
                method="paper",
                granted_at=now,
                valid_until=now + timedelta(days=182),
            )
        )


def _first_advisor(bus: Bus, agency: str) -> str:
    """Who records a consent for the agency: one of its own advisors (the bus refuses
    anyone else)."""
    return min(a.id for a in bus.directory.partner(agency).advisors)


def _consent(
    person: str,
    agency: str,
    needs: tuple[str, ...],
    kinds: tuple[str, ...],
    method: str,
    *,
    by: str,
) -> ConsentGranted:
    now = datetime.now(UTC)
    return ConsentGranted(
        message_id=str(uuid.uuid4()),
        occurred_at=now,
        consent_id=f"consent-{uuid.uuid4().hex[:8]}",
        person_ref=person,
        scope=ConsentScope(needs=needs, partner_kinds=kinds),
        collected_by=by,
        agency=agency,
        method=method,
        granted_at=now - timedelta(days=7),
        valid_until=now + timedelta(days=175),
    )


def _signal(source: str, person: str, commune: str, need: str, **extra: Any) -> Signal:
    return Signal(
        message_id=str(uuid.uuid4()),
        occurred_at=datetime.now(UTC),
        source=source,
        person_ref=person,
        commune=commune,
        needs=(need,),
        **extra,
    )


async def iml_and_redirect(day: Day, timeout: float) -> None:
    """Situation 5: the IML association as pivot; its advisor transfers the accepted
    referral to the partner she chooses."""
    bus, iml = day.bus, "hh-nord-iml"
    advisor = _first_advisor(bus, iml)
    console.rule("[bold]5. A tenant of Habitat et Humanisme (IML flat in Roubaix); a redirect")
    day.scene = "iml"
    day.say(iml, f"→ {advisor} records {IML_PERSON}'s oral consent (she follows her flat)")
    await day.clients[iml].send_consent(
        _consent(
            IML_PERSON,
            iml,
            ("difficultes-administratives-ou-juridiques",),
            ("ccas-cias", "maisons-des-solidarites", "caf"),
            "oral",
            by=advisor,
        )
    )
    await bus.wait_verdicts(5, queue="consents", timeout=timeout)
    day.say(iml, "→ signal: her housing benefit stopped after she moved in")
    signal = _signal(iml, IML_PERSON, "59512", RIGHTS)
    await day.clients[iml].send_signal(signal)
    first, rid = await asyncio.wait_for(day.accepted["iml"].get(), timeout)
    # only a referral its partner accepted is transferred: the advisor acts once she heard it
    await asyncio.wait_for(day.heard(iml, rid, "accepted").wait(), timeout)
    # the advisor knows the person: a social worker of another partner already follows her
    chosen = next(
        c.partner_id
        for c in match(bus.directory, RIGHTS, "59512", sender=iml)
        if c.partner_id != first
    )
    day.say(
        iml,
        f"→ {advisor} transfers referral {rid[:8]} from {first} to [bold]{chosen}[/bold]: "
        "its social worker already follows her",
        style="cyan",
    )
    await day.clients[iml].transfer_referral(
        rid, chosen, decided_by=advisor, reason="a social worker there already follows her"
    )
    second, _ = await asyncio.wait_for(day.accepted["iml"].get(), timeout)
    assert second == chosen, f"the transfer reached {second}, not {chosen}"
    await asyncio.wait_for(day.done["dropped"].wait(), timeout)
    day.done["iml"].set()
    day.done["redirected"].set()
    day.scene = ""


async def parked_need(day: Day, timeout: float) -> None:
    """Situation 6: a need parked for the person's consent, reminded then closed; the
    demo jumps the bus's clock forward and runs its scheduler pass, as the service would
    days later."""
    bus, source = day.bus, "lmh-proximite"
    console.rule("[bold]6. A need parked in Roubaix: the tenant cannot be reached")
    day.say(source, "→ signal: damp and mould in an LMH flat; the tenant does not open")
    await day.clients[source].send_signal(
        _signal(
            source,
            UNREACHABLE,
            "59512",
            KEEP_HOME,
            urgency="asap",
            facts=Facts(housing_condition="substandard", note="a neighbour's ceiling leaks"),
        )
    )
    # the need is parked once the advisor has been asked
    await asyncio.wait_for(day.done["asked"].wait(), timeout)
    parked = bus.settings.parked
    steps = (
        (parked.asap_remind_hours, "reminded"),
        # (settings may close as soon as it reminds: the demo still jumps an hour)
        (max(parked.asap_close_hours - parked.asap_remind_hours, 1.0), "closed"),
    )
    for hours, event in steps:
        now = day.clock.jump(timedelta(hours=hours))
        console.print(
            f"[magenta]⏩ the demo jumps {hours:g} hours forward in time: the bus's clock says "
            f"{now:%a %d %b %H:%M}; its scheduler pass runs[/magenta]"
        )
        await bus.tick()
        await asyncio.wait_for(day.done[event].wait(), timeout)


async def run_day(bus: Bus, url: str, timeout: float, clock: DemoClock | None = None) -> bool:
    day = Day(bus, url, clock or DemoClock())
    d = bus.directory
    for partner in d.partners():
        # the day is replayed from nothing each time: a memory that dies with it is right
        client = PartnerClient(
            url, partner.id, prefix=bus.topology.prefix, store=ClientStore.memory()
        )
        await client.__aenter__()
        day.clients[partner.id] = client

        async def handler(message: Any, pid: str = partner.id) -> None:
            await day.on_message(pid, message)

        await client.consume(handler)
    try:
        roubaix = d.agency_for("59512", "lmh")
        lille = d.agency_for("59350", "lmh")
        assert roubaix and lille, "the sample directory has agencies in Roubaix and Lille"

        console.rule("[bold]1. Rent arrears in Roubaix (consent on file)")
        await day.clients[roubaix.id].send_consent(
            _consent(
                "T-59512-0412",
                roubaix.id,
                ("logement-hebergement", "difficultes-financieres"),
                ("ccas-cias", "points-conseil-budget", "cresus", "maisons-des-solidarites"),
                "oral",
                by=_first_advisor(bus, roubaix.id),
            )
        )
        await bus.wait_verdicts(1, queue="consents", timeout=timeout)
        day.say("lmh-recouvrement", "→ signal: 4 months of arrears (1,840 €)")
        await day.clients["lmh-recouvrement"].send_signal(
            _signal(
                "lmh-recouvrement",
                "T-59512-0412",
                "59512",
                ARREARS,
                urgency="urgent",
                facts=Facts(arrears_eur=1840.0, arrears_months=4, household_size=3),
                profile=Profile(household="single-parent", age_band="25-59"),
            )
        )
        await asyncio.wait_for(day.done["arrears"].wait(), timeout)

        console.rule("[bold]2. A hoarded flat in Tourcoing (no consent yet)")
        day.say("lmh-proximite", "→ signal: hoarding reported by the caretaker")
        await day.clients["lmh-proximite"].send_signal(
            _signal(
                "lmh-proximite",
                "T-59599-0077",
                "59599",
                KEEP_HOME,
                facts=Facts(housing_condition="hoarding", note="neighbours complain of smells"),
                profile=Profile(household="single", age_band="60-74"),
            )
        )
        await asyncio.wait_for(day.done["hoarding"].wait(), timeout)

        console.rule("[bold]3. The CCAS of Lille alerts about a tenant's rights (SMS consent)")
        await day.clients[lille.id].send_consent(
            _consent(
                "T-59350-1290",
                lille.id,
                ("difficultes-administratives-ou-juridiques",),
                ("caf", "ccas-cias", "maisons-des-solidarites", "cidff", "fcsf"),
                "sms",
                by=_first_advisor(bus, lille.id),
            )
        )
        await bus.wait_verdicts(3, queue="consents", timeout=timeout)
        day.say("ccas-lille", "→ signal: benefits stopped after a change of situation")
        await day.clients["ccas-lille"].send_signal(
            _signal("ccas-lille", "T-59350-1290", "59350", RIGHTS, agency=lille.id)
        )
        await asyncio.wait_for(day.done["rights"].wait(), timeout)

        console.rule("[bold]4. FSL for a tenant of Vilogia in Roubaix (the landlord named)")
        day.say("ccas-roubaix", "→ signal: FSL aid for a Vilogia tenant (landlord: vilogia)")
        await day.clients["ccas-roubaix"].send_signal(
            _signal(
                "ccas-roubaix",
                "T-59512-0733",
                "59512",
                FSL,
                landlord="vilogia",
                facts=Facts(arrears_eur=960.0, arrears_months=2, household_size=2),
            )
        )
        await asyncio.wait_for(day.done["fsl"].wait(), timeout)
        await iml_and_redirect(day, timeout)
        await parked_need(day, timeout)
        await bus.relay.flush()
    finally:
        for client in day.clients.values():
            await client.__aexit__(None, None, None)
    summary(bus)
    return all(event.is_set() for event in day.done.values())


def summary(bus: Bus) -> None:
    table = Table(title="The day's referrals", show_lines=False)
    for column in ("signal", "need", "partner", "attempt", "status", "reason / outcome"):
        table.add_column(column)
    for r in bus.store.referrals():
        table.add_row(
            r.signal_id[:8],
            r.need.split("--")[-1],
            r.partner_id,
            str(r.attempt),
            r.status,
            r.reason or r.outcome or "",
        )
    console.print(table)
    console.print(
        f"outbox sent {bus.relay.sent}, pending {bus.store.pending_count()}; "
        f"audit records {bus.store.count('audit')}"
    )
    for person in ("T-59599-0077", IML_PERSON):
        console.rule(f"[bold]What the audit trail says about {person}")
        for record in bus.store.audit_trail(person):
            partner = f" → {record.partner_id}" if record.partner_id else ""
            console.print(
                f"{record.at:%H:%M:%S}  [bold]{record.action}[/bold] by {record.actor}{partner}"
                f"  {record.why or ''}"
            )


async def no_dead_letters(bus: Bus, url: str) -> bool:
    """Every message of the day was taken: no dead letter in any of the demo's queues (a
    message the bus or a partner refused would be there, with its reason)."""
    connection = await aio_pika.connect(url)
    try:
        names = await dead_letter_queues(
            connection, bus.topology, (p.id for p in bus.directory.partners())
        )
        letters = [
            letter for name in names for letter in await peek(connection, name, amqp_user(url))
        ]
    finally:
        await connection.close()
    if not letters:
        console.print("dead letters: none")
        return True
    console.print(f"[red]dead letters: {len(letters)}[/red]")
    for letter in letters:
        console.print(f"  {letter.queue}: {letter.type} {letter.message_id}: {letter.reason}")
    return False


def demo_key(settings: Settings) -> Settings | None:
    """The demo's settings with a pseudonym key: the one set (checked like the service's),
    or a throwaway random key when none is set, said on screen. None when the key set is
    refused (the reason is printed)."""
    if settings.pseudonym_key is None:
        console.print(
            "[yellow]no PARTNERBUS_PSEUDONYM_KEY set: this demo uses a throwaway random key "
            "(pseudonyms differ at every run). The service itself refuses to start "
            "without a key of its own.[/yellow]"
        )
        return settings.model_copy(update={"pseudonym_key": SecretStr(token_urlsafe(32))})
    try:
        pseudonym_key_of(settings)
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]\n(unset it for a throwaway key in the demo)")
        return None
    return settings


SYNTHETIC_REFERRALS = 20_000
"""Referrals of the synthetic year the insights are shown on (a few seconds to write)."""


def what_the_network_learns(bus: Bus, settings: Settings, out: Path, scratch: Path) -> bool:
    """The tenant's receipt and the two insights, at the terminal and as files in `out`."""
    from partnerbus.insights import (
        Period,
        print_tables,
        response_times,
        response_times_png,
        response_times_tables,
        unmet,
        unmet_png,
        unmet_tables,
    )
    from partnerbus.ledger.store import Store
    from partnerbus.receipt import (
        PdfUnavailableError,
        Retention,
        check_pdf,
        read_receipt,
        render_text,
        write_html,
        write_pdf,
    )
    from partnerbus.testing.history import END, generate

    out.mkdir(parents=True, exist_ok=True)
    agency = bus.directory.agency_for("59599")
    assert agency is not None, "the sample directory has an agency in Tourcoing"
    advisor = _first_advisor(bus, agency.id)
    console.rule(f"[bold]Her receipt: what was shared about T-59599-0077 (read by {advisor})")
    try:  # asked before the reading, so that its audit record names what was produced
        check_pdf()
        pdf = True
    except PdfUnavailableError as exc:
        console.print(f"[yellow]no PDF of the receipt here: {exc}[/yellow]")
        pdf = False
    receipt = read_receipt(
        bus.store,
        bus.directory,
        "T-59599-0077",
        advisor,
        output="text+html+pdf" if pdf else "text+html",
        now=bus.ledger.clock(),
        retention=Retention.of(settings),
    )
    render_text(receipt, console)
    write_html(receipt, out / "receipt.html")
    written = [out / "receipt.html"]
    if pdf:
        write_pdf(receipt, out / "receipt.pdf")
        written.append(out / "receipt.pdf")

    day = Period(bus.ledger.clock() - timedelta(days=30), bus.ledger.clock() + timedelta(days=1))
    console.rule("[bold]Response times on the day's own ledger")
    own = response_times(bus.store.engine, day)
    print_tables(response_times_tables(own)[:1], console)
    figures = [f for row in own.partners for f in row.figures.values()]
    hidden = sum(f.hidden for f in figures)
    console.print(
        f"{hidden} of {len(figures)} figures hidden: fewer than {own.min_persons} persons stand "
        "behind each, and a person must not be recognisable from the figures of a small commune."
    )

    console.rule(
        f"[bold]The network's insights, on a synthetic year ({SYNTHETIC_REFERRALS:,} referrals)"
    )
    history = Store(f"sqlite:///{scratch / 'synthetic-year.db'}")
    try:
        history.create_all()
        generate(history, SYNTHETIC_REFERRALS, seed=12)
        quarter = Period(END - timedelta(days=90), END)
        times = response_times(history.engine, quarter)
        print_tables(response_times_tables(times)[:1], console)
        demand = unmet(history.engine, bus.directory, quarter, by="epci")
        print_tables(unmet_tables(demand), console)
        written.append(response_times_png(times, out / "response-times.png"))
        by_commune = unmet(history.engine, bus.directory, quarter, by="commune")
        written.append(unmet_png(by_commune, out / "unmet.png"))
    finally:
        history.dispose()
    console.print("written: " + ", ".join(str(path) for path in written))
    return True


async def main(settings: Settings, timeout: float = 60.0, out: Path | None = None) -> int:
    keyed = demo_key(settings)
    if keyed is None:
        return 2
    settings = keyed
    url = settings.amqp_url.get_secret_value()
    where = f"{urlsplit(url).hostname}:{_port(url)}"
    if not broker_reachable(url):
        console.print(
            f"[red]RabbitMQ is not reachable at {where}.[/red]\n"
            "Start it with `rabbitmq-server -detached` (Debian package rabbitmq-server) and run "
            "`make demo` again. Or, with the passwords of compose.yaml set (see README):\n"
            "`docker compose up -d rabbitmq` from this repository, then\n"
            "`PARTNERBUS_AMQP_URL=amqp://admin:$PARTNERBUS_RABBITMQ_ADMIN_PASSWORD@127.0.0.1:5672/"
            " make demo`\n(the demo makes its own `demo-…` queues, which the bus's user may not "
            "touch).\n"
            "Another broker: set PARTNERBUS_AMQP_URL=amqp://user:password@host:5672/"
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="partnerbus-demo-") as tmp:
        demo = settings.model_copy(
            update={
                "prefix": f"demo-{uuid.uuid4().hex[:6]}",
                "database_url": f"sqlite:///{Path(tmp) / 'demo.db'}",
                "relay_interval_s": 0.5,
                # the demo drives the scheduler's passes itself (with its jumps in time)
                "scheduler_interval_s": 3600.0,
            }
        )
        clock = DemoClock()
        bus = create_app(demo, clock=clock)
        console.print(
            f"partnerbus demo on {urlsplit(url).hostname}, prefix [bold]{demo.prefix}[/bold], "
            f"{len(bus.directory.partners())} partners in the directory"
        )
        await bus.start()
        try:
            ok = await run_day(bus, url, timeout, clock)
        except TimeoutError:
            console.print("[red]the day did not complete in time[/red]")
            summary(bus)
            ok = False
        except Exception as exc:  # the queues are still deleted, the failure said plainly
            console.print(f"[red]the day failed: {type(exc).__name__}: {exc}[/red]")
            ok = False
        if ok:
            try:
                ok = (
                    what_the_network_learns(bus, demo, out or Path("demo-output"), Path(tmp)) and ok
                )
            except Exception as exc:  # said in one line, like a failure during the day
                console.print(f"[red]the insights failed: {type(exc).__name__}: {exc}[/red]")
                ok = False
        try:
            ok = await no_dead_letters(bus, url) and ok
        finally:
            await bus.stop()
            await bus.teardown()
    console.print(
        "[bold green]demo complete[/bold green]" if ok else "[bold red]demo failed[/bold red]"
    )
    return 0 if ok else 1
