"""A partner written in Node.js without our code (`examples/node-partner/partner.mjs`: amqplib
and the JSON contracts only), run as its own process and its own AMQP user, end to end on the
real RabbitMQ."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal as signals
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from partnerbus.directory.load import SAMPLE, directory_from_document, read_document
from partnerbus.entrypoints.bootstrap import create_app
from partnerbus.testing import Inbox, wait_for_status, wait_until

from .helpers import ARREARS, ROUBAIX, new_id, publish, revocation, signal, signal_ref
from .test_flow import KINDS, expected_partner, grant
from .test_foreign_partner import assert_contract, partner_url

pytestmark = pytest.mark.rabbitmq

SOURCE = "lmh-recouvrement"
EXAMPLE = Path(__file__).parents[2] / "examples" / "node-partner"


@pytest.fixture(scope="module")
def node() -> str:
    """The `node` binary, with the example's dependencies installed (`npm ci`)."""
    found = shutil.which("node")
    if found is None or not (EXAMPLE / "node_modules" / "amqplib").is_dir():
        if os.environ.get("CI"):
            pytest.fail("CI installs the Node partner's dependencies first (.ci/run): missing")
        pytest.skip("needs `node` and `npm ci` in examples/node-partner for the Node partner")
    return found


@pytest.fixture
async def bus(settings) -> AsyncIterator[Any]:
    """The service on the sample directory, each partner with an AMQP user of this test's own
    (`pb-<id>-<tag>`): other tests on the same broker create and remove the sample's
    `pb-<id>` users, and would change the password under a running Node partner."""
    path = Path(str(resources.files("partnerbus.directory") / "data" / SAMPLE))
    document = dict(read_document(path))
    tag = uuid.uuid4().hex[:8]
    document["partners"] = [
        {**row, "amqp_user": f"pb-{row['id']}-{tag}"} for row in document["partners"]
    ]
    service = create_app(settings, directory=directory_from_document(document, base=path.parent))
    await service.start()
    yield service
    await service.stop()
    await service.teardown()


class NodePartner:
    """The example as a subprocess; every JSON line it prints, as it prints them."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self.readers = asyncio.gather(self._read(), self._read_stderr())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            self.lines.append(json.loads(raw))

    async def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            self.stderr.append(raw.decode())

    def events(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line["event"] == event]

    def bodies(self, event: str, kind: str | None = None, **fields: Any) -> list[dict[str, Any]]:
        return [
            line["body"]
            for line in self.events(event)
            if kind in (None, line["body"]["type"])
            and all(line["body"].get(k) == v for k, v in fields.items())
        ]

    async def wait(self, what: str, condition: Any, timeout: float = 30) -> None:
        """Wait for `condition()`; fail with what the process said on stderr if it died."""

        def holds() -> bool:
            if self.process.returncode not in (None, 0):
                said = "".join(self.stderr)
                msg = f"the Node partner exited {self.process.returncode}: {said}"
                raise AssertionError(msg)
            return bool(condition())

        await wait_until(holds, timeout=timeout, what=what)

    async def exited(self, timeout: float = 15) -> int:
        code = await asyncio.wait_for(self.process.wait(), timeout)
        await asyncio.wait_for(self.readers, timeout)
        return code

    async def stop(self) -> int:
        """SIGTERM: it cancels its consumer, finishes what it handles, closes, exits 0."""
        if self.process.returncode is None:
            self.process.send_signal(signals.SIGTERM)
        return await self.exited()


@asynccontextmanager
async def running(node: str, bus, partner_id: str, **env: str) -> AsyncIterator[NodePartner]:
    """The Node partner as `partner_id`'s own RabbitMQ user, consuming its queue; killed and
    its user removed on leaving."""
    async with partner_url(bus, partner_id) as url:
        process = await asyncio.create_subprocess_exec(
            node,
            str(EXAMPLE / "partner.mjs"),
            cwd=EXAMPLE,
            env={
                "PATH": os.environ.get("PATH", ""),
                "PARTNER_AMQP_URL": url,
                "PARTNER_ID": partner_id,
                "PARTNERBUS_PREFIX": bus.topology.prefix,
                **env,
            },
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        partner = NodePartner(process)
        try:
            await partner.wait("the Node partner consuming", lambda: partner.events("consuming"))
            yield partner
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            await asyncio.wait_for(partner.readers, 10)
            if partner.stderr:  # shown by pytest when the test fails
                print(f"Node partner {partner_id} stderr:", "".join(partner.stderr))


def assert_all_contracts(*partners: NodePartner) -> None:
    """Every body the Node partners printed, received and sent, is valid against docs/schemas."""
    bodies = [b for p in partners for event in ("received", "sent") for b in p.bodies(event)]
    assert bodies
    for body in bodies:
        assert_contract(body)


async def test_a_node_partner_signals_and_another_takes_the_referral_and_closes_the_loop(
    node, bus, channel
):
    """The source's signal, published by the Node partner as its own user, becomes a referral in the Node target's queue; the target answers accepted then completed and exits after that one referral; the ledger says completed, both answers reach the source's Node process, and every body either printed matches its JSON Schema."""
    person = new_id("T")
    agency = bus.directory.agency_for(ROUBAIX).id
    await grant(bus, channel, person, agency, kinds=KINDS)
    target = expected_partner(bus)
    fields = {"person_ref": person, "commune": ROUBAIX, "needs": [ARREARS], "urgency": "urgent"}

    async with (
        running(node, bus, target, PARTNER_EXIT_AFTER="1") as helper,
        running(node, bus, SOURCE, PARTNER_SIGNAL=json.dumps(fields)) as source,
    ):
        (sent,) = source.bodies("sent", "signal")
        await helper.wait("the referral", lambda: helper.bodies("received", "referral"))
        (referral,) = helper.bodies("received", "referral")
        rid = referral["referral_id"]
        assert await wait_for_status(bus.store, rid, "completed") == "completed"
        assert await helper.exited() == 0, "it stops after PARTNER_EXIT_AFTER referrals"
        for status in ("accepted", "completed"):
            await source.wait(
                f"{status} forwarded to the source",
                lambda s=status: source.bodies("received", "referral-status-changed", status=s),
            )
        assert await source.stop() == 0

    assert (sent["source"], sent["person_ref"], sent["schema_version"]) == (SOURCE, person, 2)
    assert signal_ref(referral, sent["message_id"])
    assert (referral["partner"], referral["need"]) == (target, ARREARS)
    answers = helper.bodies("sent")
    assert [(b["status"], b["referral_id"]) for b in answers] == [
        ("accepted", rid),
        ("completed", rid),
    ]
    assert answers[1]["outcome"] == f"{ARREARS}: met the person, a plan is agreed"
    for body in answers:
        assert datetime.fromisoformat(body["occurred_at"]).utcoffset() is not None
    (completed,) = source.bodies("received", "referral-status-changed", status="completed")
    assert completed["signal_id"] == sent["message_id"]
    assert completed.get("outcome") is None, "what the partner wrote stays with the advisor"
    assert bus.store.count("signals", signal_id=sent["message_id"]) == 1
    assert_all_contracts(source, helper)


