"""The published JSON Schemas: current, valid, and in agreement with the models."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from partnerbus.contract import CATALOG, load_schemas, stale_schemas
from partnerbus.contract.compat import compare, unbumped_breaks
from partnerbus.contract.schemas import SCHEMA_DIR
from partnerbus.schemas import ReferralStatusChanged, Signal
from partnerbus.schemas.base import ACCEPTED_SCHEMA_VERSIONS, SCHEMA_VERSION

NOW = "2026-11-23T09:00:00+01:00"


def test_the_committed_schemas_are_what_the_code_generates() -> None:
    """docs/schemas/ is regenerated and compared: a model changed without `partnerbus contract export` fails here."""
    assert stale_schemas() == []


def test_a_changed_or_extra_schema_file_is_reported_stale(tmp_path: Path) -> None:
    """The check is not vacuous: an edited file and a left-over file are both named."""
    for path in SCHEMA_DIR.glob("*.schema.json"):
        (tmp_path / path.name).write_text(path.read_text())
    (tmp_path / "signal.schema.json").write_text("{}\n")
    (tmp_path / "gone.schema.json").write_text("{}\n")
    assert stale_schemas(tmp_path) == ["signal.schema.json", "gone.schema.json"]


def test_every_message_of_the_catalogue_has_a_valid_draft_2020_12_schema() -> None:
    schemas = load_schemas()
    assert set(schemas) == {entry.type for entry in CATALOG}
    for schema in schemas.values():
        Draft202012Validator.check_schema(schema)
        assert schema["x-partnerbus-contract-version"] == SCHEMA_VERSION


def _status(**fields: Any) -> dict[str, Any]:
    return {
        "message_id": "st-1",
        "occurred_at": NOW,
        "schema_version": SCHEMA_VERSION,
        "type": "referral-status-changed",
        "referral_id": "ref-1",
        "partner": "ccas-roubaix",
        **fields,
    }


@pytest.mark.parametrize(
    ("body", "valid"),
    [
        (_status(status="completed", outcome="FSL file sent"), True),
        (_status(status="completed"), False),
        (_status(status="completed", outcome=""), False),
        # the bus's copy to the source: no outcome, the signal named
        (_status(status="completed", signal_id="sig-1", need="logement-hebergement"), True),
        (_status(status="rejected"), False),
        (_status(status="rejected", reason="full"), True),
        (_status(status="accepted"), True),
        (_status(status="accepted", schema_version=1), True),
        (_status(status="accepted", schema_version=3), False),
    ],
)
def test_the_schema_and_the_model_agree_on_the_status_rules(
    body: dict[str, Any], valid: bool
) -> None:
    """What pydantic accepts the published schema accepts, and the other way round: the forwarded completion without its outcome included."""
    schema = load_schemas()["referral-status-changed"]
    schema_says = not list(Draft202012Validator(schema).iter_errors(body))
    try:
        ReferralStatusChanged.model_validate(body)
        model_says = True
    except ValidationError:
        model_says = False
    assert (schema_says, model_says) == (valid, valid)


def test_a_person_reference_that_is_an_email_fails_the_schema_too() -> None:
    schema = load_schemas()["signal"]
    body = {
        "type": "signal",
        "message_id": "sig-1",
        "occurred_at": NOW,
        "source": "lmh-recouvrement",
        "person_ref": "jeanne.dupont@example.org",
        "commune": "59512",
        "needs": ["logement-hebergement"],
    }
    assert list(Draft202012Validator(schema).iter_errors(body))
    body["person_ref"] = "T-0042"
    assert not list(Draft202012Validator(schema).iter_errors(body))
    Signal.model_validate(body)


def test_an_unknown_version_is_refused_with_the_versions_accepted() -> None:
    accepted = ", ".join(map(str, ACCEPTED_SCHEMA_VERSIONS))
    with pytest.raises(ValidationError, match=f"it accepts {accepted}"):
        ReferralStatusChanged.model_validate(_status(status="accepted", schema_version=9))


# --- compatibility with the last release ------------------------------------------------


def _pair(direction: str) -> tuple[dict[str, Any], dict[str, Any]]:
    schema = copy.deepcopy(load_schemas()["referral-status-changed"])
    schema["x-partnerbus-direction"] = direction
    return schema, copy.deepcopy(schema)


@pytest.mark.parametrize(
    ("direction", "edit", "breaking"),
    [
        ("inbound", lambda s: s["properties"].pop("note"), True),
        ("outbound", lambda s: s["properties"].pop("note"), True),
        ("inbound", lambda s: s["properties"].update(extra={"type": "string"}), False),
        (
            "inbound",
            lambda s: (
                s["properties"].update(extra={"type": "string"}),
                s["required"].append("extra"),
            ),
            True,
        ),
        ("outbound", lambda s: s["properties"].update(extra={"type": "string"}), False),
        ("outbound", lambda s: s["required"].remove("partner"), True),
        ("inbound", lambda s: s["required"].remove("partner"), False),
        ("inbound", lambda s: s["properties"]["reason"]["anyOf"][0]["enum"].pop(), True),
        ("outbound", lambda s: s["properties"]["reason"]["anyOf"][0]["enum"].pop(), False),
        ("outbound", lambda s: s["properties"]["reason"]["anyOf"][0]["enum"].append("moved"), True),
        ("inbound", lambda s: s["properties"]["reason"]["anyOf"][0]["enum"].append("moved"), False),
    ],
)
def test_a_change_breaks_by_who_sends_the_message(
    direction: str, edit: Any, breaking: bool
) -> None:
    """Removing a field breaks everyone; a new required field breaks senders; a new value breaks readers."""
    old, new = _pair(direction)
    edit(new)
    changes = compare({"s": old}, {"s": new})
    assert changes
    assert any(c.breaking for c in changes) == breaking, changes


def test_a_breaking_change_fails_unless_the_version_was_bumped() -> None:
    old, new = _pair("both")
    new["properties"].pop("note")
    assert unbumped_breaks({"s": old}, {"s": new})
    new["x-partnerbus-contract-version"] = old["x-partnerbus-contract-version"] + 1
    assert unbumped_breaks({"s": old}, {"s": new}) == []


def test_the_contract_is_compatible_with_the_last_release_or_bumped() -> None:
    """What CI checks: docs/schemas/ against docs/schemas/released/."""
    released = load_schemas(SCHEMA_DIR / "released")
    assert released
    assert unbumped_breaks(released, load_schemas()) == []
