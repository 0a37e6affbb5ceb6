"""The deployment keeps the promises: compose has no default password and publishes on
loopback only, and the bus runs end to end as the user deploy/rabbitmq-setup.sh makes
(no tags, rights on its prefix only), on the real RabbitMQ."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import aiormq
import pytest
import yaml
from pydantic import SecretStr

from partnerbus.testing import Inbox

from .helpers import ARREARS, ROUBAIX, consent, publish, signal, signal_ref

ROOT = Path(__file__).parents[2]
COMPOSE = ROOT / "compose.yaml"
SETUP = ROOT / "deploy" / "rabbitmq-setup.sh"
REQUIRED = (
    "PARTNERBUS_RABBITMQ_ADMIN_PASSWORD",
    "PARTNERBUS_RABBITMQ_PASSWORD",
    "PARTNERBUS_POSTGRES_PASSWORD",
    "PARTNERBUS_PSEUDONYM_KEY",
    "PARTNERBUS_OPS_PASSWORD",
)


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def test_no_secret_has_a_default_in_compose() -> None:
    """Every password and key is `${VAR:?…}` (required), never `${VAR:-default}`."""
    text = COMPOSE.read_text(encoding="utf-8")
    for name in REQUIRED:
        uses = re.findall(r"\$\{" + name + r"(:?[-?=+]?)", text)
        assert uses, f"{name} is not used"
        assert set(uses) == {":?"}, f"{name} must be required everywhere: {uses}"
    assert ":-partnerbus}" not in text.replace("PARTNERBUS_PREFIX:-partnerbus}", "")


def test_every_published_port_is_on_loopback_by_default() -> None:
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("${PARTNERBUS_PUBLISH_ADDRESS:-127.0.0.1}:"), (name, port)


def test_the_bus_is_not_rabbitmqs_administrator() -> None:
    """RabbitMQ's default user (an administrator) is a separate account; the bus's user
    comes from the one-shot setup, which the service waits for."""
    services = compose()["services"]
    admin = services["rabbitmq"]["environment"]["RABBITMQ_DEFAULT_USER"]
    assert "partnerbus" not in admin
    assert services["rabbitmq-setup"]["environment"]["PARTNERBUS_RABBITMQ_USER"] == "partnerbus"
    waits = services["partnerbus"]["depends_on"]["rabbitmq-setup"]["condition"]
    assert waits == "service_completed_successfully"
    ops = services["ops"]["environment"]
    assert ops["PARTNERBUS_OPS_PASSWORD"].startswith("${PARTNERBUS_OPS_PASSWORD:?")


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    found = shutil.which("docker-compose")
    return [found] if found else None


def test_compose_refuses_to_start_without_each_secret(tmp_path) -> None:
    """`docker compose config` (the client; no engine needed) fails naming the missing
    variable, and passes when all are set."""
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no docker compose client on this machine")
    # compose v1 does not know the top-level `name`: drop it for the check.
    copy = tmp_path / "compose.yaml"
    copy.write_text(re.sub(r"(?m)^name: .*$", "", COMPOSE.read_text(encoding="utf-8")))
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy")
    full = {name: secrets.token_hex(8) for name in REQUIRED}
    base = {"PATH": os.environ["PATH"]}

    def config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cli, "-f", str(copy), "config"],
            env=base | env,
            capture_output=True,
            text=True,
            cwd=tmp_path,
            check=False,
        )

    ok = config(full)
    assert ok.returncode == 0, ok.stderr
    assert "127.0.0.1" in ok.stdout
    for name in REQUIRED:
        refused = config({k: v for k, v in full.items() if k != name})
        assert refused.returncode != 0, name
        assert "set PARTNERBUS_" in refused.stderr


# The bus's own user, made by deploy/rabbitmq-setup.sh, on the real broker -------------

STUB = """#!{python}
# rabbitmqadmin stand-in: the same calls, carried out with rabbitmqctl on the local node.
import configparser, subprocess, sys
args = sys.argv[1:]
assert args[0] == "--config" and args[2] == "--node", args
conf = configparser.ConfigParser()
conf.read(args[1])
section = conf[args[3]]
assert section["username"] and section["password"] and section["hostname"], dict(section)
rest = [a for a in args[4:] if a != "--quiet"]
kv = dict(a.split("=", 1) for a in rest[2:])
ctl = lambda *a, **k: subprocess.run(["rabbitmqctl", *a], check=True, capture_output=True, text=True, **k)
if rest[:2] == ["list", "users"]:
    sys.exit(0)
if rest[:2] == ["declare", "user"]:
    users = ctl("list_users", "--formatter", "json", "--quiet").stdout
    verb = "change_password" if kv["name"] in users else "add_user"
    ctl(verb, kv["name"], input=kv["password"] + "\\n")
    ctl("set_user_tags", kv["name"], *[t for t in kv["tags"].split(",") if t])
