"""FastStream describes the bus from the subscribers' typed handlers (its AsyncAPI document)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from faststream.specification import AsyncAPI

from partnerbus.entrypoints.bootstrap import create_app
from partnerbus.settings import Settings
from tests.keys import TEST_KEY


def _document(tmp_path: Path) -> dict[str, Any]:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'ledger.db'}", pseudonym_key=TEST_KEY, prefix="doc"
    )
    bus = create_app(settings)  # nothing connects: the document comes from the code
    try:
        spec = AsyncAPI(bus.broker, title="partnerbus", version="1").to_specification()
        document: dict[str, Any] = spec.to_jsonable()
        return document
    finally:
        bus.store.dispose()


def _payload_refs(document: dict[str, Any], channel: str) -> set[str]:
    """The schemas a channel's message payload names (one model, or a union of them)."""
    messages = document["components"]["messages"]
    (message,) = (m for name, m in messages.items() if name.startswith(channel))
    ref = message["payload"]["$ref"].rsplit("/", 1)[-1]
    union = document["components"]["schemas"][ref].get("oneOf")
    return {r["$ref"].rsplit("/", 1)[-1] for r in union} if union else {ref}


def test_every_intake_queue_is_a_channel_whose_payload_is_its_message_kinds(tmp_path: Path) -> None:
    """The AsyncAPI document lists each intake queue with the pydantic models its handler takes: signals (routine and urgent), statuses and capacity, consents and the advisor's decisions."""
    document = _document(tmp_path)
    channels = set(document["channels"])
    for queue in (
        "intake.signals:",
        "intake.signals.urgent:",
        "intake.statuses:",
        "intake.consents:",
    ):
        assert any(c.startswith(f"doc.{queue}") for c in channels), queue
    assert _payload_refs(document, "doc.intake.signals:") == {"Signal"}
    assert _payload_refs(document, "doc.intake.signals.urgent:") == {"Signal"}
    assert _payload_refs(document, "doc.intake.statuses:") == {
        "ReferralStatusChanged",
        "CapacityChanged",
    }
    assert _payload_refs(document, "doc.intake.consents:") == {
        "ConsentGranted",
        "ConsentRefused",
        "ConsentRevoked",
        "ReferralCancelled",
        "NeedDirected",
        "ReferralTransferred",
        "NeedReopened",
        "OrientationRecorded",
    }
    assert "person_ref" in document["components"]["schemas"]["Signal"]["properties"]
