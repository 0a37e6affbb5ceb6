"""The advisor's and ops' command line, against the running bus and its record."""

from __future__ import annotations

import asyncio

import pytest
from typer.testing import CliRunner

from partnerbus.entrypoints.cli import _mount_optional, app
from partnerbus.testing import Inbox

from .helpers import ARREARS, ROUBAIX, new_id, publish, signal

pytestmark = pytest.mark.rabbitmq

_mount_optional()
runner = CliRunner()


async def invoke(*args: str):
    return await asyncio.to_thread(runner.invoke, app, list(args))


async def test_an_advisor_grants_consent_from_the_command_line_and_the_parked_signal_leaves(
    cli_env, channel
):
    """`consent grant` releases a parked signal; `consent list` shows the consent and is audited."""
    bus = cli_env
    t = bus.topology
    agency = bus.directory.agency_for(ROUBAIX).id
    advisor = await Inbox.open(channel, t.partner_queue_name(agency))
    person = new_id("T")
    body = signal(person=person)
    await publish(channel, f"{t.prefix}.signals", body, routing_key="lmh-recouvrement")
    await advisor.expect_kind("consent-requested")

    before = len(bus.verdicts)
    result = await invoke(
        "consent",
        "grant",
        "--person",
        person,
        "--agency",
        agency,
        "--by",
        "s.benali",
        "--needs",
        "logement-hebergement",
        "--kinds",
        "ccas-cias,maisons-des-solidarites",
        "--method",
        "paper",
        "--duration",
        "1m",
    )
    assert result.exit_code == 0, result.output
    assert "consent consent-" in result.output
    await bus.wait_verdicts(before + 1)
    await bus.relay.flush()
    assert bus.store.count("referrals", signal_id=body["message_id"]) == 1

    listed = await invoke("consent", "list", "--person", person, "--by", "s.benali")
    assert listed.exit_code == 0, listed.output
    assert "paper" in listed.output
    assert "valid" in listed.output
    actions = [r.action for r in bus.store.audit_trail(person)]
    assert "consent-granted" in actions
    assert "referral-disclosed" in actions
    assert "consents-read" in actions

    timeline = await invoke("referrals", "timeline", person, "--by", "ops.tester")
    assert timeline.exit_code == 0, timeline.output
    assert "signal-received" in timeline.output
    assert "referral-disclosed" in timeline.output


async def test_the_command_line_refuses_bad_consent_input_with_a_clear_error(cli_env):
    """An unknown duration, an unknown need or a scope without partners is an error, not a consent."""
    base = (
        "consent",
        "grant",
        "--person",
        "T-cli-1",
        "--agency",
        "lmh-agence-roubaix",
        "--by",
        "s.benali",
    )
    wrong_duration = await invoke(*base, "--needs", ARREARS, "--kinds", "caf", "--duration", "2w")
    assert wrong_duration.exit_code == 2
    assert "2w" in wrong_duration.output
    unknown_need = await invoke(*base, "--needs", "logement-hebergement--voler", "--kinds", "caf")
    assert unknown_need.exit_code == 2
    assert "unknown need" in unknown_need.output
    nobody = await invoke(*base, "--needs", ARREARS)
    assert nobody.exit_code == 2
    assert "partner kinds or partners" in nobody.output
    odd_kind = await invoke(*base, "--needs", ARREARS, "--kinds", "not-a-kind")
    assert odd_kind.exit_code == 2
    assert "not-a-kind" in odd_kind.output
    assert "known kinds" in odd_kind.output
    stranger = await invoke(*base, "--needs", ARREARS, "--partners", "ghost-partner")
    assert stranger.exit_code == 2
    assert "unknown partner(s): ghost-partner" in stranger.output
    elsewhere = await invoke(
        "consent",
        "grant",
        "--person",
        "T-cli-1",
        "--agency",
        "nowhere",
        "--by",
        "s.benali",
        "--needs",
        ARREARS,
        "--kinds",
        "caf",
    )
    assert elsewhere.exit_code == 2
    assert "unknown agency 'nowhere'" in elsewhere.output
    not_a_pivot = await invoke(
        "consent", "grant", "--person", "T-cli-1", "--agency", "ccas-roubaix", "--by", "ccas",
        "--needs", ARREARS, "--kinds", "caf",
    )  # fmt: skip
    assert not_a_pivot.exit_code == 2
    assert "no social advisors" in not_a_pivot.output
    not_hers = await invoke(
        "consent", "grant", "--person", "T-cli-1", "--agency", "lmh-agence-roubaix",
        "--by", "a.martin", "--needs", ARREARS, "--kinds", "caf",
    )  # fmt: skip
    assert not_hers.exit_code == 2
    assert "'a.martin' is not an advisor of lmh-agence-roubaix" in not_hers.output
    unknown = await invoke(
        "consent", "revoke", "consent-nope", "--agency", "lmh-agence-roubaix", "--by", "s.benali"
    )
    assert unknown.exit_code == 2
    assert "no consent consent-nope" in unknown.output
    assert cli_env.store.count("consents") == 0


async def test_the_command_line_says_when_the_broker_cannot_be_reached(cli_env, monkeypatch):
    """With no broker at the configured address, `consent grant` fails with a clear message and exit code 2, not a traceback."""
    monkeypatch.setenv("PARTNERBUS_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/")
    result = await invoke(
        "consent",
        "grant",
        "--person",
        "T-cli-2",
        "--agency",
        "lmh-agence-roubaix",
        "--by",
        "s.benali",
        "--needs",
        ARREARS,
        "--kinds",
        "caf",
    )
    assert result.exit_code == 2, result.output
    assert "did not take the message" in result.output
    assert "rabbitmq-server" in result.output
    assert "Traceback" not in result.output


