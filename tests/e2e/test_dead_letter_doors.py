"""Dead letters are a door too: a replay is authenticated and checked like the first
delivery, and a flood of refusals fills a bounded dead-letter queue without losing a
message or stopping the bus. Against the real RabbitMQ."""

from __future__ import annotations

import asyncio
import json
import subprocess
from datetime import UTC, datetime

import aio_pika
import pytest

from partnerbus.broker.dlq import peek, replay
from partnerbus.broker.topology import ORIGINAL_USER_HEADER
from partnerbus.entrypoints.bootstrap import create_app
from partnerbus.ops.monitor import metrics, snapshot
from partnerbus.testing import Inbox
from partnerbus.usecases.context import _derived_id
from tests.conftest import as_partner

from .helpers import ROUBAIX, new_id, publish, signal
from .test_cli import invoke
from .test_flow import KINDS, expected_partner, grant

pytestmark = pytest.mark.rabbitmq


async def settled(connection, queue: str, count: int) -> list:
    """The queue's messages once it holds `count`: messages a closed channel had taken
    unacked (a refused replay, a peek) go back to a quorum queue asynchronously. Read a
    dead letter through it, not with a single peek: right after the verdict a single
    peek found the queue empty twice under load (once in CI, once in a long local run)."""
    async with asyncio.timeout(30):
        while len(found := await peek(connection, queue, "guest")) != count:  # noqa: ASYNC110
            await asyncio.sleep(0.1)  # polling the broker for a condition, not a delay
    return found


# the sender of a replay ------------------------------------------------------------------
async def test_a_signal_without_user_id_is_listed_from_an_unknown_sender_and_never_replayed(
    cli_env, channel, connection
):
    """Refused for want of `user_id`: the dead letter names no sender (not the bus), is marked as an authentication refusal, and `dlq replay` refuses it with the reason, audited, leaving it where it is; the spoofed signal is never processed."""
    bus = cli_env
    t = bus.topology
    dlq_name = t.dlq_name(t.signal_queue.name)
    spoofed = signal(source="lmh-recouvrement")
    before = len(bus.verdicts)
    await publish(channel, t.signals.name, spoofed, routing_key="lmh-recouvrement", user_id=None)
    (verdict,) = (await bus.wait_verdicts(before + 1))[before:]
    assert verdict.outcome == "refused"
    assert "no user_id property" in str(verdict.reason)

    (letter,) = await settled(connection, dlq_name, 1)
    assert letter.sender is None, "an unknown sender is unknown, never the bus"
    assert letter.refusal == "authentication"

    listed = await invoke("dlq", "list")
    assert listed.exit_code == 0, listed.output
    assert "no user_id property" in listed.output
    assert "guest" not in listed.output, "the bus's own user is never shown as its sender"
    assert "never (authentication)" in listed.output

    replayed = await invoke("dlq", "replay", spoofed["message_id"], "--by", "ops.tester")
    assert replayed.exit_code == 1, replayed.output
    assert "not replayed" in replayed.output
    assert "authentication" in replayed.output
    assert "replayed 0 message(s)" in replayed.output
    assert [r.action for r in bus.store.audit_trail(spoofed["message_id"])] == [
        "dead-letter-replay-refused"
    ]
    assert [x.message_id for x in await settled(connection, dlq_name, 1)] == [spoofed["message_id"]]
    assert len(bus.verdicts) == before + 1, "nothing went back to the intake"
    assert bus.store.count("signals", signal_id=spoofed["message_id"]) == 0


async def test_a_sender_mismatch_is_not_replayable_either(bus, channel, connection):
    """A partner claiming another source: its dead letter is an authentication refusal too, and the replay function itself refuses it."""
    t = bus.topology
    dlq_name = t.dlq_name(t.signal_queue.name)
    async with as_partner(bus, "lmh-proximite") as (user, partner_channel):
        spoofed = signal(source="lmh-recouvrement")
        before = len(bus.verdicts)
        await publish(
            partner_channel, t.signals.name, spoofed, routing_key="lmh-proximite", user_id=user
        )
        await bus.wait_verdicts(before + 1)
    (letter,) = await settled(connection, dlq_name, 1)
    assert letter.sender == user
    assert letter.refusal == "authentication"
    outcome = await replay(connection, dlq_name, None, "guest", "ops.tester", topology=t)
    assert outcome.replayed == []
    ((refused, why),) = outcome.refused
    assert refused.message_id == spoofed["message_id"]
    assert "authentication" in why
    assert len(await settled(connection, dlq_name, 1)) == 1


