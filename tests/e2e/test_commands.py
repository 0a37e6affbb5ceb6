"""The `partnerbus` console script as a user runs it: `demo` and `run --workers 2` as real
processes against the real RabbitMQ, each on its own prefix and SQLite file."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal as signal_module
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import aio_pika
import pytest

from partnerbus.broker.topology import Topology
from partnerbus.directory import load_sample, match
from partnerbus.entrypoints.bootstrap import create_app
from partnerbus.ledger.store import Store
from partnerbus.settings import Settings
from partnerbus.testing import Inbox
from tests.keys import TEST_KEY

from .helpers import ARREARS, ROUBAIX, consent, new_id, publish, signal, signal_ref

pytestmark = pytest.mark.rabbitmq

PARTNERBUS = str(Path(sys.executable).parent / "partnerbus")
"""The console script installed beside the interpreter running the tests."""
KINDS = ("ccas-cias", "points-conseil-budget", "cresus", "caf", "maisons-des-solidarites")
KEY = TEST_KEY


def command_env(settings: Settings) -> dict[str, str]:
    """The environment of a `partnerbus` process: ours without any PARTNERBUS_* or colour
    variable, plus these settings; a wide terminal so that tables are not wrapped."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PARTNERBUS_") and k not in ("FORCE_COLOR", "TTY_COMPATIBLE")
    }
    env.update(
        {
            "PARTNERBUS_AMQP_URL": settings.amqp_url.get_secret_value(),
            "PARTNERBUS_PREFIX": settings.prefix,
            "PARTNERBUS_DATABASE_URL": settings.database_url,
            "PARTNERBUS_PSEUDONYM_KEY": settings.pseudonym_key.get_secret_value(),
            "PARTNERBUS_RETRY_DELAYS_MS": json.dumps(list(settings.retry_delays_ms)),
            "PARTNERBUS_RELAY_INTERVAL_S": str(settings.relay_interval_s),
            "PARTNERBUS_SCHEDULER_INTERVAL_S": str(settings.scheduler_interval_s),
            "COLUMNS": "200",
            "NO_COLOR": "1",
        }
    )
    return env


def command_settings(amqp_url: str, prefix: str, tmp_path: Path) -> Settings:
    return Settings(
        amqp_url=amqp_url,
        prefix=prefix,
        database_url=f"sqlite:///{tmp_path / 'bus.db'}",
        pseudonym_key=KEY,
        retry_delays_ms=(200,),
        relay_interval_s=0.2,
        scheduler_interval_s=3600,
    )


def topology_names(topology: Topology, partner_ids: Iterable[str]) -> list[tuple[str, str]]:
    """Every (kind, name) a bus of this topology declares: queues, dead letters, delay
    queues and exchanges."""
    names: list[tuple[str, str]] = []
    for queue in topology.all_work_queue_names(partner_ids):
        names.append(("queue", queue))
        names.append(("queue", topology.dlq_name(queue)))
        names.extend(
            ("queue", topology.retry_queue_name(queue, step))
            for step in range(len(topology.retry_delays_ms))
        )
    names.extend(("exchange", exchange.name) for exchange in topology.exchanges())
    return names


async def existing(url: str, names: Iterable[tuple[str, str]]) -> list[str]:
    """Which of these queues and exchanges exist on the broker (passive declares; a missing
    one closes its channel with 404)."""
    found = []
    connection = await aio_pika.connect(url)
    async with connection:
        for kind, name in names:
            channel = await connection.channel()
            try:
                if kind == "queue":
                    await channel.declare_queue(name, passive=True)
                else:
                    await channel.declare_exchange(name, passive=True)
                found.append(name)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                pass
            finally:
                if not channel.is_closed:
                    await channel.close()
    return found


async def consumers(connection: aio_pika.abc.AbstractConnection, queue: str) -> int | None:
    """Consumers on the queue, or None while it is not declared."""
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.consumer_count or 0)
    except aio_pika.exceptions.ChannelNotFoundEntity:
        return None
    finally:
        if not channel.is_closed:
            await channel.close()


