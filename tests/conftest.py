"""Fixtures shared by every tier: the real broker and databases, fresh names per test."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import timedelta
from urllib.parse import urlsplit

import aio_pika
import pytest
from sqlalchemy import create_engine, text

from partnerbus.broker.access import apply_with_rabbitmqctl, grants_for, remove_with_rabbitmqctl
from partnerbus.directory import load_sample
from partnerbus.entrypoints.bootstrap import Bus, create_app
from partnerbus.ledger.store import Store
from partnerbus.rules import DeadlinePolicy
from partnerbus.settings import Settings
from partnerbus.testing import FakeClock
from partnerbus.usecases import Ledger
from tests.keys import TEST_KEY, TEST_KEY_BYTES

AMQP_URL = os.environ.get("PARTNERBUS_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
POSTGRES_URL = os.environ.get(
    "PARTNERBUS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url.replace("+psycopg", ""))
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 2
        ):
            return True
    except OSError:
        return False


def require(service: str, url: str, port: int) -> None:
    """On a laptop a missing service skips; in CI it fails, so nothing is skipped silently."""
    if _reachable(url, port):
        return
    message = f"{service} is not reachable at {url}"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI must start it: see .ci/run)")
    pytest.skip(message + "; start it (see README) to run these tests")


@asynccontextmanager
async def as_partner(
    bus: Bus, partner_id: str
) -> AsyncIterator[tuple[str, aio_pika.abc.AbstractChannel]]:
    """A partner's own RabbitMQ user, with the rights derived from the directory (created
    with `partnerbus.broker.access`, removed after): its user name and a confirming channel."""
    partner = bus.directory.partner(partner_id)
    password = secrets.token_urlsafe(16)
    (grant,) = grants_for([partner], bus.topology)
    await asyncio.to_thread(
        apply_with_rabbitmqctl, [grant], vhost="/", passwords={grant.username: password}
    )
    url = bus.settings.amqp_url.get_secret_value().replace(
        "guest:guest", f"{grant.username}:{password}"
    )
    connection = await aio_pika.connect(url)
    try:
        yield grant.username, await connection.channel(publisher_confirms=True)
    finally:
        await connection.close()
        await asyncio.to_thread(remove_with_rabbitmqctl, [grant.username])


def make_ledger(store: Store, clock: FakeClock | None = None) -> Ledger:
    """The use cases' context over `store`: the bundled directory, a fake clock, a fixed
    pseudonym key (the tests' `TEST_KEY`) and short deadlines (10 days, 3 days, 1 day)."""
    return Ledger(
        store=store,
        directory=load_sample(),
        clock=clock or FakeClock(),
        pseudonym_key=TEST_KEY_BYTES,
        deadlines=DeadlinePolicy(
            routine=timedelta(days=10), urgent=timedelta(days=3), asap=timedelta(days=1)
        ),
    )


@pytest.fixture
def amqp_url() -> str:
    require("RabbitMQ", AMQP_URL, 5672)
    return AMQP_URL


@pytest.fixture
def prefix() -> str:
    """A fresh name prefix per test, so runs and tests never share queues."""
    return f"pbt-{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path) -> Iterator[Store]:
    """The durable record on both engines: a SQLite file and a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        s = Store(f"sqlite:///{tmp_path / 'ledger.db'}")
        s.create_all()
        yield s
        s.dispose()
        return
    require("PostgreSQL", POSTGRES_URL, 5432)
    schema = f"pbt_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    s = Store(POSTGRES_URL, schema=schema)
    s.create_all()
    yield s
    s.dispose()
    with admin.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture
def database_url(tmp_path) -> str:
    """The bus's record: a SQLite file (modules that must pass on both engines override this
    with `engine_url`, parametrised over SQLite and PostgreSQL)."""
    return f"sqlite:///{tmp_path / 'bus.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def engine_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """A database URL on each engine: a SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'bus.db'}"
        return
    require("PostgreSQL", POSTGRES_URL, 5432)
    schema = f"pbt_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture
def settings(amqp_url: str, prefix: str, database_url: str) -> Settings:
    return Settings(
        amqp_url=amqp_url,
        prefix=prefix,
        database_url=database_url,
        retry_delays_ms=(200,),
        delivery_limit=3,
        relay_interval_s=0.2,
        scheduler_interval_s=3600,
        pseudonym_key=TEST_KEY,
    )


@pytest.fixture
async def connection(amqp_url: str) -> AsyncIterator[aio_pika.abc.AbstractRobustConnection]:
    """A raw AMQP connection, as a partner's system would have."""
    conn = await aio_pika.connect_robust(amqp_url)
    yield conn
    await conn.close()


@pytest.fixture
async def channel(
    connection: aio_pika.abc.AbstractRobustConnection,
) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    ch = await connection.channel(publisher_confirms=True, on_return_raises=True)
    yield ch
    await ch.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def bus(settings: Settings) -> AsyncIterator[Bus]:
    """The service, started against the real broker, on a fresh prefix; removed after."""
    service = create_app(settings)
    await service.start()
    yield service
    await service.stop()
    await service.teardown()
