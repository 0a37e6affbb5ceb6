"""Quick intake harness: how many consented signals per second the service records.

Consents are granted through the bus first; then `--signals` signals wait in the intake
queue while no service runs; a fresh service (as `partnerbus run` builds it, real ledger)
starts and the clock runs until every signal has its verdict (recorded in the ledger and
acked). `PYTHONPATH=. python -m bench.intake_rate --signals 2000`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import tempfile
import time
import uuid
from pathlib import Path

import aio_pika

from partnerbus.entrypoints.bootstrap import create_app
from partnerbus.settings import Settings
from tests.e2e.helpers import ROUBAIX, consent, publish, signal
from tests.keys import TEST_KEY

KINDS = ("ccas-cias", "points-conseil-budget", "cresus", "caf", "maisons-des-solidarites")


async def main(count: int, database_url: str | None, amqp_url: str) -> dict[str, float]:
    prefix = f"pbbench-{uuid.uuid4().hex[:8]}"
    folder = Path(tempfile.mkdtemp())
    url = database_url or f"sqlite:///{folder / 'bench.db'}"
    settings = Settings(
        amqp_url=amqp_url,
        prefix=prefix,
        database_url=url,
        pseudonym_key=TEST_KEY,
        scheduler_interval_s=3600,
        relay_interval_s=0.2,
    )
    persons = [f"T-bench{uuid.uuid4().hex[:12]}" for _ in range(count)]
    bus = create_app(settings, log_level=logging.DEBUG)
    await bus.start()
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel(publisher_confirms=True)
    t = bus.topology
    agency = bus.directory.agency_for(ROUBAIX).id
    await asyncio.gather(
        *(
            publish(
                channel,
                t.consents.name,
                consent(person=p, agency=agency, kinds=KINDS),
                routing_key=agency,
            )
            for p in persons
        )
    )
    await bus.wait_verdicts(count, timeout=600)
    await bus.relay.flush()
    await bus.stop()
    await asyncio.gather(
        *(
            publish(channel, t.signals.name, signal(person=p), routing_key="lmh-recouvrement")
            for p in persons
        )
    )
    bus = create_app(settings, log_level=logging.DEBUG)
    started = time.perf_counter()
    await bus.start()
    verdicts = await bus.wait_verdicts(count, timeout=900)
    elapsed = time.perf_counter() - started
    outcomes = {o: sum(v.outcome == o for v in verdicts) for o in {v.outcome for v in verdicts}}
    await bus.stop()
    await bus.teardown()
    await connection.close()
    return {
        "signals": count,
        "seconds": round(elapsed, 2),
        "per_s": round(count / elapsed, 1),
        **{f"outcome_{k}": n for k, n in outcomes.items()},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--signals", type=int, default=2000)
    parser.add_argument("--database-url")
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(asyncio.run(main(args.signals, args.database_url, args.amqp_url))))
