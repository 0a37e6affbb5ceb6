"""What the bus may say about an error in a log line, a header or a stored column.

A database error carries the values it was given: SQLAlchemy prints the statement's bound
parameters (a person's reference, a phone, a note), and PostgreSQL's own message and DETAIL
repeat values (`Key (person_ref)=(…) already exists`) even with `hide_parameters`. So for a
database error the bus says only its class, the driver's class and the error code
(PostgreSQL's SQLSTATE, SQLite's error name); for any other error only its class, except
the broker's and the network's own errors, whose text names queues and hosts, never a body.
"""

from __future__ import annotations

import logging
import sqlite3

from sqlalchemy.exc import SQLAlchemyError

_TALKATIVE_SAFE = ("aiormq", "aio_pika", "pamqp", "faststream")
"""Packages whose exceptions say where (a queue, a routing key, a host), never a body."""


class PartnerbusError(Exception):
    """The root of every error partnerbus raises on purpose: a caller that means "anything
    the bus refused or could not do" catches this one class. The families below it:
    `Refused` (a message the use cases cannot process as sent), `ledger.store.Conflict` (a
    transaction to re-run), `StoreError`, `directory.errors.DirectoryError`, `ConfigError`
    (settings, keys, the gateway's token file), the delivery's refusals by the broker."""


class Refused(PartnerbusError):  # noqa: N818 - a business refusal, not a crash
    """The message cannot be processed as sent; it goes to the dead-letter queue with this
    reason (unknown commune, spoofed source, a status about someone else's referral…)."""


class ConfigError(PartnerbusError, ValueError):
    """A setting, key or file the bus cannot start with; still a `ValueError`, as pydantic
    and the callers that predate the hierarchy expect."""


class StoreError(PartnerbusError):
    """Raised in place of a database error that must propagate: only its description, so
    that whoever logs the traceback logs no value the original carried."""


def is_database_error(exc: BaseException) -> bool:
    """An error of SQLAlchemy or of a database driver."""
    return isinstance(exc, SQLAlchemyError | sqlite3.Error) or _package(exc) == "psycopg"


def error_code(exc: BaseException) -> str | None:
    """PostgreSQL's SQLSTATE (psycopg) or SQLite's error name, when the error has one."""
    orig = getattr(exc, "orig", None) or exc
    code = getattr(orig, "sqlstate", None)
    if code:
        return f"SQLSTATE {code}"
    name = getattr(orig, "sqlite_errorname", None)
    if name:
        return f"sqlite {name}"
    return None


def describe_error(exc: BaseException) -> str:
    """The error's kind, fit for a log line or a header: never a value it carries.

    `OperationalError (psycopg.errors.ConnectionFailure, SQLSTATE 08006)`,
    `IntegrityError (sqlite3.IntegrityError, sqlite SQLITE_CONSTRAINT_PRIMARYKEY)`,
    `DeliveryError: Message delivery failed: …`, `KeyError`."""
    name = type(exc).__name__
    if isinstance(exc, StoreError):
        return f"{name}: {exc}"
    if is_database_error(exc):
        details = []
        orig = getattr(exc, "orig", None)
        if isinstance(orig, BaseException) and orig is not exc:
            details.append(f"{type(orig).__module__}.{type(orig).__name__}")
        code = error_code(exc)
        if code:
            details.append(code)
        return f"{name} ({', '.join(details)})" if details else name
    if isinstance(exc, TimeoutError | ConnectionError) or _package(exc) in _TALKATIVE_SAFE:
        text = str(exc)
        return f"{name}: {text}"[:500] if text else name
    return name


def _package(exc: BaseException) -> str:
    return type(exc).__module__.split(".", 1)[0]


WIRE_LOGGERS = ("aiormq.connection", "aiormq.channel")
"""At DEBUG, aiormq logs every AMQP frame it sends or receives: message bodies included."""


class WireRedactor(logging.Filter):
    """Keeps a frame logged by aiormq, but as its kind only: `<ChannelFrame>`, never the
    bytes of a message body (a referral's phone, a signal's note)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(map(_is_wire, record.args)):
            record.args = tuple(f"<{type(a).__name__}>" if _is_wire(a) else a for a in record.args)
        return True


def _is_wire(value: object) -> bool:
    return isinstance(value, bytes | bytearray | memoryview) or type(value).__module__.split(
        ".", 1
    )[0] in ("aiormq", "pamqp")


def redact_wire_logs() -> None:
    """Install `WireRedactor` on aiormq's loggers (once per process): whatever level an
    operator sets, no message body reaches a log line."""
    for name in WIRE_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, WireRedactor) for f in logger.filters):
            logger.addFilter(WireRedactor())


__all__ = [
    "ConfigError",
    "PartnerbusError",
    "Refused",
    "StoreError",
    "WireRedactor",
    "describe_error",
    "error_code",
    "is_database_error",
    "redact_wire_logs",
]
