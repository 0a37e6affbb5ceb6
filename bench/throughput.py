"""The end-to-end throughput benchmark (issue 9): partnerbus as users run it, beside the
bare aio-pika forwarder at its best, on the same broker in the same run.

    python -m bench.throughput --json FILE [--quick] [--scenarios sqlite-1,postgres-2] ...

Phases, each under a fresh name prefix of its own (its queues and exchanges removed after):

1. `raw-forward`: `bench/forwarder.py` in its own process moves `--raw-messages` persistent
   messages from a quorum queue to a quorum queue (prefetch 256, pipelined confirms, ack
   after the confirm) while this process publishes them (256 confirms in flight) and an
   independent consumer counts them: `raw_forward_per_s`.
2. For each scenario (`sqlite-1`, `sqlite-2`, `postgres-1`, `postgres-2`: ledger and
   `--workers`): `partnerbus run` as a subprocess with `PARTNERBUS_*` settings, a directory
   file whose partners have RabbitMQ users of this run, and a fresh SQLite file or
   PostgreSQL schema. The agency's system grants `--signals` consents through the bus
   (`PartnerClient.send_consent`, as the agency's own user); once the ledger holds them,
   the recovery service publishes one signal per person (`PartnerClient.send_signal`, as
   its own user, 256 confirms in flight) and an independent consumer on every partner
   queue counts the referrals (correlated to signals through `signal_ref`, the signal's
   keyed reference, computable here because this run chose the pseudonym key). From the
   first publish to the last referral: `pipeline_per_s`; CPU of the partnerbus process
   tree from the first publish until the bus is quiet (the notices included), per signal:
   `cpu_ms_per_signal`. Every message the partners' queues received, per signal, is the
   fan-out `K` (the referral and its notices).
3. On the first scenario's bus (SQLite, one worker, by default), after its burst:
   `latency` (signals paced at half its measured rate, publish → referral),
   `urgent` (`--urgent` urgent signals spread over a `--burst` routine burst: each is sent
   when its share of the burst's referrals has arrived) and `rss` (peak RSS of the
   partnerbus processes, summed, sampled every 0.2 s during a `--rss-burst` burst).
4. `raw-fanout`: the forwarder again, publishing K messages per input to K quorum queues.

Waiting is on events (each message counted wakes the waiter) with a stall timeout: a phase
in which nothing arrives for `--stall-timeout` seconds ends the run with an error naming
the phase and how many arrived. Figures are only comparable within one run.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal as signal_module
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import aio_pika
import typer
import yaml
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from sqlalchemy import create_engine, text

from partnerbus.broker.access import (
    apply_with_rabbitmqctl,
    grants_for,
    password_deriver,
    remove_with_rabbitmqctl,
)
from partnerbus.broker.topology import Topology
from partnerbus.client import PartnerClient
from partnerbus.directory import Directory, load_directory
from partnerbus.rules import check_pseudonym_key, signal_pseudonym
from partnerbus.schemas import ConsentGranted, ConsentScope, Facts, Signal

from . import procstat

BROKER = {"address": "127.0.0.1:5672", "rabbitmqctl": "rabbitmqctl", "node": None}
"""The broker's AMQP address and how to reach its node with rabbitmqctl (`--broker`,
`--rabbitmqctl`, `--node`): the shared node by default."""
POSTGRES_URL = os.environ.get(
    "PARTNERBUS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
VHOST = "/"
SOURCE = "lmh-recouvrement"
ROUBAIX = "59512"
ARREARS = "logement-hebergement--reduire-les-impayes-de-loyer"
KINDS = ("ccas-cias", "points-conseil-budget", "cresus", "caf", "maisons-des-solidarites")
SCENARIOS = ("sqlite-1", "sqlite-2", "postgres-1", "postgres-2")
WINDOW = 256
"""Publishes in flight (confirms outstanding) for every burst, the raw forwarder's too."""

DEFAULTS = {
    "signals": 2_000,
    "raw_messages": 10_000,
    "latency_signals": 1_000,
    "burst": 10_000,
    "urgent": 30,
    "rss_burst": 100_000,
}
QUICK = {
    "signals": 40,
    "raw_messages": 400,
    "latency_signals": 20,
    "burst": 100,
    "urgent": 5,
    "rss_burst": 200,
}

console = Console()


class BenchError(Exception):
    """A phase that cannot finish: said with the phase and what arrived."""


# broker sandboxes ----------------------------------------------------------------------


def ctl_options() -> dict[str, Any]:
    return {"rabbitmqctl": BROKER["rabbitmqctl"], "node": BROKER["node"]}


