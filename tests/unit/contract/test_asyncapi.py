"""The AsyncAPI document: current, complete, and pointing at the committed JSON Schemas."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from partnerbus.broker.topology import ERROR_HEADER, ERROR_QUEUE_HEADER, Topology
from partnerbus.contract import CATALOG
from partnerbus.contract.asyncapi import (
    ASYNCAPI_FILE,
    PREFIX,
    AsyncAPIError,
    _entries,
    asyncapi_is_current,
    build_document,
    render_asyncapi,
)
from partnerbus.contract.schemas import SCHEMA_DIR
from partnerbus.entrypoints.contract_cli import app

Node = dict[str, Any]
VALIDATOR = Path(__file__).resolve().parents[3] / "tools" / "asyncapi-validate"


@pytest.fixture(scope="module")
def document() -> Node:
    built: Node = build_document()
    return built


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _messages_of(document: Node, channel: str) -> set[str]:
    return set(document["channels"][channel]["messages"])


def test_the_committed_document_is_what_the_code_generates() -> None:
    """docs/asyncapi.yaml is regenerated and compared: a subscriber, topology or message changed without `partnerbus contract asyncapi` fails here."""
    assert asyncapi_is_current(), "run `partnerbus contract asyncapi` and commit docs/asyncapi.yaml"


def test_the_committed_file_parses_as_the_document() -> None:
    """The YAML written is the document built (no anchors, nothing lost in the dump)."""
    assert yaml.safe_load(ASYNCAPI_FILE.read_text("utf-8")) == build_document()


def test_the_document_describes_the_code_whatever_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A deployment's settings (prefix, delivery limit) do not leak into the committed document."""
    monkeypatch.setenv("PARTNERBUS_PREFIX", "elsewhere")
    monkeypatch.setenv("PARTNERBUS_DELIVERY_LIMIT", "9")
    monkeypatch.setenv("PARTNERBUS_AMQP_URL", "amqp://someone:secret@broker.example:5672/")
    assert render_asyncapi() == ASYNCAPI_FILE.read_text("utf-8")


def test_every_intake_queue_partner_delivery_and_dead_letter_is_a_channel_with_its_operation(
    document: Node,
) -> None:
    """Intake queues (received), partner deliveries and dead letters (sent), the retries and the workers' broadcast: each a channel with one operation."""
    assert document["asyncapi"] == "3.0.0"
    expected = {
        "signals": "receive",
        "signals.urgent": "receive",
        "statuses": "receive",
        "consents": "receive",
        "directory-updates": "receive",
        "deliveries": "send",
        "dead-letters": "send",
        "retries": "send",
    }
    assert set(document["channels"]) == set(expected)
    actions = {
        op["channel"]["$ref"].removeprefix("#/channels/"): op["action"]
        for op in document["operations"].values()
    }
    assert actions == expected
    t = Topology(PREFIX)
    queues = {
        key: document["channels"][key]["bindings"]["amqp"]["queue"]["name"]
        for key in ("signals", "signals.urgent", "statuses", "consents")
    }
    assert queues == {
        "signals": t.signal_queue.name,
        "signals.urgent": t.urgent_signal_queue.name,
        "statuses": t.status_queue.name,
        "consents": t.consent_queue.name,
    }


def test_the_messages_are_those_of_the_catalogue_on_the_right_channels(document: Node) -> None:
    """Partners publish the inbound messages to the intake channels and receive the outbound ones on their queue; every contract message is named by its type."""
    inbound = {e.type for e in CATALOG if e.inbound}
    outbound = {e.type for e in CATALOG if e.outbound}
    received = set().union(
        *(_messages_of(document, c) for c in ("signals", "signals.urgent", "statuses", "consents"))
    )
    assert received == inbound
    assert _messages_of(document, "deliveries") == outbound
    assert _messages_of(document, "signals.urgent") == {"signal"}
    assert _messages_of(document, "consents") == {
        "consent-granted",
        "consent-refused",
        "consent-revoked",
        "referral-cancelled",
        "need-directed",
        "referral-transferred",
        "need-reopened",
        "orientation-recorded",
    }
    assert _messages_of(document, "directory-updates") == {"capacity-changed"}
    assert set(document["components"]["messages"]) == {e.type for e in CATALOG} | {
        "dead-letter",
        "retry",
    }
    for entry in CATALOG:
        message = document["components"]["messages"][entry.type]
        assert message["bindings"]["amqp"]["messageType"] == entry.type
        assert message["x-direction"] == entry.direction


