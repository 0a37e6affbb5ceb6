"""What both insights share: the period, the privacy threshold, durations and percentiles in
SQL (the same figures on SQLite and PostgreSQL)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import BigInteger, Connection, Engine, Integer, cast, func, literal
from sqlalchemy.sql.elements import ColumnElement

from partnerbus.ledger.store import read_only_connection

MIN_PERSONS = 5
"""The privacy threshold: a figure drawn from fewer distinct persons is never shown. A
response-time row keeps its counts and hides its median and 90th percentile; an unmet-demand
cell is rolled into the coarser territory ("other communes of the EPCI"), and hidden there
too when still too small. Lowering it needs a change of code, not an option."""

DEFAULT_PERIOD = timedelta(days=90)

PERCENTILE_DEFINITION = (
    "continuous percentile with linear interpolation between the two nearest ranks "
    "(PostgreSQL's percentile_cont, numpy's default 'linear'): for n durations sorted "
    "ascending x[0] <= ... <= x[n-1], the p-th percentile is x[i] + f * (x[i+1] - x[i]) "
    "with i = floor(p * (n - 1)) and f = p * (n - 1) - i; durations are whole seconds "
    "between the timestamps truncated to the second; figures are rounded to 0.01 s"
)

_PERIOD = re.compile(r"^\s*(\d+)\s*([dhw])\s*$")


@dataclass(frozen=True)
class Period:
    """The half-open window [since, until) an insight looks at, and the previous window of
    the same length it is compared with."""

    since: datetime
    until: datetime

    def __post_init__(self) -> None:
        for value in (self.since, self.until):
            if value.tzinfo is None:
                msg = "a period's bounds are aware datetimes (UTC)"
                raise ValueError(msg)
        if self.until <= self.since:
            msg = f"the period ends ({self.until:%Y-%m-%d}) before it starts"
            raise ValueError(msg)

    @property
    def length(self) -> timedelta:
        return self.until - self.since

    @property
    def previous(self) -> Period:
        return Period(self.since - self.length, self.since)

    def as_json(self) -> dict[str, str]:
        return {
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "previous_since": self.previous.since.isoformat(),
        }


def parse_length(text: str) -> timedelta:
    """`30d`, `12w`, `48h`: a period's length."""
    found = _PERIOD.match(text)
    if not found:
        msg = f"a period is a number and a unit (d, w or h), like 30d: not {text!r}"
        raise ValueError(msg)
    number, unit = int(found.group(1)), found.group(2)
    if number <= 0:
        msg = "a period lasts at least one unit"
        raise ValueError(msg)
    return {
        "d": timedelta(days=number),
        "w": timedelta(weeks=number),
        "h": timedelta(hours=number),
    }[unit]


def parse_instant(text: str) -> datetime:
    """An ISO date or date-time; a naive one is UTC."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        msg = f"a date is ISO, like 2026-01-01 or 2026-01-01T08:00: not {text!r}"
        raise ValueError(msg) from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def resolve_period(
    since: str | None = None,
    until: str | None = None,
    period: str | None = None,
    *,
    now: datetime | None = None,
) -> Period:
    """The window from the command's options: `--until` (default now) and either `--since`
    or `--period` (default 90 days before `until`)."""
    end = parse_instant(until) if until else (now or datetime.now(UTC))
    if since and period:
        msg = "give --since or --period, not both"
        raise ValueError(msg)
    if since:
        return Period(parse_instant(since), end)
    length = parse_length(period) if period else DEFAULT_PERIOD
    return Period(end - length, end)


SQLITE_CACHE_KIB = 65_536
"""SQLite's page cache while an insight reads (64 MiB instead of its 2 MiB default): a
year of referrals is read across a few hundred megabytes of pages."""


POSTGRES_WORK_MEM = "64MB"
"""PostgreSQL's memory for each sort while an insight reads (its default is 4 MB)."""


@contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """A connection for an insight's reads, read-only as the store's own (`Store.read`:
    on SQLite it takes no write lock, so the service writes on while an insight reads; on
    PostgreSQL its transaction is read-only): on SQLite with a larger page cache for the
    time of the reads, given back as it was; on PostgreSQL in one transaction with more
    sort memory and no JIT (`SET LOCAL`: gone when it ends)."""
    with read_only_connection(engine) as conn:
        if engine.dialect.name == "postgresql":
            with conn.begin():
                # For this transaction only: sorts of a few hundred thousand durations in
                # memory rather than on disk, and no JIT (its compilation took longer
                # than the query on a year of referrals).
                conn.exec_driver_sql(f"SET LOCAL work_mem = '{POSTGRES_WORK_MEM}'")
                conn.exec_driver_sql("SET LOCAL jit = off")
                yield conn
            return
        if engine.dialect.name != "sqlite":
            yield conn
            return
        before = conn.exec_driver_sql("PRAGMA cache_size").scalar()
        conn.exec_driver_sql(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
        try:
            yield conn
        finally:
            conn.rollback()
            conn.exec_driver_sql(f"PRAGMA cache_size={int(before or -2000)}")


def epoch_seconds(column: Any, dialect: str) -> ColumnElement[int]:
    """A timestamp as whole seconds since the epoch, truncated: the same integer on both
    engines (SQLite keeps the ledger's times as text, PostgreSQL as timestamptz)."""
    if dialect == "postgresql":
        return cast(func.floor(func.extract("epoch", column)), BigInteger)
    return cast(func.strftime("%s", column), Integer)


def seconds_between(start: Any, end: Any, dialect: str) -> ColumnElement[int]:
    """Whole seconds from `start` to `end`."""
    return epoch_seconds(end, dialect) - epoch_seconds(start, dialect)


def interpolated(
    lower: ColumnElement[Any], upper: ColumnElement[Any], n: ColumnElement[Any], percent: int
) -> ColumnElement[float]:
    """The percentile from the values at ranks i and i+1 (`lower`, `upper`) of n, with
    integer arithmetic for the rank so both engines land on the same i and fraction."""
    remainder = (literal(percent) * (n - 1)) % 100
    return lower + (func.coalesce(upper, lower) - lower) * remainder / literal(100.0)


def rank_of(n: ColumnElement[Any], percent: int) -> ColumnElement[int]:
    """i = floor(percent * (n - 1) / 100), by integer division on both engines."""
    return (literal(percent) * (n - 1)) // literal(100)


def rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), 2)
