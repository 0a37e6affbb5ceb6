"""The ledger's schema, kept by Alembic migrations (`partnerbus/ledger/migrations/`).

Every way of opening a ledger goes through `upgrade`: the service at start, `partnerbus db
upgrade`, the commands that read the ledger, the tests' stores. One migrator at a time:
the upgrade runs in one transaction that first takes the database's lock (SQLite: the write
lock, `BEGIN IMMEDIATE`; PostgreSQL: a transaction-level advisory lock per schema), so a
second worker starting beside the first waits, then finds the schema at head and does
nothing. A ledger created before migrations (its tables there, no `alembic_version`) is
adopted at the baseline, 0001: the baseline creates only what that ledger lacks of it
(the indexes added since the first release), records 0001, and the later revisions run.

Configured in code (no alembic.ini): the URL is the Store's, so the same settings
(`PARTNERBUS_DATABASE_URL`) serve every command.
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text

from partnerbus.ledger import tables as t

if TYPE_CHECKING:
    from partnerbus.ledger.store import Store

log = logging.getLogger("partnerbus.ledger.migrate")

MIGRATIONS = Path(__file__).with_name("migrations")
BASELINE = "0001"
"""The schema as it stood when migrations came in; a ledger from before is adopted here."""
VERSION_TABLE = "alembic_version"
LOCK_NAME = "partnerbus-ledger-migrations"


class LedgerSchemaError(RuntimeError):
    """The ledger's schema is not the one this version of partnerbus works with."""


@dataclass(frozen=True)
class Upgraded:
    before: str | None
    """The revision found (None: an empty database, or one from before migrations)."""
    after: str | None
    adopted: bool
    """The ledger was created before migrations and was adopted at the baseline."""


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration, in code: the migrations shipped in the package, and the
    connection they run on (`env.py` takes it from `attributes`)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("path_separator", "os")
    # Files named by their number: 0002_add_outbox_priority.py
    config.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    config.attributes["connection"] = connection
    return config


def configure(context: Any, connection: Connection) -> None:
    """Configure Alembic's environment context (called by `env.py`)."""
    context.configure(
        connection=connection,
        target_metadata=t.metadata,
        # SQLite alters a table by copying it: autogenerate writes batch operations.
        render_as_batch=connection.dialect.name == "sqlite",
        render_item=_render_item,
        compare_type=True,
    )


def _render_item(kind: str, obj: Any, _context: Any) -> str | bool:
    # A migration states the column type the database holds, not the Python-side decorator,
    # so that a revision reads the same whatever tables.py later becomes.
    if kind == "type" and isinstance(obj, t.UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def head() -> str:
    """The revision this version of partnerbus works with."""
    revision = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if revision is None:  # pragma: no cover - the package ships its migrations
        raise LedgerSchemaError("no migration found in " + str(MIGRATIONS))
    return revision


_IN_PROCESS = threading.Lock()
"""Alembic's `op` and `context` are process-wide proxies: two threads migrating at once
(even two different databases) would run each other's operations. Taken before the
database's lock, never after, so that no thread waits on the database while holding it
against another thread that holds the database."""


@contextmanager
def _locked(store: Store) -> Iterator[Connection]:
    """One transaction that holds the migration lock until it commits."""
    with _IN_PROCESS, store.engine.begin() as conn:  # SQLite: BEGIN IMMEDIATE, the write lock
        if conn.dialect.name == "postgresql":
            # Per schema, so that ledgers side by side in one database do not wait on
            # each other; released by the commit (or the rollback).
            conn.execute(
                text(
                    "SELECT pg_advisory_xact_lock("
                    "hashtext(:name || ':' || coalesce(current_schema(), '')))"
                ),
                {"name": LOCK_NAME},
            )
        yield conn


@contextmanager
def _reading(store: Store) -> Iterator[Connection]:
    from partnerbus.ledger.store import read_only_connection

    with read_only_connection(store.engine) as conn:
        yield conn


def _revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def _is_pre_migration_ledger(conn: Connection) -> bool:
    names = set(inspect(conn).get_table_names())
    return VERSION_TABLE not in names and bool(names & set(t.metadata.tables))


def upgrade(store: Store, revision: str = "head") -> Upgraded:
    """Bring the ledger's schema to `revision` (head by default), one migrator at a time;
    adopt a ledger from before migrations at the baseline first."""
    with _locked(store) as conn:
        before = _revision(conn)
        adopted = before is None and _is_pre_migration_ledger(conn)
        if adopted:
            log.warning(
                "ledger created before migrations: adopted at %s (its tables and rows kept, "
                "what it lacks of %s created)",
                BASELINE,
                BASELINE,
            )
            config = alembic_config(conn)
            config.attributes["adopting"] = True
            command.upgrade(config, BASELINE)
        command.upgrade(alembic_config(conn), revision)
        after = _revision(conn)
    if after != before:
        log.info("ledger schema upgraded from %s to %s", before or "nothing", after)
    return Upgraded(before=before, after=after, adopted=adopted)


def current(store: Store) -> str | None:
    """The ledger's revision (None: empty, or created before migrations)."""
    with _reading(store) as conn:
        return _revision(conn)


def differences(store: Store) -> list[Any]:
    """What separates the ledger's schema from tables.py (Alembic's autogenerate diff;
    empty when they agree)."""
    with _reading(store) as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, t.metadata))