def test_every_message_payload_refers_to_a_committed_schema_file(document: Node) -> None:
    """Bodies are not copied inline: each payload names files under docs/schemas/, relative to the document, and they exist."""
    assert "schemas" not in document["components"]
    for name, message in document["components"]["messages"].items():
        refs = list(_refs(message["payload"]))
        assert refs, name
        for ref in refs:
            assert ref.startswith("schemas/"), (name, ref)
            assert (ASYNCAPI_FILE.parent / ref).is_file(), (name, ref)
            assert (SCHEMA_DIR / Path(ref).name).is_file()
    assert document["components"]["messages"]["signal"]["payload"] == {
        "$ref": "schemas/signal.schema.json"
    }
    dead = document["components"]["messages"]["dead-letter"]["payload"]["anyOf"]
    assert {r["$ref"] for r in dead if "$ref" in r} == {
        f"schemas/{e.type}.schema.json" for e in CATALOG
    }


def test_every_internal_ref_resolves(document: Node) -> None:
    """Channels, operations and messages point at one another by refs that exist."""
    for ref in _refs(document):
        if not ref.startswith("#/"):
            continue
        node: Any = document
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        assert isinstance(node, dict), ref


def test_the_rabbitmq_side_is_described(document: Node) -> None:
    """Exchanges, routing keys, quorum queues with their dead-letter route, persistent delivery, acks, the partner's user_id and the dead letters' headers are in the document."""
    t = Topology(PREFIX)
    signals = document["channels"]["signals"]["bindings"]["amqp"]
    assert signals["x-exchange"]["name"] == t.signals.name
    assert signals["x-exchange"]["type"] == "topic"
    assert signals["queue"]["x-arguments"] == dict(
        sorted(t.work_queue_arguments(t.signal_queue.name).items())
    )
    assert signals["queue"]["x-arguments"]["x-queue-type"] == "quorum"
    deliveries = document["channels"]["deliveries"]
    assert deliveries["address"] == "{partner}"
    assert deliveries["bindings"]["amqp"]["exchange"]["name"] == t.deliveries.name
    assert deliveries["bindings"]["amqp"]["x-queue"]["name"] == t.partner_queue_name("{partner}")
    assert document["channels"]["signals.urgent"]["address"] == "{partner}.urgent"
    for name, operation in document["operations"].items():
        amqp = operation["bindings"]["amqp"]
        assert amqp["deliveryMode"] == 2, name
        assert amqp["ack"] is True, name
    for name in ("receiveSignal", "receiveUrgentSignal", "receiveStatus", "receiveConsent"):
        assert document["operations"][name]["bindings"]["amqp"]["userId"] == "pb-{partner}"
    headers = document["components"]["messages"]["dead-letter"]["headers"]["properties"]
    assert {ERROR_HEADER, ERROR_QUEUE_HEADER, "x-death"} <= set(headers)
    description = document["info"]["description"]
    for words in ("user_id", "at least once", "publisher", "quorum", "message_id", "ack"):
        assert words in description.lower(), words


def test_a_handler_message_outside_the_contract_is_refused() -> None:
    """A subscriber that takes a model the catalogue does not list cannot be documented silently."""
    with pytest.raises(AsyncAPIError, match="Unknown is not a message of the contract"):
        _entries(["Signal", "Unknown"], "signals")


def test_the_check_command_fails_on_a_stale_document(tmp_path: Path) -> None:
    """`partnerbus contract asyncapi --check` exits 1 on a stale file, 0 once it is written."""
    path = tmp_path / "asyncapi.yaml"
    path.write_text("asyncapi: 3.0.0\n")
    runner = CliRunner()
    stale = runner.invoke(app, ["asyncapi", "--path", str(path), "--check"])
    assert stale.exit_code == 1
    assert "stale" in stale.output
    assert runner.invoke(app, ["asyncapi", "--path", str(path)]).exit_code == 0
    assert runner.invoke(app, ["asyncapi", "--path", str(path), "--check"]).exit_code == 0
    assert path.read_text("utf-8") == ASYNCAPI_FILE.read_text("utf-8")


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    node = shutil.which("node")
    if node is None or not (VALIDATOR / "node_modules" / "@asyncapi" / "parser").is_dir():
        if os.environ.get("CI"):
            pytest.fail("CI installs the AsyncAPI parser first (.ci/run): it is missing")
        pytest.skip("run `npm ci` in tools/asyncapi-validate for the AsyncAPI parser")
    return subprocess.run(
        [node, str(VALIDATOR / "validate.mjs"), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_asyncapi_parser_accepts_the_document_and_refuses_a_broken_one(
    tmp_path: Path,
) -> None:
    """The AsyncAPI project's parser passes docs/asyncapi.yaml, and fails (exit 1, naming the error) once a payload's schema file is missing: the CI step is not vacuous."""
    ok = _validate(ASYNCAPI_FILE)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    shutil.copytree(SCHEMA_DIR, tmp_path / "schemas")
    (tmp_path / "schemas" / "signal.schema.json").unlink()
    broken = tmp_path / "asyncapi.yaml"
    shutil.copy(ASYNCAPI_FILE, broken)
    result = _validate(broken)
    assert result.returncode == 1
    assert "signal.schema.json" in result.stdout
