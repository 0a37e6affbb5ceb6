"""Wiring: the one place where settings, store, directory, broker and subscribers meet.

`create_app(settings)` builds everything and connects nothing; the FastStream app's
start-up declares the topology, creates the tables and starts the outbox relay and the
scheduler. Worker processes (`partnerbus run --workers N`) each call `app_factory()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from faststream import AckPolicy, FastStream
from faststream.rabbit import Channel, RabbitBroker, RabbitQueue
from faststream.rabbit.annotations import RabbitMessage

from partnerbus import usecases
from partnerbus.broker import retention
from partnerbus.broker.publisher import RelayChannel
from partnerbus.broker.topology import Topology
from partnerbus.directory import Directory
from partnerbus.errors import describe_error, redact_wire_logs
from partnerbus.handlers.batch import Batcher
from partnerbus.handlers.delivery import Verdict
from partnerbus.handlers.outbox import Relay
from partnerbus.handlers.subscribers import CAPACITY, Wiring, build_router, raw_body
from partnerbus.ledger.migrate import open_ledger
from partnerbus.ledger.store import Store
from partnerbus.ops.counters import INTAKE_VERDICTS
from partnerbus.ops.monitor import SCHEDULER_PASS_FAILED
from partnerbus.rules import DeadlinePolicy, FollowUpPolicy, FollowUpSteps
from partnerbus.schemas import utcnow
from partnerbus.settings import Settings, amqp_user, open_directory, pseudonym_key_of
from partnerbus.usecases import DIRECTORY_UPDATES_KEY, Ledger

log = logging.getLogger("partnerbus")
VERDICTS_KEPT = 10_000
"""The intake verdicts a worker keeps for `wait_verdicts` (the demo's and the tests'
waits): the last ones only, so that a service running for months keeps a constant
footprint (between `VERDICTS_KEPT` and twice as many)."""

ANSWERS_LOOKBACK = timedelta(days=180)
"""Answers older than this no longer count in a partner's acceptance rate."""
ANSWERS_SLACK = timedelta(minutes=5)
"""How far back each refresh looks for partners that answered, beyond its last pass."""


def deadline_policy(settings: Settings) -> DeadlinePolicy:
    d = settings.deadlines
    return DeadlinePolicy(
        routine=timedelta(hours=d.routine_hours),
        urgent=timedelta(hours=d.urgent_hours),
        asap=timedelta(hours=d.asap_hours),
        reminder_fraction=d.reminder_fraction,
    )


def parked_policy(settings: Settings) -> FollowUpPolicy:
    """The parked needs' follow-up (`PARTNERBUS_PARKED_*`): remind the advisor, then close."""
    p = settings.parked
    return FollowUpPolicy(
        routine=_steps(p.routine_remind_hours, p.routine_close_hours, "PARKED_ROUTINE"),
        urgent=_steps(p.urgent_remind_hours, p.urgent_close_hours, "PARKED_URGENT"),
        asap=_steps(p.asap_remind_hours, p.asap_close_hours, "PARKED_ASAP"),
    )


def stalled_policy(settings: Settings) -> FollowUpPolicy:
    """The stalled referrals' follow-up (`PARTNERBUS_STALLED_*`): remind the partner, then
    tell the advisor."""
    s = settings.stalled
    return FollowUpPolicy(
        routine=_steps(s.routine_remind_hours, s.routine_report_hours, "STALLED_ROUTINE"),
        urgent=_steps(s.urgent_remind_hours, s.urgent_report_hours, "STALLED_URGENT"),
        asap=_steps(s.asap_remind_hours, s.asap_report_hours, "STALLED_ASAP"),
    )


def _steps(remind_hours: float, last_hours: float, name: str) -> FollowUpSteps:
    try:
        return FollowUpSteps(timedelta(hours=remind_hours), timedelta(hours=last_hours))
    except ValueError as exc:
        msg = f"PARTNERBUS_{name}_*: {exc}"
        raise ValueError(msg) from None


