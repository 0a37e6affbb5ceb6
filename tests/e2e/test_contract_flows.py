"""Every body the bus sends is valid under its published contract.

Random flows (grants, signals with and without consent, partners' answers, rejections that
reroute, refusals, revocations, capacity changes, deadlines and consent expiry) run through
the real pipeline on the real broker. Every message that reaches any partner's queue, every
outbox row and every dead-letter copy is then checked against docs/schemas/ with a JSON
Schema validator: not with our own pydantic models, which could agree with a wrong bus.
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from partnerbus.contract import load_schemas
from partnerbus.entrypoints.bootstrap import create_app
from partnerbus.testing import FakeClock, Inbox, wait_until

from .helpers import (
    ARREARS,
    KEEP_HOME,
    RIGHTS,
    ROUBAIX,
    TOURCOING,
    consent,
    iso,
    new_id,
    publish,
    revocation,
    signal,
    status,
)
from .test_flow import KINDS

pytestmark = pytest.mark.rabbitmq

SOURCE = "lmh-recouvrement"
UNCOVERED = "sante--sante-mentale"
"""A need no partner of the sample directory covers here: the advisor is told."""
SCHEMAS = load_schemas()
VALIDATORS = {kind: Draft202012Validator(schema) for kind, schema in SCHEMAS.items()}


def contract_errors(body: dict[str, Any]) -> list[str]:
    """What the published schema of the body's own type finds wrong with it."""
    kind = body.get("type")
    if kind not in VALIDATORS:
        return [f"type {kind!r} is not a message of the contract"]
    return [
        f"{kind} {'/'.join(map(str, e.absolute_path)) or '(body)'}: {e.message}"
        for e in VALIDATORS[kind].iter_errors(body)
    ]


def test_the_validator_finds_what_the_schemas_forbid() -> None:
    """The check below is not vacuous: a completion without its outcome, an unknown field, a missing id fail."""
    good = status(referral_id="r-1", partner="ccas-roubaix", value="completed", outcome="done")
    assert contract_errors(good) == []
    assert contract_errors({**good, "outcome": None})
    assert contract_errors({**good, "colour": "blue"})
    assert contract_errors({k: v for k, v in good.items() if k != "referral_id"})
    assert contract_errors({"type": "gossip"})