def rabbitmqctl(*args: str) -> str:
    node = ["-n", str(BROKER["node"])] if BROKER["node"] else []
    done = subprocess.run(
        [str(BROKER["rabbitmqctl"]), *node, *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return done.stdout


@contextlib.asynccontextmanager
async def sandbox(run_id: str, name: str, known: bool = False) -> AsyncIterator[str]:
    """A fresh name prefix on the shared broker for one phase; every queue and exchange
    under it is deleted afterwards (found by name: the topology is being reshaped, and a
    queue it adds is removed too). Yields the prefix. (A virtual host per phase would be
    tidier, but vhost operations stall for minutes when the shared broker is busy.)
    `known`: the caller deletes its own queues, only a failure needs the listing."""
    prefix = f"bench-{run_id}-{name}"
    try:
        yield prefix
    except BaseException:
        known = False
        raise
    finally:
        try:
            if not known:
                await remove_prefix(prefix)
        except Exception as exc:
            console.print(f"[yellow]could not remove {prefix}.*: {exc!r}[/yellow]")


async def remove_prefix(prefix: str) -> None:
    def names(what: str) -> list[str]:
        out = rabbitmqctl(what, "-p", VHOST, "name", "--quiet", "--no-table-headers")
        return [n for n in out.split() if n.startswith(f"{prefix}.")]

    queues = await asyncio.to_thread(names, "list_queues")
    exchanges = await asyncio.to_thread(names, "list_exchanges")
    connection = await aio_pika.connect(amqp_url())
    async with connection:
        channel = await connection.channel()
        for queue in queues:
            await channel.queue_delete(queue)
        for exchange in exchanges:
            await channel.exchange_delete(exchange)


def amqp_url(user: str = "guest", password: str = "guest") -> str:  # noqa: S107
    host = quote(VHOST, safe="")
    address = BROKER["address"]
    return f"amqp://{quote(user, safe='')}:{quote(password, safe='')}@{address}/{host}"


@dataclass
class Run:
    """What one benchmark run made and shares across phases."""

    run_id: str
    workdir: Path
    directory_path: Path
    directory: Directory
    secret: str
    pseudonym_key: str
    stall_s: float
    window: int
    progress: Progress
    bus_settings: dict[str, str] = field(default_factory=dict)
    """`PARTNERBUS_*` settings given to every `partnerbus run` (`--bus-setting`)."""

    @property
    def source(self) -> str:
        return SOURCE

    @property
    def agency(self) -> str:
        agency = self.directory.agency_for(ROUBAIX)
        assert agency is not None, "the sample directory has an agency in Roubaix"
        return agency.id

    @property
    def advisor(self) -> str:
        """Who records the consents: one of the agency's own advisors."""
        return min(a.id for a in self.directory.partner(self.agency).advisors)

    @property
    def publishers(self) -> list[str]:
        return [self.source, self.agency]

    def user_url(self, partner_id: str) -> str:
        user = self.directory.partner(partner_id).username
        return amqp_url(user, password_deriver(self.secret)(user))

    def say(self, line: str) -> None:
        self.progress.console.print(line)


def write_directory(path: Path, user_prefix: str) -> Path:
    """The bundled sample directory with a RabbitMQ user of this run for every partner:
    users are broker-wide, and other runs on the shared broker create `pb-<id>` users."""
    data = resources.files("partnerbus.directory") / "data"
    document = yaml.safe_load((data / "lille.yaml").read_text(encoding="utf-8"))
    csv_name = document["territory"].get("communes_csv")
    if csv_name:
        document["territory"]["communes_csv"] = str(data / csv_name)
    for partner in document["partners"]:
        partner["amqp_user"] = f"{user_prefix}{partner['id']}"
    path.write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    return path


async def grant_users(run: Run, prefix: str) -> None:
    """The publishing partners' users and their rights under this prefix, derived from the
    directory by `partnerbus.broker.access` (what `partnerbus access apply` does), on the
    broker's `/` virtual host."""
    partners = [run.directory.partner(p) for p in run.publishers]
    grants = grants_for(partners, Topology(prefix))
    password_for = password_deriver(run.secret)
    await asyncio.to_thread(
        apply_with_rabbitmqctl,
        grants,
        vhost=VHOST,
        passwords={g.username: password_for(g.username) for g in grants},
        **ctl_options(),
    )


# counting ------------------------------------------------------------------------------


@dataclass
class Phase:
    """The signals of one phase and what the independent consumer saw of them."""

    name: str
    expected: int = 0
    sent_at: dict[str, float] = field(default_factory=dict)
    arrived: dict[str, float] = field(default_factory=dict)
    """Signal id → monotonic time of its first referral."""
    recorded: dict[str, float] = field(default_factory=dict)
    """Signal id → monotonic time the bus recorded it (its referral's `occurred_at`, the
    bus's clock when the intake routed it, read back onto this process's monotonic clock)."""
    message_ids: set[str] = field(default_factory=set)
    referral_ids: set[str] = field(default_factory=set)
    deliveries: int = 0
    last_arrival: float = 0.0

    @property
    def lost(self) -> int:
        return self.expected - len(self.arrived)

    @property
    def duplicated(self) -> int:
        """Referral deliveries a partner deduplicating on `message_id` drops."""
        return self.deliveries - len(self.message_ids)

    def split_ms(self, only: Iterable[str] | None = None) -> tuple[list[float], list[float]]:
        """Each latency cut in two at the moment the bus recorded the signal: publish →
        recorded (the intake), recorded → in the partner's queue (outbox and relay)."""
        ids = [s for s in (only or self.sent_at) if s in self.arrived and s in self.recorded]
        intake = sorted((self.recorded[s] - self.sent_at[s]) * 1000 for s in ids)
        relay = sorted((self.arrived[s] - self.recorded[s]) * 1000 for s in ids)
        return intake, relay

    def latencies_ms(self, ids: Iterable[str] | None = None) -> list[float]:
        ids = self.sent_at.keys() if ids is None else ids
        return sorted((self.arrived[s] - self.sent_at[s]) * 1000 for s in ids if s in self.arrived)


def _wall_to_monotonic(value: object, now_mono: float) -> float | None:
    """An ISO instant of the bus (the same machine's wall clock) on this process's
    monotonic clock, or None when the body carries none."""
    if not isinstance(value, str):
        return None
    try:
        wall = datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
    return now_mono - (time.time() - wall)


class Counter:
    """An independent consumer (as `guest`) on every partner queue of the bus: each
    referral is matched to the signal it comes from through its `signal_ref`; every other
    message (the notices) is counted. All are acked."""

    def __init__(self, url: str, prefix: str, directory: Directory, key: bytes) -> None:
        self.url = url
        self.prefix = prefix
        self.directory = directory
        self.key = key
        self.owner: dict[str, Phase] = {}
        self._ids: list[str] = []
        self._refs: dict[str, tuple[dict[str, str], int]] = {}
        self.messages = 0
        self.by_type: collections.Counter[str] = collections.Counter()
        self.referrals = 0
        self.unmatched = 0
        self.last_message = time.monotonic()
        self.changed = asyncio.Event()
        self.connection: AbstractRobustConnection | None = None

    async def __aenter__(self) -> Counter:
        self.connection = await aio_pika.connect_robust(self.url)
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=500)
        topology = Topology(self.prefix)
        for partner in self.directory.partners():
            queue = await channel.get_queue(topology.partner_queue_name(partner.id), ensure=False)
            await queue.consume(self._on_message)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.connection is not None:
            await self.connection.close()

    def register(self, phase: Phase, signal_ids: Iterable[str]) -> None:
        for sid in signal_ids:
            self.owner[sid] = phase
            self._ids.append(sid)
            phase.expected += 1

    def _signal_of(self, partner: str, ref: str) -> str | None:
        refs, upto = self._refs.get(partner, ({}, 0))
        if ref not in refs and upto < len(self._ids):
            for sid in self._ids[upto:]:
                refs[signal_pseudonym(self.key, partner, sid)] = sid
            upto = len(self._ids)
        self._refs[partner] = (refs, upto)
        return refs.get(ref)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        now = time.monotonic()
        self.messages += 1
        self.last_message = now
        try:
            body = json.loads(message.body)
        except ValueError:
            body = {}
        self.by_type[str(body.get("type"))] += 1
        if body.get("type") == "referral":
            self.referrals += 1
            sid = self._signal_of(str(body.get("partner")), str(body.get("signal_ref")))
            phase = self.owner.get(sid) if sid else None
            if phase is None:
                self.unmatched += 1
            else:
                phase.deliveries += 1
                phase.message_ids.add(str(message.message_id))
                phase.referral_ids.add(str(body.get("referral_id")))
                if sid not in phase.arrived:
                    phase.arrived[sid] = now
                    phase.last_arrival = now
                    occurred = _wall_to_monotonic(body.get("occurred_at"), now)
                    if occurred is not None:
                        phase.recorded[sid] = occurred
        await message.ack()
        self.changed.set()

    async def until(
        self,
        done: Callable[[], bool],
        count: Callable[[], int],
        what: str,
        stall_s: float,
        tick: Callable[[int], None] | None = None,
    ) -> None:
        """Wait (woken by each message counted) until `done()`; a stall of `stall_s`
        seconds without any message is an error naming `what` and `count()`."""
        while not done():
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), stall_s)
            except TimeoutError:
                msg = f"{what}: stalled, {count()} arrived, nothing new for {stall_s:.0f} s"
                raise BenchError(msg) from None
            if tick is not None:
                tick(count())

    async def quiet(self, seconds: float, limit: float) -> None:
        """Wait until no message has arrived for `seconds` (at most `limit` seconds): the
        relay's notices come after the referrals."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            idle = time.monotonic() - self.last_message
            if idle >= seconds:
                return
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), seconds - idle)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


# publishing ----------------------------------------------------------------------------


async def windowed(
    items: Iterable[Any], send: Callable[[Any], Awaitable[None]], window: int
) -> None:
    """Send each item with at most `window` sends (publishes awaiting their confirm) in
    flight: confirms are pipelined, as a careful fast publisher does."""
    gate = asyncio.Semaphore(window)
    errors: list[BaseException] = []

    async def one(item: Any) -> None:
        try:
            await send(item)
        except Exception as exc:
            errors.append(exc)
        finally:
            gate.release()

    tasks = set()
    for item in items:
        await gate.acquire()
        if errors:
            break
        task = asyncio.create_task(one(item))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    if errors:
        msg = f"a publish failed: {type(errors[0]).__name__}: {errors[0]}"
        raise BenchError(msg) from errors[0]


def consent_for(run: Run, person: str) -> ConsentGranted:
    now = datetime.now(UTC)
    return ConsentGranted(
        message_id=str(uuid.uuid4()),
        occurred_at=now,
        consent_id=f"c-{uuid.uuid4().hex[:16]}",
        person_ref=person,
        scope=ConsentScope(needs=("logement-hebergement",), partner_kinds=KINDS),
        collected_by=run.advisor,
        agency=run.agency,
        method="oral",
        granted_at=now - timedelta(hours=1),
        valid_until=now + timedelta(days=90),
    )


def signal_for(person: str, urgency: str = "routine") -> Signal:
    return Signal(
        message_id=f"sig-{uuid.uuid4().hex}",
        occurred_at=datetime.now(UTC),
        source=SOURCE,
        person_ref=person,
        commune=ROUBAIX,
        needs=(ARREARS,),
        urgency=urgency,  # type: ignore[arg-type]
        facts=Facts(arrears_eur=1840.0, arrears_months=4, household_size=3),
    )


# the bus as users run it ---------------------------------------------------------------


def partnerbus_executable() -> str:
    """The `partnerbus` beside this Python; `PARTNERBUS_BENCH_PARTNERBUS` names another (an
    earlier build, for a before/after in one run)."""
    chosen = os.environ.get("PARTNERBUS_BENCH_PARTNERBUS")
    if chosen:
        return chosen
    beside = Path(sys.executable).with_name("partnerbus")
    found = str(beside) if beside.exists() else shutil.which("partnerbus")
    if not found:
        msg = "the `partnerbus` command is not installed beside this Python"
        raise BenchError(msg)
    return found


@dataclass
class Ledger:
    """A fresh ledger for one scenario: a SQLite file, or a PostgreSQL schema (dropped
    after)."""

    url: str
    engine_name: str
    schema: str | None = None

    @classmethod
    def make(cls, engine_name: str, workdir: Path, name: str, postgres_url: str) -> Ledger:
        if engine_name == "sqlite":
            return cls(f"sqlite:///{workdir / f'{name}.db'}", engine_name)
        schema = f"bench_{uuid.uuid4().hex[:10]}"
        admin = create_engine(postgres_url)
        try:
            with admin.begin() as conn:
                conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        finally:
            admin.dispose()
        return cls(f"{postgres_url}?options=-csearch_path%3D{schema}", engine_name, schema)

    def drop(self, postgres_url: str) -> None:
        if self.schema is None:
            return
        admin = create_engine(postgres_url)
        try:
            with admin.begin() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE'))
        finally:
            admin.dispose()

    def consents(self) -> int:
        """Consents recorded: the bus answers nothing to a granted consent, so its ledger
        is the only witness that the signals will find them."""
        engine = create_engine(self.url)
        try:
            with engine.connect() as conn:
                return int(conn.execute(text("SELECT count(*) FROM consents")).scalar_one())
        except Exception:
            return 0
        finally:
            engine.dispose()


class BusProcess:
    """`partnerbus run --workers N` in a process group of its own, settings from the
    environment, output to a log file."""

    def __init__(self, run: Run, prefix: str, ledger: Ledger, workers: int, name: str) -> None:
        self.run = run
        self.prefix = prefix
        self.workers = workers
        self.name = name
        self.log = run.workdir / f"{name}.log"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("PARTNERBUS_")},
            "PARTNERBUS_AMQP_URL": amqp_url(),
            "PARTNERBUS_PREFIX": prefix,
            "PARTNERBUS_DATABASE_URL": ledger.url,
            "PARTNERBUS_DIRECTORY_PATH": str(run.directory_path),
            "PARTNERBUS_PSEUDONYM_KEY": run.pseudonym_key,
            **run.bus_settings,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> BusProcess:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [partnerbus_executable(), "run", "--workers", str(self.workers)],
                env=self.env,
                cwd=self.run.workdir,  # no stray .env file
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def usage(self) -> procstat.Usage:
        return procstat.usage(self.pid)

    def tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            msg = f"{self.name}: partnerbus exited ({self.proc.returncode}):\n{self.tail()}"
            raise BenchError(msg)

    async def ready(self, timeout: float = 120) -> float:
        """Wait until every intake queue has a consumer per worker and every partner queue
        is declared; seconds taken."""
        topology = Topology(self.prefix)
        intake = [q.name for q, _ in topology.intake_queues()]
        partners = [topology.partner_queue_name(p.id) for p in self.run.directory.partners()]
        began = time.monotonic()
        connection = await aio_pika.connect(amqp_url())
        try:
            while True:
                self.check_alive()
                if time.monotonic() - began > timeout:
                    msg = f"{self.name}: not ready after {timeout:.0f} s:\n{self.tail()}"
                    raise BenchError(msg)
                if await _consumers_at_least(connection, intake, self.workers) and (
                    await _consumers_at_least(connection, partners, 0)
                ):
                    return time.monotonic() - began
                await asyncio.sleep(0.1)  # polled: the broker tells no one of a new consumer
        finally:
            await connection.close()

    def stop(self) -> None:
        """SIGTERM to the group (FastStream's graceful shutdown), SIGKILL after 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal_module.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal_module.SIGKILL)
            self.proc.wait(10)


async def _consumers_at_least(connection: Any, names: list[str], count: int) -> bool:
    """Whether every queue exists with at least `count` consumers."""
    channel = await connection.channel()
    try:
        for name in names:
            queue = await channel.declare_queue(name, passive=True)
            if int(queue.declaration_result.consumer_count or 0) < count:
                return False
        return True
    except aio_pika.exceptions.ChannelClosed:
        return False  # not declared yet: the passive declare closed the channel
    finally:
        if not channel.is_closed:
            await channel.close()


@dataclass
class Scene:
    """A running bus with its publishers and counter."""

    run: Run
    name: str
    bus: BusProcess
    ledger: Ledger
    counter: Counter
    source: PartnerClient
    agency: PartnerClient
    consents_sent: int = 0


async def grant_consents(scene: Scene, persons: list[str], what: str) -> float:
    """The agency's system grants a consent per person through the bus; returns once the
    ledger holds them all (seconds taken)."""
    run = scene.run
    task = run.progress.add_task(f"{what}: consents", total=len(persons))
    began = time.monotonic()
    sender = asyncio.create_task(
        windowed((consent_for(run, p) for p in persons), scene.agency.send_consent, run.window)
    )
    target = scene.consents_sent + len(persons)
    seen, since = -1, time.monotonic()
    try:
        while True:
            scene.bus.check_alive()
            recorded = await asyncio.to_thread(scene.ledger.consents)
            run.progress.update(task, completed=recorded - scene.consents_sent)
            if recorded >= target:
                break
            if sender.done() and sender.exception() is not None:
                raise sender.exception()  # type: ignore[misc]
            if recorded != seen:
                seen, since = recorded, time.monotonic()
            elif time.monotonic() - since > run.stall_s:
                msg = (
                    f"{what}: consents stalled, {recorded - scene.consents_sent} of "
                    f"{len(persons)} recorded, nothing new for {run.stall_s:.0f} s"
                )
                raise BenchError(msg)
            await asyncio.sleep(0.2)  # a database count: nothing to wait on
        await sender
        # The bus answers each consent to the agency (`consent-recorded`): let those
        # answers arrive too, so that the phase measured next carries only its signals.
        answered = scene.counter.by_type
        await scene.counter.until(
            lambda: answered["consent-recorded"] >= target,
            lambda: answered["consent-recorded"],
            f"{what}: consent answers",
            run.stall_s,
        )
    finally:
        if not sender.done():
            sender.cancel()
        run.progress.remove_task(task)
    scene.consents_sent = target
    return time.monotonic() - began


def new_persons(n: int) -> list[str]:
    return [f"T-{uuid.uuid4().hex[:16]}" for _ in range(n)]


async def wait_arrivals(scene: Scene, phase: Phase, ids: set[str] | None, what: str) -> None:
    """Until every signal of `phase` (or of `ids`) has its referral."""
    run = scene.run
    goal = phase.expected if ids is None else len(ids)
    task = run.progress.add_task(f"{what}: referrals", total=goal)

    def count() -> int:
        return len(phase.arrived) if ids is None else len(ids & phase.arrived.keys())

    def tick(n: int) -> None:
        run.progress.update(task, completed=n)

    try:
        await scene.counter.until(
            lambda: count() >= goal, count, f"{scene.name} {what}", run.stall_s, tick
        )
    except BenchError:
        scene.bus.check_alive()
        raise
    finally:
        run.progress.remove_task(task)


async def throughput(scene: Scene, n: int) -> dict[str, Any]:
    """N consented signals as fast as the source's system publishes them."""
    run = scene.run
    persons = new_persons(n)
    await grant_consents(scene, persons, f"{scene.name} burst")
    signals = [signal_for(p) for p in persons]
    phase = Phase(f"{scene.name}")
    scene.counter.register(phase, (s.message_id for s in signals))
    messages_before = scene.counter.messages
    cpu0 = scene.bus.usage()
    t0 = time.monotonic()
    sender = asyncio.create_task(windowed(signals, scene.source.send_signal, run.window))
    await wait_arrivals(scene, phase, None, f"{scene.name} burst")
    await sender
    seconds = phase.last_arrival - t0
    await scene.counter.quiet(3.0, limit=max(30.0, run.stall_s))
    cpu1 = scene.bus.usage()
    k = (scene.counter.messages - messages_before) / n
    return {
        "phase": phase,
        "signals": n,
        "seconds": round(seconds, 3),
        "pipeline_per_s": round(n / seconds, 2),
        "cpu_ms_per_signal": round((cpu1.cpu_s - cpu0.cpu_s) * 1000 / n, 2),
        "messages_per_signal": round(k, 2),
        "processes": cpu1.processes,
    }


async def latency(scene: Scene, n: int, rate: float) -> dict[str, Any]:
    """N signals paced at `rate` per second: publish → referral, each."""
    run = scene.run
    persons = new_persons(n)
    await grant_consents(scene, persons, "latency")
    signals = [signal_for(p) for p in persons]
    phase = Phase("latency")
    scene.counter.register(phase, (s.message_id for s in signals))
    cpu0 = scene.bus.usage()
    t0 = time.monotonic()
    sends = []
    for i, s in enumerate(signals):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing the publisher, not waiting for an outcome
        phase.sent_at[s.message_id] = time.monotonic()
        sends.append(asyncio.create_task(scene.source.send_signal(s)))
    await asyncio.gather(*sends)
    await wait_arrivals(scene, phase, None, "latency")
    lat = phase.latencies_ms()
    intake, relay = phase.split_ms()
    await scene.counter.quiet(3.0, limit=max(30.0, run.stall_s))
    cpu1 = scene.bus.usage()
    return {
        "phase": phase,
        "signals": n,
        "rate_per_s": round(rate, 2),
        "cpu_ms_per_signal": round((cpu1.cpu_s - cpu0.cpu_s) * 1000 / n, 2),
        "latency_p50_ms": percentile(lat, 0.5),
        "latency_p99_ms": percentile(lat, 0.99),
        "intake_p50_ms": percentile(intake, 0.5),
        "intake_p99_ms": percentile(intake, 0.99),
        "relay_p50_ms": percentile(relay, 0.5),
        "relay_p99_ms": percentile(relay, 0.99),
        "latency_max_ms": round(lat[-1], 1) if lat else None,
    }


async def urgent(scene: Scene, burst: int, count: int) -> dict[str, Any]:
    """A routine burst; the j-th of `count` urgent signals is sent once j/(count+1) of the
    burst's referrals have arrived, so they are spread over the time the burst drains."""
    run = scene.run
    persons = new_persons(burst + count)
    await grant_consents(scene, persons, "urgent")
    routine = [signal_for(p) for p in persons[:burst]]
    urgents = [signal_for(p, "urgent") for p in persons[burst:]]
    phase = Phase("urgent")
    scene.counter.register(phase, (s.message_id for s in [*routine, *urgents]))
    routine_ids = {s.message_id for s in routine}
    urgent_ids = {s.message_id for s in urgents}
    t0 = time.monotonic()
    sender = asyncio.create_task(windowed(routine, scene.source.send_signal, run.window))
    task = run.progress.add_task("urgent: routine burst", total=burst)

    def drained() -> int:
        return len(routine_ids & phase.arrived.keys())

    try:
        for j, s in enumerate(urgents, start=1):
            share = j * burst // (count + 1)
            await scene.counter.until(
                lambda share=share: drained() >= share,
                drained,
                f"{scene.name} urgent burst",
                run.stall_s,
                lambda n: run.progress.update(task, completed=n),
            )
            phase.sent_at[s.message_id] = time.monotonic()
            await scene.source.send_signal(s)
        await sender
    finally:
        run.progress.remove_task(task)
    await wait_arrivals(scene, phase, None, "urgent burst")
    seconds = max(phase.arrived[s] for s in routine_ids) - t0
    lat = phase.latencies_ms(urgent_ids)
    intake, relay = phase.split_ms(urgent_ids)
    await scene.counter.quiet(3.0, limit=max(30.0, run.stall_s))
    return {
        "phase": phase,
        "burst": burst,
        "urgent": count,
        "burst_per_s": round(burst / seconds, 2),
        "urgent_p50_ms": percentile(lat, 0.5),
        "urgent_p99_ms": percentile(lat, 0.99),
        "urgent_intake_p99_ms": percentile(intake, 0.99),
        "urgent_relay_p99_ms": percentile(relay, 0.99),
        "urgent_max_ms": round(lat[-1], 1) if lat else None,
    }


async def rss(scene: Scene, n: int) -> dict[str, Any]:
    """Peak RSS of the partnerbus processes (summed) during an N-signal burst."""
    run = scene.run
    persons = new_persons(n)
    peak = {"consents": 0, "burst": 0}
    part = "consents"
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            peak[part] = max(peak[part], scene.bus.usage().rss_bytes)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)

    sampler = asyncio.create_task(sample())
    try:
        await grant_consents(scene, persons, "rss")
        part = "burst"
        signals = [signal_for(p) for p in persons]
        phase = Phase("rss")
        scene.counter.register(phase, (s.message_id for s in signals))
        t0 = time.monotonic()
        sender = asyncio.create_task(windowed(signals, scene.source.send_signal, run.window))
        await wait_arrivals(scene, phase, None, "rss burst")
        await sender
        seconds = phase.last_arrival - t0
        await scene.counter.quiet(3.0, limit=max(30.0, run.stall_s))
    finally:
        stop.set()
        await sampler
    return {
        "phase": phase,
        "signals": n,
        "burst_per_s": round(n / seconds, 2),
        "rss_mb": round(peak["burst"] / 2**20, 1),
        "rss_mb_during_consents": round(peak["consents"] / 2**20, 1),
    }