def describe(difference: Any) -> str:
    """One line for one item of `differences`: `add_index ix_outbox_referral`,
    `modify_nullable outbox.attempts: True -> False`."""
    if isinstance(difference, list):  # one column's changes come as a list
        return "; ".join(describe(item) for item in difference)
    kind, *parts = difference
    if kind.startswith("modify_"):
        _schema, table, column, _existing, old, new = parts
        return f"{kind} {table}.{column}: {old} -> {new}"
    named = [getattr(part, "name", None) or part for part in parts if part is not None]
    if kind.endswith("_column"):  # (schema, table name, column)
        return f"{kind} {named[0]}.{named[1]}"
    return f"{kind} {' '.join(map(str, named))}"


def require_head(store: Store) -> None:
    """Refuse a ledger whose schema is not this version's (when the operator migrates)."""
    found, wanted = current(store), head()
    if found != wanted:
        msg = (
            f"the ledger's schema is at {found or 'no revision'}, this version of partnerbus "
            f"needs {wanted}: run `partnerbus db upgrade` (the service does not, with "
            "PARTNERBUS_LEDGER_AUTO_UPGRADE=false)"
        )
        raise LedgerSchemaError(msg)


def open_ledger(store: Store, *, auto_upgrade: bool) -> None:
    """Make `store` ready for use: upgrade it, or check that the operator did."""
    if auto_upgrade:
        upgrade(store)
    else:
        require_head(store)


def new_revision(message: str, *, autogenerate: bool = True, url: str | None = None) -> Path:
    """Write the next revision (0002, 0003, ...) into the package's versions/, its
    operations autogenerated from what tables.py declares beyond head. The comparison runs
    against `url` when given (a database at head), else against a scratch SQLite file
    brought to head."""
    from partnerbus.ledger.store import Store

    number = int(head()) + 1
    with tempfile.TemporaryDirectory(prefix="partnerbus-revision-") as scratch:
        store = Store(url or f"sqlite:///{Path(scratch) / 'head.db'}")
        try:
            if url is None:
                upgrade(store)
            with _IN_PROCESS, _reading(store) as conn:  # the comparison only reads
                script = command.revision(
                    alembic_config(conn),
                    message=message,
                    autogenerate=autogenerate,
                    rev_id=f"{number:04d}",
                )
        finally:
            store.dispose()
    if script is None or isinstance(script, list):  # pragma: no cover - one head, one script
        raise LedgerSchemaError("alembic wrote no single revision")
    path = Path(script.path)
    _tidy(path)
    return path


def _tidy(path: Path) -> None:
    """Format a written revision as the project's code (ruff), when ruff is installed."""
    if importlib.util.find_spec("ruff") is None:  # pragma: no cover - a dev dependency
        return
    for args in (["check", "--fix", "--quiet"], ["format", "--quiet"]):
        subprocess.run([sys.executable, "-m", "ruff", *args, str(path)], check=False)  # noqa: S603


__all__ = [
    "BASELINE",
    "LedgerSchemaError",
    "Upgraded",
    "alembic_config",
    "current",
    "describe",
    "differences",
    "head",
    "new_revision",
    "open_ledger",
    "require_head",
    "upgrade",
]
