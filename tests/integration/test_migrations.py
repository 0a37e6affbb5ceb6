"""The ledger's migrations (the CI check): `upgrade head` builds exactly tables.py's schema on
SQLite and PostgreSQL, a ledger from before migrations is adopted, one migrator at a time."""

from __future__ import annotations

import multiprocessing
import os
from datetime import UTC, datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData, inspect, select
from typer.testing import CliRunner

from partnerbus.directory import load_sample
from partnerbus.entrypoints.bootstrap import create_app
from partnerbus.entrypoints.cli import app as cli
from partnerbus.ledger import migrate
from partnerbus.ledger import tables as t
from partnerbus.ledger.store import Store
from partnerbus.settings import Settings
from tests.keys import TEST_KEY

ADDED_AFTER_FIRST_RELEASE = {
    "ix_referral_history_at",
    "ix_referral_history_actor",
    "ix_outbox_referral",
}
"""Indexes tables.py gained after ledgers were first deployed: `create_all` never added
them to an existing ledger."""

SINCE_BASELINE = {
    ("outbox", "priority"),
    ("signal_needs", "parked_since"),
    ("signal_needs", "reminded_at"),
    ("referrals", "stalled_reminded_at"),
    ("referrals", "stalled_reported_at"),
    ("referrals", "sending_until"),
}
"""Columns later revisions added (0002: the outbox's priority; 0004: the follow-ups of
parked needs and stalled referrals; 0006: a referral being sent); a ledger from before
migrations never had them, nor the indexes over them."""

INDEXES_SINCE_BASELINE = {
    "ix_referrals_partner_status",
    "ix_referrals_created_at",
    "ix_referrals_status_closed",
    "ix_signal_needs_state_updated",
    "ix_referral_history_first",
}
"""Indexes over older columns that later revisions added (0003: a partner's referrals by
status, for capacity; 0005: the insights' periods); a ledger from before migrations never
had them."""


@pytest.fixture
def empty(engine_url: str):
    """A Store on an empty database: a SQLite file, or a fresh PostgreSQL schema."""
    store = Store(engine_url)
    yield store
    store.dispose()


def schema_diff(store: Store) -> list:
    """Alembic's autogenerate comparison of the database with tables.py's metadata."""
    with store.engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), t.metadata)


def index_names(store: Store) -> set[str]:
    with store.engine.connect() as conn:
        inspector = inspect(conn)
        return {
            str(index["name"])
            for table in inspector.get_table_names()
            for index in inspector.get_indexes(table)
        }


def create_pre_migration_ledger(store: Store, *, without: set[str]) -> None:
    """A ledger as `create_all` left it before migrations: tables.py's tables, lacking the
    indexes named in `without`, and no alembic_version table."""
    old = MetaData()
    for table in t.metadata.sorted_tables:
        copy = table.to_metadata(old)
        later = {name for tbl, name in SINCE_BASELINE if tbl == table.name}
        for index in [
            i
            for i in copy.indexes
            if i.name in without
            or i.name in INDEXES_SINCE_BASELINE
            or {c.name for c in i.columns} & later
        ]:
            copy.indexes.discard(index)
        for name in later:
            copy._columns.remove(copy.c[name])  # test-only: the table as 0001 knew it
    old.create_all(store.engine)


def test_upgrade_head_on_an_empty_database_builds_exactly_the_models_schema(empty: Store) -> None:
    """`upgrade head` on an empty database yields tables.py's schema: the autogenerate diff is empty, and the ledger is recorded at head."""
    done = migrate.upgrade(empty)

    assert (done.before, done.after, done.adopted) == (None, migrate.head(), False)
    assert schema_diff(empty) == []
    assert migrate.current(empty) == migrate.head()
    assert set(t.metadata.tables) <= set(inspect(empty.engine).get_table_names())
    assert index_names(empty) >= {i.name for tbl in t.metadata.tables.values() for i in tbl.indexes}


def test_a_second_upgrade_changes_nothing(empty: Store) -> None:
    """Upgrading a ledger already at head does nothing and keeps its rows."""
    migrate.upgrade(empty)
    with empty.begin() as tx:
        tx.audit.record("ops", "test", "subject-1", datetime.now(UTC))

    again = migrate.upgrade(empty)

    assert again.before == again.after == migrate.head()
    assert not again.adopted
    with empty.engine.connect() as conn:
        assert conn.execute(select(t.audit.c.subject)).scalars().all() == ["subject-1"]