@contextlib.asynccontextmanager
async def scene(
    run: Run, name: str, engine_name: str, workers: int, postgres_url: str
) -> AsyncIterator[Scene]:
    """A fresh prefix, users' rights, ledger and bus for one scenario; removed after."""
    async with sandbox(run.run_id, name) as prefix:
        ledger = await asyncio.to_thread(Ledger.make, engine_name, run.workdir, name, postgres_url)
        bus = BusProcess(run, prefix, ledger, workers, name).start()
        try:
            # rabbitmqctl is slow (a second a call): the rights are set while the bus starts.
            await grant_users(run, prefix)
            took = await bus.ready()
            run.say(f"{name}: partnerbus run --workers {workers} ready in {took:.1f} s")
            key = check_pseudonym_key(run.pseudonym_key)
            async with (
                Counter(amqp_url(), prefix, run.directory, key) as counter,
                PartnerClient(run.user_url(run.source), run.source, prefix=prefix) as source,
                PartnerClient(run.user_url(run.agency), run.agency, prefix=prefix) as agency,
            ):
                yield Scene(run, name, bus, ledger, counter, source, agency)
        finally:
            await asyncio.to_thread(bus.stop)
            await asyncio.to_thread(ledger.drop, postgres_url)


# the bare forwarder --------------------------------------------------------------------