@dataclass
class Bus:
    """A running partnerbus service: what tests, the demo and `partnerbus run` hold."""

    settings: Settings
    topology: Topology
    broker: RabbitBroker
    app: FastStream
    ledger: Ledger
    relay: Relay
    executor: ThreadPoolExecutor
    """Start-up, the scheduler and (until it has its own) the relay."""
    intake_executor: ThreadPoolExecutor
    """The intake's own database thread: it never waits behind the relay's work."""
    verdicts: list[tuple[str, Verdict]] = field(default_factory=list)
    batchers: dict[str, Batcher] = field(default_factory=dict)
    """Each intake queue's group commit, by queue name."""
    directory_updates: list[str] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _verdict_seen: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    _retention_at: datetime | None = None
    _answers_at: datetime | None = None
    _metrics: tuple[Any, Any] | None = None

    @property
    def store(self) -> Store:
        return self.ledger.store

    @property
    def directory(self) -> Directory:
        return self.ledger.directory

    def record_verdict(self, queue: str, verdict: Verdict) -> None:
        INTAKE_VERDICTS.labels(
            queue.removeprefix(self.settings.prefix + "."), verdict.outcome
        ).inc()
        self.verdicts.append((queue, verdict))
        if len(self.verdicts) > 2 * VERDICTS_KEPT:  # trimmed in bulk: O(1) per verdict
            del self.verdicts[:-VERDICTS_KEPT]
        self._verdict_seen.set()

    async def wait_verdicts(
        self, count: int, *, queue: str | None = None, timeout: float = 10.0
    ) -> list[Verdict]:
        """Wait until `count` intake deliveries (of `queue`, or any) have been decided
        (among the last `VERDICTS_KEPT`, which is all a waiter may ask for)."""
        if count > VERDICTS_KEPT:
            raise ValueError(f"a worker keeps its last {VERDICTS_KEPT} verdicts only")
        async with asyncio.timeout(timeout):
            while True:
                found = [v for q, v in self.verdicts if queue is None or q.endswith(queue)]
                if len(found) >= count:
                    return found
                self._verdict_seen.clear()
                await self._verdict_seen.wait()

    def record_directory_update(self, message_id: str) -> None:
        self.directory_updates.append(message_id)
        del self.directory_updates[:-1000]  # the recent ones are all a waiter may need
        self._verdict_seen.set()

    async def wait_directory_update(self, message_id: str, timeout: float = 10.0) -> None:
        """Wait until this worker's directory has applied that capacity event."""
        async with asyncio.timeout(timeout):
            while message_id not in self.directory_updates:
                self._verdict_seen.clear()
                await self._verdict_seen.wait()

    async def declare(self) -> None:
        """Declare every exchange, queue, binding, dead-letter and delay queue. Idempotent."""
        t = self.topology
        exchanges = {e.name: await self.broker.declare_exchange(e) for e in t.exchanges()}
        work = [q for q, _ in t.intake_queues()] + [
            t.partner_queue(p.id) for p in self.directory.partners()
        ]
        import aio_pika

        # The bounded queues are declared on a connection of their own: a queue from before
        # the bounds makes RabbitMQ refuse the redeclare (PRECONDITION_FAILED), which closes
        # the channel it was tried on.
        async with await aio_pika.connect(self.settings.amqp_url.get_secret_value()) as probe:
            for queue in work:
                declared = await self.broker.declare_queue(queue)
                await _declare_bounded(probe, t.dead_letter_queue(queue.name), t.dead_letters.name)
                for step in range(len(t.retry_delays_ms)):
                    await _declare_bounded(probe, t.retry_queue(queue.name, step), t.retries.name)
                if t.partner_of(queue.name):
                    await declared.bind(exchanges[t.deliveries.name], routing_key=queue.routing_key)
            # Before the urgent queue, routine signals were bound with `#`, which would
            # take urgent keys too: that binding goes (unbinding a missing one is a no-op).
            routine = await probe.channel()
            signals = await routine.declare_queue(t.signal_queue.name, passive=True)
            await signals.unbind(t.signals.name, routing_key="#")
            await routine.close()

    async def teardown(self) -> None:
        """Delete every queue and exchange of this prefix (tests, demo clean-up)."""
        import aio_pika

        t = self.topology
        connection = await aio_pika.connect(self.settings.amqp_url.get_secret_value())
        async with connection:
            channel = await connection.channel()
            work = t.all_work_queue_names(p.id for p in self.directory.partners())
            for name in work:
                await channel.queue_delete(name)
                await channel.queue_delete(t.dlq_name(name))
                for step in range(len(t.retry_delays_ms)):
                    await channel.queue_delete(t.retry_queue_name(name, step))
            for exchange in t.exchanges():
                await channel.exchange_delete(exchange.name)

    async def start(self) -> None:
        """Start consuming (used by tests and the demo; `partnerbus run` uses app.run)."""
        await self.app.start()

    async def stop(self) -> None:
        await self.app.stop()

    async def _on_startup(self) -> None:
        loop = asyncio.get_running_loop()
        # Before any worker touches the ledger: its schema at this version's, migrated here
        # (one worker at a time) unless the operator migrates (`partnerbus db upgrade`).
        await loop.run_in_executor(
            self.executor,
            partial(open_ledger, self.store, auto_upgrade=self.settings.ledger_auto_upgrade),
        )
        for partner_id, status, remaining in await loop.run_in_executor(
            self.executor, self.store.capacities
        ):
            with contextlib.suppress(KeyError):
                self.directory.apply_capacity(partner_id, status, remaining)
        await self.refresh_answers()

    async def refresh_answers(self) -> int:
        """Load the partners' recent answers from the durable record into this worker's
        directory, so that every worker ranks on the same acceptance rates (each worker
        also counts the answers it records itself at once; this pass makes them agree and
        corrects what a rolled-back transaction may have counted). Returns the partners
        updated."""
        now = self.ledger.clock()
        # After the first load, only the partners that answered since the last pass (with
        # a margin for transactions still open then and for clocks of other workers).
        changed_since = None if self._answers_at is None else self._answers_at - ANSWERS_SLACK
        answers = await asyncio.get_running_loop().run_in_executor(
            self.executor,
            partial(
                self.store.recent_answers,
                now - ANSWERS_LOOKBACK,
                usecases.BUS,
                answered_since=changed_since,
            ),
        )
        self._answers_at = now
        updated = 0
        for partner_id, recent in answers.items():
            if partner_id in self.directory:
                self.directory.set_answers(partner_id, recent)
                updated += 1
        return updated

    def _serve_metrics(self) -> None:
        """This process's counters (`partnerbus.ops.counters`) on `metrics_port`, when set.
        Several workers on one host: the first serves them, the others say so and go on."""
        port = self.settings.metrics_port
        if port is None or self._metrics is not None:
            return
        from prometheus_client import start_http_server

        try:
            self._metrics = start_http_server(port, addr=self.settings.metrics_host)
        except OSError as exc:
            log.warning(
                "metrics not served on %s:%d (%s)", self.settings.metrics_host, port, exc.strerror
            )

    async def _after_startup(self) -> None:
        await self.declare()
        self._serve_metrics()
        self._stop.clear()
        self._tasks = [
            asyncio.create_task(self.relay.run(self.settings.relay_interval_s, self._stop)),
            asyncio.create_task(self._scheduler()),
        ]

    async def _on_shutdown(self) -> None:
        # Take no new message first: each subscriber finishes (and acks) the handlers under
        # way, within the broker's graceful timeout, and cancels its consumer; what it had
        # prefetched but not started goes back to the queue when the channel closes.
        # All at once: each `stop` marks its subscriber stopped before its first await, so
        # no queue takes another message while an earlier one cancels its consumer (one
        # after the other, the last queue kept consuming for as long as the others took).
        await asyncio.gather(*(subscriber.stop() for subscriber in self.broker.subscribers))
        self._stop.set()
        self.relay.kick()
        relay, *others = self._tasks
        for task in others:
            task.cancel()
        # The relay sends what is committed before the connection closes (bounded: each
        # publish has its timeout; whatever is left goes at the next start).
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(relay, timeout=self.settings.publish_timeout_s + 5)
        for task in others:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []

    async def _after_shutdown(self) -> None:
        if self._metrics is not None:
            server, _thread = self._metrics
            server.shutdown()
            server.server_close()
            self._metrics = None
        self.intake_executor.shutdown(wait=True)
        self.executor.shutdown(wait=True)
        self.relay.executor.shutdown(wait=True)
        self.store.dispose()

    async def tick(self) -> dict[str, int]:
        """One pass of the time-driven work, then send: deadlines and consent expiry each
        pass; retention (the record, then the dead letters) when a day has passed since the
        last."""

        def work() -> dict[str, int]:
            # The deadline pass and retention each run in their own transaction: one that
            # fails (logged, counted) does not stop the other; each item of the deadline
            # pass is isolated in its turn (`watch_deadlines`).
            try:
                return self.store.run(lambda tx: usecases.watch_deadlines(self.ledger, tx))
            except Exception as exc:
                usecases.scheduled_item_failed("deadlines", "the deadline pass", exc)
                return {}

        counts = await asyncio.get_running_loop().run_in_executor(self.executor, work)
        now = self.ledger.clock()
        if self._retention_at is None or now - self._retention_at >= timedelta(days=1):
            counts |= await self.retain()
        await self.relay.flush()
        counts["answers-refreshed"] = await self.refresh_answers()
        return counts

    async def retain(self) -> dict[str, int]:
        """Retention: the record first (free text, anonymisation, erasure by person, copies
        of messages), then the dead letters and retry copies that died before the free-text
        period, by the ledger's clock. A failure of the queue step is logged and counted; it
        is tried again at the next day's pass."""
        now = self.ledger.clock()
        settings = self.settings

        def record() -> dict[str, int]:
            with self.store.begin() as tx:
                return usecases.apply_retention(
                    self.ledger,
                    tx,
                    keep=timedelta(days=settings.retention_days),
                    keep_free_text=timedelta(days=settings.free_text_retention_days),
                )

        loop = asyncio.get_running_loop()
        try:
            counts = await loop.run_in_executor(self.executor, record)
        except Exception as exc:
            # not marked done: the next pass tries again
            usecases.scheduled_item_failed("retention", "the retention pass", exc)
            return {}
        self._retention_at = now
        try:
            counts |= await self.purge_dead_letters(
                now - timedelta(days=settings.free_text_retention_days)
            )
        except Exception as exc:
            log.warning("dead-letter retention failed (%s); next pass tomorrow", type(exc).__name__)
            counts["dead-letter-queues-failed"] = counts.get("dead-letter-queues-failed", 0) + 1
        return counts

    async def purge_dead_letters(self, cutoff: datetime) -> dict[str, int]:
        """Remove from every dead-letter and delay queue of the prefix the messages that died
        before `cutoff`, each recorded in the audit first (by id, queue and date only)."""
        import aio_pika

        loop = asyncio.get_running_loop()
        now = self.ledger.clock()

        def audit(expired: retention.Expired) -> None:
            with self.store.begin() as tx:
                tx.audit.record(
                    usecases.BUS,
                    "dead-letter-expired",
                    (expired.message_id or "-")[:128],
                    now,
                    why=f"{expired.queue}; died {expired.died_at:%Y-%m-%d}",
                )

        async def record(expired: retention.Expired) -> None:
            await loop.run_in_executor(self.executor, audit, expired)

        amqp_url = self.settings.amqp_url.get_secret_value()
        names = retention.retention_queue_names(
            self.topology, (p.id for p in self.directory.partners())
        )
        async with await aio_pika.connect(amqp_url) as connection:
            report = await retention.purge_expired(
                connection, names, cutoff, now, amqp_user(amqp_url), record
            )
        return report.counts()

    async def _record_failed_pass(self, error: str) -> None:
        """A failed pass leaves an audit record that the ops page's alert reads (when the
        ledger itself is what failed, only the log keeps it)."""

        def work() -> None:
            with self.store.begin() as tx:
                tx.audit.record(
                    usecases.BUS,
                    SCHEDULER_PASS_FAILED,
                    "scheduler",
                    self.ledger.clock(),
                    why=error[:300],
                )

        try:
            await asyncio.get_running_loop().run_in_executor(self.executor, work)
        except Exception as exc:
            log.error("the failed scheduler pass could not be recorded: %s", describe_error(exc))

    async def _scheduler(self) -> None:
        while not self._stop.is_set():
            try:
                await self.tick()
            except Exception as exc:
                # no traceback: a database error's text would carry the values it was given
                log.error("scheduler pass failed: %s", describe_error(exc))
                await self._record_failed_pass(describe_error(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.settings.scheduler_interval_s)


@functools.cache
def _prometheus_middleware() -> Any:
    from faststream.rabbit.prometheus import RabbitPrometheusMiddleware
    from prometheus_client import REGISTRY

    return RabbitPrometheusMiddleware(registry=REGISTRY, app_name="partnerbus")


async def _declare_bounded(connection: Any, queue: RabbitQueue, exchange: str) -> None:
    """Declare a dead-letter or delay queue with its bounds and bind it. One that exists
    from before the bounds (or with other ones) is kept as it is, with a warning: RabbitMQ
    cannot change a queue's arguments; a policy can bound it (docs/RELIABILITY.md)."""
    import aio_pika

    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(
            queue.name, durable=True, arguments=dict(queue.arguments or {})
        )
    except aio_pika.exceptions.ChannelPreconditionFailed as exc:
        log.warning(
            "queue %s exists with other arguments than this version declares (%s); kept as it "
            "is, without the bounds: apply them with a policy, see docs/RELIABILITY.md",
            queue.name,
            exc,
        )
        channel = await connection.channel()
        declared = await channel.declare_queue(queue.name, passive=True)
    try:
        await declared.bind(exchange, routing_key=queue.routing_key)
    finally:
        await channel.close()


def create_app(
    settings: Settings | None = None,
    *,
    directory: Directory | None = None,
    store: Store | None = None,
    clock: Callable[[], datetime] = utcnow,
    log_level: int = logging.DEBUG,
) -> Bus:
    """Build the service. Nothing connects here: the broker connects on start."""
    settings = settings or Settings()
    pseudonym_key = pseudonym_key_of(settings)  # refused here, before anything is built
    redact_wire_logs()
    if directory is None:
        directory = open_directory(settings, say=log.info)
    store = store or Store(settings.database_url)
    topology = Topology(
        settings.prefix,
        delivery_limit=settings.delivery_limit,
        retry_delays_ms=settings.retry_delays_ms,
        dead_letter_max_messages=settings.dead_letter_max_messages,
        dead_letter_max_bytes=settings.dead_letter_max_bytes,
        retry_max_messages=settings.retry_max_messages,
        retry_max_bytes=settings.retry_max_bytes,
    )
    broker = RabbitBroker(
        settings.amqp_url.get_secret_value(),
        default_channel=Channel(
            prefetch_count=settings.prefetch, publisher_confirms=True, on_return_raises=True
        ),
        graceful_timeout=15.0,
        log_level=log_level,  # the level FastStream logs each message at
        # FastStream's own metrics (received, processed and their duration per handler,
        # published), in this process's registry: served on `metrics_port` beside ours
        # (docs/OPERATIONS.md lists the names). Made once per process, shared by brokers.
        middlewares=[_prometheus_middleware()],
    )
    ledger = Ledger(
        store=store,
        directory=directory,
        clock=clock,
        pseudonym_key=pseudonym_key,
        deadlines=deadline_policy(settings),
        consent_notice=timedelta(days=settings.consent_expiry_notice_days),
        parked=parked_policy(settings),
        stalled=stalled_policy(settings),
    )
    # SQLite has one writer: one database thread per room avoids lock contention inside a
    # process (the intake and the relay still take turns on the file's write lock, each
    # for one short transaction). The intake has its own: it never waits behind the relay.
    executor = ThreadPoolExecutor(
        max_workers=1 if store.is_sqlite else 4, thread_name_prefix="partnerbus-db"
    )
    intake_executor = ThreadPoolExecutor(
        max_workers=1 if store.is_sqlite else 2, thread_name_prefix="partnerbus-intake"
    )
    # The relay publishes on a channel of its own, which it can renew
    # (`partnerbus.broker.publisher`); `_connection` is the broker's robust connection
    # (FastStream exposes no accessor).
    relay_channel = RelayChannel(lambda: broker._connection)
    relay = Relay(
        ledger,
        topology,
        relay_channel.publish,
        # its own database thread: sending never waits behind the intake's transactions
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="partnerbus-relay-db"),
        timeout_s=settings.publish_timeout_s,
        lease=timedelta(seconds=settings.outbox_lease_s),
        window_budget_s=settings.batch_budget_ms / 1000,
        renew=relay_channel.renew,
    )
    app = FastStream(broker, logger=log)
    bus = Bus(
        settings=settings,
        topology=topology,
        broker=broker,
        app=app,
        ledger=ledger,
        relay=relay,
        executor=executor,
        intake_executor=intake_executor,
    )
    wiring = Wiring(
        ledger=ledger,
        topology=topology,
        relay=relay,
        executor=intake_executor,
        publish=broker.publish,
        trusted_senders=settings.trusted_senders,
        own_user=amqp_user(settings.amqp_url.get_secret_value()),
        max_bytes=settings.max_message_bytes,
        publish_timeout_s=settings.publish_timeout_s,
        on_verdict=bus.record_verdict,
        batch_size=settings.intake_batch_size,
        batch_wait_s=settings.intake_batch_wait_ms / 1000,
        batch_budget_s=settings.batch_budget_ms / 1000,
        urgent_prefetch=settings.urgent_prefetch,
    )
    broker.include_router(build_router(wiring))
    bus.batchers = wiring.batchers
    _subscribe_directory_updates(broker, topology, directory, bus.record_directory_update)
    app.on_startup(bus._on_startup)
    app.after_startup(bus._after_startup)
    app.on_shutdown(bus._on_shutdown)
    app.after_shutdown(bus._after_shutdown)
    return bus