elif rest[:2] == ["declare", "permission"]:
    ctl("set_permissions", "-p", kv["vhost"], kv["user"], kv["configure"], kv["write"], kv["read"])
else:
    sys.exit("unexpected: " + " ".join(rest))
"""


def _ctl(*args: str) -> str:
    return subprocess.run(
        ["rabbitmqctl", *args], check=True, capture_output=True, text=True, timeout=60
    ).stdout


@pytest.fixture
def bus_user(amqp_url: str, prefix: str, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """The bus's user as compose's rabbitmq-setup makes it (the script itself, its
    rabbitmqadmin calls carried out by rabbitmqctl): its name and password."""
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not installed")
    user = f"pbt-bus-{uuid.uuid4().hex[:8]}"
    password = secrets.token_urlsafe(18)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "rabbitmqadmin"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "RABBITMQ_ADMIN_PASSWORD": "unused-by-the-stub",
        "PARTNERBUS_RABBITMQ_USER": user,
        "PARTNERBUS_RABBITMQ_PASSWORD": password,
        "PARTNERBUS_PREFIX": prefix,
        "HOME": os.environ.get("HOME", "/root"),
    }
    done = subprocess.run(
        ["sh", str(SETUP)], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    try:
        yield user, password
    finally:
        subprocess.run(["rabbitmqctl", "delete_user", user], capture_output=True, check=False)


@pytest.fixture
def bus_url(bus_user: tuple[str, str], amqp_url: str) -> str:
    user, password = bus_user
    return amqp_url.replace("guest:guest", f"{user}:{password}")


@pytest.fixture
def settings(settings, bus_url):  # type: ignore[no-untyped-def]
    """The bus runs as the limited user."""
    return settings.model_copy(update={"amqp_url": SecretStr(bus_url)})


async def a_consented_signal_becomes_a_referral(bus, channel, user: str) -> None:
    """The bus's main path, published as `user` (the bus's own user may claim any sender)."""
    agency = bus.directory.agency_for(ROUBAIX).id
    person = f"T-{uuid.uuid4().hex[:8]}"
    kinds = ("ccas-cias", "points-conseil-budget", "cresus", "caf", "maisons-des-solidarites")
    before = len(bus.verdicts)
    await publish(
        channel,
        bus.topology.consents.name,
        consent(person=person, agency=agency, kinds=kinds),
        routing_key=agency,
        user_id=user,
    )
    await bus.wait_verdicts(before + 1, timeout=30)
    from partnerbus.directory import match

    target = match(bus.directory, ARREARS, ROUBAIX, sender="lmh-recouvrement")[0].partner_id
    inbox = await Inbox.open(channel, bus.topology.partner_queue_name(target))
    body = signal(person=person)
    await publish(
        channel, bus.topology.signals.name, body, routing_key="lmh-recouvrement", user_id=user
    )
    (referral,) = await inbox.expect(1, timeout=30)
    assert referral.kind == "referral"
    assert signal_ref(referral.body, body["message_id"])
    await inbox.close()


@pytest.mark.rabbitmq
async def test_the_bus_runs_as_the_user_the_setup_makes(bus, bus_user, bus_url, prefix) -> None:
    """No tags; rights on `<prefix>.…` and the default exchange only. The bus declares its
    whole topology, takes a consent and a signal and sends the referral as that user; it
    may publish through the default exchange (dead-letter replay), and may not touch a
    resource outside its prefix."""
    user, _ = bus_user
    listed = {u["user"]: u["tags"] for u in json.loads(_ctl("list_users", "--formatter", "json"))}
    assert listed[user] == []
    (perms,) = json.loads(_ctl("list_user_permissions", user, "--formatter", "json"))
    p = prefix.replace(".", "\\.")  # only dots are special in a prefix
    assert perms["configure"] == f"^{p}\\..*"
    assert perms["write"] == f"^({p}\\..*|amq\\.default)$"
    assert perms["read"] == f"^{p}\\..*"

    connection = await aio_pika.connect(bus_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await a_consented_signal_becomes_a_referral(bus, channel, user)
        # The default exchange, as `dlq replay` uses it: routed and confirmed.
        scratch = await channel.declare_queue(f"{prefix}.scratch", auto_delete=True)
        await channel.default_exchange.publish(
            aio_pika.Message(b"{}", user_id=user), routing_key=scratch.name
        )
        assert (await scratch.get(timeout=10, fail=False)) is not None
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await (await connection.channel()).declare_queue(f"x{prefix}.elsewhere")
        own = await (await connection.channel()).declare_queue(
            f"{prefix}.bind-test", auto_delete=True
        )
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await own.bind("amq.topic", "#")  # no read on an exchange outside its prefix