async def test_the_intake_never_takes_an_empty_first_sender_on_a_bus_message_for_the_bus(
    bus, channel
):
    """Defence in depth: a message published as the bus whose first-sender header is present but empty (an unknown sender carried through a replay) is refused, not trusted as the bus."""
    t = bus.topology
    body = signal(source="lmh-recouvrement")
    exchange = await channel.get_exchange(t.signals.name, ensure=False)
    before = len(bus.verdicts)
    await exchange.publish(
        aio_pika.Message(
            json.dumps(body).encode(),
            message_id=body["message_id"],
            user_id="guest",
            headers={ORIGINAL_USER_HEADER: "", "partnerbus-replayed-by": "ops.tester"},
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        ),
        routing_key="lmh-recouvrement",
    )
    (verdict,) = (await bus.wait_verdicts(before + 1))[before:]
    assert verdict.outcome == "refused"
    assert "no user_id property" in str(verdict.reason)
    assert bus.store.count("signals", signal_id=body["message_id"]) == 0


# a partner's dead letters go through the outbox ------------------------------------------
async def _referral_dead_in_partner_queue(
    bus, channel, connection, person: str
) -> tuple[str, dict]:
    """A consented signal whose referral the partner's client fails on until it is in the
    partner's dead letters: (partner id, the dead letter's body)."""
    from partnerbus.client import PartnerClient

    t = bus.topology
    target = expected_partner(bus)
    watching = await connection.channel()  # closed after: the letter goes back, unacked
    dead = await Inbox.open(watching, t.dlq_name(t.partner_queue_name(target)), ack=False)
    async with PartnerClient(
        bus.settings.amqp_url.get_secret_value(), target, prefix=t.prefix
    ) as client:

        async def handler(message):
            msg = "the partner's system is broken"
            raise RuntimeError(msg)

        await client.consume(handler)
        await publish(
            channel, f"{t.prefix}.signals", signal(person=person), routing_key="lmh-recouvrement"
        )
        (letter,) = await dead.expect(1, timeout=30)
    await watching.close()
    assert letter.kind == "referral"
    return target, letter.body


async def test_a_partner_dead_letter_for_a_withdrawn_referral_is_refused_and_never_reaches_the_partner(
    cli_env, channel, connection
):
    """The issue's scenario: a referral dead-lettered from the partner's queue, then the consent revoked and `ReferralWithdrawn` sent. `replay --all` leaves partner dead letters alone; replaying it by id is refused with the reason (audited), and the partner's queue holds only what the ledger ordered."""
    bus = cli_env
    t = bus.topology
    person = new_id("T")
    agency = bus.directory.agency_for(ROUBAIX).id
    given = await grant(bus, channel, person, agency, kinds=KINDS)
    target, body = await _referral_dead_in_partner_queue(bus, channel, connection, person)
    rid = body["referral_id"]
    partner_queue = t.partner_queue_name(target)
    partner_dlq = t.dlq_name(partner_queue)

    before = len(bus.verdicts)
    revocation = {
        "type": "consent-revoked",
        "message_id": new_id("rev"),
        "occurred_at": datetime.now(UTC).isoformat(),
        "consent_id": given["consent_id"],
        "revoked_by": "s.benali",
        "agency": agency,
        "revoked_at": datetime.now(UTC).isoformat(),
    }
    await publish(channel, f"{t.prefix}.consents", revocation, routing_key=agency)
    await bus.wait_verdicts(before + 1)
    await bus.relay.wait_recorded(_derived_id("withdrawn", rid), timeout=30)
    assert [m.type for m in await settled(connection, partner_queue, 1)] == ["referral-withdrawn"]

    everything = await invoke("dlq", "replay", "--all", "--by", "ops.tester")
    assert everything.exit_code == 0, everything.output
    assert "replayed 0 message(s)" in everything.output

    by_id = await invoke("dlq", "replay", rid, "--by", "ops.tester")
    assert by_id.exit_code == 1, by_id.output
    assert "not replayed" in by_id.output
    assert "withdrawn" in by_id.output
    assert "dead-letter-replay-refused" in [r.action for r in bus.store.audit_trail(rid)]

    await bus.relay.flush()
    assert [m.type for m in await settled(connection, partner_queue, 1)] == ["referral-withdrawn"]
    assert [m.message_id for m in await settled(connection, partner_dlq, 1)] == [rid]
    assert bus.store.referral(rid).status == "withdrawn"


