"""No personal data in any log line or header, even when the database fails on a signal
(real broker; SQLite and PostgreSQL)."""

from __future__ import annotations

import logging
import secrets
import sqlite3
import uuid
from typing import Any

import psycopg
import pytest
from sqlalchemy import event

from partnerbus.broker.topology import ERROR_HEADER, LAST_ERROR_HEADER
from partnerbus.errors import describe_error
from partnerbus.ledger.store import Store
from partnerbus.rules import ConsentRecord
from partnerbus.schemas import ConsentScope
from partnerbus.testing import FakeClock, Inbox

from .helpers import publish, signal

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
def database_url(engine_url: str) -> str:
    """These run on both engines: SQLite and PostgreSQL."""
    return engine_url


def markers() -> tuple[str, str, str]:
    """A person reference, a phone number and a note that appear nowhere else."""
    tag = uuid.uuid4().hex[:12]
    phone = "07" + "".join(secrets.choice("0123456789") for _ in range(8))
    return f"T-MRK{tag}", phone, f"violence at home MRK{tag}note"


def fail_signal_inserts(store: Store, marker: str) -> None:
    """Every insert of a signal fails as a transient database error whose text, as a real
    driver's would, repeats a value (PostgreSQL's DETAIL does so even without parameters)."""

    def fail(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO SIGNALS"):
            if store.is_sqlite:
                raise sqlite3.OperationalError(f"disk I/O error near {marker}")
            raise psycopg.errors.AdminShutdown(f"terminating connection; DETAIL: ({marker})")

    event.listen(store.engine, "before_cursor_execute", fail)


def capture_every_logger(handler: logging.Handler) -> None:
    """Loggers that do not propagate to the root (FastStream's) get the capture too."""
    for logger in list(logging.root.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger) and not logger.propagate:
            logger.setLevel(logging.DEBUG)
            if handler not in logger.handlers:
                logger.addHandler(handler)


async def test_a_database_failure_on_a_signal_puts_no_personal_data_in_logs_or_headers(
    bus, channel, caplog, capfd
):
    """A signal whose insert fails (transient, then given up): its person reference, phone and note are in no log record (every logger, DEBUG, tracebacks included), no output, and no header of its retry copy or dead letter."""
    person, phone, note = markers()
    fail_signal_inserts(bus.store, person)
    caplog.set_level(logging.DEBUG)
    capture_every_logger(caplog.handler)
    t = bus.topology
    dead = await Inbox.open(channel, t.dlq_name(t.signal_queue.name))
    body = signal(person=person, contact={"phone": phone}, facts={"note": note})
    await publish(channel, f"{t.prefix}.signals", body, routing_key="lmh-recouvrement")

    verdicts = await bus.wait_verdicts(2, queue="signals", timeout=60)
    assert [v.outcome for v in verdicts] == ["retried", "refused"]
    (letter,) = await dead.expect(1, timeout=30)
    assert letter.message_id == body["message_id"]
    assert "OperationalError" in letter.headers[LAST_ERROR_HEADER]
    assert "OperationalError" in letter.headers[ERROR_HEADER]

    headers = repr(letter.headers)
    logged = caplog.text + "\n".join(
        f"{r.getMessage()} {r.exc_text or ''} {r.args!r}" for r in caplog.records
    )
    out, err = capfd.readouterr()
    for value in (person, phone, note, person.removeprefix("T-")):
        assert value not in headers, f"{value} in a header: {headers}"
        assert value not in logged, f"{value} in a log record"
        assert value not in out + err, f"{value} in the output"
        assert all(value not in (v.reason or "") for v in verdicts)


def test_an_integrity_error_is_described_without_the_values_it_carries(store: Store) -> None:
    """A duplicate key: PostgreSQL's DETAIL and the bound parameters name the person; the description keeps only the classes and the SQLSTATE (or SQLite's error name)."""
    person, _, _ = markers()
    now = FakeClock()()
    row = ConsentRecord(
        consent_id=f"c-{person}",
        person_ref=person,
        scope=ConsentScope(needs=("logement-hebergement",), partner_kinds=("caf",)),
        collected_by="a.martin",
        agency="lmh-agence-roubaix",
        method="oral",
        granted_at=now,
        valid_until=now,
        revoked_at=None,
    )
    with store.begin() as tx:
        tx.consents.add(row)
    from sqlalchemy.exc import IntegrityError

    from partnerbus.ledger import tables as t

    with pytest.raises(IntegrityError) as caught, store.begin() as tx:
        tx.conn.execute(t.consents.insert().values(**_columns(row)))
    said = describe_error(caught.value)
    assert person not in said and person not in str(caught.value).split("[SQL")[1]
    assert said.startswith("IntegrityError (")
    assert ("SQLSTATE 23505" if not store.is_sqlite else "sqlite SQLITE_CONSTRAINT") in said


def _columns(row: ConsentRecord) -> dict[str, Any]:
    values = {k: getattr(row, k) for k in row.__dataclass_fields__}
    values["scope"] = row.scope.model_dump_json()
    return values


async def test_a_database_error_that_propagates_from_an_intake_carries_no_value() -> None:
    """A non-transient database error (nacked, then dead-lettered by the delivery limit) is raised again as a StoreError naming only its kind: FastStream's traceback of it shows no value."""
    from types import SimpleNamespace

    from pydantic import TypeAdapter
    from sqlalchemy import create_engine, text

    from partnerbus.broker.topology import Topology
    from partnerbus.directory import load_sample
    from partnerbus.errors import StoreError
    from partnerbus.handlers.delivery import Intake

    person, _, _ = markers()
    engine = create_engine("sqlite://")  # even with its parameters shown

    async def work(_message: Any) -> bool:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE t (person TEXT PRIMARY KEY)"))
            conn.execute(text("INSERT INTO t VALUES (:p)"), {"p": person})
            conn.execute(text("INSERT INTO t VALUES (:p)"), {"p": person})
        return True

    async def publish(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("nothing is published for a non-transient error")

    intake = Intake(
        queue="q",
        topology=Topology("pb"),
        directory=load_sample(),
        publish=publish,
        trusted_senders=(),
        max_bytes=1024,
        own_user="guest",
    )
    raw = SimpleNamespace(user_id="guest", headers={})
    with pytest.raises(StoreError) as caught:
        await intake.run(raw, b"{}", TypeAdapter(dict), lambda _m: "x", work)  # type: ignore[arg-type]
    assert "IntegrityError" in str(caught.value)
    assert caught.value.__suppress_context__ and caught.value.__cause__ is None
    assert person not in str(caught.value)
    engine.dispose()
