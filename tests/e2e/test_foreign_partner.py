"""A partner written without our code (`examples/pika_partner.py`: pika and the JSON
contracts only), end to end on the real RabbitMQ, each side as its own AMQP user."""

from __future__ import annotations

import asyncio
import importlib.util
import secrets
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import jsonschema
import pika.exceptions
import pytest

from partnerbus.broker.access import apply_with_rabbitmqctl, grants_for, remove_with_rabbitmqctl
from partnerbus.testing import Inbox, wait_for_status, wait_until

from .helpers import (
    ARREARS,
    ROUBAIX,
    contract_schema,
    new_id,
    publish,
    revocation,
    signal,
    signal_ref,
)
from .test_flow import KINDS, expected_partner, grant

pytestmark = pytest.mark.rabbitmq

SOURCE = "lmh-recouvrement"
EXAMPLE = Path(__file__).parents[2] / "examples" / "pika_partner.py"


def _load_example() -> Any:
    """The example as a module: it is a script, outside any package."""
    spec = importlib.util.spec_from_file_location("pika_partner", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


example = _load_example()
FORMATS = jsonschema.FormatChecker()


@FORMATS.checks("date-time", raises=ValueError)
def _date_time(value: object) -> bool:
    """RFC 3339 with its offset: what `Instant` accepts (jsonschema alone skips the check)."""
    return not isinstance(value, str) or datetime.fromisoformat(value).tzinfo is not None


def assert_contract(body: dict[str, Any]) -> None:
    """The body is valid against the JSON Schema of its type."""
    jsonschema.validate(body, contract_schema(body["type"]), format_checker=FORMATS)


def assert_all_contracts(*partners: Any) -> None:
    bodies = [b for p in partners for b in (*p.sent, *p.received)]
    assert bodies
    for body in bodies:
        assert_contract(body)


@asynccontextmanager
async def partner_url(bus, partner_id: str) -> AsyncIterator[str]:
    """A partner's own RabbitMQ user with the rights derived from the directory, as an
    AMQP URL carrying its credentials; removed after."""
    partner = bus.directory.partner(partner_id)
    password = secrets.token_urlsafe(16)
    (rights,) = grants_for([partner], bus.topology)
    await asyncio.to_thread(
        apply_with_rabbitmqctl, [rights], vhost="/", passwords={rights.username: password}
    )
    try:
        yield bus.settings.amqp_url.get_secret_value().replace(
            "guest:guest", f"{rights.username}:{password}"
        )
    finally:
        await asyncio.to_thread(remove_with_rabbitmqctl, [rights.username])


@asynccontextmanager
async def connected(bus, partner_id: str, **options: Any) -> AsyncIterator[Any]:
    """The example's partner, connected as its own user (its blocking calls in a thread)."""
    async with partner_url(bus, partner_id) as url:
        partner = await asyncio.to_thread(
            example.Partner, url, partner_id, prefix=bus.topology.prefix, **options
        )
        try:
            yield partner
        finally:
            await asyncio.to_thread(partner.close)


@asynccontextmanager
async def serving(partner: Any) -> AsyncIterator[Any]:
    """`partner.serve()` in a thread; stopped, and its failure raised, on leaving."""
    task = asyncio.create_task(asyncio.to_thread(partner.serve))
    try:
        yield partner
    finally:
        if not task.done():
            partner.stop()
        await asyncio.wait_for(task, 10)


def of_kind(partner: Any, kind: str, **fields: Any) -> list[dict[str, Any]]:
    return [
        b
        for b in list(partner.received)
        if b["type"] == kind and all(b.get(k) == v for k, v in fields.items())
    ]


async def test_a_pika_partner_signals_takes_its_referral_and_its_statuses_close_the_loop(
    bus, channel
):
    """The source's signal, published with pika as its own user, becomes a referral in the pika target's queue; the target's `accepted` and `completed` are recorded and forwarded to the source; every body matches its JSON Schema."""
    person = new_id("T")
    agency = bus.directory.agency_for(ROUBAIX).id
    await grant(bus, channel, person, agency, kinds=KINDS)
    target = expected_partner(bus)

    async with connected(bus, SOURCE) as source, connected(bus, target) as helper:
        sent = await asyncio.to_thread(source.signal, person, ROUBAIX, [ARREARS])
        async with serving(source), serving(helper):
            await wait_until(lambda: bool(of_kind(helper, "referral")), what="the referral")
            (referral,) = of_kind(helper, "referral")
            rid = referral["referral_id"]
            assert await wait_for_status(bus.store, rid, "completed") == "completed"
            for status in ("accepted", "completed"):
                await wait_until(
                    lambda s=status: bool(of_kind(source, "referral-status-changed", status=s)),
                    what=f"{status} forwarded to the source",
                )

    assert signal_ref(referral, sent["message_id"])
    assert (referral["partner"], referral["need"]) == (target, ARREARS)
    answers = [(b["status"], b["referral_id"]) for b in helper.sent]
    assert answers == [("accepted", rid), ("completed", rid)]
    assert helper.held == {}
    (completed,) = of_kind(source, "referral-status-changed", status="completed")
    assert completed["referral_id"] == rid
    assert completed["signal_id"] == sent["message_id"]
    assert completed["need"] == ARREARS
    assert completed.get("outcome") is None, "what the partner wrote stays with the advisor"
    assert_all_contracts(source, helper)


async def test_a_pika_partner_drops_a_referral_whose_consent_is_revoked(bus, channel):
    """A referral the pika partner accepted and holds is withdrawn when the consent is revoked: the withdrawal reaches it, it drops the referral, and the ledger says withdrawn."""
    person = new_id("T")
    agency = bus.directory.agency_for(ROUBAIX).id
    given = await grant(bus, channel, person, agency, kinds=KINDS)
    target = expected_partner(bus)
    t = bus.topology

    async with connected(bus, target, complete=False) as helper, serving(helper):
        await publish(channel, t.signals.name, signal(person=person), routing_key=SOURCE)
        await wait_until(lambda: bool(helper.held), what="the referral held")
        (rid,) = helper.held
        await wait_for_status(bus.store, rid, "accepted")
        await publish(channel, t.consents.name, revocation(given), routing_key=agency)
        await wait_until(
            lambda: bool(of_kind(helper, "referral-withdrawn", referral_id=rid)),
            what="the withdrawal",
        )
        assert await wait_for_status(bus.store, rid, "withdrawn") == "withdrawn"

    assert helper.held == {}
    (withdrawn,) = of_kind(helper, "referral-withdrawn")
    assert withdrawn["reason"] == "consent-revoked"
    assert [b["status"] for b in helper.sent] == ["accepted"]
    assert_all_contracts(helper)


@pytest.mark.parametrize(
    ("forge", "code", "says"),
    [
        pytest.param("user_id", 406, "user_id property set to 'pb-lmh-recouvrement'", id="user"),
        pytest.param("routing_key", 403, "access to topic 'lmh-recouvrement'", id="key"),
    ],
)
async def test_a_pika_partner_passing_for_another_is_refused_by_the_broker(
    bus, forge: str, code: int, says: str
):
    """Publishing with another partner's user name as `user_id`, or with its routing key, closes the pika partner's channel (RabbitMQ's own check, before any routing): nothing reaches the bus, and its next signal, on a new connection, flows."""
    target = expected_partner(bus)
    forged = signal(source=SOURCE, type="signal")
    async with partner_url(bus, target) as url:
        helper = await asyncio.to_thread(example.Partner, url, target, prefix=bus.topology.prefix)
        if forge == "user_id":
            helper.user = "pb-lmh-recouvrement"
            attempt = (helper.publish, "signals", target, forged)
        else:
            attempt = (helper.publish, "signals", SOURCE, forged)
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            await asyncio.to_thread(*attempt)
        await asyncio.to_thread(helper.close)
        assert refused.value.reply_code == code
        assert says in refused.value.reply_text

        before = len(bus.verdicts)
        helper = await asyncio.to_thread(example.Partner, url, target, prefix=bus.topology.prefix)
        own = await asyncio.to_thread(helper.signal, new_id("T"), ROUBAIX, [ARREARS])
        await asyncio.to_thread(helper.close)
    verdicts = (await bus.wait_verdicts(before + 1))[before:]
    assert [v.outcome for v in verdicts] == ["processed"]
    assert bus.store.count("signals", signal_id=own["message_id"]) == 1
    assert bus.store.count("signals", signal_id=forged["message_id"]) == 0


async def test_a_pika_partner_rejects_what_it_cannot_read_to_its_dead_letter_queue(bus, channel):
    """Broken JSON and a body without a type in the pika partner's queue are nacked without requeue: RabbitMQ dead-letters them to the queue's DLQ (x-death: rejected), nothing is taken."""
    target = expected_partner(bus)
    t = bus.topology
    dlq = await Inbox.open(channel, t.dlq_name(t.partner_queue_name(target)))
    junk = {"broken-1": b'{"type": "referral", oops', "untyped-1": b'["no", "type"]'}
    async with connected(bus, target) as helper, serving(helper):
        for message_id, raw in junk.items():
            await publish(
                channel, t.deliveries.name, raw, routing_key=target, message_id=message_id
            )
        dead = await dlq.expect(2, timeout=30)

    assert sorted(d.message_id for d in dead) == sorted(junk)
    for letter in dead:
        (death,) = letter.headers["x-death"]
        assert death["reason"] == "rejected"
        assert death["queue"] == t.partner_queue_name(target)
    assert helper.received == []
    assert helper.sent == []