async def test_ops_list_and_replay_dead_letters_from_the_command_line(cli_env, channel):
    """`dlq list` shows a refused message with its reason; `dlq replay` sends it back and audits it."""
    bus = cli_env
    t = bus.topology
    await publish(channel, t.signals.name, b"{broken", routing_key="x", message_id="cli-bad-1")
    await bus.wait_verdicts(1)
    listed = await invoke("dlq", "list")
    assert listed.exit_code == 0, listed.output
    assert "cli-bad-1" in listed.output
    assert "not JSON" in listed.output

    before = len(bus.verdicts)
    replayed = await invoke("dlq", "replay", "cli-bad-1", "--by", "ops.tester")
    assert replayed.exit_code == 0, replayed.output
    assert "replayed 1 message(s)" in replayed.output
    (verdict,) = (await bus.wait_verdicts(before + 1))[before:]
    assert verdict.outcome == "refused", "still broken: it goes back to the dead letters"
    assert [r.action for r in bus.store.audit_trail("cli-bad-1")] == ["dead-letter-replayed"]


async def test_an_advisor_revokes_a_consent_from_the_command_line(cli_env, channel):
    """`consent revoke` withdraws the referral made under it."""
    bus = cli_env
    t = bus.topology
    agency = bus.directory.agency_for(ROUBAIX).id
    person = new_id("T")
    granted = await invoke(
        "consent",
        "grant",
        "--person",
        person,
        "--agency",
        agency,
        "--by",
        "s.benali",
        "--needs",
        "logement-hebergement",
        "--kinds",
        "ccas-cias,maisons-des-solidarites",
    )
    assert granted.exit_code == 0, granted.output
    consent_id = granted.stdout.split()[1]
    await bus.wait_verdicts(1)
    inbox = await Inbox.open(
        channel, t.partner_queue_name(bus.directory.partner("ccas-roubaix").id)
    )
    await publish(channel, t.signals.name, signal(person=person), routing_key="lmh-recouvrement")
    await inbox.expect_kind("referral")
    revoked = await invoke(
        "consent", "revoke", consent_id, "--agency", agency, "--by", "s.benali", "--reason", "asked"
    )
    assert revoked.exit_code == 0, revoked.output
    withdrawn = await inbox.expect_kind("referral-withdrawn")
    assert withdrawn.body["reason"] == "consent-revoked"
    again = await invoke("consent", "revoke", consent_id, "--agency", agency, "--by", "s.benali")
    assert again.exit_code == 2
    assert "already revoked" in again.output


async def test_purging_dead_letters_asks_for_confirmation_then_audits_each(cli_env, channel):
    """`dlq purge` refuses without --yes; with it, the messages are gone and each is audited."""
    bus = cli_env
    await publish(
        channel, bus.topology.signals.name, b"[1, 2", routing_key="x", message_id="cli-bad-2"
    )
    await bus.wait_verdicts(1)
    refused = await invoke("dlq", "purge", "--by", "ops.tester")
    assert refused.exit_code == 2
    purged = await invoke("dlq", "purge", "--by", "ops.tester", "--yes")
    assert purged.exit_code == 0, purged.output
    assert "purged 1 message(s)" in purged.output
    assert "no dead letters" in (await invoke("dlq", "list")).output
    assert [r.action for r in bus.store.audit_trail("cli-bad-2")] == ["dead-letter-purged"]


async def test_the_health_check_sees_the_running_service_and_its_absence(cli_env, monkeypatch):
    """`partnerbus health` exits 0 while the bus consumes, 1 with a reason for a prefix nobody serves."""
    healthy = await invoke("health")
    assert healthy.exit_code == 0, healthy.output
    assert "4 consumers on the intake queues" in healthy.output  # urgent signals too
    monkeypatch.setenv("PARTNERBUS_PREFIX", "nobody-serves-this")
    unhealthy = await invoke("health")
    assert unhealthy.exit_code == 1
    assert "never started" in unhealthy.output


async def test_ops_read_one_dead_letter_and_replay_them_all_after_a_fix(cli_env, channel):
    """`dlq show` prints one dead letter's reason, headers and body and audits the read; `dlq replay --all` sends every dead letter back and audits each."""
    bus = cli_env
    t = bus.topology
    for n in (1, 2):
        await publish(
            channel, t.signals.name, b'{"half": ', routing_key="x", message_id=f"cli-all-{n}"
        )
    await bus.wait_verdicts(2)

    shown = await invoke("dlq", "show", "cli-all-1", "--by", "ops.reader")
    assert shown.exit_code == 0, shown.output
    assert "not JSON" in shown.output
    assert '{"half": ' in shown.output
    assert "partnerbus-error" in shown.output
    assert [r.action for r in bus.store.audit_trail("cli-all-1")] == ["dead-letter-read"]
    missing = await invoke("dlq", "show", "cli-nothing", "--by", "ops.reader")
    assert missing.exit_code == 1
    assert "no dead letter cli-nothing" in missing.output

    nothing_named = await invoke("dlq", "replay", "--by", "ops.tester")
    assert nothing_named.exit_code == 2
    before = len(bus.verdicts)
    replayed = await invoke("dlq", "replay", "--all", "--by", "ops.tester")
    assert replayed.exit_code == 0, replayed.output
    assert "replayed 2 message(s)" in replayed.output
    await bus.wait_verdicts(before + 2)
    for n in (1, 2):
        actions = [r.action for r in bus.store.audit_trail(f"cli-all-{n}")]
        assert "dead-letter-replayed" in actions