def test_a_ledger_from_before_migrations_is_adopted_and_gains_the_missing_indexes(
    empty: Store,
) -> None:
    """A ledger created by create_all before migrations (no alembic_version, the later indexes missing) is adopted at 0001 with its rows, gains those indexes, and ends at head with tables.py's schema."""
    create_pre_migration_ledger(empty, without=ADDED_AFTER_FIRST_RELEASE)
    with empty.begin() as tx:
        tx.audit.record("ops", "before-migrations", "subject-old", datetime.now(UTC))
    assert not index_names(empty) & ADDED_AFTER_FIRST_RELEASE
    assert migrate.current(empty) is None

    done = migrate.upgrade(empty)

    assert done.adopted and done.before is None and done.after == migrate.head()
    assert index_names(empty) >= ADDED_AFTER_FIRST_RELEASE
    assert schema_diff(empty) == []
    with empty.engine.connect() as conn:
        assert conn.execute(select(t.audit.c.subject)).scalars().all() == ["subject-old"]
    assert not migrate.upgrade(empty).adopted, "adopted once: later upgrades find a revision"


def test_a_ledger_from_before_migrations_with_todays_tables_is_stamped_at_the_baseline(
    empty: Store,
) -> None:
    """A pre-migration ledger that already has every table and index of 0001 is only recorded at 0001 (then upgraded): nothing is created twice."""
    create_pre_migration_ledger(empty, without=set())

    done = migrate.upgrade(empty)

    assert done.adopted and done.after == migrate.head()
    assert schema_diff(empty) == []


def _upgrade_in_a_process(url: str, start, results) -> None:
    """A worker process: wait for the other, then upgrade; put (revision found, error)."""
    store = Store(url)
    try:
        start.wait(timeout=60)
        done = migrate.upgrade(store)
        results.put((done.before, None))
    except BaseException as exc:
        results.put((None, f"{type(exc).__name__}: {exc}"))
    finally:
        store.dispose()


def test_two_workers_starting_together_migrate_once(engine_url: str) -> None:
    """Two processes upgrading the same empty database at once both succeed: one migrates, the other waits on the lock (SQLite's write lock, PostgreSQL's advisory lock) and then finds head."""
    spawn = multiprocessing.get_context("spawn")
    start, results = spawn.Barrier(2), spawn.Queue()
    workers = [
        spawn.Process(target=_upgrade_in_a_process, args=(engine_url, start, results))
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=90) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)

    assert [error for _, error in outcomes] == [None, None]
    assert sorted(before or "" for before, _ in outcomes) == ["", migrate.head()]
    store = Store(engine_url)
    try:
        assert schema_diff(store) == []
    finally:
        store.dispose()


def test_without_auto_upgrade_a_ledger_behind_is_refused(empty: Store) -> None:
    """With auto-upgrade off, opening a ledger that is not at head fails and says to run `partnerbus db upgrade`; once upgraded it opens."""
    with pytest.raises(migrate.LedgerSchemaError, match="partnerbus db upgrade"):
        migrate.open_ledger(empty, auto_upgrade=False)
    assert inspect(empty.engine).get_table_names() == [], "nothing was created"

    migrate.upgrade(empty)
    migrate.open_ledger(empty, auto_upgrade=False)


async def test_the_service_migrates_its_ledger_at_start_unless_told_not_to(tmp_path) -> None:
    """The service's start brings an empty ledger to head; with PARTNERBUS_LEDGER_AUTO_UPGRADE=false it refuses to start on it instead."""
    url = f"sqlite:///{tmp_path / 'bus.db'}"
    for auto, expected in ((False, None), (True, migrate.head())):
        settings = Settings(
            database_url=url, prefix="pbt-migrate", pseudonym_key=TEST_KEY, ledger_auto_upgrade=auto
        )
        bus = create_app(settings, directory=load_sample())
        try:
            if auto:
                await bus._on_startup()
            else:
                with pytest.raises(migrate.LedgerSchemaError):
                    await bus._on_startup()
            assert migrate.current(bus.store) == expected
        finally:
            bus.executor.shutdown()
            bus.store.dispose()


