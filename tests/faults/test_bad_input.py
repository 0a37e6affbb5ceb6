"""Abuse: a few hundred generated messages, valid and invalid, through one running bus. Each
is processed or dead-lettered with a reason; none disappears; the consumer lives on."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import aio_pika
import pytest
from hypothesis import HealthCheck, Phase, given, seed
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from partnerbus.rules import signal_pseudonym
from partnerbus.testing import Inbox
from tests.conftest import as_partner
from tests.e2e.helpers import ARREARS, ROUBAIX, consent, signal, status
from tests.keys import TEST_KEY_BYTES

pytestmark = [pytest.mark.slow, pytest.mark.rabbitmq, pytest.mark.timeout(300)]

SEED = int(os.environ.get("PARTNERBUS_FUZZ_SEED", "20261123"))
BATCHES, BATCH_SIZE = 6, 50  # 300 messages
PARTNER = "cs-alma-accueil"  # a centre social, publishing with its own RabbitMQ user
KINDS = (
    "valid-signal",
    "duplicate",
    "own-signal",
    "valid-consent",
    "not-json",
    "truncated-json",
    "not-an-object",
    "wrong-type",
    "unknown-need",
    "unknown-commune",
    "huge",
    "missing-message-id",
    "extra-field",
    "spoofed-source",
    "no-user-id",
    "bad-consent",
    "unknown-referral",
)
GOOD = {"valid-signal", "duplicate", "own-signal", "valid-consent"}
SCALARS = ("message_id", "source", "person_ref", "commune", "urgency", "occurred_at")


@dataclass
class Case:
    kind: str
    role: str  # signals | consents | statuses
    routing_key: str
    body: bytes
    user: str  # "guest", "partner", or "" for no user_id property
    fuzz_id: str = ""


# Integers are among the wrong types of a date too: pydantic's lax mode would read them as
# Unix time, which the bus refuses (every moment is ISO 8601 text with a time zone).
not_a_date = st.one_of(
    st.integers(),
    st.booleans(),
    st.lists(st.integers(), min_size=1, max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), min_size=1, max_size=2),
)
wrong_values = not_a_date
DATES = frozenset({"occurred_at", "granted_at", "valid_until"})


@st.composite
def cases(draw: st.DrawFn) -> Case:
    kind = draw(st.sampled_from(KINDS))
    person = "T-" + draw(st.text("abcdef0123456789", min_size=8, max_size=12))
    body: Any = signal(person=person)
    role, key, user = "signals", "lmh-recouvrement", "guest"
    raw: bytes | None = None
    if kind == "own-signal":
        body, key, user = signal(person=person, source=PARTNER), PARTNER, "partner"
    elif kind == "valid-consent":
        role, key = "consents", "lmh-agence-roubaix"
        body = consent(person=person, agency=key, kinds=("ccas-cias",))
    elif kind == "not-json":
        raw = draw(st.binary(max_size=64).filter(_not_json))
    elif kind == "truncated-json":
        text = json.dumps(body)
        raw = text[: draw(st.integers(0, len(text) - 1))].encode()
    elif kind == "not-an-object":
        body = draw(st.one_of(st.integers(), st.text(max_size=20), st.lists(st.integers())))
    elif kind == "wrong-type":
        field = draw(st.sampled_from((*SCALARS, "needs")))
        body[field] = draw(
            st.integers() if field == "needs" else not_a_date if field in DATES else wrong_values
        )
    elif kind == "unknown-need":
        body["needs"] = ["zz-" + draw(st.text("abcdefgh-", min_size=3, max_size=30))]
    elif kind == "unknown-commune":
        body["commune"] = draw(st.from_regex(r"\A00[0-9]{3}\Z") | st.text(max_size=8))
    elif kind == "huge":
        body["facts"]["note"] = "x" * draw(st.integers(300_000, 320_000))
    elif kind == "missing-message-id":
        del body["message_id"]
    elif kind == "extra-field":
        body[draw(st.sampled_from(("admin", "priority", "x")))] = draw(st.integers())
    elif kind == "spoofed-source":
        body["source"] = draw(st.sampled_from(("lmh-recouvrement", "caf-nord", "ccas-roubaix")))
        key, user = PARTNER, "partner"
    elif kind == "no-user-id":
        user = ""
    elif kind == "bad-consent":
        role, key = "consents", "lmh-agence-roubaix"
        body = consent(person=person, agency=key, kinds=("ccas-cias",))
        field = draw(st.sampled_from(("method", "granted_at", "scope", "agency")))
        body[field] = draw(not_a_date if field in DATES else wrong_values)
    elif kind == "unknown-referral":
        role, key = "statuses", "ccas-roubaix"
        body = status(referral_id=f"r-{person}", partner=key, value="accepted")
    return Case(kind, role, key, raw if raw is not None else json.dumps(body).encode(), user)


def _not_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return True
    return False


def generate() -> list[Case]:
    """Hypothesis draws the batches (generation only, a fixed seed for reproducible figures)."""
    batches: list[list[Case]] = []

    @hyp_settings(
        max_examples=BATCHES,
        database=None,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @seed(SEED)
    @given(st.lists(cases(), min_size=BATCH_SIZE, max_size=BATCH_SIZE))
    def collect(batch: list[Case]) -> None:
        batches.append(batch)

    collect()
    out: list[Case] = []
    valid: list[Case] = []
    for batch in batches:
        for case in batch:
            if case.kind == "duplicate":  # the same message again, as a partner's resend
                if not valid:
                    continue
                case = Case("duplicate", "signals", "lmh-recouvrement", valid[-1].body, "guest")
            elif case.kind == "valid-signal":
                valid.append(case)
            out.append(case)
    for i, case in enumerate(out):
        case.fuzz_id = f"fz-{i}"
    return out


@pytest.fixture
async def partner_channel(bus):
    """The centre social's own RabbitMQ user (rights derived from the directory), removed after."""
    async with as_partner(bus, PARTNER) as user_and_channel:
        yield user_and_channel