def start_forwarder(run: Run, name: str, url: str, source: str, targets: list[str]) -> Any:
    """`bench/forwarder.py` in a process (and process group) of its own."""
    with (run.workdir / f"{name}.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "bench.forwarder", url, source, *targets],
            cwd=Path(__file__).resolve().parent.parent,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_process(proc: Any) -> None:
    """SIGTERM, then SIGKILL after 30 s."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@dataclass
class Copies:
    """What the independent consumer counted of the forwarder's output."""

    seen: set[str] = field(default_factory=set)
    deliveries: int = 0
    last: float = 0.0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        self.deliveries += 1
        self.seen.add(str(message.message_id))
        self.last = time.monotonic()
        await message.ack()
        self.changed.set()


async def raw_forward(run: Run, name: str, n: int, k: int, body: bytes) -> dict[str, Any]:
    """The forwarder moving N inputs, K persistent confirmed copies each, while this
    process publishes the inputs (`WINDOW` confirms in flight) and counts the copies.
    Timed from the first publish to the last copy counted, as the pipeline is."""
    async with sandbox(run.run_id, name, known=True) as prefix:
        url = amqp_url()
        source = f"{prefix}.in"
        targets = [f"{prefix}.out-{i}" for i in range(k)]
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            quorum = {"x-queue-type": "quorum"}
            for queue_name in (source, *targets):
                await channel.declare_queue(queue_name, durable=True, arguments=quorum)
            copies = Copies()
            counting = await connection.channel()
            await counting.set_qos(prefetch_count=500)
            for t in targets:
                queue = await counting.get_queue(t, ensure=False)
                await queue.consume(copies.on_message)
            proc = start_forwarder(run, name, url, source, targets)
            task = run.progress.add_task(f"{name}: messages", total=n * k)
            try:
                began = time.monotonic()
                while not await _consumers_at_least(connection, [source], 1):
                    if proc.poll() is not None or time.monotonic() - began > 60:
                        msg = f"{name}: the forwarder did not start (log: {name}.log)"
                        raise BenchError(msg)
                    await asyncio.sleep(0.1)  # polled: the broker tells no one of a consumer
                exchange = channel.default_exchange

                async def send(i: int) -> None:
                    await exchange.publish(
                        aio_pika.Message(
                            body,
                            content_type="application/json",
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            message_id=f"m-{i}",
                        ),
                        routing_key=source,
                    )

                cpu0 = procstat.usage(proc.pid)
                t0 = time.monotonic()
                sender = asyncio.create_task(windowed(range(n), send, run.window))
                while len(copies.seen) < n * k:
                    copies.changed.clear()
                    try:
                        await asyncio.wait_for(copies.changed.wait(), run.stall_s)
                    except TimeoutError:
                        msg = (
                            f"{name}: stalled, {len(copies.seen)} of {n * k} copies arrived, "
                            f"nothing new for {run.stall_s:.0f} s"
                        )
                        raise BenchError(msg) from None
                    run.progress.update(task, completed=len(copies.seen))
                await sender
                cpu1 = procstat.usage(proc.pid)
                seconds = copies.last - t0
            finally:
                run.progress.remove_task(task)
                await asyncio.to_thread(stop_process, proc)
            for queue_name in (source, *targets):  # all it made: no rabbitmqctl listing
                await channel.queue_delete(queue_name)
    return {
        "messages": n,
        "fanout": k,
        "seconds": round(seconds, 3),
        "per_s": round(n / seconds, 2),
        "cpu_ms_per_message": round((cpu1.cpu_s - cpu0.cpu_s) * 1000 / n, 3),
        "duplicated": copies.deliveries - len(copies.seen),
    }


# the run -------------------------------------------------------------------------------


async def rabbitmq_version() -> str | None:
    """The server's own version, from the AMQP handshake (no rabbitmqctl call)."""
    try:
        connection = await aio_pika.connect(amqp_url(), timeout=10)
    except (OSError, aio_pika.exceptions.AMQPError, TimeoutError):
        return None
    async with connection:
        properties = connection.transport.connection.server_properties  # type: ignore[union-attr]
        version = properties.get("version")
        return version.decode() if isinstance(version, bytes) else version


def facts(postgres_url: str) -> dict[str, Any]:
    out: dict[str, Any] = procstat.machine()
    out["python"] = platform.python_version()
    out["sqlite"] = sqlite3.sqlite_version
    out["rabbitmq"] = asyncio.run(rabbitmq_version())
    try:
        engine = create_engine(postgres_url)
        with engine.connect() as conn:
            out["postgresql"] = conn.execute(text("SHOW server_version")).scalar_one()
        engine.dispose()
    except Exception:
        out["postgresql"] = None
    return out


def parse_scenarios(value: str) -> list[tuple[str, str, int]]:
    out = []
    for name in (v.strip() for v in value.split(",") if v.strip()):
        if name not in SCENARIOS:
            msg = f"unknown scenario {name!r}: choose among {', '.join(SCENARIOS)}"
            raise typer.BadParameter(msg)
        engine_name, workers = name.rsplit("-", 1)
        out.append((name, engine_name, int(workers)))
    if not out:
        msg = "no scenario"
        raise typer.BadParameter(msg)
    return out


async def bench(
    run: Run,
    counts: dict[str, int],
    scenarios: list[tuple[str, str, int]],
    *,
    skip_rss: bool,
    fanout: int,
    postgres_url: str,
    latency_rate: float | None = None,
) -> dict[str, Any]:
    sample_body = signal_for("T-0000000000000000").model_dump_json().encode()
    result: dict[str, Any] = {"scenarios": {}}
    run.say("raw forwarder (1 copy per input)")
    raw = await raw_forward(run, "raw-forward", counts["raw_messages"], 1, sample_body)
    run.say(f"  raw_forward_per_s {raw['per_s']}")
    result["raw_forward"] = raw
    phases: list[Phase] = []
    headline = scenarios[0][0]
    for name, engine_name, workers in scenarios:
        async with scene(run, name, engine_name, workers, postgres_url) as s:
            figures = await throughput(s, counts["signals"])
            phases.append(figures.pop("phase"))
            figures["ratio"] = round(figures["pipeline_per_s"] / raw["per_s"], 3)
            run.say(
                f"  {name}: {figures['pipeline_per_s']} signals/s, ratio {figures['ratio']}, "
                f"{figures['cpu_ms_per_signal']} ms CPU/signal, "
                f"{figures['messages_per_signal']} messages/signal"
            )
            result["scenarios"][name] = figures
            if name != headline:
                continue
            rate = latency_rate or figures["pipeline_per_s"] / 2
            lat = await latency(s, counts["latency_signals"], rate)
            phases.append(lat.pop("phase"))
            run.say(
                f"  latency at {lat['rate_per_s']}/s: p50 {lat['latency_p50_ms']} ms, "
                f"p99 {lat['latency_p99_ms']} ms (intake p50/p99 {lat['intake_p50_ms']}/"
                f"{lat['intake_p99_ms']}, outbox and relay {lat['relay_p50_ms']}/"
                f"{lat['relay_p99_ms']})"
            )
            result["latency"] = lat
            urg = await urgent(s, counts["burst"], counts["urgent"])
            phases.append(urg.pop("phase"))
            run.say(
                f"  urgent during a {urg['burst']}-signal burst: p99 {urg['urgent_p99_ms']} ms "
                f"(intake {urg['urgent_intake_p99_ms']}, outbox and relay "
                f"{urg['urgent_relay_p99_ms']})"
            )
            result["urgent"] = urg
            if not skip_rss:
                mem = await rss(s, counts["rss_burst"])
                phases.append(mem.pop("phase"))
                run.say(f"  rss during a {mem['signals']}-signal burst: {mem['rss_mb']} MB")
                result["rss"] = mem
            # Late duplicates of every phase of this bus are counted before it stops.
            await s.counter.quiet(3.0, limit=30.0)
            result["scenarios"][name]["unmatched_referrals"] = s.counter.unmatched
    k = fanout or max(1, round(result["scenarios"][headline]["messages_per_signal"]))
    run.say(f"raw forwarder, {k} copies per input")
    fan = await raw_forward(run, "raw-fanout", counts["raw_messages"], k, sample_body)
    result["raw_fanout"] = fan
    head = result["scenarios"][headline]
    for figures in result["scenarios"].values():
        figures["ratio_fanout"] = round(figures["pipeline_per_s"] / fan["per_s"], 3)
    by_phase = {
        p.name: {"expected": p.expected, "lost": p.lost, "duplicated": p.duplicated} for p in phases
    }
    return {
        "raw_forward_per_s": raw["per_s"],
        "raw_fanout_per_s": fan["per_s"],
        "fanout_k": k,
        "headline_scenario": headline,
        "pipeline_per_s": head["pipeline_per_s"],
        "ratio": head["ratio"],
        "ratio_fanout": head["ratio_fanout"],
        "cpu_ms_per_signal": head["cpu_ms_per_signal"],
        "raw_cpu_ms_per_message": raw["cpu_ms_per_message"],
        "latency_p50_ms": result["latency"]["latency_p50_ms"],
        "latency_p99_ms": result["latency"]["latency_p99_ms"],
        "urgent_p99_ms": result["urgent"]["urgent_p99_ms"],
        "lost": sum(p.lost for p in phases),
        "duplicated": sum(p.duplicated for p in phases) + raw["duplicated"] + fan["duplicated"],
        "rss_mb": result["rss"]["rss_mb"] if "rss" in result else None,
        **result,
        "phases": by_phase,
    }


def table(figures: dict[str, Any]) -> Table:
    t = Table(title="partnerbus throughput (ratios hold within one run only)")
    t.add_column("figure")
    t.add_column("value", justify="right")
    for key in (
        "raw_forward_per_s",
        "raw_fanout_per_s",
        "fanout_k",
        "pipeline_per_s",
        "ratio",
        "ratio_fanout",
        "cpu_ms_per_signal",
        "raw_cpu_ms_per_message",
        "latency_p50_ms",
        "latency_p99_ms",
        "urgent_p99_ms",
        "lost",
        "duplicated",
        "rss_mb",
    ):
        t.add_row(key, "—" if figures.get(key) is None else str(figures[key]))
    for name, s in figures["scenarios"].items():
        t.add_row(
            f"{name}: per_s / ratio / cpu ms",
            f"{s['pipeline_per_s']} / {s['ratio']} / {s['cpu_ms_per_signal']}",
        )
    return t


app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)


