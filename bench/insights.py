"""A year of a département's referrals, written straight into a ledger, and the time each
insight takes on it.

    python -m bench.insights [--referrals 200000] [--db URL] [--keep] [--repeat 3]
                             [--json FILE] [--seed 12]

A fresh SQLite file (or, with a PostgreSQL `--db`, a fresh schema, dropped afterwards
unless `--keep`), brought to head by the migrations (0005's indexes included), then
`--referrals` referrals written into it by `partnerbus.testing.history.generate` (a year of
the bundled sample's communes and partners: its docstring says what is in it).

Then each insight over the last 90 days (response times, unmet by commune, EPCI and
département; on PostgreSQL the response times with `percentile_cont` and with the portable
window query) is run `--repeat` times after a warm-up: the best and the median wall time.
On PostgreSQL the benchmark also checks that both response-times queries agree.

Measured 2026-11-28 (2 cores shared with other runs), 200,000 referrals, best of 5:
response-times SQLite 5.6 s, PostgreSQL 2.7 s (portable query 5.0 s); unmet by commune
0.8 s / 1.3 s (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from partnerbus.directory import load_sample
from partnerbus.insights import Period, response_times, unmet
from partnerbus.ledger.store import Store
from partnerbus.testing.history import END, generate


def _timed(work: Callable[[], Any], repeat: int) -> dict[str, float]:
    work()  # warm-up: the page cache, the engine's statement cache
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        runs.append(time.perf_counter() - started)
    return {"best_s": round(min(runs), 3), "median_s": round(statistics.median(runs), 3)}


def measure(store: Store, repeat: int) -> dict[str, dict[str, float]]:
    d = load_sample()
    period = Period(END - timedelta(days=90), END)
    engine = store.engine
    out = {
        "response-times": _timed(lambda: response_times(engine, period), repeat),
        "unmet --by commune": _timed(lambda: unmet(engine, d, period, by="commune"), repeat),
        "unmet --by epci": _timed(lambda: unmet(engine, d, period, by="epci"), repeat),
        "unmet --by departement": _timed(
            lambda: unmet(engine, d, period, by="departement"), repeat
        ),
    }
    if engine.dialect.name == "postgresql":
        out["response-times (portable window query)"] = _timed(
            lambda: response_times(engine, period, native=False), repeat
        )
        native = response_times(engine, period).as_json()
        portable = response_times(engine, period, native=False).as_json()
        native["method"] = portable["method"]
        if native != portable:
            msg = "percentile_cont and the window query disagree"
            raise AssertionError(msg)
    return out


def _analyse(store: Store) -> None:
    with store.engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")


@contextmanager
def _fresh(url: str | None, *, keep: bool) -> Iterator[Store]:
    """A fresh SQLite file, or a fresh PostgreSQL schema (dropped afterwards unless `keep`)."""
    if url is None or url.startswith("sqlite"):
        store = Store(url or f"sqlite:///{Path(tempfile.mkdtemp()) / 'insights.db'}")
        try:
            yield store
        finally:
            store.dispose()
        return
    schema = f"bench_insights_{uuid.uuid4().hex[:8]}"
    admin = create_engine(url)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    store = Store(url, schema=schema)
    try:
        yield store
    finally:
        store.dispose()
        if not keep:
            with admin.begin() as conn:
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--referrals", type=int, default=200_000)
    parser.add_argument(
        "--db", default=None, help="a SQLite or PostgreSQL URL (default: a fresh SQLite file)"
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--keep", action="store_true", help="keep the PostgreSQL schema")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with _fresh(args.db, keep=args.keep) as store:
        store.create_all()
        started = time.perf_counter()
        counts = generate(store, args.referrals, args.seed)
        generated_s = time.perf_counter() - started
        _analyse(store)
        timings = measure(store, args.repeat)
        report = {
            "engine": store.engine.dialect.name,
            "rows": counts,
            "generate_s": round(generated_s, 1),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
            "insights": timings,
        }
        print(json.dumps(report, indent=2))
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
