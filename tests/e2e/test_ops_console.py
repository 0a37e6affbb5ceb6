"""The ops console over real HTTP: sign-in and its attacks, per-partner figures checked
against an independent count, alerts, the dead-letter browser's replay and purge."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest
from pydantic import SecretStr

from partnerbus.entrypoints.gateway import issue_token, revoke_token
from partnerbus.entrypoints.web import create_ops_app
from partnerbus.ops.session import COOKIE, new_session, sign
from partnerbus.testing import wait_until

from .helpers import publish
from .ops_scenario import depth, independent_count, scripted_run, serving

pytestmark = pytest.mark.rabbitmq

OPS_USER = "ops"
OPS_PASSWORD = "ops-test-password-0123456789"


def console_settings(bus, tmp_path, **changes):  # type: ignore[no-untyped-def]
    tokens = tmp_path / "tokens.json"
    return bus.settings.model_copy(
        update={
            "ops_user": OPS_USER,
            "ops_password": SecretStr(OPS_PASSWORD),
            "gateway_tokens_path": tokens,
            "ops_refresh_s": 0.01,
            **changes,
        }
    )


@pytest.fixture
async def console(bus, tmp_path) -> AsyncIterator[tuple[str, object]]:
    settings = console_settings(bus, tmp_path)
    web = create_ops_app(settings, bus.directory, bus.store)
    async with serving(web) as url:
        yield url, settings


async def sign_in_ops(client: httpx.AsyncClient) -> None:
    answer = await client.post(
        "/login", data={"role": "ops", "user": OPS_USER, "password": OPS_PASSWORD}
    )
    assert answer.status_code == 303 and answer.headers["location"] == "/"


async def sign_in_partner(client: httpx.AsyncClient, token: str) -> None:
    answer = await client.post("/login", data={"role": "partner", "token": token})
    assert answer.status_code == 303, answer.text


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, "no CSRF token on the page"
    return found.group(1)


def cell(page: str, partner: str, column: str) -> str:
    row = re.search(rf'<tr id="partner-{re.escape(partner)}".*?</tr>', page, re.S)
    assert row, f"no row for {partner}"
    found = re.search(rf'data-col="{column}">([^<]*)<', row.group(0))
    assert found, f"no {column} in {partner}'s row"
    return found.group(1).strip()


async def test_without_a_session_the_pages_send_to_the_login_form_and_show_no_figure(bus, console):
    url, _ = console
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        for path in ("/", "/figures", "/letters", "/letters?partner=x"):
            answer = await client.get(path)
            assert answer.status_code == 303 and answer.headers["location"] == "/login"
            assert bus.settings.prefix not in answer.text
        htmx = await client.get("/figures", headers={"HX-Request": "true"})
        assert htmx.status_code == 401 and htmx.headers["hx-redirect"] == "/login"
        login = await client.get("/login")
        assert login.status_code == 200 and 'action="/login"' in login.text
        assert '<tr id="partner-' not in login.text  # no row, no figure
        assert bus.settings.prefix not in login.text
        for path in ("/letters/replay", "/letters/purge"):
            refused = await client.post(path, data={"queue": "x", "message_id": "y"})
            assert refused.status_code == 303 and refused.headers["location"] == "/login"


async def test_the_session_cookie_is_signed_httponly_and_samesite_strict(bus, console):
    url, _ = console
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        wrong = await client.post(
            "/login", data={"role": "ops", "user": OPS_USER, "password": "not-it-0123456789"}
        )
        assert wrong.status_code == 401 and COOKIE not in wrong.cookies
        assert '<tr id="partner-' not in wrong.text
        answer = await client.post(
            "/login", data={"role": "ops", "user": OPS_USER, "password": OPS_PASSWORD}
        )
        cookie = answer.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}=")
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
        page = await client.get("/")
        assert page.status_code == 200
        assert "Content-Security-Policy" in page.headers
        assert page.headers["cache-control"] == "no-store"


async def test_forged_malformed_and_expired_cookies_are_refused(bus, console):
    url, _ = console
    other_key = b"k" * 32
    from partnerbus.ops.session import session_key

    key = session_key(OPS_PASSWORD)
    forged = sign(new_session("ops", None, 3600), other_key)
    expired = sign(new_session("ops", None, -10), key)
    valid = sign(new_session("ops", None, 3600), key)
    payload, _, mac = valid.partition(".")
    tampered_payload = sign(new_session("partner", "x", 3600, "d" * 64), key).split(".")[0]
    bad = [
        forged,
        expired,
        f"{tampered_payload}.{mac}",  # another payload under a valid signature
        "garbage",
        "a.b.c",
        "%%%.%%%",
        "é.é",
        payload,  # no signature
        f"{payload}.",
        "x" * 5000,
    ]
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        for value in bad:
            client.cookies.clear()
            raw = f"{COOKIE}={value}".encode()
            answer = await client.get("/", headers={"Cookie": raw})
            assert answer.status_code == 303, value[:40]
            assert answer.headers["location"] == "/login"
        answer = await client.get("/", headers={"Cookie": f"{COOKIE}={valid}"})
        assert answer.status_code == 200


async def test_posts_need_the_csrf_token_a_bounded_body_and_the_ops_role(bus, console):
    url, _ = console
    dlq = bus.topology.dlq_name(bus.topology.signal_queue.name)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        await sign_in_ops(client)
        page = (await client.get("/letters")).text
        token = csrf_of(page)
        fields = {"queue": dlq, "message_id": "nothing-here"}
        missing = await client.post("/letters/replay", data=fields)
        assert missing.status_code == 403
        wrong = await client.post("/letters/purge", data={**fields, "csrf": "x" + token})
        assert wrong.status_code == 403
        huge = await client.post(
            "/letters/replay",
            content=b"csrf=" + b"a" * 100_000,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert huge.status_code == 413
        huge_login = await client.post(
            "/login",
            content=b"user=" + b"a" * 100_000,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert huge_login.status_code == 413
        cross = await client.post(
            "/letters/replay",
            data={**fields, "csrf": token},
            headers={"Origin": "http://evil.example"},
        )
        assert cross.status_code == 403
        unknown_queue = await client.post(
            "/letters/replay", data={"queue": "amq.whatever", "message_id": "m", "csrf": token}
        )
        assert unknown_queue.status_code == 400
        ok = await client.post("/letters/replay", data={**fields, "csrf": token})
        assert ok.status_code == 303 and "no%20such%20dead%20letter" in ok.headers["location"]


async def test_a_partner_sees_only_its_own_row_and_letters_and_cannot_replay(
    bus, channel, tmp_path, console
):
    """A partner's staff sign in with its gateway token: its row only, its letters only;
    another partner's letters and any replay or purge are 403; a revoked token ends the
    session."""
    url, settings = console
    run = await scripted_run(bus, channel)
    token = issue_token(settings.gateway_tokens_path, run.target)
    other = run.agency
    dlq = bus.topology.dlq_name(bus.topology.signal_queue.name)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        assert (
            await client.post("/login", data={"role": "partner", "token": "x" * 43})
        ).status_code == 401
        await sign_in_partner(client, token)
        page = (await client.get("/")).text
        assert f'id="partner-{run.target}"' in page
        assert page.count('<tr id="partner-') == 1
        assert f'id="partner-{other}"' not in page
        assert 'id="queues"' not in page and 'id="dead-letters"' not in page
        assert bus.topology.signal_queue.name not in page
        assert (await client.get(f"/letters?partner={other}")).status_code == 403
        own = await client.get(f"/letters?partner={run.target}")
        assert own.status_code == 200 and run.bad_message_id not in own.text
        token_field = csrf_of(page)
        for action in ("/letters/replay", "/letters/purge"):
            refused = await client.post(
                action, data={"queue": dlq, "message_id": run.bad_message_id, "csrf": token_field}
            )
            assert refused.status_code == 403
        assert await depth(bus, dlq) == 1  # untouched
        assert (await client.get("/metrics")).status_code == 401  # not the partner's
        revoke_token(settings.gateway_tokens_path, run.target)
        after = await client.get("/")
        assert after.status_code == 303 and after.headers["location"] == "/login"
    await run.agency_inbox.close()


async def test_the_partner_rows_match_an_independent_count_and_name_the_idle_queue(
    bus, channel, console
):
    """After a scripted run: the target partner's row (received, queued, consumers,
    accepted, rejected, awaiting, sent) equals what SQL and a passive declare say; the
    page alerts that its queue has no consumer (and not the agency's, which has one); the
    source's received count; the parked need under its agency; metrics per partner."""
    url, _ = console
    run = await scripted_run(bus, channel)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        await sign_in_ops(client)
        page = (await client.get("/figures")).text
        metrics = (await client.get("/metrics", auth=(OPS_USER, OPS_PASSWORD))).text
    count = await independent_count(bus, channel, run.target)
    assert count.accepted == 1 and count.rejected == 1 and count.awaiting == 1
    assert cell(page, run.target, "queued") == str(count.queued)
    assert cell(page, run.target, "consumers") == str(count.consumers) == "0"
    assert cell(page, run.target, "accepted") == str(count.accepted)
    assert cell(page, run.target, "rejected") == str(count.rejected)
    assert cell(page, run.target, "awaiting") == str(count.awaiting)
    assert cell(page, run.target, "sent") == str(count.sent)
    assert "full 1" in page
    source = await independent_count(bus, channel, "lmh-recouvrement")
    assert cell(page, "lmh-recouvrement", "received") == str(source.received) == "4"
    assert f'data-kind="no-consumer" data-partner="{run.target}"' in page
    assert f'data-kind="no-consumer" data-partner="{run.agency}"' not in page
    assert cell(page, run.agency, "consumers") == "1"
    assert f'<tr data-agency="{run.agency}"><td>{run.agency}</td><td>1</td>' in page
    assert f'<tr class="parked-need" data-signal="{run.parked_signal}">' in page
    assert f'partnerbus_partner_queue_consumers{{partner="{run.target}"}} 0.0' in metrics
    assert (
        f'partnerbus_partner_referrals{{partner="{run.target}",status="accepted"}} 1.0' in metrics
    )
    assert f'partnerbus_partner_rejected{{partner="{run.target}",reason="full"}} 1.0' in metrics
    assert 'partnerbus_alerts{kind="no-consumer"}' in metrics
    await run.agency_inbox.close()


async def test_alerts_dead_letters_rising_an_old_message_and_a_failed_scheduler_pass(
    bus, channel, tmp_path
):
    """A second dead letter between two snapshots: 'rising'; an oldest referral older
    than the threshold; a scheduler pass that failed, recorded in the ledger."""
    settings = console_settings(bus, tmp_path, ops_oldest_message_alert_s=0.001)
    web = create_ops_app(settings, bus.directory, bus.store)
    t = bus.topology
    run = await scripted_run(bus, channel)
    async with serving(web) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        await sign_in_ops(client)
        first = (await client.get("/figures")).text
        assert 'data-kind="dead-letters-rising"' not in first
        assert f'data-kind="old-message" data-partner="{run.target}"' in first
        assert 'data-kind="scheduler"' not in first
        await publish(channel, t.signals.name, b"{nope", routing_key="x", message_id="bad-2")
        dlq = t.dlq_name(t.signal_queue.name)

        async def two() -> bool:
            return await depth(bus, dlq) == 2

        await wait_until(two, timeout=20)
        # one pass of the service's own scheduler loop, failing
        import asyncio

        stop = asyncio.Event()

        async def failing_tick() -> dict[str, int]:
            stop.set()  # this pass is the last of the loop
            raise RuntimeError("the database is away")

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(bus, "tick", failing_tick)
            patch.setattr(bus, "_stop", stop)
            await asyncio.wait_for(bus._scheduler(), 10)
        assert bus.store.count("audit", action="scheduler-pass-failed") == 1
        second = (await client.get("/figures")).text
        assert 'data-kind="dead-letters-rising"' in second
        assert "dead letters rising: 1 → 2" in second
        assert 'data-kind="scheduler"' in second
    await run.agency_inbox.close()


async def test_replay_and_purge_from_the_page_go_through_dlq_and_are_audited(bus, channel, console):
    """The replay button sends the letter back to its intake queue (the service decides it
    again: here a second refusal); the purge button deletes it; both audited under the ops
    sign-in, like `partnerbus dlq`."""
    url, _ = console
    t = bus.topology
    dlq = t.dlq_name(t.signal_queue.name)
    await publish(channel, t.signals.name, b"{broken", routing_key="x", message_id="bad-r")

    async def depth_is(n: int) -> bool:
        return await depth(bus, dlq) == n

    await bus.wait_verdicts(1)
    await wait_until(lambda: depth_is(1), timeout=20)
    before = len(bus.verdicts)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        await sign_in_ops(client)
        shown: list[str] = []

        async def listed() -> bool:
            # a retention pass may hold the letter unacked for a moment (it reads the
            # dead-letter queues too): the page shows it at the next snapshot
            shown[:] = [(await client.get("/letters")).text]
            return 'data-message-id="bad-r"' in shown[0]

        await wait_until(listed, timeout=20)
        letters = shown[0]
        assert "not JSON" in letters
        token = csrf_of(letters)
        replayed = await client.post(
            "/letters/replay", data={"queue": dlq, "message_id": "bad-r", "csrf": token}
        )
        assert replayed.status_code == 303 and "bad-r%20replayed" in replayed.headers["location"]
        await bus.wait_verdicts(before + 1)  # it went back to the intake queue
        await wait_until(lambda: depth_is(1), timeout=20)  # and died again, still broken
        assert bus.store.count("audit", action="dead-letter-replayed", subject="bad-r") == 1
        purged = await client.post(
            "/letters/purge", data={"queue": dlq, "message_id": "bad-r", "csrf": token}
        )
        assert purged.status_code == 303 and "bad-r%20purged" in purged.headers["location"]
        await wait_until(lambda: depth_is(0), timeout=20)
        assert bus.store.count("audit", action="dead-letter-purged", subject="bad-r") == 1
        assert (await client.get("/letters")).text.count("data-message-id=") == 0


def test_a_session_lasts_its_max_age():
    from partnerbus.ops.session import session_key, verify

    key = session_key(OPS_PASSWORD)
    cookie = sign(new_session("ops", None, 60), key)
    assert verify(cookie, key) is not None
    later = verify(
        cookie, key, now=timedelta(minutes=2).total_seconds() + __import__("time").time()
    )
    assert later is None


async def test_ops_status_shows_the_same_rows_and_alerts_at_the_terminal(
    bus, channel, cli_env, monkeypatch
):
    """`partnerbus ops status` prints the partner rows and the alerts; `--watch` keeps
    them on screen over one AMQP connection, refreshed every `--interval`, until Ctrl-C."""
    import asyncio

    from typer.testing import CliRunner

    from partnerbus.entrypoints import cli
    from partnerbus.ops import monitor, terminal

    run = await scripted_run(bus, channel)
    runner = CliRunner()
    monkeypatch.setenv("COLUMNS", "250")
    once = await asyncio.to_thread(runner.invoke, cli.app, ["ops", "status"])
    assert once.exit_code == 0, once.output
    assert "no consumer on" in once.output and run.target in once.output
    line = next(x for x in once.output.splitlines() if f"│ {run.target} " in x)
    cells = [c.strip() for c in line.split("│")[1:-1]]
    count = await independent_count(bus, channel, run.target)
    assert cells[3] == str(count.queued) and cells[5] == "0"  # queued, consumers
    assert cells[8] == "1" and cells[9].startswith("1 (full 1)")  # accepted, rejected

    frames: list[int] = []
    real_probe = monitor.BrokerProbe
    probes: list[monitor.BrokerProbe] = []

    class CountingProbe(real_probe):  # type: ignore[misc, valid-type]
        def __init__(self, url: str) -> None:
            super().__init__(url)
            probes.append(self)

    async def two_frames(seconds: float) -> None:
        frames.append(int(seconds))
        if len(frames) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(monitor, "BrokerProbe", CountingProbe)
    monkeypatch.setattr(terminal, "pause", two_frames)
    try:
        watched = await asyncio.to_thread(
            runner.invoke, cli.app, ["ops", "status", "--watch", "--interval", "7"]
        )
    finally:
        monkeypatch.undo()
    assert watched.exit_code == 0, watched.output
    assert frames == [7, 7]
    assert len(probes) == 1 and probes[0].connections == 1
    assert watched.output.count("partners") >= 2 and run.target in watched.output
    await run.agency_inbox.close()


async def test_the_service_process_counts_handler_latencies_and_verdicts(bus, channel):
    """The service's own registry (served on `metrics_port`): FastStream's Prometheus
    middleware times each handler (labelled by exchange and routing key, i.e. the
    sender), and the intake counts its verdicts per queue."""
    from prometheus_client import REGISTRY, generate_latest

    t = bus.topology
    await publish(channel, t.signals.name, b"{nope", routing_key="x", message_id="m-lat")
    await bus.wait_verdicts(1)
    text = generate_latest(REGISTRY).decode()
    assert "faststream_received_processed_messages_duration_seconds_bucket{" in text
    # FastStream names the handler by exchange and routing key: the sender's partner id
    assert f'handler="{t.signals.name}.x"' in text
    assert 'app_name="partnerbus"' in text
    assert 'partnerbus_intake_verdicts_total{outcome="refused",queue="intake.signals"}' in text


async def test_a_letter_that_died_in_a_partners_queue_is_its_own_and_goes_back_by_the_outbox(
    bus, channel, connection, console
):
    """The partner's system refuses its referral (reject, no requeue): the letter is in its
    row and its staff's letter list, not in another partner's; ops replay it from the page,
    through the outbox (the referral still awaits that partner), and it is back in the
    partner's queue."""
    url, settings = console
    run = await scripted_run(bus, channel)
    t = bus.topology
    queue_name = t.partner_queue_name(run.target)
    plain = await connection.channel()
    queue = await plain.declare_queue(queue_name, passive=True)
    waiting = next(
        r for r in bus.store.referrals() if r.partner_id == run.target and r.status == "delivered"
    )
    refused_id = None
    for _ in range(10):  # the others stay unacked, back in the queue when the channel closes
        message = await queue.get(no_ack=False, fail=False)
        assert message is not None
        if message.type == "referral" and waiting.referral_id in message.body.decode():
            refused_id = message.message_id
            await message.reject(requeue=False)
            break
    await plain.close()
    assert refused_id is not None
    partner_dlq = t.dlq_name(queue_name)

    async def dead() -> bool:
        return await depth(bus, partner_dlq) == 1

    await wait_until(dead, timeout=20)
    token = issue_token(settings.gateway_tokens_path, run.target)
    other_token = issue_token(settings.gateway_tokens_path, run.agency)
    async with (
        httpx.AsyncClient(base_url=url, timeout=30) as staff,
        httpx.AsyncClient(base_url=url, timeout=30) as other,
        httpx.AsyncClient(base_url=url, timeout=30) as ops,
    ):
        await sign_in_partner(staff, token)
        await sign_in_partner(other, other_token)
        shown: list[str] = []

        async def listed() -> bool:
            shown[:] = [(await staff.get("/letters")).text]
            return f'data-message-id="{refused_id}"' in shown[0]

        await wait_until(listed, timeout=20)
        assert "button" not in shown[0].split('<table id="letters">')[1]  # no replay for staff
        assert cell((await staff.get("/figures")).text, run.target, "dead-lettered") == "1"
        assert f'data-message-id="{refused_id}"' not in (await other.get("/letters")).text
        await sign_in_ops(ops)
        page = (await ops.get("/letters")).text
        replayed = await ops.post(
            "/letters/replay",
            data={"queue": partner_dlq, "message_id": refused_id, "csrf": csrf_of(page)},
        )
        assert replayed.status_code == 303
        assert "replayed" in replayed.headers["location"], replayed.headers["location"]

    async def gone() -> bool:
        return await depth(bus, partner_dlq) == 0

    await wait_until(gone, timeout=20)
    assert bus.store.count("audit", action="dead-letter-replayed", subject=refused_id) == 1
    await run.agency_inbox.close()


async def test_guessing_at_the_login_form_is_slowed_down(bus, console):
    """Ten attempts a minute per client address, right or wrong: the eleventh gets 429
    and no session, even with the right password."""
    url, _ = console
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        for i in range(10):
            wrong = await client.post(
                "/login", data={"role": "ops", "user": OPS_USER, "password": f"guess-{i:020d}"}
            )
            assert wrong.status_code == 401
        right = await client.post(
            "/login", data={"role": "ops", "user": OPS_USER, "password": OPS_PASSWORD}
        )
        assert right.status_code == 429 and COOKIE not in right.cookies
        partner = await client.post("/login", data={"role": "partner", "token": "x" * 43})
        assert partner.status_code == 429