async def test_a_partner_dead_letter_still_awaited_and_consented_is_sent_again_through_the_outbox(
    cli_env, channel, connection
):
    """The partner fixed its client: the referral, still awaiting an answer under a valid consent, is replayed through the outbox (the relay's send-time check), reaches the partner again, and its state does not move back."""
    bus = cli_env
    t = bus.topology
    person = new_id("T")
    agency = bus.directory.agency_for(ROUBAIX).id
    await grant(bus, channel, person, agency, kinds=KINDS)
    target, body = await _referral_dead_in_partner_queue(bus, channel, connection, person)
    rid = body["referral_id"]
    assert bus.store.referral(rid).status == "delivered"
    inbox = await Inbox.open(channel, t.partner_queue_name(target))

    replayed = await invoke("dlq", "replay", "--all", "--include-partners", "--by", "ops.tester")
    assert replayed.exit_code == 0, replayed.output
    assert "replayed 1 message(s)" in replayed.output
    again = await inbox.expect_kind("referral", timeout=30)
    assert again.body == body
    assert again.message_id == rid
    assert await peek(connection, t.dlq_name(t.partner_queue_name(target)), "guest") == []
    assert bus.store.referral(rid).status == "delivered"
    assert "dead-letter-replayed" in [r.action for r in bus.store.audit_trail(rid)]


# bounds ------------------------------------------------------------------------------------
BOUND = 3


@pytest.fixture
async def bounded_bus(settings):
    """The service with a dead-letter queue bound of three messages."""
    # One delivery at a time: a quorum queue refuses publishes once it is past its limit,
    # and tells each publisher so asynchronously; with N copies in flight at once it can
    # take up to N past the limit (RabbitMQ's documented overshoot). One in flight: one.
    service = create_app(
        settings.model_copy(update={"dead_letter_max_messages": BOUND, "prefetch": 1})
    )
    await service.start()
    yield service
    await service.stop()
    await service.teardown()


