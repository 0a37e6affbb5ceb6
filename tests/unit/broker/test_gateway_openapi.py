"""The gateway's OpenAPI document: generated from the code, committed in
docs/gateway-openapi.json, and true to what the gateway answers and accepts."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from partnerbus.entrypoints.cli import app
from partnerbus.entrypoints.gateway import openapi_document
from partnerbus.handlers.subscribers import SIGNAL, STATUS

COMMITTED = Path(__file__).parents[3] / "docs" / "gateway-openapi.json"
ROUTES = ("/v1/signals", "/v1/statuses", "/v1/consents")
REFUSALS = {"400", "401", "403", "413", "422", "429", "503"}
runner = CliRunner()


def _document() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(openapi_document())
    return document


def test_the_committed_document_is_the_one_the_code_generates():
    """docs/gateway-openapi.json is exactly what `partnerbus gateway openapi` prints: a change to the routes or the message models without regenerating it fails here."""
    assert COMMITTED.read_text(encoding="utf-8") == openapi_document(), (
        "regenerate it: partnerbus gateway openapi > docs/gateway-openapi.json"
    )


def test_the_openapi_command_prints_the_document_and_checks_a_file(tmp_path):
    """`gateway openapi` prints the document (no settings needed); `--check FILE` exits 0 when the file is it, 1 with the command to run when it is stale."""
    printed = runner.invoke(app, ["gateway", "openapi"])
    assert printed.exit_code == 0, printed.output
    assert printed.stdout == openapi_document()
    assert runner.invoke(app, ["gateway", "openapi", "--check", str(COMMITTED)]).exit_code == 0
    stale = tmp_path / "stale.json"
    stale.write_text(openapi_document().replace("/v1/signals", "/v1/signal"), encoding="utf-8")
    checked = runner.invoke(app, ["gateway", "openapi", "--check", str(stale)])
    assert checked.exit_code == 1
    assert "partnerbus gateway openapi >" in checked.output


def test_every_route_documents_its_body_its_answers_and_the_bearer_token():
    """Each route: a required JSON body (its message schema), 202 with the accepted id, each refusal the gateway makes with its `detail`, headers for 401 and 429, and the partner's bearer token as its security."""
    document = _document()
    schemes = document["components"]["securitySchemes"]
    assert schemes["partnerToken"]["type"] == "http"
    assert schemes["partnerToken"]["scheme"] == "bearer"
    schemas = document["components"]["schemas"]
    for path in ROUTES:
        operation = document["paths"][path]["post"]
        assert operation["security"] == [{"partnerToken": []}]
        body = operation["requestBody"]
        assert body["required"] is True
        ref = body["content"]["application/json"]["schema"]["$ref"]
        assert ref.removeprefix("#/components/schemas/") in schemas
        answers = operation["responses"]
        assert set(answers) == {"202"} | REFUSALS, path
        accepted = answers["202"]["content"]["application/json"]["schema"]["$ref"]
        assert accepted.endswith("/Accepted")
        for code in REFUSALS:
            refusal = answers[code]["content"]["application/json"]["schema"]["$ref"]
            assert refusal.endswith("/Refusal"), (path, code)
        assert "WWW-Authenticate" in answers["401"]["headers"]
        assert "Retry-After" in answers["429"]["headers"]
    every_ref = re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', openapi_document())
    assert set(every_ref) <= set(schemas), "every reference resolves"


@pytest.mark.parametrize("ref", ["0000", "T-59512.0042", "a:b_c-d"])
def test_a_person_ref_the_document_allows_is_one_the_gateway_accepts(ref):
    """Found by schemathesis: the document gave `person_ref` as any string while the gateway refused all but pseudonymous references (422 for bodies the document called valid); it now carries the same pattern."""
    pattern = _document()["components"]["schemas"]["Signal"]["properties"]["person_ref"]["pattern"]
    assert re.search(pattern, ref)
    SIGNAL.validate_python(_signal(person_ref=ref))


@pytest.mark.parametrize("ref", ["jean.dupont@mail.fr", "Jean Dupont", "abc", "-abcd"])
def test_a_person_ref_the_gateway_refuses_is_one_the_document_refuses(ref):
    """The other way round: names, e-mail addresses and too short references are outside the document's pattern too."""
    pattern = _document()["components"]["schemas"]["Signal"]["properties"]["person_ref"]["pattern"]
    assert not re.search(pattern, ref)
    with pytest.raises(ValidationError):
        SIGNAL.validate_python(_signal(person_ref=ref))


def test_repeated_needs_are_outside_the_document_as_they_are_refused():
    """Found by schemathesis: a signal with a need repeated was valid for the document and a 422 for the gateway; the document now says the needs are unique."""
    needs = _document()["components"]["schemas"]["Signal"]["properties"]["needs"]
    assert needs["uniqueItems"] is True
    with pytest.raises(ValidationError, match="needs must not repeat"):
        SIGNAL.validate_python(_signal(needs=["logement", "logement"]))


def test_in_a_union_the_type_that_picks_the_member_is_required():
    """Found while writing the document: a status or consent event without `type` was valid for the document (each model has it as a default) but the gateway cannot tell which event it is; in the unions `type` is required."""
    schemas = _document()["components"]["schemas"]
    for union in ("StatusMessage", "ConsentMessage"):
        for ref in schemas[union]["discriminator"]["mapping"].values():
            member = schemas[ref.removeprefix("#/components/schemas/")]
            assert "type" in member["required"], ref
    assert "type" not in schemas["Signal"]["required"]  # alone, a signal's type may be left out


def _signal(**fields: Any) -> dict[str, Any]:
    return {
        "message_id": "s-1",
        "occurred_at": "2026-11-23T09:00:00+01:00",
        "source": "lmh-recouvrement",
        "person_ref": "T-0001",
        "commune": "59512",
        "needs": ["logement"],
        **fields,
    }


@pytest.mark.parametrize("value", ["false", "true", '"4"', "4.5"])
def test_a_count_is_a_json_integer_as_the_document_says(value):
    """Found by schemathesis: `"remaining": false` or `"arrears_months": "4"` was accepted (read as 0 or 4) although the document says integer; counts are now strict, on every door."""
    capacity = (
        '{"type": "capacity-changed", "message_id": "c-1", "partner": "ccas-roubaix",'
        f' "occurred_at": "2026-11-23T09:00:00+01:00", "status": "capacity", "remaining": {value}}}'
    )
    with pytest.raises(ValidationError, match="remaining"):
        STATUS.validate_json(capacity)
    facts = json.dumps(_signal(facts={"arrears_months": None}))
    with pytest.raises(ValidationError, match="arrears_months"):
        SIGNAL.validate_json(facts.replace('"arrears_months": null', f'"arrears_months": {value}'))
    assert STATUS.validate_json(capacity.replace(value + "}", "4}")).remaining == 4
