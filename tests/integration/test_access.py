"""Per-partner access rights, proven against the real RabbitMQ: each partner reads only its
own queue, writes only to the signal and status exchanges with its own routing key, and
cannot claim another partner's `user_id`."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import aio_pika
import aiormq.exceptions
import pytest

from partnerbus.broker.access import (
    PartnerGrant,
    apply_with_rabbitmqctl,
    check_rabbit_password,
    definitions,
    derive_password,
    grants_for,
    password_deriver,
    rabbit_password_hash,
    remove_with_rabbitmqctl,
)
from partnerbus.broker.topology import Topology
from partnerbus.schemas.directory import Advisor, Partner
from tests.conftest import AMQP_URL, require

SECRET = "test-access-secret"
RABBITMQCTL = shutil.which("rabbitmqctl") or "rabbitmqctl"


def _partner(pid: str, *, advisors: bool = False) -> Partner:
    return Partner(
        id=pid,
        name=f"Partner {pid}",
        kind="bailleur-social" if advisors else "ccas-cias",
        organisation="org-" + pid,
        advisors=(Advisor(id="adv-" + pid, name="Conseillère"),) if advisors else (),
    )


def _ctl(*args: str, stdin: str | None = None, check: bool = True) -> str:
    return subprocess.run(
        [RABBITMQCTL, *args], input=stdin, capture_output=True, text=True, check=check, timeout=60
    ).stdout


def _eventually(
    probe: Callable[[], list[dict[str, str]]],
    ok: Callable[[list[dict[str, str]]], bool],
    timeout: float = 30.0,
) -> list[dict[str, str]]:
    """Probe (each probe is a blocking rabbitmqctl call) until `ok`, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if ok(found):
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s: {found}")


def _url(user: str, password: str, vhost: str) -> str:
    return f"amqp://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:5672/" + quote(
        vhost, safe=""
    )


# pure core -----------------------------------------------------------------------------


def test_grants_are_anchored_and_escaped() -> None:
    """A partner's regexes match exactly its own queue and the two partner exchanges."""
    t = Topology("pb.test")
    [g] = grants_for([_partner("ccas-lille")], t)
    assert g == PartnerGrant(
        username="pb-ccas-lille",
        partner_id="ccas-lille",
        configure="",
        write=r"^(pb\.test\.signals|pb\.test\.statuses)$",
        read=r"^pb\.test\.partner\.ccas\-lille$",
        topic_exchanges=("pb.test.signals", "pb.test.statuses"),
        topic_write=r"^ccas\-lille$",
        topic_read="^$",
        urgent_exchange="pb.test.signals",
    )
    assert g.topic_write_on("pb.test.signals") == r"^ccas\-lille(\.urgent)?$"
    assert g.topic_write_on("pb.test.statuses") == r"^ccas\-lille$"


def test_agencies_with_advisors_may_write_consents() -> None:
    """Only partners with advisors get the consents exchange, unless consent writers are off."""
    t = Topology("pb")
    agency, ccas = _partner("agence-sud", advisors=True), _partner("ccas-x")
    by_id = {g.partner_id: g for g in grants_for([agency, ccas], t)}
    assert "pb.consents" in by_id["agence-sud"].topic_exchanges
    assert "consents" in by_id["agence-sud"].write
    assert "consents" not in by_id["ccas-x"].write
    [g] = grants_for([agency], t, consent_writers=False)
    assert "consents" not in g.write


def test_two_partners_on_one_user_is_refused() -> None:
    """A shared AMQP user would let one partner read another's queue, so it is an error."""
    a = _partner("aa").model_copy(update={"amqp_user": "shared"})
    b = _partner("bb").model_copy(update={"amqp_user": "shared"})
    with pytest.raises(ValueError, match="share the AMQP user"):
        grants_for([a, b], Topology("pb"))


def test_passwords_are_reproducible_and_hashed_like_rabbitmq() -> None:
    """Derived passwords depend on secret and user; the hash is salt + sha256(salt + password)."""
    assert derive_password("s", "pb-a1") == derive_password("s", "pb-a1")
    assert derive_password("s", "pb-a1") != derive_password("s", "pb-b1")
    assert derive_password("s", "pb-a1") != derive_password("t", "pb-a1")
    with pytest.raises(ValueError, match="secret"):
        password_deriver("")
    h = rabbit_password_hash("pw", b"\x01\x02\x03\x04")
    assert h == rabbit_password_hash("pw", b"\x01\x02\x03\x04")
    assert check_rabbit_password("pw", h)
    assert not check_rabbit_password("other", h)


