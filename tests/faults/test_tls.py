"""AMQP over TLS, for real: a RabbitMQ node started with the shipped
deploy/rabbitmq-tls.conf (paths and port changed) and certificates of a throwaway CA made
with openssl; the bus, a partner's client and the ops monitor all dial amqps://."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest

from partnerbus.client import PartnerClient
from partnerbus.entrypoints.bootstrap import create_app
from partnerbus.ops.monitor import snapshot
from partnerbus.schemas import ConsentGranted
from partnerbus.settings import Settings
from partnerbus.testing import Inbox
from partnerbus.testing.cluster import LocalCluster
from tests.keys import TEST_KEY

from ..e2e.helpers import ARREARS, ROUBAIX, consent, publish, signal, signal_ref
from .conftest import build_cluster

pytestmark = [pytest.mark.rabbitmq, pytest.mark.timeout(300)]

ROOT = Path(__file__).parents[2]
TLS_PORT = 5693
KINDS = ("ccas-cias", "points-conseil-budget", "cresus", "caf", "maisons-des-solidarites")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certificates(where: Path) -> Path:
    """A CA, and a server certificate for 127.0.0.1 / localhost signed by it."""
    where.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=partnerbus test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=where,
    )  # fmt: skip
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
        "-out", "server.csr", "-subj", "/CN=localhost",
        cwd=where,
    )  # fmt: skip
    (where / "server.ext").write_text(
        "subjectAltName = IP:127.0.0.1, DNS:localhost\n"
        "extendedKeyUsage = serverAuth\n"
        "keyUsage = critical, digitalSignature, keyEncipherment\n"
        "authorityKeyIdentifier = keyid, issuer\n"
        "subjectKeyIdentifier = hash\n"
    )
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-out", "server.pem", "-extfile", "server.ext",
        cwd=where,
    )  # fmt: skip
    return where


def node_config(certs: Path) -> str:
    """The shipped TLS configuration, with this test's paths and port; the node keeps the
    helper's plain listener (its own, on 5692) so `listeners.tcp = none` is left out."""
    shipped = (ROOT / "deploy" / "rabbitmq-tls.conf").read_text(encoding="utf-8")
    assert "listeners.ssl.default = 5671" in shipped
    conf = shipped.replace("/etc/rabbitmq/tls", str(certs)).replace(
        "listeners.ssl.default = 5671", f"listeners.ssl.default = 127.0.0.1:{TLS_PORT}"
    )
    return "\n".join(line for line in conf.splitlines() if line.strip() != "listeners.tcp = none")


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, Path]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    certs = make_certificates(tmp_path_factory.mktemp("tls"))
    with build_cluster(
        names=("pbtls1",), amqp_port=5692, dist_port=25692, extra_config="\n" + node_config(certs)
    ) as node:
        yield node, certs


def amqps_url(certs: Path) -> str:
    return f"amqps://guest:guest@127.0.0.1:{TLS_PORT}/?cafile={certs / 'ca.pem'}"


async def test_a_signal_crosses_the_bus_over_amqps(tls_node, tmp_path) -> None:
    """The service (FastStream), a partner's client (aio-pika, robust) and the ops monitor
    connect with amqps:// and the CA file from the URL; a consented signal becomes a
    referral in the partner's queue."""
    _, certs = tls_node
    url = amqps_url(certs)
    settings = Settings(
        amqp_url=url,
        prefix=f"pbt-tls-{uuid.uuid4().hex[:8]}",
        database_url=f"sqlite:///{tmp_path / 'bus.db'}",
        relay_interval_s=0.2,
        scheduler_interval_s=3600,
        pseudonym_key=TEST_KEY,
    )
    bus = create_app(settings)
    await bus.start()
    try:
        agency = bus.directory.agency_for(ROUBAIX).id
        person = f"T-{uuid.uuid4().hex[:8]}"
        async with PartnerClient(url, agency, prefix=settings.prefix) as client:
            await client.send_consent(
                ConsentGranted.model_validate(consent(person=person, agency=agency, kinds=KINDS))
            )
        await bus.wait_verdicts(1, timeout=30)

        from partnerbus.directory import match

        target = match(bus.directory, ARREARS, ROUBAIX, sender="lmh-recouvrement")[0].partner_id
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            inbox = await Inbox.open(channel, bus.topology.partner_queue_name(target))
            body = signal(person=person)
            await publish(channel, bus.topology.signals.name, body, routing_key="lmh-recouvrement")
            (referral,) = await inbox.expect(1, timeout=30)
            assert referral.kind == "referral"
            assert signal_ref(referral.body, body["message_id"], key=TEST_KEY.encode())
            await inbox.close()

        snap = await snapshot(
            url,
            bus.topology,
            [p.id for p in bus.directory.partners()],
            bus.store,
            bus.ledger.clock(),
        )
        assert snap.broker_error is None
        assert any(q.role == "intake" and q.consumers for q in snap.queues)
    finally:
        await bus.stop()
        await bus.teardown()


async def test_the_server_certificate_is_checked(tls_node) -> None:
    """Without the CA the connection is refused (the certificate is verified, not just
    encrypted); a plain amqp:// client gets nothing from the TLS port."""
    assert tls_node
    with pytest.raises((ssl.SSLError, ConnectionError, aio_pika.exceptions.AMQPConnectionError)):
        await aio_pika.connect(f"amqps://guest:guest@127.0.0.1:{TLS_PORT}/", timeout=10)
    with pytest.raises((ConnectionError, aio_pika.exceptions.AMQPConnectionError, TimeoutError)):
        await aio_pika.connect(f"amqp://guest:guest@127.0.0.1:{TLS_PORT}/", timeout=10)
