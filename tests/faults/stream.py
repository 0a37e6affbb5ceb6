"""The shared harness of the fault tests: a stream of consented signals, published as a
careful partner would (confirms, resend until confirmed, same `message_id`), and an
independent consumer that counts the referrals that reached the partners' queues."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal as signal_module
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from sqlalchemy import select

from partnerbus.broker.topology import Topology
from partnerbus.directory import Directory, load_sample
from partnerbus.ledger import tables
from partnerbus.ledger.store import LedgerTx, Store
from partnerbus.rules import signal_pseudonym
from partnerbus.settings import Settings
from tests.e2e.helpers import ROUBAIX, consent, new_id, signal
from tests.keys import TEST_KEY, TEST_KEY_BYTES

KINDS = ("ccas-cias", "points-conseil-budget", "cresus", "caf", "maisons-des-solidarites")
SOURCE = "lmh-recouvrement"
N = 200
"""Signals per fault run: each for its own consented person, so each yields one referral."""


def fault_settings(url: str, prefix: str, db: Path, **overrides: object) -> Settings:
    """Settings of a bus under fault: short lease and sweep, so crashes heal in seconds;
    the lease stays above twice the publish timeout, the rule docs/RELIABILITY.md gives."""
    values: dict[str, object] = {
        "amqp_url": url,
        "prefix": prefix,
        "database_url": f"sqlite:///{db}",
        "retry_delays_ms": (200,),
        "delivery_limit": 5,
        "relay_interval_s": 0.5,
        "outbox_lease_s": 5,
        "publish_timeout_s": 2,
        "scheduler_interval_s": 3600,
        "pseudonym_key": TEST_KEY,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def env_for(settings: Settings) -> dict[str, str]:
    """The same settings as `PARTNERBUS_*` environment variables, for `partnerbus run`."""
    return {
        "PARTNERBUS_AMQP_URL": settings.amqp_url.get_secret_value(),
        "PARTNERBUS_PREFIX": settings.prefix,
        "PARTNERBUS_DATABASE_URL": settings.database_url,
        "PARTNERBUS_RETRY_DELAYS_MS": json.dumps(list(settings.retry_delays_ms)),
        "PARTNERBUS_DELIVERY_LIMIT": str(settings.delivery_limit),
        "PARTNERBUS_RELAY_INTERVAL_S": str(settings.relay_interval_s),
        "PARTNERBUS_OUTBOX_LEASE_S": str(settings.outbox_lease_s),
        "PARTNERBUS_PUBLISH_TIMEOUT_S": str(settings.publish_timeout_s),
        "PARTNERBUS_SCHEDULER_INTERVAL_S": str(settings.scheduler_interval_s),
        "PARTNERBUS_PSEUDONYM_KEY": settings.pseudonym_key.get_secret_value(),
    }


@dataclass
class Workload:
    """N persons, a consent each, a signal each: the signals' ids are what we count."""

    prefix: str
    n: int = N
    directory: Directory = field(default_factory=load_sample)
    consents: list[dict] = field(default_factory=list)
    signals: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        agency = self.directory.agency_for(ROUBAIX).id
        for _ in range(self.n):
            person = new_id("T")
            self.consents.append(consent(person=person, agency=agency, kinds=KINDS))
            self.signals.append(signal(person=person, source=SOURCE))
        self.agency = agency

    @property
    def signal_ids(self) -> set[str]:
        return {s["message_id"] for s in self.signals}

    @property
    def topology(self) -> Topology:
        return Topology(self.prefix)


