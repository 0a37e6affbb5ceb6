"""One JSON Schema (draft 2020-12) per message, generated from the pydantic models and
committed under docs/schemas/ so that partner teams can read it, generate code from it and
validate against it without our code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from partnerbus.schemas.base import SCHEMA_VERSION

from .catalog import CATALOG, Contracted

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "docs" / "schemas"
"""Where the committed schemas live in a checkout."""

DIALECT = "https://json-schema.org/draft/2020-12/schema"


def schema_file(message_type: str) -> str:
    return f"{message_type}.schema.json"


def _schema(entry: Contracted) -> dict[str, Any]:
    body = entry.model.model_json_schema(mode="validation")
    # Every message names its type: the bus tells the kinds of one channel apart by it
    # (statuses, consents), and always writes it on what it sends.
    required = body.setdefault("required", [])
    if "type" not in required:
        required.insert(0, "type")
    who = {
        "inbound": "Published by partners to the bus.",
        "outbound": "Sent by the bus to a partner's queue.",
        "both": "Published by partners; the bus forwards a copy to the source and the advisor.",
    }[entry.direction]
    return {
        "$schema": DIALECT,
        "$id": schema_file(entry.type),
        "x-partnerbus-contract-version": SCHEMA_VERSION,
        "x-partnerbus-direction": entry.direction,
        **body,
        "description": f"{body.get('description', '').strip()}\n\n{who}".strip(),
    }


def render_schemas() -> dict[str, str]:
    """File name → text, as committed (sorted keys, two-space indent, final newline)."""
    return {
        schema_file(entry.type): json.dumps(_schema(entry), indent=2, sort_keys=True) + "\n"
        for entry in CATALOG
    }


def write_schemas(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_schemas().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def stale_schemas(directory: Path = SCHEMA_DIR) -> list[str]:
    """Files that differ from what the code generates (missing, changed or left over)."""
    expected = render_schemas()
    stale = [
        name
        for name, text in expected.items()
        if not (directory / name).is_file() or (directory / name).read_text("utf-8") != text
    ]
    if directory.is_dir():
        stale += sorted(p.name for p in directory.glob("*.schema.json") if p.name not in expected)
    return stale


def load_schemas(directory: Path = SCHEMA_DIR) -> dict[str, dict[str, Any]]:
    """Message type → its committed schema."""
    schemas: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.glob("*.schema.json")):
        schemas[path.name.removesuffix(".schema.json")] = json.loads(path.read_text("utf-8"))
    return schemas
