"""The partner client's store: what it has handled and what was withdrawn, kept across
restarts, pruned after its horizon."""

from __future__ import annotations

import sqlite3
import threading
import uuid
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from partnerbus.client import PartnerClient
from partnerbus.client_store import KEEP_HANDLED, KEEP_WITHDRAWN, ClientStore
from partnerbus.testing import FakeClock


@pytest.fixture
def opened(engine_url: str):
    """A fresh store on each engine: a SQLite file and a PostgreSQL schema."""
    store = ClientStore(engine_url)
    store.open()
    yield store
    store.close()


def test_a_message_is_handled_once_marked_and_marking_it_again_changes_nothing(opened):
    """`was_handled` is false until `mark_handled`, true after; a second mark is a repeat, not an error."""
    assert not opened.was_handled("m-1")
    opened.mark_handled("m-1")
    opened.mark_handled("m-1")
    assert opened.was_handled("m-1")
    assert not opened.was_handled("m-2")
    assert opened.counts() == (1, 0)


def test_a_withdrawn_referral_is_remembered_and_recording_it_again_changes_nothing(opened):
    """`record_withdrawn` twice leaves one row; other referrals are not withdrawn."""
    opened.record_withdrawn("ref-1")
    opened.record_withdrawn("ref-1")
    assert opened.was_withdrawn("ref-1")
    assert not opened.was_withdrawn("ref-2")
    assert opened.counts() == (0, 1)


def test_the_file_store_keeps_both_across_a_restart(tmp_path):
    """What one store wrote to its file, a new store on the same file reads (a client restart)."""
    path = tmp_path / "client.db"
    first = ClientStore.sqlite(path)
    first.open()
    first.mark_handled("m-1")
    first.record_withdrawn("ref-1")
    first.close()

    again = ClientStore.sqlite(path)
    again.open()
    assert again.was_handled("m-1")
    assert again.was_withdrawn("ref-1")
    again.close()


def test_the_sqlite_file_commits_with_synchronous_full(tmp_path):
    """Each record is on disk before the ack: the store's connections say `synchronous=FULL` (2)."""
    store = ClientStore.sqlite(tmp_path / "client.db")
    store.open()
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2
    store.close()


def test_a_memory_store_forgets_when_closed_and_a_new_one_starts_empty():
    """The in-memory store (tests only) shares one database between the client's threads, and dies with it."""
    store = ClientStore.memory()
    store.open()
    store.mark_handled("m-1")
    assert store.was_handled("m-1")
    assert store.in_memory
    store.close()
    fresh = ClientStore.memory()
    fresh.open()
    assert not fresh.was_handled("m-1")
    fresh.close()


def test_a_memory_store_takes_the_clients_threads_one_at_a_time():
    """The client asks its store from several threads at once (a message each): in memory
    they share one connection, and interleaved transactions on it failed (the demo printed
    a "not handled" traceback) or crashed the driver. Eight threads, no error, every id kept."""
    store = ClientStore.memory()
    store.open()
    errors: list[BaseException] = []
    ids = [[str(uuid.uuid4()) for _ in range(100)] for _ in range(8)]

    def work(mine: list[str]) -> None:
        try:
            for message_id in mine:
                assert not store.was_handled(message_id)
                store.mark_handled(message_id)
                store.record_withdrawn(message_id)
                assert store.was_withdrawn(message_id)
        except BaseException as exc:  # reported below, with the others
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(mine,)) for mine in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert store.counts() == (800, 800)
    store.close()


def test_handled_ids_older_than_the_horizon_are_pruned_and_newer_ones_kept(engine_url):
    """Past `keep_handled` a handled id is forgotten; withdrawals are kept to their own, longer horizon."""
    clock = FakeClock()
    store = ClientStore(engine_url, clock=clock)
    store.open()
    store.mark_handled("old")
    store.record_withdrawn("ref-old")
    clock.advance(KEEP_HANDLED - timedelta(days=1))
    store.mark_handled("recent")
    clock.advance(timedelta(days=2))

    assert store.prune() == (1, 0)
    assert not store.was_handled("old")
    assert store.was_handled("recent")
    assert store.was_withdrawn("ref-old")

    clock.advance(KEEP_WITHDRAWN)
    assert store.prune() == (1, 1)
    assert store.counts() == (0, 0)
    store.close()


def test_recording_prunes_at_most_once_an_hour_and_opening_prunes(tmp_path):
    """The handled table cannot grow past its horizon: marking prunes when an hour has passed since the last pass, and opening the store prunes."""
    clock = FakeClock()
    path = tmp_path / "client.db"
    store = ClientStore.sqlite(path, keep_handled=timedelta(hours=2), clock=clock)
    store.open()
    store.mark_handled("a")
    clock.advance(timedelta(hours=3))
    store.mark_handled("b")  # more than an hour since the last pass: "a" goes
    assert not store.was_handled("a")
    clock.advance(timedelta(minutes=30))
    store.mark_handled("c")
    clock.advance(timedelta(hours=3))  # "b" and "c" are now past the horizon
    store.close()

    reopened = ClientStore.sqlite(path, keep_handled=timedelta(hours=2), clock=clock)
    reopened.open()
    assert reopened.counts() == (0, 0)
    reopened.close()


def test_instants_are_kept_in_utc_whatever_the_clock_zone(tmp_path):
    """A clock in another zone prunes by the true instant (SQLite compares the wall time as text)."""
    paris = datetime(2026, 11, 23, 10, 0, tzinfo=UTC).astimezone(ZoneInfo("Europe/Paris"))
    clock = FakeClock(paris)
    store = ClientStore.sqlite(tmp_path / "c.db", keep_handled=timedelta(hours=1), clock=clock)
    store.open()
    store.mark_handled("m")
    clock.advance(timedelta(minutes=59))
    assert store.prune() == (0, 0)
    clock.advance(timedelta(minutes=2))
    assert store.prune() == (1, 0)
    store.close()


def test_a_horizon_that_is_not_positive_is_refused():
    """`keep_handled=0` would forget at once: refused with a clear error."""
    with pytest.raises(ValueError, match="positive"):
        ClientStore.memory(keep_handled=timedelta(0))


def test_the_client_takes_a_store_a_path_or_a_url(tmp_path):
    """`store=` accepts a `ClientStore`, a file path (SQLite) or a database URL; none means memory."""
    given = ClientStore.memory()
    url = "amqp://guest:guest@127.0.0.1:5672/"
    assert PartnerClient(url, "p", store=given).store is given
    assert PartnerClient(url, "p", store=tmp_path / "a.db").store.url.endswith("a.db")
    assert PartnerClient(url, "p", store=f"sqlite:///{tmp_path / 'b.db'}").store.url == (
        f"sqlite:///{tmp_path / 'b.db'}"
    )
    assert PartnerClient(url, "p").store.in_memory


def test_a_store_file_written_by_the_client_is_plain_sqlite(tmp_path):
    """A partner's IT team can read the file with any SQLite tool: two tables, ids and instants."""
    path = tmp_path / "client.db"
    store = ClientStore.sqlite(path)
    store.open()
    store.mark_handled("m-1")
    store.close()
    with sqlite3.connect(path) as conn:
        tables = {r[0] for r in conn.execute("select name from sqlite_master where type='table'")}
        assert tables == {"partnerbus_client_handled", "partnerbus_client_withdrawn"}
        assert conn.execute("select message_id from partnerbus_client_handled").fetchall() == [
            ("m-1",)
        ]
    conn.close()
