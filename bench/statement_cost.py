"""CPU per ledger write, by how it is run: SQLAlchemy's `execute` with and without an
event listener on the engine, and `Prepared` (`exec_driver_sql`).

    python -m bench.statement_cost [--rows 5000] [--rounds 8] [--database-url URL]

A fresh SQLite file (or the PostgreSQL URL given, in a fresh schema) at the migrations'
head. Each round inserts `--rows` referral-history rows (the ledger's commonest write) in
one transaction each way, in turn: `execute` on the store's engine as it is, `execute`
with a `before_cursor_execute` listener added (what the store's former `begin` listener
cost every statement), and `Prepared`. Prints the process CPU time per row, median and
best of the rounds. Figures are only comparable within one run (docs/PERFORMANCE.md,
"Less CPU per statement").
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, event

from bench.ledgers import fresh_ledger_url
from partnerbus.ledger import tables as t
from partnerbus.ledger.repos.referrals import INSERT_HISTORY
from partnerbus.ledger.store import Store

ROW = {
    "referral_id": "r" * 40,
    "from_status": "requested",
    "to_status": "delivered",
    "outcome": "applied",
    "actor": "bus",
    "reason": "confirmed by the broker",
    "at": datetime(2026, 11, 28, 12, 0, tzinfo=UTC),
}


def _listener(*_args: Any) -> None:
    return None


def measure(url: str, rows: int, rounds: int) -> dict[str, list[float]]:
    store = Store(url)
    store.create_all()
    core = t.referral_history.insert()

    def execute(conn: Connection) -> None:
        conn.execute(core, ROW)

    def prepared(conn: Connection) -> None:
        INSERT_HISTORY(conn, ROW)

    ways: dict[str, tuple[Callable[[Connection], None], bool]] = {
        "execute": (execute, False),
        "execute, a listener on the engine": (execute, True),
        "Prepared": (prepared, False),
    }
    spent: dict[str, list[float]] = {name: [] for name in ways}
    try:
        for _ in range(rounds):
            for name, (write, listen) in ways.items():
                if listen:
                    event.listen(store.engine, "before_cursor_execute", _listener)
                try:
                    with store.begin() as tx:
                        write(tx.conn)  # warm: the statement compiled or rendered
                        began = time.process_time()
                        for _ in range(rows):
                            write(tx.conn)
                        spent[name].append(1e6 * (time.process_time() - began) / rows)
                finally:
                    if listen:
                        event.remove(store.engine, "before_cursor_execute", _listener)
    finally:
        store.dispose()
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description="CPU per ledger write")
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--database-url", default=None, help="PostgreSQL URL (a fresh schema)")
    args = parser.parse_args()
    with fresh_ledger_url(args.database_url) as url:
        spent = measure(url, args.rows, args.rounds)
    for name, values in spent.items():
        print(
            f"{name}: {statistics.median(values):.1f} µs a row (median of {len(values)}), "
            f"best {min(values):.1f}"
        )


if __name__ == "__main__":
    main()