def _messages(names: set[str]) -> dict[str, int]:
    """Messages in each queue as RabbitMQ counts them: ready, unacked, and those a quorum
    queue keeps while it waits to dead-letter them (not visible to a passive declare)."""
    out = subprocess.run(
        ["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "name", "messages"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    found = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in names:
            found[parts[0]] = int(parts[1])
    return found


async def test_a_flood_of_refusals_fills_the_bounded_dead_letters_loses_nothing_and_is_counted(
    bounded_bus, channel, connection
):
    """A partner floods bad messages: the dead-letter queue holds at most its bound, every
    other message stays in the work queue (dead-lettered + still queued == published), each
    refused dead letter is counted (audit and the ops metric), and the bus goes on
    processing another partner's good signal."""
    bus = bounded_bus
    t = bus.topology
    work = t.signal_queue.name
    dlq_name = t.dlq_name(work)
    flood = 12
    async with as_partner(bus, "lmh-proximite") as (user, partner_channel):
        for n in range(flood):
            await publish(
                partner_channel,
                t.signals.name,
                b"{not json",
                routing_key="lmh-proximite",
                user_id=user,
                message_id=f"flood-{n}",
            )
        verdicts = await bus.wait_verdicts(flood, timeout=60)
    outcomes = [v.outcome for v in verdicts]
    taken = outcomes.count("refused")  # the bus's copies the dead-letter queue took
    held = outcomes.count("held")
    # A quorum queue takes one message past its length limit, then refuses (RabbitMQ's
    # documented overshoot): at most BOUND + 1.
    assert BOUND <= taken <= BOUND + 1
    assert held == flood - taken

    async with asyncio.timeout(90):
        while True:
            counts = await asyncio.to_thread(_messages, {work, dlq_name})
            if counts.get(dlq_name, 0) + counts.get(work, 0) == flood:
                break
            await asyncio.sleep(0.5)  # polling the broker's figures, not assuming a time
    assert counts[dlq_name] == taken, "RabbitMQ's own dead-lettering respects the bound too"
    assert counts[work] == held, "each refused copy's original stays in the work queue"

    assert bus.store.count("audit", action="dead-letter-refused") == held
    snap = await snapshot(
        bus.settings.amqp_url.get_secret_value(),
        t,
        [p.id for p in bus.directory.partners()],
        bus.store,
        datetime.now(UTC),
    )
    assert f"partnerbus_dead_letter_refused_total {float(held)}" in metrics(snap).decode()

    person = new_id("T")
    agency = bus.directory.agency_for(ROUBAIX).id
    await grant(bus, channel, person, agency, kinds=KINDS)
    before = len(bus.verdicts)
    good = signal(person=person)
    await publish(channel, t.signals.name, good, routing_key="lmh-recouvrement")
    (verdict,) = (await bus.wait_verdicts(before + 1, timeout=30))[before:]
    assert verdict.outcome == "processed"
    assert bus.store.count("signals", signal_id=good["message_id"]) == 1


async def test_a_dead_letter_queue_from_before_the_bounds_is_kept_and_the_bus_starts(
    settings, channel, connection, caplog
):
    """RabbitMQ cannot change a queue's arguments: a dead-letter queue declared by an older version (no bounds) is kept as it is, with a warning that says how to bound it, and the bus starts and dead-letters into it."""
    from partnerbus.broker.topology import Topology

    old = Topology(settings.prefix).dlq_name(f"{settings.prefix}.intake.signals")
    await channel.declare_queue(old, durable=True, arguments={"x-queue-type": "quorum"})
    bus = create_app(settings)
    await bus.start()
    try:
        assert any(old in r.getMessage() and "policy" in r.getMessage() for r in caplog.records), (
            "a warning names the queue and the way to bound it"
        )
        before = len(bus.verdicts)
        await publish(channel, bus.topology.signals.name, b"{nope", routing_key="x")
        (verdict,) = (await bus.wait_verdicts(before + 1))[before:]
        assert verdict.outcome == "refused"
        (letter,) = await peek(connection, old, "guest")
        assert "not JSON" in letter.reason
    finally:
        await bus.stop()
        await bus.teardown()


async def test_a_full_delay_queue_sends_the_message_to_its_dead_letters_with_that_reason(
    settings, channel, connection, tmp_path
):
    """Transient failures fill a bounded delay queue: the next message is not lost nor looped, it is dead-lettered with the reason (which names no personal data)."""
    from .test_delivery import FlakyStore

    store = FlakyStore(f"sqlite:///{tmp_path / 'flaky.db'}")
    bus = create_app(
        settings.model_copy(
            update={"retry_max_messages": 1, "retry_delays_ms": (600_000,), "prefetch": 1}
        ),
        store=store,
    )
    await bus.start()
    try:
        t = bus.topology
        store.failures = 1_000
        sent = [signal() for _ in range(4)]
        for body in sent:
            await publish(channel, t.signals.name, body, routing_key="lmh-recouvrement")
        verdicts = await bus.wait_verdicts(len(sent), timeout=30)
        outcomes = [v.outcome for v in verdicts]
        # one message past the limit, as quorum queues do, then refused
        assert outcomes.count("retried") in (1, 2)
        assert outcomes.count("refused") == len(sent) - outcomes.count("retried")
        dead = await peek(connection, t.dlq_name(t.signal_queue.name), "guest")
        assert len(dead) == outcomes.count("refused")
        for letter in dead:
            assert letter.reason == "delay queue full after a transient failure (OperationalError)"
    finally:
        store.failures = 0
        await bus.stop()
        await bus.teardown()