async def test_every_generated_bad_message_is_dead_lettered_with_a_reason_and_none_disappears(
    bus, channel, partner_channel
) -> None:
    """300 generated messages: published = processed + duplicates + dead-lettered with a reason; a good signal still flows."""
    user, as_partner = partner_channel
    t = bus.topology
    cases_ = generate()
    dlqs = {
        role: await Inbox.open(channel, t.dlq_name(f"{t.prefix}.intake.{role}"))
        for role in ("signals", "consents", "statuses")
    }
    began = time.monotonic()
    before = len(bus.verdicts)
    for case in cases_:
        ch = as_partner if case.user == "partner" else channel
        ex = await ch.get_exchange(f"{t.prefix}.{case.role}", ensure=False)
        await ex.publish(
            aio_pika.Message(
                case.body,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=str(uuid.uuid4()),
                user_id={"partner": user, "guest": "guest"}.get(case.user),
                headers={"fuzz-id": case.fuzz_id},
            ),
            routing_key=case.routing_key,
        )
    published = len(cases_)
    verdicts = (await bus.wait_verdicts(before + published, timeout=120))[before:]
    outcomes = Counter(v.outcome for v in verdicts)

    refused = outcomes["refused"]
    async with asyncio.timeout(60):
        while sum(len(i.seen) for i in dlqs.values()) < refused:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    dead = [d for i in dlqs.values() for d in i.seen]
    dead_ids = {d.headers.get("fuzz-id") for d in dead}
    by_kind = Counter(c.kind for c in cases_)
    bad_kinds = Counter(c.kind for c in cases_ if c.fuzz_id in dead_ids)
    seconds = time.monotonic() - began
    print(
        f"\nFAULT-FIGURES bad-input: published={published} processed={outcomes['processed']} "
        f"duplicates={outcomes['duplicate']} dead-lettered={refused} "
        f"retried={outcomes['retried']} disappeared={published - sum(outcomes.values())} "
        f"time={seconds:.1f}s seed={SEED}\n"
        f"kinds={dict(sorted(by_kind.items()))}\ndead-lettered kinds={dict(sorted(bad_kinds.items()))}"
    )
    assert sum(outcomes.values()) == published, "a message has no verdict: it disappeared"
    assert outcomes["retried"] == 0
    assert all(d.headers.get("partnerbus-error") for d in dead), "a dead letter without reason"
    assert not [d for d in dead if "x-death" in d.headers], "a handler crashed on an input"
    assert len(dead) == refused and len(dead_ids) == refused
    for case in cases_:
        assert (case.fuzz_id in dead_ids) == (case.kind not in GOOD), (case.kind, case.body[:200])
    kind_of = {c.fuzz_id: c.kind for c in cases_}
    reasons = {kind_of[d.headers["fuzz-id"]]: d.headers["partnerbus-error"] for d in dead}
    if "huge" in reasons:
        assert reasons["huge"].startswith("message too large")
    if "spoofed-source" in reasons:
        assert "does not match the authenticated AMQP user" in reasons["spoofed-source"]
    for role in ("signals", "consents", "statuses"):
        q = await channel.declare_queue(f"{t.prefix}.intake.{role}", passive=True)
        assert q.declaration_result.message_count == 0

    # The consumer lives on: a consented signal after the storm reaches its partner.
    person = "T-after-the-storm"
    inbox = await Inbox.open(channel, t.partner_queue_name("ccas-roubaix"))
    ex = await channel.get_exchange(t.consents.name, ensure=False)
    grant = consent(person=person, agency="lmh-agence-roubaix", kinds=("ccas-cias",))
    await ex.publish(
        aio_pika.Message(
            json.dumps(grant).encode(), message_id=grant["message_id"], user_id="guest"
        ),
        routing_key="lmh-agence-roubaix",
    )
    good = signal(person=person, commune=ROUBAIX, needs=(ARREARS,))
    ex = await channel.get_exchange(t.signals.name, ensure=False)
    await ex.publish(
        aio_pika.Message(json.dumps(good).encode(), message_id=good["message_id"], user_id="guest"),
        routing_key="lmh-recouvrement",
    )
    referral = await inbox.expect_kind(
        "referral",
        timeout=20,
        signal_ref=signal_pseudonym(TEST_KEY_BYTES, "ccas-roubaix", good["message_id"]),
    )
    assert referral.body["need"] == ARREARS