# against the real broker ---------------------------------------------------------------


@dataclass(frozen=True)
class World:
    vhost: str
    topology: Topology
    a: Partner
    b: Partner
    passwords: dict[str, str]

    def url(self, partner: Partner) -> str:
        return _url(partner.username, self.passwords[partner.username], self.vhost)

    @property
    def guest_url(self) -> str:
        return AMQP_URL.rstrip("/") + "/" + quote(self.vhost, safe="")


async def _declare_topology(url: str, topology: Topology, partner_ids: list[str]) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        ch = await connection.channel()
        exchanges = {}
        for ex in topology.exchanges():
            exchanges[ex.name] = await ch.declare_exchange(
                ex.name, type=ex.type.value, durable=True
            )
        for pid in partner_ids:
            spec = topology.partner_queue(pid)
            queue = await ch.declare_queue(spec.name, durable=True, arguments=spec.arguments)
            await queue.bind(exchanges[topology.deliveries.name], routing_key=pid)
        for spec, exchange in topology.intake_queues():
            queue = await ch.declare_queue(spec.name, durable=True, arguments=spec.arguments)
            await queue.bind(exchanges[exchange.name], routing_key=spec.routing_key)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    """A fresh vhost with the topology, and users for partners A (an agency) and B."""
    require("RabbitMQ", AMQP_URL, 5672)
    tag = uuid.uuid4().hex[:8]
    vhost = f"pbt-access-{tag}"
    topology = Topology(f"pbt-{tag}")
    a, b = _partner(f"a-{tag}", advisors=True), _partner(f"b-{tag}")
    users = [a.username, b.username]
    _ctl("add_vhost", vhost)
    try:
        _ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        w = World(vhost, topology, a, b, {u: derive_password(SECRET, u) for u in users})
        asyncio.run(_declare_topology(w.guest_url, topology, [a.id, b.id]))
        done = apply_with_rabbitmqctl(
            grants_for([a, b], topology),
            vhost=vhost,
            passwords=w.passwords,
            rabbitmqctl=RABBITMQCTL,
        )
        assert f"add_user {b.username}" in done
        yield w
    finally:
        remove_with_rabbitmqctl(users, rabbitmqctl=RABBITMQCTL)
        _ctl("delete_vhost", vhost)
    assert not set(users) & {
        u["user"] for u in json.loads(_ctl("list_users", "-q", "--formatter", "json"))
    }


async def _as(world: World, partner: Partner) -> aio_pika.abc.AbstractConnection:
    return await aio_pika.connect(world.url(partner))


async def _ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    return None


def _msg(body: bytes = b"{}", **props: object) -> aio_pika.Message:
    return aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **props)  # type: ignore[arg-type]


@pytest.mark.rabbitmq
def test_apply_is_idempotent(world: World) -> None:
    """Applying the same grants again changes passwords in place and adds no user."""
    grants = grants_for([world.a, world.b], world.topology)
    done = apply_with_rabbitmqctl(
        grants, vhost=world.vhost, passwords=world.passwords, rabbitmqctl=RABBITMQCTL
    )
    assert f"change_password {world.b.username}" in done
    assert not [d for d in done if d.startswith("add_user")]
    perms = json.loads(_ctl("list_permissions", "-p", world.vhost, "-q", "--formatter", "json"))
    mine = {p["user"]: p for p in perms if p["user"] == world.b.username}
    assert mine[world.b.username]["configure"] == ""
    assert mine[world.b.username]["read"] == grants[1].read


@pytest.mark.rabbitmq
async def test_partner_cannot_consume_another_partners_queue(world: World) -> None:
    """B consuming or getting from A's queue is refused with ACCESS_REFUSED."""
    conn = await _as(world, world.b)
    async with conn:
        ch = await conn.channel()
        queue = await ch.get_queue(world.topology.partner_queue_name(world.a.id), ensure=True)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await queue.consume(_ignore)
        ch = await conn.channel()
        queue = await ch.get_queue(world.topology.partner_queue_name(world.a.id), ensure=False)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await queue.get(fail=False)