def test_db_upgrade_command_migrates_a_fresh_sqlite_file(tmp_path, monkeypatch) -> None:
    """`partnerbus db upgrade` brings a fresh SQLite file (PARTNERBUS_DATABASE_URL) to head (an unknown revision is a clear error); `db current` and `db check` then agree with it."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    monkeypatch.setenv("PARTNERBUS_DATABASE_URL", url)
    runner = CliRunner()

    before = runner.invoke(cli, ["db", "check"])
    assert before.exit_code == 1, before.output

    unknown = runner.invoke(cli, ["db", "upgrade", "--revision", "nope"])
    assert unknown.exit_code == 2 and "nope" in unknown.output, unknown.output

    upgraded = runner.invoke(cli, ["db", "upgrade"])
    assert upgraded.exit_code == 0, upgraded.output
    assert f"upgraded from nothing to {migrate.head()}" in upgraded.output

    current = runner.invoke(cli, ["db", "current"])
    assert current.exit_code == 0 and f"{migrate.head()} (head)" in current.output
    checked = runner.invoke(cli, ["db", "check"])
    assert checked.exit_code == 0, checked.output
    store = Store(url)
    try:
        assert schema_diff(store) == []
    finally:
        store.dispose()


def test_a_new_revision_is_autogenerated_from_what_the_tables_add(tmp_path, monkeypatch) -> None:
    """`partnerbus db revision -m` writes the next revision with the column tables.py gained beyond head, and upgrading with it gives exactly the new schema (the path the next schema change takes)."""
    import shutil
    import types

    from sqlalchemy import Column, Integer

    following = f"{int(migrate.head()) + 1:04d}"
    migrations = tmp_path / "migrations"
    shutil.copytree(migrate.MIGRATIONS, migrations)
    grown = MetaData()
    for table in t.metadata.sorted_tables:
        table.to_metadata(grown)
    grown.tables["outbox"].append_column(Column("region_hint", Integer, nullable=True))
    monkeypatch.setattr(migrate, "MIGRATIONS", migrations)
    monkeypatch.setattr(
        migrate, "t", types.SimpleNamespace(metadata=grown, UTCDateTime=t.UTCDateTime)
    )

    written = CliRunner().invoke(cli, ["db", "revision", "-m", "outbox region hint"])

    assert written.exit_code == 0, written.output
    (path,) = (migrations / "versions").glob(f"{following}_*.py")
    assert path.name == f"{following}_outbox_region_hint.py"
    source = path.read_text()
    assert "add_column" in source and "region_hint" in source and "down_revision" in source
    assert migrate.head() == following
    store = Store(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        assert migrate.upgrade(store).after == following
        assert migrate.differences(store) == []
    finally:
        store.dispose()


@pytest.mark.parametrize(
    "command",
    [
        ["db", "upgrade"],
        ["db", "current"],
        ["consent", "list", "--person", "T-1", "--by", "s.benali"],
        ["referrals", "timeline", "sig-1", "--by", "s.benali"],
        ["insights", "unmet"],
    ],
    ids=lambda c: " ".join(c[:2]),
)
def test_a_ledger_command_on_an_unreachable_database_says_so_without_a_traceback(
    monkeypatch, command: list[str]
) -> None:
    """A command that opens the ledger, its database down (nothing listens on the port): exit code 2 and one error naming the database without its password and the kind of failure; no traceback."""
    for key in [k for k in os.environ if k.startswith("PARTNERBUS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv(
        "PARTNERBUS_DATABASE_URL", "postgresql+psycopg://ops:s3cret@127.0.0.1:1/ledger"
    )
    monkeypatch.setenv("PARTNERBUS_PSEUDONYM_KEY", TEST_KEY)
    result = CliRunner().invoke(cli, command)
    said = " ".join(result.output.split())  # the console wraps long lines
    assert result.exit_code == 2, result.output  # a refusal, as every `error:` of the CLI
    assert (
        "error: the ledger's database at postgresql+psycopg://ops:***@127.0.0.1:1/ledger "
        "failed: OperationalError (psycopg.OperationalError)"
    ) in said, result.output
    assert "Traceback" not in said and "s3cret" not in said
    assert isinstance(result.exception, SystemExit)