class Publisher:
    """A partner's careful publisher: confirms, and a message not confirmed is sent again
    with the same `message_id` once the connection is back (the bus deduplicates)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.connection: AbstractRobustConnection | None = None
        self.published = 0
        self.resent = 0

    async def __aenter__(self) -> Publisher:
        self.connection = await aio_pika.connect_robust(self.url, reconnect_interval=0.5)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.connection is not None:
            await self.connection.close()

    async def send(
        self, exchange: str, bodies: Iterable[dict], routing_key: str, *, timeout: float = 180
    ) -> None:
        assert self.connection is not None
        channel = None
        async with asyncio.timeout(timeout):
            for body in bodies:
                while True:
                    try:
                        if channel is None or channel.is_closed:
                            channel = await self.connection.channel(
                                publisher_confirms=True, on_return_raises=True
                            )
                        ex = await channel.get_exchange(exchange, ensure=False)
                        await ex.publish(
                            aio_pika.Message(
                                json.dumps(body).encode(),
                                content_type="application/json",
                                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                message_id=body["message_id"],
                                user_id="guest",
                            ),
                            routing_key=routing_key,
                            timeout=5,
                        )
                        self.published += 1
                        break
                    except Exception:  # connection lost, nack, timeout: send it again
                        self.resent += 1
                        channel = None
                        await asyncio.sleep(0.1)


@dataclass
class Tally:
    """What the independent consumer saw."""

    n: int
    deliveries: list[tuple[str, str, bool]] = field(default_factory=list)
    """(referral_id, message_id, redelivered flag) per delivery of a referral of ours."""

    @property
    def distinct(self) -> int:
        return len({rid for rid, _, _ in self.deliveries})

    @property
    def distinct_message_ids(self) -> int:
        """What a partner deduplicating on `message_id` keeps."""
        return len({mid for _, mid, _ in self.deliveries})

    @property
    def twice(self) -> set[str]:
        """Referral ids delivered more than once."""
        seen: set[str] = set()
        again: set[str] = set()
        for rid, _, _ in self.deliveries:
            (again if rid in seen else seen).add(rid)
        return again

    @property
    def lost(self) -> int:
        return self.n - self.distinct

    @property
    def duplicated(self) -> int:
        return len(self.deliveries) - self.distinct

    def line(self, what: str, seconds: float) -> str:
        return (
            f"FAULT-FIGURES {what}: N={self.n} delivered={len(self.deliveries)} "
            f"distinct={self.distinct} lost={self.lost} duplicated={self.duplicated} "
            f"partner-keeps={self.distinct_message_ids} "
            f"time={seconds:.1f}s"
        )


class GatedStore(Store):
    """A store whose intake transactions, once armed, run `after` more and then wait at a
    gate until it opens: the bus is held mid-stream, however fast it drains the queue (left
    to race, the stop could come after the last signal). Only the intake's thread waits."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._left: int | None = None
        self.reached = threading.Event()
        self._open = threading.Event()

    def arm(self, after: int) -> None:
        self._left = after

    def open(self) -> None:
        self._open.set()

    @contextmanager
    def begin(self) -> Iterator[LedgerTx]:
        if self._left is not None and threading.current_thread().name.startswith(
            "partnerbus-intake"
        ):
            if self._left > 0:
                self._left -= 1
            else:
                self.reached.set()
                self._open.wait(60)
        with super().begin() as tx:
            yield tx


class ReferralCounter:
    """An independent consumer on every partner queue of a prefix: counts the referrals of
    our signals by `referral_id` (other messages, such as `delivered` notices, are acked
    and ignored)."""

    def __init__(self, url: str, workload: Workload) -> None:
        self.url = url
        self.workload = workload
        self.tally = Tally(workload.n)
        self.others = 0
        self._ids = workload.signal_ids
        self._refs: dict[object, set[str]] = {}
        self._changed = asyncio.Event()
        self.connection: AbstractRobustConnection | None = None

    async def __aenter__(self) -> ReferralCounter:
        self.connection = await aio_pika.connect_robust(self.url, reconnect_interval=0.5)
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=100)
        t = self.workload.topology
        for partner in self.workload.directory.partners():
            queue = await channel.get_queue(t.partner_queue_name(partner.id), ensure=True)
            await queue.consume(self._on_message)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.connection is not None:
            await self.connection.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            body = json.loads(message.body)
        except ValueError:
            body = {}
        if message.type == "referral" and self._ours(body):
            self.tally.deliveries.append(
                (str(body["referral_id"]), str(message.message_id), bool(message.redelivered))
            )
        else:
            self.others += 1
        await message.ack()
        self._changed.set()

    def _ours(self, body: dict) -> bool:
        """A referral of one of our signals: partners see a signal only through their own
        keyed reference of it (`fault_settings` use the tests' `TEST_KEY`)."""
        partner = body.get("partner")
        if partner not in self._refs:
            self._refs[partner] = {
                signal_pseudonym(TEST_KEY_BYTES, str(partner), sid) for sid in self._ids
            }
        return body.get("signal_ref") in self._refs[partner]

    async def wait_distinct(self, count: int, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self.tally.distinct < count:
                    self._changed.clear()
                    await self._changed.wait()

    async def settle(self, pending: Callable[[], int], timeout: float = 180) -> None:
        """Wait until nothing more can arrive: the outbox has nothing unsent and every
        intake and partner queue of the prefix is empty (checked twice in a row)."""
        t = self.workload.topology
        names = [q.name for q, _ in t.intake_queues()] + [
            t.partner_queue_name(p.id) for p in self.workload.directory.partners()
        ]
        assert self.connection is not None
        calm = 0
        seen: dict[str, int] = {}
        try:
            async with asyncio.timeout(timeout):
                while calm < 2:
                    seen = {"outbox": await asyncio.to_thread(pending)}
                    channel = await self.connection.channel()
                    try:
                        for name in names:
                            q = await channel.declare_queue(name, passive=True)
                            seen[name] = int(q.declaration_result.message_count or 0)
                    finally:
                        await channel.close()
                    calm = calm + 1 if sum(seen.values()) == 0 else 0
                    await asyncio.sleep(0.2)
        except TimeoutError:
            left = {k: v for k, v in seen.items() if v}
            raise AssertionError(f"not settled after {timeout} s: {left}") from None


def pending_of(db: Path) -> Callable[[], int]:
    """Unsent outbox rows of a bus's SQLite ledger, read from the test process."""

    def pending() -> int:
        store = Store(f"sqlite:///{db}")
        try:
            return store.pending_count()
        finally:
            store.dispose()

    return pending


def resent_referrals(store: Store) -> set[str]:
    """Referral ids whose outbox row was claimed more than once: a publish that was not
    confirmed (connection lost, worker killed before `mark_sent`) and was sent again."""
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(tables.outbox.c.referral_id)
            .where(tables.outbox.c.message_type == "referral")
            .where(tables.outbox.c.attempts > 1)
        )
        return {str(r) for (r,) in rows}