@pytest.mark.rabbitmq
async def test_partner_consumes_its_own_queue(world: World) -> None:
    """A referral the bus routes to B's queue is consumed by B, with a passive declare."""
    guest = await aio_pika.connect(world.guest_url)
    async with guest:
        ch = await guest.channel(publisher_confirms=True, on_return_raises=True)
        deliveries = await ch.get_exchange(world.topology.deliveries.name)
        await deliveries.publish(_msg(b'{"for":"b"}'), routing_key=world.b.id)
    conn = await _as(world, world.b)
    async with conn:
        ch = await conn.channel()
        queue = await ch.get_queue(world.topology.partner_queue_name(world.b.id), ensure=True)
        got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.ack()
            if not got.done():
                got.set_result(message.body)

        await queue.consume(on_message)
        assert await asyncio.wait_for(got, 10) == b'{"for":"b"}'


@pytest.mark.rabbitmq
async def test_partner_cannot_publish_to_deliveries(world: World) -> None:
    """B cannot write to the deliveries exchange, so it cannot forge a referral to A."""
    conn = await _as(world, world.b)
    async with conn:
        ch = await conn.channel(publisher_confirms=True)
        ex = await ch.get_exchange(world.topology.deliveries.name, ensure=False)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await ex.publish(_msg(user_id=world.b.username), routing_key=world.a.id)


@pytest.mark.rabbitmq
async def test_partner_publishes_signals_with_its_own_routing_key(world: World) -> None:
    """B's signal with routing key B is confirmed and reaches intake with user_id B."""
    conn = await _as(world, world.b)
    async with conn:
        ch = await conn.channel(publisher_confirms=True, on_return_raises=True)
        for name in (world.topology.signals.name, world.topology.statuses.name):
            ex = await ch.get_exchange(name, ensure=False)
            body = f'{{"to":"{name}","n":"{uuid.uuid4()}"}}'.encode()
            await ex.publish(_msg(body, user_id=world.b.username), routing_key=world.b.id)
    guest = await aio_pika.connect(world.guest_url)
    async with guest:
        ch = await guest.channel()
        q = await ch.get_queue(world.topology.signal_queue.name)
        message = await q.get(timeout=10)
        await message.ack()
        assert message.user_id == world.b.username
        assert message.routing_key == world.b.id


@pytest.mark.rabbitmq
async def test_topic_permission_pins_routing_key(world: World) -> None:
    """B publishing a signal with A's id as routing key is refused by the topic permission."""
    conn = await _as(world, world.b)
    async with conn:
        ch = await conn.channel(publisher_confirms=True)
        ex = await ch.get_exchange(world.topology.signals.name, ensure=False)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await ex.publish(_msg(user_id=world.b.username), routing_key=world.a.id)
        ch = await conn.channel(publisher_confirms=True)
        ex = await ch.get_exchange(world.topology.statuses.name, ensure=False)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await ex.publish(_msg(user_id=world.b.username), routing_key=f"{world.b.id}.x")


@pytest.mark.rabbitmq
async def test_urgent_key_only_for_ones_own_signals(world: World) -> None:
    """B may publish a signal with `B.urgent` (it lands in the urgent queue), never with `A.urgent`, nor `B.urgent` on statuses."""
    t = world.topology
    conn = await _as(world, world.b)
    async with conn:
        ch = await conn.channel(publisher_confirms=True, on_return_raises=True)
        ex = await ch.get_exchange(t.signals.name, ensure=False)
        body = f'{{"n":"{uuid.uuid4()}"}}'.encode()
        await ex.publish(_msg(body, user_id=world.b.username), routing_key=f"{world.b.id}.urgent")
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await ex.publish(_msg(user_id=world.b.username), routing_key=f"{world.a.id}.urgent")
        ch = await conn.channel(publisher_confirms=True)
        ex = await ch.get_exchange(t.statuses.name, ensure=False)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await ex.publish(_msg(user_id=world.b.username), routing_key=f"{world.b.id}.urgent")
    guest = await aio_pika.connect(world.guest_url)
    async with guest:
        ch = await guest.channel()
        q = await ch.get_queue(t.urgent_signal_queue.name)
        message = await q.get(timeout=10)
        await message.ack()
        assert message.body == body
        assert message.user_id == world.b.username


