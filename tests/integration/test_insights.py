"""The insights on the real database (SQLite and PostgreSQL), against figures computed by
hand from the scripted histories of `tests/integration/insights_history.py`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from partnerbus.directory import load_sample
from partnerbus.entrypoints.cli import app as cli
from partnerbus.insights import (
    MIN_PERSONS,
    Period,
    response_times,
    response_times_png,
    unmet,
    unmet_png,
)
from partnerbus.ledger.store import Store
from tests.integration.insights_history import (
    LILLE,
    MEL,
    N1,
    N2,
    SINCE,
    UNTIL,
    response_history,
    unmet_history,
)

PERIOD = Period(SINCE, UNTIL)
HOUR = 3600.0
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def responses(store: Store) -> Store:
    response_history().write(store)
    return store


@pytest.fixture
def unmet_store(store: Store) -> Store:
    unmet_history().write(store)
    return store


def _row(rows: list, partner: str, source: str | None = None):  # type: ignore[no-untyped-def]
    return next(r for r in rows if r.partner == partner and r.source == source)


def test_response_times_per_partner_match_the_figures_computed_by_hand(responses: Store) -> None:
    """p-slow answered after 1, 2, 3, 4, 5 and 10 h (median 3.5 h, p90 7.5 h), 1, 1, 2, 2, 3 h
    the period before (median 2 h, p90 2.6 h); p-fast after 5 h, completing after 29 to 125 h
    (median 77 h, p90 115.4 h); an ignored repeat, a skipped confirm and the referrals outside
    both periods count for nothing."""
    result = response_times(responses.engine, PERIOD)
    slow = _row(result.partners, "p-slow")
    answer = slow.figures["answer"]
    assert (answer.count, answer.persons, answer.median_s, answer.p90_s) == (
        6,
        6,
        3.5 * HOUR,
        7.5 * HOUR,
    )
    assert (slow.current.sent, slow.current.waiting, slow.current.expired) == (8, 1, 1)
    # accepted four times only: four persons, the figures hidden, the count kept
    accept = slow.figures["accept"]
    assert (accept.count, accept.persons, accept.median_s, accept.hidden) == (4, 4, None, True)
    before = slow.previous_figures["answer"]
    assert (before.count, before.median_s, before.p90_s) == (5, 2 * HOUR, 2.6 * HOUR)
    assert slow.growth == 1.75 and slow.grew

    fast = _row(result.partners, "p-fast")
    assert (fast.figures["answer"].median_s, fast.figures["answer"].p90_s) == (5 * HOUR,) * 2
    assert fast.figures["accept"].count == 5
    complete = fast.figures["complete"]
    assert (complete.count, complete.median_s, complete.p90_s) == (5, 77 * HOUR, 115.4 * HOUR)
    assert fast.previous_figures["answer"].median_s == 6 * HOUR
    assert fast.growth == round(5 / 6, 4) and not fast.grew
    assert fast.current.sent == 5 and fast.previous.sent == 5

    tiny = _row(result.partners, "p-tiny")
    assert tiny.current.sent == 3
    assert tiny.figures["answer"].count == 3 and tiny.figures["answer"].hidden
    assert tiny.figures["answer"].median_s is None and tiny.growth is None


def test_partners_whose_times_grew_come_first_then_the_slowest(responses: Store) -> None:
    """p-slow grew (x1.75) and comes first though p-fast is slower (5 h against 3.5 h);
    p-tiny, its figures hidden, comes last."""
    result = response_times(responses.engine, PERIOD)
    assert [r.partner for r in result.partners] == ["p-slow", "p-fast", "p-tiny"]
    assert [(r.source, r.partner) for r in result.agreements] == [
        ("src-a", "p-fast"),
        ("src-a", "p-slow"),
        ("src-b", "p-slow"),
        ("src-b", "p-tiny"),
    ]


def test_response_times_per_agreement_hide_the_figures_of_fewer_than_five_persons(
    responses: Store,
) -> None:
    result = response_times(responses.engine, PERIOD)
    a_slow = _row(result.agreements, "p-slow", "src-a")
    assert a_slow.current.sent == 6 and a_slow.figures["answer"].count == 4
    assert a_slow.figures["answer"].median_s is None and a_slow.figures["answer"].hidden
    # the previous period had five persons: shown, but a hidden figure never "grew"
    assert a_slow.previous_figures["answer"].median_s == 2 * HOUR and not a_slow.grew
    a_fast = _row(result.agreements, "p-fast", "src-a")
    assert a_fast.figures["complete"].median_s == 77 * HOUR


@pytest.mark.postgres
def test_percentile_cont_and_the_portable_query_agree_on_postgresql(responses: Store) -> None:
    if responses.engine.dialect.name != "postgresql":
        with pytest.raises(ValueError, match="percentile_cont"):
            response_times(responses.engine, PERIOD, native=True)
        return
    native = response_times(responses.engine, PERIOD).as_json()
    portable = response_times(responses.engine, PERIOD, native=False).as_json()
    assert (native["method"], portable["method"]) == ("percentile_cont", "window")
    native.pop("method"), portable.pop("method")
    assert native == portable


def test_unmet_by_commune_rolls_small_communes_into_the_epci(unmet_store: Store) -> None:
    """Lille: 5 persons without a partner, 2 refused as full (7 persons: shown, `full`
    hidden); Roubaix (3 expired) and Tourcoing (2 without consent) are too small: rolled into
    the other communes of the MEL (5 persons: shown); Villeneuve-d'Ascq's 2 needs of
    another kind stay hidden even rolled up."""
    result = unmet(unmet_store.engine, load_sample(), PERIOD, by="commune")
    cells = {(c.need, c.territory): c for c in result.cells}
    assert set(cells) == {(N1, LILLE), (N1, f"other:{MEL}")}
    lille = cells[(N1, LILLE)]
    assert (lille.units, lille.persons, lille.rolled_up) == (7, 7, False)
    assert lille.categories == {
        "no-partner": 5,
        "unanswered": 0,
        "full": None,
        "consent-not-obtained": 0,
    }
    other = cells[(N1, f"other:{MEL}")]
    assert (other.units, other.persons, other.rolled_up) == (5, 5, True)
    assert other.name == "other communes of Métropole Européenne de Lille"
    assert other.categories == {
        "no-partner": 0,
        "unanswered": None,
        "full": 0,
        "consent-not-obtained": None,
    }
    assert result.hidden_cells == 1
    # the whole network's totals: seven without a partner; the others under five persons
    assert result.totals == {
        "no-partner": 7,
        "unanswered": None,
        "full": None,
        "consent-not-obtained": None,
    }


def test_unmet_by_epci_and_departement(unmet_store: Store) -> None:
    d = load_sample()
    for by, code, name in (
        ("epci", MEL, "Métropole Européenne de Lille"),
        ("departement", "59", "Nord"),
    ):
        result = unmet(unmet_store.engine, d, PERIOD, by=by)
        assert [(c.need, c.territory, c.name, c.units, c.persons) for c in result.cells] == [
            (N1, code, name, 12, 12)
        ]
        assert result.cells[0].categories["no-partner"] == 5
        assert result.cells[0].supply is not None
        assert result.cells[0].supply.communes == 95
        assert result.hidden_cells == 1  # N2: two persons, hidden


def test_unmet_shows_the_directory_supply_gaps(unmet_store: Store) -> None:
    """The gaps are `directory check`'s own, rolled up to the level."""
    from partnerbus.directory.check import WATCHED_NEEDS, find_gaps

    d = load_sample()
    result = unmet(unmet_store.engine, d, PERIOD, by="commune")
    expected = {(g.need, c) for g in find_gaps(d, [*WATCHED_NEEDS, N1, N2]) for c in g.communes}
    assert {(g.need, g.territory) for g in result.supply_gaps} == expected
    assert all(g.supply.without_partner == 1 == g.supply.communes for g in result.supply_gaps)