async def wait_consumers(
    url: str, queues: dict[str, int], timeout: float, declared: Iterable[str] = ()
) -> None:
    """Poll until each queue has exactly its number of consumers and the `declared` queues
    exist; tiny awaits between polls, a failure naming what is missing after `timeout`."""
    connection = await aio_pika.connect(url)
    last: dict[str, int | None] = {}
    async with connection:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    last = {q: await consumers(connection, q) for q in (*queues, *declared)}
                    if all(last[q] == n for q, n in queues.items()) and all(
                        last[q] is not None for q in declared
                    ):
                        return
                    await asyncio.sleep(0.1)
        except TimeoutError:
            raise AssertionError(f"after {timeout}s, consumers per queue: {last}") from None


async def wait_recorded(store: Store, table: str, count: int, timeout: float) -> None:
    """Poll the workers' SQLite ledger until the table holds `count` rows."""
    async with asyncio.timeout(timeout):
        while await asyncio.to_thread(store.count, table) < count:  # noqa: ASYNC110 - a row count: no event
            await asyncio.sleep(0.05)


async def test_the_demo_command_plays_the_day_prints_the_summary_and_leaves_nothing_behind(
    amqp_url: str, prefix: str, tmp_path: Path
) -> None:
    """`partnerbus demo` exits 0 after printing each situation (the two landlords' agencies of Roubaix, the IML association's advisor redirecting a referral, a parked need reminded then closed after a jump in time), the referrals table and the audit trail, and deletes its queues and exchanges."""
    settings = command_settings(amqp_url, prefix, tmp_path)
    done = await asyncio.to_thread(
        subprocess.run,
        [PARTNERBUS, "demo", "--timeout", "30"],
        env=command_env(settings),
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    out = done.stdout
    # Every message the bus sent was taken: no client gave one back, nothing crashed, and
    # no dead letter was left in any of the demo's queues (the demo counts them before it
    # deletes its queues, and fails when there is one).
    for bad in ("Traceback", "not handled", "ERROR"):
        assert bad not in out + done.stderr, f"the demo printed {bad!r}"
    # The demo names its own prefix (`demo-…`) and keeps its ledger in a temporary directory.
    used = re.search(r"prefix (demo-[0-9a-f]{6}), (\d+) partners in the directory", out)
    assert used, out + done.stderr
    demo_prefix = used.group(1)
    directory = load_sample()
    names = topology_names(Topology(demo_prefix), (p.id for p in directory.partners()))
    left = await existing(amqp_url, names)
    if left:  # clean up after a demo that did not, then fail
        bus = create_app(
            Settings(
                amqp_url=amqp_url, prefix=demo_prefix, database_url="sqlite://", pseudonym_key=KEY
            ),
            directory=directory,
        )
        bus.executor.shutdown()
        await bus.teardown()
        bus.store.dispose()

    assert done.returncode == 0, out + done.stderr
    assert int(used.group(2)) == len(directory.partners())
    for step in (
        "1. Rent arrears in Roubaix (consent on file)",
        "2. A hoarded flat in Tourcoing (no consent yet)",
        "3. The CCAS of Lille alerts about a tenant's rights (SMS consent)",
        "4. FSL for a tenant of Vilogia in Roubaix (the landlord named)",
        "5. A tenant of Habitat et Humanisme (IML flat in Roubaix); a redirect",
        "6. A need parked in Roubaix: the tenant cannot be reached",
    ):
        assert step in out
    arrears_partner = match(directory, ARREARS, ROUBAIX, sender="lmh-recouvrement")[0].partner_id
    assert f"{arrears_partner:<22} ← referral" in out
    assert "→ signal: 4 months of arrears (1,840 €)" in out
    assert "consent requested for T-59599-0077" in out
    assert "→ declined: no room this month (full)" in out
    assert "→ completed: FSL file filed; repayment plan signed" in out
    assert "The day's referrals" in out
    day_table = out[out.index("The day's referrals") : out.index("outbox sent")]
    rows = [line for line in day_table.splitlines() if line.startswith("│")]
    # arrears, hoarding twice (declined, then rerouted), rights, FSL, IML twice (transferred)
    assert len(rows) == 7, out
    assert any(
        "reduire-les-impayes-de-loyer" in r and arrears_partner in r and "completed" in r
        for r in rows
    ), rows
    assert any(
        "se-maintenir-dans-le-logement" in r and "rejected" in r and "full" in r for r in rows
    )
    assert any(
        "se-maintenir-dans-le-logement" in r and "│ 2 " in r and "accepted" in r for r in rows
    )
    assert any("fsl" in r and "fsl-nord" in r and "accepted" in r for r in rows), rows
    assert f"{'vilogia-agence-roubaix':<22} ← consent requested for T-59512-0733" in out
    assert "lmh-agence-roubaix     ← consent requested for T-59512-0733" not in out
    # 5. the IML association's advisor transfers the accepted referral to another partner:
    # the first is told to drop it, the other receives it (attempt 2) and accepts
    moved = re.search(
        r"hh-nord-iml +→ e\.vandamme transfers referral ([0-9a-f]{8}) from (\S+) to (\S+):", out
    )
    assert moved, out
    rid, first, chosen = moved.groups()
    assert first != chosen
    assert f"{first:<22} ← referral {rid}" in out
    assert f"{first:<22} ← referral {rid} withdrawn (signal-cancelled): drops it" in out
    assert re.search(rf"{re.escape(chosen)} +← referral [0-9a-f]{{8}} for \S+ \(attempt 2", out)
    assert any(
        "accompagnement-pour-lacces-aux-droits" in r and first in r and "cancelled" in r
        for r in rows
    ), rows
    assert any(
        "accompagnement-pour-lacces-aux-droits" in r
        and chosen in r
        and "│ 2 " in r
        and "accepted" in r
        for r in rows
    ), rows
    assert "What the audit trail says about T-59512-0951" in out
    assert f"referral-transferred by e.vandamme → {first}" in out
    assert f"need-directed by e.vandamme → {chosen}" in out
    # 6. LMH's own Roubaix advisor is asked (not Vilogia's); the demo jumps in time: she is
    # reminded, then the need closes for the source and for her
    assert f"{'lmh-agence-roubaix':<22} ← consent requested for T-59512-0588" in out
    assert "vilogia-agence-roubaix ← consent requested for T-59512-0588" not in out
    assert "the tenant cannot be reached" in out
    assert "the demo jumps 24 hours forward in time" in out
    assert f"{'lmh-agence-roubaix':<22} ← reminder: consent still awaited for T-59512-0588" in out
    assert "the demo jumps 144 hours forward in time" in out
    for told in ("lmh-proximite", "lmh-agence-roubaix"):
        assert re.search(rf"{told} +← need closed: .* is consent-not-obtained", out), out
    assert out.index("← reminder: consent still awaited") < out.index("consent-not-obtained")
    assert re.search(r"outbox sent \d+, pending 0; audit records \d+", out), out
    assert "What the audit trail says about T-59599-0077" in out
    assert "consent-granted by" in out
    assert "dead letters: none" in out, out
    assert out.rstrip().endswith("demo complete"), out
    assert left == [], f"the demo left {left} on the broker"
    # What the network learns: her receipt read by her agency's advisor, the insights on
    # the day's ledger (hidden: too few persons) and on a synthetic year, with the charts
    assert "Her receipt: what was shared about T-59599-0077" in out
    assert "Droit d'accès (article 15 du RGPD)" in out
    assert "CNIL" in out
    shown = re.search(r"(\d+) of (\d+) figures hidden: fewer than 5 persons", out)
    assert shown, out
    assert shown.group(1) == shown.group(2) != "0", "the day's few persons: every figure hidden"
    assert "The network's insights, on a synthetic year" in out
    assert "unmet demand by need × epci" in out
    # the demo writes nothing in its working directory but `demo-output/`
    written = await asyncio.to_thread(lambda: sorted(p.name for p in tmp_path.iterdir()))
    assert written == ["demo-output"], f"the demo wrote {written} in its working directory"
    files = {p.name: p.read_bytes() for p in (tmp_path / "demo-output").iterdir()}
    assert sorted(files) == ["receipt.html", "receipt.pdf", "response-times.png", "unmet.png"]
    assert files["receipt.pdf"].startswith(b"%PDF-")
    assert b"T-59599-0077" in files["receipt.html"]
    for chart in ("response-times.png", "unmet.png"):
        assert files[chart].startswith(b"\x89PNG\r\n\x1a\n")


async def test_the_run_command_with_two_workers_routes_a_referral_and_stops_on_sigterm(
    amqp_url: str, prefix: str, tmp_path: Path, channel: aio_pika.abc.AbstractChannel
) -> None:
    """`partnerbus run --workers 2` consumes with two workers, turns a consented signal into a referral in the best partner's queue, and exits on SIGTERM."""
    settings = command_settings(amqp_url, prefix, tmp_path)
    t = Topology(prefix, retry_delays_ms=settings.retry_delays_ms)
    directory = load_sample()
    agency = directory.agency_for(ROUBAIX).id
    target = match(directory, ARREARS, ROUBAIX, sender="lmh-recouvrement")[0].partner_id
    last = directory.partners()[-1].id
    log = tmp_path / "run.log"
    store = Store(settings.database_url)
    with log.open("wb") as out:
        proc = subprocess.Popen(  # noqa: ASYNC220 - started once, waited on in a thread
            [PARTNERBUS, "run", "--workers", "2"],
            env=command_env(settings),
            cwd=tmp_path,  # no stray .env file
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the supervisor and its workers
        )
    try:
        await wait_consumers(
            amqp_url,
            {q.name: 2 for q, _ in t.intake_queues()},
            timeout=60,
            # the last queue the bus declares: the topology is complete
            declared=[t.retry_queue_name(t.partner_queue_name(last), len(t.retry_delays_ms) - 1)],
        )
        inbox = await Inbox.open(channel, t.partner_queue_name(target))

        person = new_id("T")
        await publish(
            channel,
            t.consents.name,
            consent(person=person, agency=agency, kinds=KINDS),
            routing_key=agency,
        )
        await wait_recorded(store, "consents", 1, timeout=30)
        body = signal(person=person)
        await publish(channel, t.signals.name, body, routing_key="lmh-recouvrement")

        (referral,) = await inbox.expect(1, timeout=30)
        assert referral.kind == "referral"
        assert referral.body["partner"] == target
        assert referral.body["need"] == ARREARS
        assert signal_ref(referral.body, body["message_id"], key=KEY.encode())
        assert person not in referral.raw.decode()
        await inbox.close()
        assert store.count("referrals", signal_id=body["message_id"]) == 1

        os.killpg(proc.pid, signal_module.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 45)
        assert code == 0, "FastStream's graceful stop ends with status 0"
        await wait_consumers(amqp_url, {q.name: 0 for q, _ in t.intake_queues()}, timeout=30)
    except BaseException:
        print(log.read_text(errors="replace")[-4000:])
        raise
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal_module.SIGKILL)
            await asyncio.to_thread(proc.wait, 30)
        store.dispose()
        bus = create_app(settings, directory=directory)
        bus.executor.shutdown()
        await bus.teardown()
        bus.store.dispose()
    left = await existing(amqp_url, topology_names(t, (p.id for p in directory.partners())))
    assert left == [], f"left on the broker after the teardown: {left}"