def parse_bus_settings(items: list[str]) -> dict[str, str]:
    """`NAME=VALUE` items as `PARTNERBUS_NAME` variables; a malformed one ends the run."""
    settings: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip().upper().removeprefix("PARTNERBUS_")
        if not sep or not name.replace("_", "").isalnum():
            raise typer.BadParameter(f"{item!r}: expected NAME=VALUE", param_hint="--bus-setting")
        settings[f"PARTNERBUS_{name}"] = value
    return settings


def _count(value: int | None, name: str, quick: bool) -> int:
    if value is not None:
        return value
    return (QUICK if quick else DEFAULTS)[name]


CountOption = Annotated[int | None, typer.Option(min=1, show_default=False)]


@app.command()
def main(
    json_path: Annotated[Path, typer.Option("--json", help="Where to write the figures.")],
    signals: Annotated[
        int | None, typer.Option(min=1, help="Signals per scenario burst [2,000].")
    ] = None,
    raw_messages: Annotated[
        int | None, typer.Option(min=1, help="Inputs through the raw forwarder [10,000].")
    ] = None,
    latency_signals: Annotated[
        int | None, typer.Option(min=1, help="Signals paced at half rate [1,000].")
    ] = None,
    burst: Annotated[
        int | None, typer.Option(min=1, help="Routine burst around the urgent ones [10,000].")
    ] = None,
    urgent_count: Annotated[
        int | None, typer.Option("--urgent", min=1, help="Urgent signals in the burst [30].")
    ] = None,
    rss_burst: Annotated[
        int | None, typer.Option(min=1, help="Signals of the RSS burst [100,000].")
    ] = None,
    scenarios: Annotated[
        str,
        typer.Option(
            help="Comma-separated among sqlite-1, sqlite-2, postgres-1, postgres-2; the "
            "first is the headline and carries the latency, urgent and RSS phases."
        ),
    ] = ",".join(SCENARIOS),
    skip_rss: Annotated[bool, typer.Option(help="Skip the RSS burst.")] = False,
    latency_rate: Annotated[
        float | None,
        typer.Option(min=0.1, help="Pace of the latency phase, signals/s [half the rate]."),
    ] = None,
    bus_setting: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=VALUE given to every `partnerbus run` as PARTNERBUS_NAME (repeatable), "
            "e.g. BATCH_BUDGET_MS=0 for an A/B run."
        ),
    ] = None,
    quick: Annotated[bool, typer.Option(help="Small counts, for development.")] = False,
    fanout: Annotated[
        int, typer.Option(min=0, help="Copies per input of the fan-out forwarder; 0: measured.")
    ] = 0,
    stall_timeout: Annotated[
        float, typer.Option(min=1, help="Seconds without progress that end a phase in error.")
    ] = 60.0,
    postgres_url: Annotated[
        str, typer.Option(help="PostgreSQL database for the ledgers.")
    ] = POSTGRES_URL,
    broker: Annotated[
        str,
        typer.Option(envvar="PARTNERBUS_BENCH_BROKER", help="RabbitMQ AMQP address (guest)."),
    ] = str(BROKER["address"]),
    ctl: Annotated[
        str,
        typer.Option(
            "--rabbitmqctl",
            envvar="PARTNERBUS_BENCH_RABBITMQCTL",
            help="The rabbitmqctl executable.",
        ),
    ] = "rabbitmqctl",
    node: Annotated[
        str | None,
        typer.Option(envvar="PARTNERBUS_BENCH_NODE", help="The broker's node (rabbitmqctl -n)."),
    ] = None,
) -> None:
    """Measure partnerbus end to end beside a bare aio-pika forwarder; write FILE."""
    counts = {
        "signals": _count(signals, "signals", quick),
        "raw_messages": _count(raw_messages, "raw_messages", quick),
        "latency_signals": _count(latency_signals, "latency_signals", quick),
        "burst": _count(burst, "burst", quick),
        "urgent": _count(urgent_count, "urgent", quick),
        "rss_burst": _count(rss_burst, "rss_burst", quick),
    }
    chosen = parse_scenarios(scenarios)
    bus_settings = parse_bus_settings(bus_setting or [])
    BROKER.update(address=broker, rabbitmqctl=ctl, node=node)
    if shutil.which(ctl) is None:
        console.print("[red]rabbitmqctl is needed (partner users, clean-up)[/red]")
        raise typer.Exit(2)
    run_id = uuid.uuid4().hex[:6]
    started = datetime.now(UTC)
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="partnerbus-bench-") as tmp:
        workdir = Path(tmp)
        directory_path = write_directory(workdir / "directory.json", f"bench-{run_id}-")
        directory = load_directory(directory_path)
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        run = Run(
            run_id=run_id,
            workdir=workdir,
            directory_path=directory_path,
            directory=directory,
            secret=secrets.token_urlsafe(32),
            pseudonym_key=secrets.token_urlsafe(32),
            stall_s=stall_timeout,
            window=WINDOW,
            progress=progress,
            bus_settings=bus_settings,
        )
        machine = facts(postgres_url)
        try:
            with progress:
                figures = asyncio.run(
                    bench(
                        run,
                        counts,
                        chosen,
                        skip_rss=skip_rss,
                        fanout=fanout,
                        postgres_url=postgres_url,
                        latency_rate=latency_rate,
                    )
                )
        except BenchError as exc:
            console.print(f"[red]benchmark failed:[/red] {exc}", markup=True, highlight=False)
            raise typer.Exit(1) from None
        except (subprocess.SubprocessError, OSError, aio_pika.exceptions.AMQPError) as exc:
            # rabbitmqctl failing or the broker gone: said in one line, not a traceback
            detail = getattr(exc, "stderr", None) or ""
            console.print(
                f"[red]benchmark failed:[/red] {type(exc).__name__}: {exc} {detail}".strip(),
                markup=True,
                highlight=False,
            )
            raise typer.Exit(1) from None
        finally:
            users = [directory.partner(p).username for p in run.publishers]
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                remove_with_rabbitmqctl(users, **ctl_options())
    figures["machine"] = machine
    figures["options"] = {
        **counts,
        "scenarios": [c[0] for c in chosen],
        "skip_rss": skip_rss,
        "window": WINDOW,
        "latency_rate": latency_rate,
        "bus_settings": bus_settings,
    }
    figures["started_at"] = started.isoformat(timespec="seconds")
    figures["seconds"] = round(time.monotonic() - began, 1)
    json_path.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    console.print(table(figures))
    console.print(f"wrote {json_path}")


if __name__ == "__main__":
    app()