def test_insights_never_name_a_person_or_a_signal(responses: Store) -> None:
    unmet_history().write(responses)  # both histories in one ledger (distinct ids)
    documents = [
        response_times(responses.engine, PERIOD).as_json(),
        *(
            unmet(responses.engine, load_sample(), PERIOD, by=by).as_json()
            for by in ("commune", "epci", "departement")
        ),
    ]
    text = json.dumps(documents)
    assert "person-" not in text and "sig-" not in text and "ref-" not in text
    assert all(doc["min_persons"] == MIN_PERSONS == 5 for doc in documents)


def test_the_threshold_is_never_lowered(responses: Store) -> None:
    with pytest.raises(ValueError, match="at least 5"):
        response_times(responses.engine, PERIOD, min_persons=2)
    with pytest.raises(ValueError, match="at least 5"):
        unmet(responses.engine, load_sample(), PERIOD, min_persons=1)


def test_charts_are_png_files(unmet_store: Store, tmp_path) -> None:
    response_history().write(unmet_store)
    times = response_times_png(response_times(unmet_store.engine, PERIOD), tmp_path / "t.png")
    demand = unmet_png(unmet(unmet_store.engine, load_sample(), PERIOD), tmp_path / "u.png")
    for path in (times, demand):
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000


def test_cli_prints_tables_json_and_writes_charts(engine_url: str, tmp_path, monkeypatch) -> None:
    store = Store(engine_url)
    store.create_all()
    response_history().write(store)
    unmet_history().write(store)
    store.dispose()
    monkeypatch.setenv("PARTNERBUS_DATABASE_URL", engine_url)
    monkeypatch.delenv("PARTNERBUS_DIRECTORY_PATH", raising=False)
    runner = CliRunner()
    window = ["--since", "2026-01-01", "--until", "2026-04-01"]

    result = runner.invoke(cli, ["insights", "response-times", *window, "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    # p-x and p-y (the unmet history's) answered fewer than five persons: after the others
    assert [p["partner"] for p in document["partners"]][:2] == ["p-slow", "p-fast"]
    slow = document["partners"][0]
    assert slow["grew"] and slow["answer_growth"] == 1.75
    assert slow["current"]["answer"] == {
        "count": 6,
        "persons": 6,
        "median_s": 12600.0,
        "p90_s": 27000.0,
        "hidden": False,
    }
    assert document["period"]["previous_since"] == "2025-10-03T00:00:00+00:00"

    png = tmp_path / "times.png"
    result = runner.invoke(cli, ["insights", "response-times", *window, "--png", str(png)])
    assert result.exit_code == 0, result.output
    assert "p-slow" in result.stdout and "3.5 h" in result.stdout
    assert png.read_bytes().startswith(PNG_MAGIC)

    result = runner.invoke(cli, ["insights", "unmet", *window, "--by", "epci", "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    # the unmet history's 12, and the response history's expired and `full` referrals
    assert [(c["territory"], c["needs"]) for c in document["cells"]] == [(MEL, 14)]
    assert document["hidden_cells"] == 1

    png = tmp_path / "unmet.png"
    result = runner.invoke(
        cli, ["insights", "unmet", "--period", "90d", "--until", "2026-04-01", "--png", str(png)]
    )
    assert result.exit_code == 0, result.output
    # the table (wrapped at the runner's 80 columns): Lille, then the other communes' row
    assert "Lille" in result.stdout and "other" in result.stdout and "59350" in result.stdout
    assert png.read_bytes().startswith(PNG_MAGIC)

    result = runner.invoke(cli, ["insights", "unmet", "--by", "region"])
    assert result.exit_code == 2 and "--by is one of" in result.output
    result = runner.invoke(cli, ["insights", "response-times", "--period", "soon"])
    assert result.exit_code == 2


@pytest.mark.parametrize("n", [5, 7, 11, 37])
def test_the_percentiles_are_numpys_linear_ones(store: Store, n: int) -> None:
    """The documented definition, on awkward counts: numpy's default (linear) percentile of
    the same whole-second durations."""
    import random

    import numpy as np

    from tests.integration.insights_history import D, History, answered

    rng = random.Random(n)
    hours = [rng.uniform(0.01, 300) for _ in range(n)]
    h = History()
    for i, value in enumerate(hours):
        signal_id = h.signal(f"person-{i}", LILLE, "src-a", SINCE + D)
        h.referral(signal_id, N1, "p-one", SINCE + D, answered("accepted", value))
    h.write(store)
    figure = _row(response_times(store.engine, PERIOD).partners, "p-one").figures["answer"]
    seconds = [int(v * 3600) for v in hours]  # both timestamps hold whole microseconds
    assert figure.count == n
    assert figure.median_s == round(float(np.percentile(seconds, 50)), 2)
    assert figure.p90_s == round(float(np.percentile(seconds, 90)), 2)


def test_a_period_is_read_from_the_options() -> None:
    from datetime import UTC, datetime, timedelta

    from partnerbus.insights import resolve_period

    now = datetime(2026, 6, 1, tzinfo=UTC)
    assert resolve_period(now=now) == Period(now - timedelta(days=90), now)
    assert resolve_period(period="30d", until="2026-04-01") == Period(
        datetime(2026, 3, 2, tzinfo=UTC), UNTIL
    )
    assert resolve_period(since="2026-01-01", until="2026-04-01") == PERIOD
    assert resolve_period(period="2w", now=now).length == timedelta(weeks=2)
    assert PERIOD.previous == Period(datetime(2025, 10, 3, tzinfo=UTC), SINCE)
    for bad in (
        {"period": "soon"},
        {"period": "0d"},
        {"since": "2026-05-01", "until": "2026-04-01"},
        {"since": "2026-01-01", "period": "30d"},
    ):
        with pytest.raises(ValueError, match=r"period|--since"):
            resolve_period(**bad, now=now)  # type: ignore[arg-type]


def test_communes_outside_the_directory_roll_into_their_own_row(store: Store) -> None:
    """Six persons in two communes the directory does not know (another département):
    each commune too small, rolled together; by département, its own row."""
    from tests.integration.insights_history import D, History

    h = History("x")
    for i in range(6):
        commune = "62041" if i < 3 else "62042"
        h.need(h.signal(f"person-x{i}", commune, "src-a", SINCE + D), N1, "no-partner", SINCE + D)
    h.write(store)
    d = load_sample()
    by_commune = unmet(store.engine, d, PERIOD, by="commune")
    assert [(c.territory, c.name, c.units) for c in by_commune.cells] == [
        ("other:?", "other communes of communes outside the directory", 6)
    ]
    by_departement = unmet(store.engine, d, PERIOD, by="departement")
    assert [(c.territory, c.units, c.supply) for c in by_departement.cells] == [("62", 6, None)]


def test_an_insight_leaves_the_connection_settings_as_they_were(responses: Store) -> None:
    """The larger SQLite page cache, PostgreSQL's work_mem and jit: for the insight only."""
    queries = ["PRAGMA cache_size"] if responses.is_sqlite else ["SHOW work_mem", "SHOW jit"]
    with responses.engine.connect() as conn:
        before = [conn.exec_driver_sql(q).scalar() for q in queries]
    response_times(responses.engine, PERIOD)
    unmet(responses.engine, load_sample(), PERIOD)
    with responses.engine.connect() as conn:
        assert [conn.exec_driver_sql(q).scalar() for q in queries] == before


def test_cli_says_what_is_wrong_with_the_options(tmp_path, monkeypatch) -> None:
    """A bad date, a period that ends before it starts, a chart that cannot be written:
    a clear error and exit 2, no traceback (the chart's before anything is read)."""
    monkeypatch.setenv("PARTNERBUS_DATABASE_URL", f"sqlite:///{tmp_path / 'ledger.db'}")
    runner = CliRunner()
    cases = [
        (["response-times", "--since", "yesterday"], "a date is ISO"),
        (["unmet", "--since", "2026-02-01", "--until", "2026-01-01"], "before it starts"),
        (["response-times", "--png", str(tmp_path / "nowhere" / "t.png")], "cannot write"),
        (["unmet", "--png", str(tmp_path)], "it is a directory"),
    ]
    for args, said in cases:
        result = runner.invoke(cli, ["insights", *args])
        assert result.exit_code == 2, result.output
        said_in = " ".join(result.output.split())  # the error console wraps long lines
        assert said in said_in and "Traceback" not in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)


def test_an_insight_reads_beside_the_writers(responses: Store) -> None:
    """An insight's reads take no write lock (SQLite) and write nothing (PostgreSQL): the
    service records on while a coordinator reads a year of its ledger."""
    from sqlalchemy.exc import DBAPIError

    from partnerbus.insights.common import reading

    with reading(responses.engine) as conn:
        conn.exec_driver_sql("SELECT count(*) FROM referrals").scalar()
        if responses.is_sqlite:
            with responses.begin() as tx:  # would wait 30 s, then fail, behind a write lock
                tx.conn.exec_driver_sql("DELETE FROM outbox")
        else:
            with pytest.raises(DBAPIError, match="read-only"):
                conn.exec_driver_sql("DELETE FROM outbox")