class Flow:
    """A random day of the bus, driven step by step."""

    def __init__(self, bus: Any, channel: Any, clock: FakeClock, rng: random.Random) -> None:
        self.bus, self.channel, self.clock, self.rng = bus, channel, clock, rng
        self.t = bus.topology
        self.people = [new_id("T") for _ in range(5)]
        self.consents: dict[str, dict[str, Any]] = {}  # consent id → body
        self.signals: list[dict[str, Any]] = []
        self.answered: set[str] = set()
        self.inboxes: dict[str, Inbox] = {}
        self.steps: list[str] = []

    async def open(self) -> None:
        for partner in self.bus.directory.partners():
            name = self.t.partner_queue_name(partner.id)
            self.inboxes[name] = await Inbox.open(self.channel, name)
        for queue in (
            self.t.signal_queue.name,
            self.t.urgent_signal_queue.name,
            self.t.consent_queue.name,
            self.t.status_queue.name,
        ):
            name = self.t.dlq_name(queue)
            self.inboxes[name] = await Inbox.open(self.channel, name)

    def received(self) -> list[Any]:
        return [item for inbox in self.inboxes.values() for item in inbox.seen]

    async def _send(self, exchange: str, body: dict[str, Any], routing_key: str) -> None:
        before = len(self.bus.verdicts)
        await publish(self.channel, f"{self.t.prefix}.{exchange}", body, routing_key=routing_key)
        await self.bus.wait_verdicts(before + 1, timeout=20)

    def _moment(self) -> str:
        return iso(self.clock())

    async def grant(self) -> None:
        person = self.rng.choice(self.people)
        commune = self.rng.choice((ROUBAIX, TOURCOING))
        agency = self.bus.directory.agency_for(commune).id
        body = consent(
            person=person,
            agency=agency,
            kinds=KINDS,
            granted_at=self.clock() - timedelta(hours=1),
            days=self.rng.choice((1, 30)),
        )
        body["occurred_at"] = self._moment()
        self.consents[body["consent_id"]] = body
        await self._send("consents", body, agency)
        self.steps.append(f"grant {person} at {agency}")

    async def revoke(self) -> None:
        if not self.consents:
            return await self.grant()
        consent_id = self.rng.choice(sorted(self.consents))
        granted = self.consents.pop(consent_id)
        body = revocation(
            granted,
            occurred_at=self._moment(),
            revoked_at=self._moment(),
            reason="the person asked",
        )
        await self._send("consents", body, granted["agency"])
        self.steps.append(f"revoke {consent_id}")
        return None

    async def signal(self) -> None:
        person = self.rng.choice(self.people)
        needs = tuple(
            self.rng.sample((ARREARS, KEEP_HOME, RIGHTS, UNCOVERED), self.rng.randint(1, 2))
        )
        body = signal(
            person=person,
            commune=self.rng.choice((ROUBAIX, TOURCOING)),
            needs=needs,
            urgency=self.rng.choice(("routine", "urgent", "asap")),
        )
        body["occurred_at"] = self._moment()
        self.signals.append(body)
        await self._send("signals", body, self.t.signal_routing_key(SOURCE, body["urgency"]))
        self.steps.append(f"signal {person} {needs}")

    async def refuse(self) -> None:
        if not self.signals:
            return await self.signal()
        sent = self.rng.choice(self.signals)
        agency = self.bus.directory.agency_for(sent["commune"]).id
        body = {
            "type": "consent-refused",
            "message_id": new_id("ref"),
            "occurred_at": self._moment(),
            "signal_id": sent["message_id"],
            "person_ref": sent["person_ref"],
            "collected_by": consent(person="T-x000", agency=agency)["collected_by"],
            "agency": agency,
        }
        await self._send("consents", body, agency)
        self.steps.append(f"refuse {sent['message_id']}")
        return None

    async def answer(self) -> None:
        referrals = [
            r
            for r in self.received()
            if r.kind == "referral" and r.body["referral_id"] not in self.answered
        ]
        if not referrals:
            return await self.signal()
        referral = self.rng.choice(referrals)
        rid, partner = referral.body["referral_id"], referral.body["partner"]
        value = self.rng.choice(("received", "accepted", "rejected", "completed", "in-progress"))
        extra: dict[str, Any] = {}
        if value == "rejected":
            extra["reason"] = self.rng.choice(("full", "not-eligible", "unreachable"))
            self.answered.add(rid)
        if value == "completed":
            extra["outcome"] = "FSL file sent, payment plan agreed"
            extra["note"] = "seen at home"
            self.answered.add(rid)
        body = status(referral_id=rid, partner=partner, value=value, **extra)
        body["occurred_at"] = self._moment()
        await self._send("statuses", body, partner)
        self.steps.append(f"{partner} {value} {rid}")
        return None

    async def answer_for_another(self) -> None:
        """A partner answers for a referral that is not its own: refused, dead-lettered
        with the reason (the copy is the partner's own, valid, body)."""
        referrals = [r for r in self.received() if r.kind == "referral"]
        if not referrals:
            return await self.signal()
        referral = self.rng.choice(referrals)
        other = next(
            p.id for p in self.bus.directory.partners() if p.id != referral.body["partner"]
        )
        body = status(referral_id=referral.body["referral_id"], partner=other, value="accepted")
        body["occurred_at"] = self._moment()
        await self._send("statuses", body, other)
        self.steps.append(f"{other} answers for {referral.body['referral_id']}")
        return None

    async def capacity(self) -> None:
        partner = self.rng.choice([p.id for p in self.bus.directory.partners()])
        body = {
            "type": "capacity-changed",
            "message_id": new_id("cap"),
            "occurred_at": self._moment(),
            "partner": partner,
            "status": self.rng.choice(("capacity", "no-capacity", "waitlist")),
        }
        await self._send("statuses", body, partner)
        self.steps.append(f"capacity {partner}")

    async def time_passes(self) -> None:
        hours = self.rng.choice((13, 25, 49))
        self.clock.advance(timedelta(hours=hours))
        await self.bus.tick()
        self.steps.append(f"+{hours} h")

    async def run(self, steps: int) -> None:
        actions = (
            (self.grant, 3),
            (self.signal, 4),
            (self.answer, 4),
            (self.revoke, 1),
            (self.refuse, 1),
            (self.capacity, 1),
            (self.answer_for_another, 1),
            (self.time_passes, 1),
        )
        moves = [action for action, weight in actions for _ in range(weight)]
        for _ in range(steps):
            await self.rng.choice(moves)()
            await self.bus.relay.flush()

    async def settle(self) -> list[tuple[str, str, str]]:
        """Everything the outbox holds has left, and every sent message has reached the
        queue consumer that reads it."""
        await self.bus.relay.flush()
        await wait_until(
            lambda: self.bus.store.pending_count() == 0, timeout=30, what="an empty outbox"
        )
        rows = self.bus.store.outbox()
        partners = {p.id for p in self.bus.directory.partners()}
        # what goes to partners' queues (the workers' directory broadcast does not)
        sent = {body for key, _kind, body in rows if key in partners}
        try:
            await wait_until(
                lambda: sent <= {item.raw.decode() for item in self.received()},
                timeout=15,
                what="every outbox row in a partner's queue",
            )
        except AssertionError:
            seen = {item.raw.decode() for item in self.received()}
            missing = [(k, kind) for k, kind, body in rows if body not in seen]
            raise AssertionError(f"missing {missing}; steps {self.steps}") from None
        return rows


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", [7, 2026, 31337])
async def test_every_message_the_bus_sends_in_random_flows_is_valid_under_the_published_schemas(
    settings, channel, seed
):
    """Random grants, signals, answers, reroutes, refusals, revocations, capacity changes and expiries: each body in the outbox, in partners' queues and in the dead letters validates against docs/schemas/."""
    clock = FakeClock(datetime.now(UTC))
    bus = create_app(settings, clock=clock)
    await bus.start()
    try:
        flow = Flow(bus, channel, clock, random.Random(seed))
        await flow.open()
        await flow.run(40)
        rows = await flow.settle()

        kinds = {kind for _key, kind, _body in rows}
        assert {"referral", "referral-status-changed", "consent-requested"} <= kinds, kinds
        dead = [
            i for name, inbox in flow.inboxes.items() if name.endswith(".dlq") for i in inbox.seen
        ]
        assert dead, "the flows include refused answers: their dead-letter copies are checked"
        problems: list[str] = []
        for routing_key, _kind, body in rows:
            problems += [f"outbox → {routing_key}: {p}" for p in contract_errors(_json(body))]
        for item in flow.received():
            problems += [f"{item.message_id}: {p}" for p in contract_errors(item.body)]
        assert problems == [], "\n".join([*problems, "steps:", *flow.steps])
    finally:
        await bus.stop()
        await bus.teardown()


def _json(text: str) -> dict[str, Any]:
    body = json.loads(text)
    assert isinstance(body, dict)
    return body