@pytest.mark.rabbitmq
async def test_user_id_of_another_partner_is_refused(world: World) -> None:
    """RabbitMQ itself refuses a `user_id` that is not the connection's user (PRECONDITION_FAILED)."""
    conn = await _as(world, world.b)
    async with conn:
        ch = await conn.channel(publisher_confirms=True)
        ex = await ch.get_exchange(world.topology.signals.name, ensure=False)
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
            await ex.publish(_msg(user_id=world.a.username), routing_key=world.b.id)


@pytest.mark.rabbitmq
async def test_consents_only_for_agencies(world: World) -> None:
    """A (an agency with advisors) may publish consent events; B may not."""
    name = world.topology.consents.name
    conn = await _as(world, world.a)
    async with conn:
        ch = await conn.channel(publisher_confirms=True, on_return_raises=True)
        ex = await ch.get_exchange(name, ensure=False)
        await ex.publish(_msg(user_id=world.a.username), routing_key=world.a.id)
    conn = await _as(world, world.b)
    async with conn:
        ch = await conn.channel(publisher_confirms=True)
        ex = await ch.get_exchange(name, ensure=False)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await ex.publish(_msg(user_id=world.b.username), routing_key=world.b.id)


@pytest.mark.rabbitmq
async def test_partner_cannot_declare_or_bind(world: World) -> None:
    """B can neither declare a queue nor bind its own queue to another exchange."""
    conn = await _as(world, world.b)
    async with conn:
        ch = await conn.channel()
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await ch.declare_queue(f"{world.topology.prefix}.partner.{world.b.id}.spy")
        ch = await conn.channel()
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await ch.declare_exchange(f"{world.topology.prefix}.spy", durable=False)
        ch = await conn.channel()
        queue = await ch.get_queue(world.topology.partner_queue_name(world.b.id), ensure=True)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await queue.bind(world.topology.deliveries.name, routing_key=world.a.id)


@pytest.mark.rabbitmq
async def test_definitions_import_and_authenticate(tmp_path: Path) -> None:
    """The exported definitions import into a throwaway vhost and their users authenticate."""
    require("RabbitMQ", AMQP_URL, 5672)
    tag = uuid.uuid4().hex[:8]
    vhost = f"pbt-defs-{tag}"
    topology = Topology(f"pbt-{tag}")
    partners = [_partner(f"a-{tag}", advisors=True), _partner(f"b-{tag}")]
    password_for = password_deriver(SECRET)
    doc = definitions(partners, topology, vhost=vhost, password_for=password_for)
    path = tmp_path / "definitions.json"
    path.write_text(json.dumps(doc))
    try:
        # Through stdin (no path argument): the Debian wrapper runs rabbitmqctl as the
        # rabbitmq user, who cannot read pytest's private tmp_path.
        _ctl("import_definitions", "--format", "json", stdin=path.read_text())
        # The import runs asynchronously on the node: wait until its last part is there.
        topics = _eventually(
            lambda: json.loads(
                _ctl("list_topic_permissions", "-p", vhost, "-q", "--formatter", "json")
            ),
            lambda found: len(found) == 5,  # A: signals, statuses, consents; B: two
        )
        assert {t["write"] for t in topics} == {
            f"^a\\-{tag}$",
            f"^b\\-{tag}$",
            f"^a\\-{tag}(\\.urgent)?$",
            f"^b\\-{tag}(\\.urgent)?$",
        }
        user = partners[1].username
        # On stdin: a generated password may begin with "-", which the CLI would take for
        # an option (the bus's own `add_user` and `change_password` pass it so too).
        assert "Success" in _ctl("authenticate_user", user, stdin=password_for(user) + "\n")
        perms = json.loads(_ctl("list_permissions", "-p", vhost, "-q", "--formatter", "json"))
        assert {p["user"] for p in perms} == {p.username for p in partners}
        conn = await aio_pika.connect(_url(user, password_for(user), vhost))
        async with conn:
            assert not conn.is_closed
    finally:
        remove_with_rabbitmqctl([p.username for p in partners], rabbitmqctl=RABBITMQCTL)
        _ctl("delete_vhost", vhost, check=False)
