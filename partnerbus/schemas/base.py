"""Shared building blocks of every message and record."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Strict,
    StringConstraints,
    WithJsonSchema,
)

SCHEMA_VERSION = 2
"""The contract's major version, carried by every message the bus sends. It changes when
a change would break a partner written against the previous one (docs/CHANGELOG-CONTRACT.md)."""
ACCEPTED_SCHEMA_VERSIONS: tuple[int, ...] = (1, 2)
"""What the bus reads: version 1 messages have the same fields as version 2 (what changed
is what the bus sends), so a partner written against version 1 keeps working."""

# data·inclusion v1 thématique, "parent--child" or a bare parent. Local codes start with "local-".
NEED_PATTERN = r"^(local-)?[a-z0-9]+(?:-[a-z0-9]+)*(?:--[a-z0-9]+(?:-[a-z0-9]+)*)?$"
# INSEE commune code: 5 characters, Corsica uses 2A/2B.
COMMUNE_PATTERN = r"^(?:\d{5}|2[AB]\d{3})$"
# Pseudonymous person reference: never a name, never an e-mail.
PERSON_REF_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{3,63}$"
PARTNER_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{1,62}$"
MESSAGE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"

NeedCode = Annotated[str, StringConstraints(pattern=NEED_PATTERN, max_length=160)]
CommuneCode = Annotated[str, StringConstraints(pattern=COMMUNE_PATTERN)]
PartnerId = Annotated[str, StringConstraints(pattern=PARTNER_ID_PATTERN)]
OrganisationId = Annotated[str, StringConstraints(pattern=PARTNER_ID_PATTERN)]
"""An organisation of the directory (`Partner.organisation`): a landlord, an association…"""
MessageId = Annotated[str, StringConstraints(pattern=MESSAGE_ID_PATTERN)]
ShortText = Annotated[str, StringConstraints(max_length=2000)]


def _pseudonymous(value: str) -> str:
    if "@" in value or " " in value:
        msg = "a person reference must be pseudonymous: never a name or an e-mail address"
        raise ValueError(msg)
    if not re.fullmatch(PERSON_REF_PATTERN, value):
        msg = "a person reference is 4 to 64 letters, digits or . _ : - (starting alphanumeric)"
        raise ValueError(msg)
    return value


PseudonymousRef = Annotated[
    str,
    AfterValidator(_pseudonymous),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": PERSON_REF_PATTERN,
            "description": "A pseudonymous reference: never a name or an e-mail address.",
        }
    ),
]


def _accepted_version(value: int) -> int:
    if value not in ACCEPTED_SCHEMA_VERSIONS:
        accepted = ", ".join(str(v) for v in ACCEPTED_SCHEMA_VERSIONS)
        msg = (
            f"schema_version {value} is not one this bus reads: it accepts {accepted} "
            f"(current {SCHEMA_VERSION}); see docs/CHANGELOG-CONTRACT.md"
        )
        raise ValueError(msg)
    return value


SchemaVersion = Annotated[
    int,
    Strict(),  # "2" is not 2: the schema says integer
    AfterValidator(_accepted_version),
    WithJsonSchema(
        {
            "type": "integer",
            "enum": list(ACCEPTED_SCHEMA_VERSIONS),
            "description": (
                f"The contract version the message was written against; the bus sends "
                f"{SCHEMA_VERSION}."
            ),
        }
    ),
]


def _iso_instant(value: object) -> object:
    # pydantic would read a number as seconds since 1970: a partner's bug, not a date.
    if isinstance(value, int | float):
        msg = "a moment is an ISO 8601 string with its time zone, e.g. 2026-11-23T09:00:00+01:00"
        raise ValueError(msg)
    return value


Instant = Annotated[AwareDatetime, BeforeValidator(_iso_instant)]
"""An aware moment, given as ISO 8601 text (or a datetime), never as a bare number."""

Urgency = Literal["routine", "urgent", "asap"]
"""FHIR request priorities (stat is for clinics; the bus has no use for it)."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_message_id() -> str:
    return str(uuid.uuid4())


class Record(BaseModel):
    """A frozen value: nothing changes it after it is built, unknown fields are refused."""

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)


class Message(Record):
    """A message on the bus: a command (imperative name) or an event (past tense)."""

    message_id: MessageId
    """Unique per message; the bus deduplicates on it (at-least-once delivery)."""
    occurred_at: Instant
    schema_version: SchemaVersion = SCHEMA_VERSION
