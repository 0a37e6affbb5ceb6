"""What every repository shares: the transaction's connection, the upsert, the row mapping."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

from sqlalchemy import Connection, CursorResult, Dialect, Table, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql.dml import Insert, UpdateBase

from partnerbus.errors import PartnerbusError

R = TypeVar("R")


class Conflict(PartnerbusError):  # noqa: N818 - a signal to re-run, not an error
    """The row changed since this transaction read it (a compare-and-set found another
    status): the decision was made on a stale read, so the whole transaction re-runs."""


class Prepared:
    """A hot write (an INSERT, an upsert, an UPDATE by key), rendered to SQL once per
    dialect and set of parameters by SQLAlchemy, then run with `exec_driver_sql`: the
    same statement, the same transaction, errors wrapped and events fired as for any
    statement, without the compiled-cache lookup and parameter processing of
    `Connection.execute`, which cost about 15 µs a statement here (issue 9; measured in
    docs/PERFORMANCE.md). The values go through the columns' own bind processors
    (`UTCDateTime`, SQLite's text dates); a column left out takes its scalar default.
    No expanding parameters (`IN` lists): those statements stay with `execute`."""

    def __init__(self, statement: UpdateBase) -> None:
        if isinstance(statement, Insert):
            # no implicit RETURNING of the key (an explicit one stays)
            statement = statement.inline()
        self.statement = statement
        self._rendered: dict[tuple[str, tuple[str, ...]], _Rendered] = {}

    def __call__(self, conn: Connection, params: Mapping[str, Any]) -> CursorResult[Any]:
        key = (conn.dialect.name, tuple(params))
        rendered = self._rendered.get(key)
        if rendered is None:
            rendered = self._rendered[key] = _Rendered.of(self.statement, conn.dialect, key[1])
        return conn.exec_driver_sql(rendered.sql, rendered.parameters(params))


class _Rendered:
    """One statement's SQL for one dialect and its parameters, in the driver's order."""

    def __init__(
        self,
        sql: str,
        positional: bool,
        order: list[tuple[str, str, Any]],
        defaults: dict[str, Any],
    ) -> None:
        self.sql = sql
        self.positional = positional
        self.order = order  # (parameter name, its name in the SQL, its bind processor)
        self.defaults = defaults  # the columns left out: their scalar defaults

    @classmethod
    def of(cls, statement: UpdateBase, dialect: Dialect, keys: tuple[str, ...]) -> _Rendered:
        compiled = statement.compile(dialect=dialect, column_keys=list(keys))
        names = list(compiled.positiontup or ()) if compiled.positional else list(compiled.binds)
        table = statement.table
        order, defaults = [], {}
        for name in names:
            bind = compiled.binds[name]
            if bind.expanding:
                raise ValueError(f"{name}: an expanding parameter cannot be prepared")
            if name not in keys:
                column = table.c.get(name)
                if column is None or column.default is None or not column.default.is_scalar:
                    raise ValueError(f"{name}: neither given nor a column with a scalar default")
                defaults[name] = column.default.arg
            escaped = compiled.escaped_bind_names.get(name, name)
            # the type as this dialect stores it (SQLite: dates as text), as `execute` does
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            order.append((name, escaped, process))
        return cls(compiled.string, compiled.positional, order, defaults)

    def parameters(self, params: Mapping[str, Any]) -> Any:
        if self.defaults:
            params = {**self.defaults, **params}
        if self.positional:
            return tuple(
                [process(params[n]) if process else params[n] for n, _, process in self.order]
            )
        return {e: process(params[n]) if process else params[n] for n, e, process in self.order}


def row_of(cls: type[R], row: Any) -> R:
    """A result row as the frozen dataclass `cls` (its fields are the columns)."""
    return cls(**dict(row._mapping))


def advisory_lock(conn: Connection, *names: str) -> None:
    """Hold, until this transaction ends, the PostgreSQL advisory lock named by `names`
    (a 64-bit hash of them); nothing on SQLite, whose BEGIN IMMEDIATE already serialises
    every writer."""
    if conn.dialect.name != "postgresql":
        return
    digest = hashlib.blake2b("\x00".join(names).encode(), digest_size=8).digest()
    conn.execute(select(func.pg_advisory_xact_lock(int.from_bytes(digest, "big", signed=True))))


class RowCache:
    """Rows one transaction has read, so that it reads each at most once (issue 9: the
    relay read a referral four times and its signal twice per send). Kept per
    transaction (`LedgerTx`), so a re-run starts afresh. On SQLite any read is served
    again (BEGIN IMMEDIATE holds the file's write lock, a read transaction its snapshot:
    nothing else changes a row meanwhile). On PostgreSQL a locking read is served only by
    a copy read with that lock (FOR UPDATE: nobody else changes the row until commit);
    an unlocked read by any copy (the row as this transaction read it moments before:
    what it decides on it is guarded by a lock or a compare-and-set, as any unlocked read
    is). A repository writing a cached row updates or drops it; a savepoint rolled back
    and a retention rewrite drop them all."""

    def __init__(self, conn: Connection) -> None:
        self.any_row = conn.dialect.name == "sqlite"
        self.rows: dict[tuple[str, str], tuple[Any, bool]] = {}
        # Per partner: its referrals counted in these statuses (`CapacityRepository.taken`,
        # read under the partner's lock), kept true by this transaction's own writes.
        self._taken: dict[str, tuple[frozenset[str], int]] = {}

    def get(self, kind: str, key: str, *, lock: bool = False) -> Any:
        """The cached row, or None if it must be read (again)."""
        found = self.rows.get((kind, key))
        if found is None:
            return None
        row, locked = found
        return row if self.any_row or locked or not lock else None

    def entry(self, kind: str, key: str) -> tuple[Any, bool] | None:
        """The cached (row, read with its lock) whatever the engine, or None if not
        cached; a row cached as None is a row known not to exist. For a repository that
        decides itself what a copy may serve (it updates a row it has just written)."""
        return self.rows.get((kind, key))

    def put(self, kind: str, key: str, row: Any, *, locked: bool = False) -> None:
        self.rows[(kind, key)] = (row, locked or self.rows.get((kind, key), (None, False))[1])

    def drop(self, kind: str, key: str) -> None:
        self.rows.pop((kind, key), None)

    def clear(self) -> None:
        self.rows.clear()
        self._taken.clear()

    def taken(self, partner_id: str, statuses: frozenset[str]) -> int | None:
        """How many of the partner's referrals are in `statuses`, as counted in this
        transaction; None if it must be counted (again)."""
        counted = self._taken.get(partner_id)
        return counted[1] if counted is not None and counted[0] == statuses else None

    def put_taken(self, partner_id: str, statuses: frozenset[str], count: int) -> None:
        self._taken[partner_id] = (statuses, count)

    def count_referral(self, partner_id: str | None, old: str | None, new: str) -> None:
        """This transaction moved one of `partner_id`'s referrals from status `old` (None:
        a new referral) to `new`: its counts follow. `partner_id` None: whose referral it
        was is not known here, so every count is read again when asked."""
        if partner_id is None:
            self._taken.clear()
            return
        counted = self._taken.get(partner_id)
        if counted is not None:
            statuses, count = counted
            self._taken[partner_id] = (
                statuses,
                count + (new in statuses) - (old is not None and old in statuses),
            )


class Repository:
    """One concern of the ledger, over the connection of the transaction it works in: a
    repository never begins nor commits; `Store.begin` does, around all of them."""

    def __init__(self, conn: Connection, cache: RowCache | None = None) -> None:
        self.conn = conn
        self.cache = cache if cache is not None else RowCache(conn)

    def _prefetch(
        self, kind: str, column: Any, keys: Collection[str], make: Callable[[Any], R]
    ) -> list[R]:
        """Read the rows of `column`'s table whose `column` is one of `keys` and not cached
        yet, in one statement; cache them (unlocked) as `kind`, made by `make`. Returns the
        rows read."""
        wanted = [k for k in set(keys) if (kind, k) not in self.cache.rows]
        if not wanted:
            return []
        made = []
        for row in self.conn.execute(select(column.table).where(column.in_(wanted))):
            made.append(one := make(row))
            self.cache.put(kind, getattr(row, column.key), one)
        return made

    def _upsert(self, table: Table, key: dict[str, Any], values: dict[str, Any]) -> None:
        """Insert or update in one statement (INSERT … ON CONFLICT DO UPDATE): two
        transactions writing the same key never both insert, nor lose the row."""
        statement = _upsert_statement(self.conn.dialect.name, table, tuple(key), tuple(values))
        statement(self.conn, {**key, **values})


@functools.cache
def _upsert_statement(
    dialect_name: str, table: Table, key: tuple[str, ...], columns: tuple[str, ...]
) -> Prepared:
    """The upsert of `table` on `key` setting `columns`, built once per shape: the values
    go as parameters and the update takes them from the row that conflicted (`excluded`),
    so each call reuses the rendered statement (`Prepared`, issue 9)."""
    dialect = postgresql if dialect_name == "postgresql" else sqlite
    statement = dialect.insert(table)
    return Prepared(
        statement.on_conflict_do_update(
            index_elements=list(key), set_={name: statement.excluded[name] for name in columns}
        )
    )