def check_duplicates(tally: Tally, store: Store) -> None:
    """At least once: a referral may reach a partner twice only as the relay's resend of a
    publish whose confirm never came, with the same `message_id` (partners drop it)."""
    assert tally.distinct_message_ids == tally.distinct, "a duplicate with a new message_id"
    unexplained = tally.twice - resent_referrals(store)
    assert not unexplained, f"delivered twice without a resend: {sorted(unexplained)[:5]}"


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll a cheap predicate with tiny awaits inside an overall timeout; seconds taken."""
    began = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            while not predicate():  # noqa: ASYNC110 - a database or queue figure: no event
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None
    return time.monotonic() - began


class Worker:
    """`partnerbus run` as a subprocess (one worker process, settings from the environment),
    so that a test can SIGKILL it like a crash."""

    def __init__(self, settings: Settings, workdir: Path, name: str) -> None:
        self.env = {**os.environ, **env_for(settings)}
        self.workdir = workdir
        self.log = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "faststream",
                    "run",
                    "partnerbus.entrypoints.bootstrap:app_factory",
                    "--factory",
                ],
                env=self.env,
                cwd=self.workdir,  # no stray .env file
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown hook, no ack, no `mark_sent` runs."""
        assert self.proc is not None
        self.proc.send_signal(signal_module.SIGKILL)
        self.proc.wait(30)

    def terminate(self) -> None:
        """SIGTERM: FastStream's graceful shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


async def await_queue(
    url: str, queue: str, ready: Callable[[int, int], bool], timeout: float = 60
) -> float:
    """Poll a passive declare of `queue` until `ready(messages, consumers)`; a queue not
    declared yet is not ready. Seconds taken; polled with tiny awaits, never slept."""
    began = time.monotonic()
    connection = await aio_pika.connect(url)
    try:
        async with asyncio.timeout(timeout):
            while True:
                channel = await connection.channel()
                try:
                    q = await channel.declare_queue(queue, passive=True)
                    result = q.declaration_result
                    if ready(int(result.message_count or 0), int(result.consumer_count or 0)):
                        return time.monotonic() - began
                except aio_pika.exceptions.ChannelClosed:
                    pass  # not declared yet: the passive declare closed the channel
                finally:
                    if not channel.is_closed:
                        await channel.close()
                await asyncio.sleep(0.05)
    finally:
        await connection.close()


async def wait_consumers_gone(url: str, queue: str, timeout: float = 60) -> float:
    """Wait until no consumer is attached to `queue` (a killed worker's consumer is gone
    once RabbitMQ has seen its connection close)."""
    return await await_queue(url, queue, lambda _messages, consumers: consumers == 0, timeout)


async def wait_ready(url: str, workload: Workload, timeout: float = 60) -> float:
    """Wait until a bus consumes the signal queue and has declared every partner queue (the
    last retry queue of the last partner is declared last)."""
    t = workload.topology
    last = t.retry_queue_name(t.partner_queue_name(workload.directory.partners()[-1].id), 0)
    began = time.monotonic()
    await await_queue(url, t.signal_queue.name, lambda _m, consumers: consumers >= 1, timeout)
    await await_queue(url, last, lambda _m, _c: True, timeout)
    return time.monotonic() - began
