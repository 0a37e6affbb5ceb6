"""CPU and SQL statements per signal in the use cases, without a broker.

    python -m bench.cpu_per_signal [--signals 1000] [--database-url URL] [--profile FILE]

A fresh SQLite file (or the PostgreSQL URL given, in a fresh schema). `--signals`
consented signals are recorded through the use cases (`grant_consent` + `receive_signal`,
in batches of 200 as `bench.relay_drain` does), then the relay drains the outbox with a
publish that confirms after 1 ms (its own database thread, the same ledger, the send-time
use cases `send_or_withhold` and `mark_delivered`). Prints the process CPU time per signal
of each phase (`time.process_time()`: every thread) and the SQL statements per signal
(SQLAlchemy's `before_cursor_execute`), by kind. `--profile FILE`: cProfile of the
recording (FILE) and of the relay's database thread (FILE.thread), for `pstats`.

Measured 2026-11-27 in one run (2 cores shared with a test run: compare within one run),
1,000 signals, SQLite, CPU ms per signal record + drain: 4.1 + 3.8 before issue 9's
statement caching, 1.5 + 1.5 after; statements 16 + 13.3 before, 16 + 12.3 after.
Measured 2026-11-28, 2,000 signals, SQLite, alternating with the previous tree: statements
20 + 12.2 before the per-transaction row cache, 16 + 5.1 after (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sqlalchemy import event

from bench.ledgers import fresh_ledger_url
from bench.relay_drain import KEY, record
from partnerbus.broker.topology import Topology
from partnerbus.directory import load_sample
from partnerbus.handlers.outbox import Relay
from partnerbus.ledger.store import Store
from partnerbus.rules import DeadlinePolicy
from partnerbus.schemas import utcnow
from partnerbus.usecases import Ledger


def measure(url: str, signals: int, profile: Path | None, count: bool = True) -> None:
    store = Store(url)
    store.create_all()
    counts: Counter[str] = Counter()
    phase = ["setup"]

    def _count(*args: Any) -> None:
        statement = args[2]
        counts[phase[0]] += 1
        counts[phase[0] + ":" + statement.split()[0].upper()] += 1

    if count:  # counting costs CPU of its own: off to time
        event.listen(store.engine, "before_cursor_execute", _count)

    ledger = Ledger(
        store=store,
        directory=load_sample(),
        clock=utcnow,
        pseudonym_key=KEY.encode(),
        deadlines=DeadlinePolicy(
            routine=timedelta(days=10), urgent=timedelta(days=3), asap=timedelta(days=1)
        ),
    )
    bus = SimpleNamespace(ledger=ledger, store=store)
    record(bus, 10_000_000, 20)  # warm-up: imports, compiled statements
    main_profile = cProfile.Profile() if profile else None
    phase[0] = "record"
    if main_profile:
        main_profile.enable()
    began = time.process_time()
    for start in range(0, signals, 200):
        record(bus, start, min(200, signals - start))
    recorded = time.process_time()
    if main_profile:
        main_profile.disable()
        main_profile.dump_stats(profile)

    thread_profile: dict[str, cProfile.Profile] = {}

    def start_profile() -> None:
        if profile:
            thread_profile["p"] = cProfile.Profile()
            thread_profile["p"].enable()

    def stop_profile() -> None:
        if profile:
            thread_profile["p"].disable()
            thread_profile["p"].dump_stats(f"{profile}.thread")

    async def publish(body: bytes, **options: object) -> None:
        await asyncio.sleep(0.001)

    async def drain() -> None:
        with ThreadPoolExecutor(1, initializer=start_profile) as executor:
            relay = Relay(ledger, Topology("bench"), publish, executor, timeout_s=10)
            while store.pending_count():
                await relay.flush()
            executor.submit(stop_profile).result()

    phase[0] = "drain"
    drain_began = time.process_time()
    asyncio.run(drain())
    drained = time.process_time()
    store.dispose()
    record_ms = 1000 * (recorded - began) / signals
    drain_ms = 1000 * (drained - drain_began) / signals
    print(
        f"signals {signals}: CPU ms per signal record {record_ms:.2f} drain {drain_ms:.2f} "
        f"total {record_ms + drain_ms:.2f}"
    )
    if count:
        print(
            f"statements per signal record {counts['record'] / signals:.1f} "
            f"drain {counts['drain'] / signals:.1f}"
        )
        kinds = {k: round(v / signals, 2) for k, v in sorted(counts.items()) if ":" in k}
        print({k: v for k, v in kinds.items() if not k.startswith("setup")})


def main() -> None:
    parser = argparse.ArgumentParser(description="CPU and statements per signal")
    parser.add_argument("--signals", type=int, default=1000)
    parser.add_argument("--database-url", default=None, help="PostgreSQL URL (a fresh schema)")
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument(
        "--no-count", action="store_true", help="time only: do not count the statements"
    )
    args = parser.parse_args()
    with fresh_ledger_url(args.database_url) as url:
        measure(url, args.signals, args.profile, not args.no_count)


if __name__ == "__main__":
    main()