async def test_a_node_partner_drops_a_referral_whose_consent_is_revoked(node, bus, channel):
    """A referral the Node partner accepted and holds (PARTNER_COMPLETE=no) is withdrawn when the consent is revoked: the withdrawal reaches it, it drops the referral, and the ledger says withdrawn."""
    person = new_id("T")
    agency = bus.directory.agency_for(ROUBAIX).id
    given = await grant(bus, channel, person, agency, kinds=KINDS)
    target = expected_partner(bus)
    t = bus.topology

    async with running(node, bus, target, PARTNER_COMPLETE="no") as helper:
        await publish(channel, t.signals.name, signal(person=person), routing_key=SOURCE)
        await helper.wait("the referral accepted", lambda: helper.bodies("sent", status="accepted"))
        (accepted,) = helper.bodies("sent")
        rid = accepted["referral_id"]
        await wait_for_status(bus.store, rid, "accepted")
        await publish(channel, t.consents.name, revocation(given), routing_key=agency)
        await helper.wait("the referral dropped", lambda: helper.events("dropped"))
        assert await wait_for_status(bus.store, rid, "withdrawn") == "withdrawn"
        assert await helper.stop() == 0

    assert helper.events("dropped") == [{"event": "dropped", "referral_id": rid}]
    (withdrawn,) = helper.bodies("received", "referral-withdrawn")
    assert (withdrawn["referral_id"], withdrawn["reason"]) == (rid, "consent-revoked")
    assert [b["status"] for b in helper.bodies("sent")] == ["accepted"]
    assert_all_contracts(helper)


async def test_a_node_partner_rejects_what_it_cannot_read_to_its_dead_letter_queue(
    node, bus, channel
):
    """Broken JSON and a body without a type in the Node partner's queue are nacked without requeue: RabbitMQ dead-letters them to the queue's DLQ (x-death: rejected), nothing is taken or sent."""
    target = expected_partner(bus)
    t = bus.topology
    dlq = await Inbox.open(channel, t.dlq_name(t.partner_queue_name(target)))
    junk = {"broken-1": b'{"type": "referral", oops', "untyped-1": b'["no", "type"]'}
    async with running(node, bus, target) as helper:
        for message_id, raw in junk.items():
            await publish(
                channel, t.deliveries.name, raw, routing_key=target, message_id=message_id
            )
        dead = await dlq.expect(2, timeout=30)
        await helper.wait("both rejections printed", lambda: len(helper.events("rejected")) == 2)
        assert await helper.stop() == 0

    assert sorted(d.message_id for d in dead) == sorted(junk)
    for letter in dead:
        (death,) = letter.headers["x-death"]
        assert death["reason"] == "rejected"
        assert death["queue"] == t.partner_queue_name(target)
    assert sorted(r["message_id"] for r in helper.events("rejected")) == sorted(junk)
    assert helper.bodies("received") == []
    assert helper.bodies("sent") == []
