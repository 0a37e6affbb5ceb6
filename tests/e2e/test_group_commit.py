"""Group commit at the intake, and urgent signals first, against the real broker."""

from __future__ import annotations

import asyncio
import threading

import pytest
from sqlalchemy import event
from sqlalchemy.exc import OperationalError

from partnerbus.broker.dlq import peek
from partnerbus.entrypoints.bootstrap import create_app

from .helpers import publish, signal

pytestmark = pytest.mark.rabbitmq

SOURCE = "lmh-recouvrement"


async def _queued_then_started(settings, channel, bodies, *, urgent=()):
    """Publish while no service consumes, then start one: the prefetch hands it all at once."""
    first = create_app(settings)
    await first.start()
    await first.stop()
    t = first.topology
    await asyncio.gather(*(publish(channel, t.signals.name, b, routing_key=SOURCE) for b in bodies))
    for body in urgent:
        await publish(channel, t.signals.name, body, routing_key=f"{SOURCE}.urgent")
    return create_app(settings)


async def test_one_bad_message_in_a_batch_is_dead_lettered_alone_and_the_others_commit(
    settings, channel, connection
):
    """In a batch, a signal its use case refuses is dead-lettered alone with its reason; the others are recorded in fewer transactions than messages."""
    good = [signal() for _ in range(20)]
    bad = signal(commune="00000")
    bodies = [*good[:10], bad, *good[10:]]
    bus = await _queued_then_started(settings, channel, bodies)
    await bus.start()
    try:
        t = bus.topology
        verdicts = await bus.wait_verdicts(len(bodies), queue="intake.signals", timeout=60)
        assert [v.outcome for v in verdicts].count("processed") == len(good)
        (refused,) = [v for v in verdicts if v.outcome == "refused"]
        assert refused.reason is not None and "unknown commune" in refused.reason
        assert bus.store.count("signals") == len(good)
        assert bus.batchers[t.signal_queue.name].batches < len(bodies)
        (letter,) = await peek(connection, t.dlq_name(t.signal_queue.name), "guest")
        assert letter.message_id == bad["message_id"]
        assert "unknown commune" in (letter.reason or "")
    finally:
        await bus.stop()
        await bus.teardown()


async def test_a_batch_whose_commit_fails_is_not_acked_and_every_message_is_recorded_later(
    settings, channel
):
    """The database failing at a batch's commit acks none of its messages as recorded: each goes to its retry queue and is recorded once afterwards."""
    bodies = [signal() for _ in range(10)]
    bus = await _queued_then_started(settings, channel, bodies)
    failures = {"left": 1}

    def fail_commit(_conn) -> None:  # type: ignore[no-untyped-def]
        # only the intake's transactions (its own database thread), the first one
        if failures["left"] > 0 and threading.current_thread().name.startswith("partnerbus-intake"):
            failures["left"] -= 1
            raise OperationalError("COMMIT", {}, Exception("database is down"))

    event.listen(bus.store.engine, "commit", fail_commit)
    await bus.start()
    try:
        # The first transaction is the first batch: it fails whole, nothing is recorded.
        verdicts = await bus.wait_verdicts(len(bodies), queue="intake.signals", timeout=60)
        retried = [v for v in verdicts if v.outcome == "retried"]
        assert retried, "the failed batch's messages are retried, not acked as done"
        total = len(bodies) + len(retried)
        verdicts = await bus.wait_verdicts(total, queue="intake.signals", timeout=60)
        assert [v.outcome for v in verdicts].count("processed") == len(bodies)
        assert bus.store.count("signals") == len(bodies)
    finally:
        event.remove(bus.store.engine, "commit", fail_commit)
        await bus.stop()
        await bus.teardown()


async def test_an_urgent_signal_is_recorded_before_the_routine_backlog_drains(settings, channel):
    """An urgent signal published after 2,000 routine ones is recorded while routine ones are still waiting."""
    routine = [signal(urgency="routine") for _ in range(2000)]
    urgent = signal(urgency="urgent")
    bus = await _queued_then_started(settings, channel, routine, urgent=[urgent])
    await bus.start()
    try:
        (verdict,) = await bus.wait_verdicts(1, queue="intake.signals.urgent", timeout=60)
        assert verdict.outcome == "processed"
        # counted after the urgent one's commit: routine signals are still to be recorded
        assert bus.store.count("signals") < len(routine) + 1
        await bus.wait_verdicts(len(routine), queue="intake.signals", timeout=300)
        assert bus.store.count("signals") == len(routine) + 1
    finally:
        await bus.stop()
        await bus.teardown()
