"""The relay alone: how fast it drains a backlog of referrals to the real broker.

    python -m bench.relay_drain [--database-url URL] [--signals 2000] [--json FILE]
                                [--fake-confirm-ms MS]

A fresh prefix on the broker (PARTNERBUS_TEST_AMQP_URL or the local guest), a fresh SQLite
file (or the PostgreSQL URL given, in a fresh schema). The service is started with its relay
held, `--signals` consented signals are recorded through the use cases (each makes one
referral), then the relay is let go and timed until the outbox is empty: the referrals and
the two `delivered` notices each confirm queues. Prints referrals/s and outbox rows/s.

Measured 2026-11-27 (2 cores shared with other runs; noisy, compare within one run), 2,000
signals, real broker, outbox rows/s (referrals/s): SQLite 119 (40) before the windows, 652
(217) after; PostgreSQL 93 (31) before, 174 (58) after. What is left per referral is the use
cases' own statements at send time (`send_or_withhold`, `mark_delivered`: about 12 since
the statement caching; `bench.cpu_per_signal` counts them). With that caching (same run,
1,000 signals): SQLite 185 -> 328 referrals/s, PostgreSQL 97 -> 152.

`--fake-confirm-ms`: no broker; the relay alone (its own thread, the same ledger) with a
publish that confirms after that many milliseconds, to time the relay's own work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

from sqlalchemy import create_engine, text

from partnerbus import usecases
from partnerbus.entrypoints.bootstrap import create_app
from partnerbus.schemas import ConsentGranted, ConsentScope, Signal, utcnow
from partnerbus.settings import Settings

ARREARS = "logement-hebergement--reduire-les-impayes-de-loyer"
KINDS = ("ccas-cias", "points-conseil-budget", "cresus", "caf", "maisons-des-solidarites")
KEY = "bench-relay-drain-" + "k" * 40


def record(bus, start: int, count: int, urgency: str = "routine") -> None:  # type: ignore[no-untyped-def]
    ledger = bus.ledger
    now = utcnow()

    def work(tx):  # type: ignore[no-untyped-def]
        for n in range(start, start + count):
            person = f"T-BENCH-{n}"
            grant = ConsentGranted(
                message_id=f"grant-{n}",
                occurred_at=now,
                consent_id=f"c-{n}",
                person_ref=person,
                scope=ConsentScope(needs=("logement-hebergement",), partner_kinds=KINDS),
                collected_by="s.benali",
                agency="lmh-agence-roubaix",
                method="oral",
                granted_at=now - timedelta(minutes=1),
                valid_until=now + timedelta(days=30),
            )
            signal = Signal(
                message_id=f"sig-{n}",
                occurred_at=now,
                source="lmh-recouvrement",
                person_ref=person,
                commune="59512",
                needs=(ARREARS,),
                urgency=urgency,  # type: ignore[arg-type]
            )
            usecases.grant_consent(ledger, tx, grant, "bench")
            usecases.receive_signal(ledger, tx, signal, "bench")

    bus.store.run(work)


async def drain(database_url: str, signals: int) -> dict[str, float]:
    settings = Settings(
        amqp_url=os.environ.get("PARTNERBUS_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
        prefix=f"pbbench-{uuid.uuid4().hex[:8]}",
        database_url=database_url,
        relay_interval_s=3600,
        scheduler_interval_s=3600,
        pseudonym_key=KEY,
    )
    bus = create_app(settings)
    await bus.start()
    try:
        async with bus.relay._lock:  # the relay waits while the backlog is recorded
            for start in range(0, signals, 200):
                await asyncio.to_thread(record, bus, start, min(200, signals - start))
            rows = await asyncio.to_thread(bus.store.pending_count)
        began = time.perf_counter()
        while True:
            await bus.relay.flush()
            if await asyncio.to_thread(bus.store.pending_count) == 0:
                break
        elapsed = time.perf_counter() - began
        total = await asyncio.to_thread(bus.store.count, "outbox")
    finally:
        await bus.stop()
        await bus.teardown()
    return {
        "signals": signals,
        "pending_at_start": rows,
        "rows_sent": total,
        "seconds": round(elapsed, 3),
        "referrals_per_s": round(signals / elapsed, 1),
        "rows_per_s": round(total / elapsed, 1),
    }


async def drain_fake(database_url: str, signals: int, confirm_ms: float) -> dict[str, float]:
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from partnerbus.broker.topology import Topology
    from partnerbus.directory import load_sample
    from partnerbus.handlers.outbox import Relay
    from partnerbus.ledger.store import Store
    from partnerbus.rules import DeadlinePolicy
    from partnerbus.usecases import Ledger

    store = Store(database_url)
    store.create_all()
    ledger = Ledger(
        store=store,
        directory=load_sample(),
        clock=utcnow,
        pseudonym_key=KEY.encode(),
        deadlines=DeadlinePolicy(
            routine=timedelta(days=10), urgent=timedelta(days=3), asap=timedelta(days=1)
        ),
    )
    fake_bus = SimpleNamespace(ledger=ledger, store=store)
    for start in range(0, signals, 200):
        record(fake_bus, start, min(200, signals - start))

    async def publish(body: bytes, **options: object) -> None:
        await asyncio.sleep(confirm_ms / 1000)

    with ThreadPoolExecutor(1) as executor:
        relay = Relay(ledger, Topology("bench"), publish, executor, timeout_s=10)
        began = time.perf_counter()
        while await asyncio.to_thread(store.pending_count):
            await relay.flush()
        elapsed = time.perf_counter() - began
    total = store.count("outbox")
    store.dispose()
    return {
        "signals": signals,
        "rows_sent": total,
        "seconds": round(elapsed, 3),
        "referrals_per_s": round(signals / elapsed, 1),
        "rows_per_s": round(total / elapsed, 1),
        "fake_confirm_ms": confirm_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="relay drain benchmark")
    parser.add_argument("--database-url", default=None, help="PostgreSQL URL (a fresh schema)")
    parser.add_argument("--signals", type=int, default=2000)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--fake-confirm-ms", type=float, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.database_url:
            schema = f"pbbench_{uuid.uuid4().hex[:8]}"
            admin = create_engine(args.database_url)
            with admin.begin() as conn:
                conn.execute(text(f'CREATE SCHEMA "{schema}"'))
            url = f"{args.database_url}?options=-csearch_path%3D{schema}"
        else:
            url = f"sqlite:///{Path(tmp) / 'ledger.db'}"
        try:
            if args.fake_confirm_ms is not None:
                figures = asyncio.run(drain_fake(url, args.signals, args.fake_confirm_ms))
            else:
                figures = asyncio.run(drain(url, args.signals))
        finally:
            if args.database_url:
                with admin.begin() as conn:
                    conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
                admin.dispose()
    figures["engine"] = "postgresql" if args.database_url else "sqlite"
    print(json.dumps(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