def _subscribe_directory_updates(
    broker: RabbitBroker,
    topology: Topology,
    directory: Directory,
    applied: Callable[[str], None],
) -> None:
    """Each worker hears capacity changes on its own exclusive queue (a broadcast)."""
    import uuid

    queue = RabbitQueue(
        f"{topology.prefix}.directory-updates.{uuid.uuid4().hex[:12]}",
        exclusive=True,
        auto_delete=True,
        routing_key=DIRECTORY_UPDATES_KEY,
    )

    @broker.subscriber(queue, topology.deliveries, ack_policy=AckPolicy.ACK, decoder=raw_body)
    async def on_directory_update(body: bytes, message: RabbitMessage) -> None:
        try:
            event = CAPACITY.validate_json(body)
        except ValueError:
            log.warning("ignored a malformed directory update %s", message.message_id)
            return
        with contextlib.suppress(KeyError):
            directory.apply_capacity(event.partner, event.status, event.remaining)
        applied(event.message_id)


def app_factory() -> FastStream:
    """Entry point of `faststream run --factory` (what `partnerbus run` starts)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = Settings()
    bus = create_app(settings, log_level=logging.INFO if settings.log_messages else logging.DEBUG)
    # The directory is built once and then only read: keep the collector off its objects.
    gc.freeze()
    return bus.app
