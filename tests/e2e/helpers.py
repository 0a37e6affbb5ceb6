"""Raw AMQP, as a partner's system speaks it: JSON bodies built by hand, not by our models."""

from __future__ import annotations

import functools
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika

from tests.keys import TEST_KEY_BYTES

ARREARS = "logement-hebergement--reduire-les-impayes-de-loyer"
KEEP_HOME = "logement-hebergement--se-maintenir-dans-le-logement"
RIGHTS = "difficultes-administratives-ou-juridiques--accompagnement-pour-lacces-aux-droits"
ROUBAIX = "59512"
TOURCOING = "59599"
LILLE = "59350"


def new_id(prefix: str = "m") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def signal_ref(referral: dict[str, Any], signal_id: str, key: bytes = TEST_KEY_BYTES) -> bool:
    """Whether this referral body comes from that signal: partners see the signal only
    through their own keyed reference (the tests' bus key is `TEST_KEY`)."""
    from partnerbus.rules import signal_pseudonym

    return referral["signal_ref"] == signal_pseudonym(key, referral["partner"], signal_id)


@functools.cache
def advisor_of(agency: str) -> str:
    """An advisor of this agency in the sample directory (its first), or the agency's id when
    it has none or is unknown (a consent such an agency sends is refused anyway)."""
    from partnerbus.directory import load_sample

    try:
        advisors = sorted(a.id for a in load_sample().partner(agency).advisors)
    except KeyError:
        advisors = []
    return advisors[0] if advisors else agency


def iso(moment: datetime) -> str:
    return moment.isoformat()


def signal(
    *,
    source: str = "lmh-recouvrement",
    person: str | None = None,
    commune: str = ROUBAIX,
    needs: tuple[str, ...] = (ARREARS,),
    message_id: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    body = {
        "message_id": message_id or new_id("sig"),
        "occurred_at": iso(datetime.now(UTC)),
        "schema_version": 2,
        "source": source,
        "person_ref": person or new_id("T"),
        "commune": commune,
        "needs": list(needs),
        "urgency": "urgent",
        "facts": {"arrears_eur": 1840.5, "arrears_months": 4, "note": "talked at the door"},
        "contact": {"phone": "+33 6 12 34 56 78"},
    }
    body.update(extra)
    return body


def consent(
    *,
    person: str,
    agency: str,
    needs: tuple[str, ...] = ("logement-hebergement",),
    kinds: tuple[str, ...] = (),
    partners: tuple[str, ...] = (),
    granted_at: datetime | None = None,
    days: int = 30,
    consent_id: str | None = None,
    by: str | None = None,
) -> dict[str, Any]:
    """A consent as the agency's system sends it, collected by one of the agency's own
    advisors in the sample directory (or `by`)."""
    start = granted_at or datetime.now(UTC) - timedelta(hours=1)
    return {
        "type": "consent-granted",
        "message_id": new_id("msg"),
        "occurred_at": iso(start),
        "consent_id": consent_id or new_id("c"),
        "person_ref": person,
        "scope": {"needs": list(needs), "partner_kinds": list(kinds), "partners": list(partners)},
        "collected_by": by or advisor_of(agency),
        "agency": agency,
        "method": "oral",
        "granted_at": iso(start),
        "valid_until": iso(start + timedelta(days=days)),
    }


def revocation(granted: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The agency's revocation of a consent it granted (`granted`: the body of `consent`)."""
    now = iso(datetime.now(UTC))
    return {
        "type": "consent-revoked",
        "message_id": new_id("rev"),
        "occurred_at": now,
        "consent_id": granted["consent_id"],
        "revoked_by": granted["collected_by"],
        "agency": granted["agency"],
        "revoked_at": now,
        **extra,
    }


def status(*, referral_id: str, partner: str, value: str, **extra: Any) -> dict[str, Any]:
    body = {
        "type": "referral-status-changed",
        "message_id": new_id("st"),
        "occurred_at": iso(datetime.now(UTC)),
        "referral_id": referral_id,
        "partner": partner,
        "status": value,
    }
    body.update(extra)
    return body


async def publish(
    channel: aio_pika.abc.AbstractChannel,
    exchange: str,
    body: dict[str, Any] | bytes,
    *,
    routing_key: str = "",
    user_id: str | None = "guest",
    message_id: str | None = None,
) -> None:
    """Publish as a partner would: JSON, persistent, with its AMQP user as `user_id`."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    mid = message_id or (body.get("message_id") if isinstance(body, dict) else None)
    ex = await channel.get_exchange(exchange, ensure=False)
    await ex.publish(
        aio_pika.Message(
            raw,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=mid,
            user_id=user_id,
        ),
        routing_key=routing_key,
    )


async def queue_depth(channel: aio_pika.abc.AbstractChannel, name: str) -> int:
    queue = await channel.declare_queue(name, passive=True)
    return int(queue.declaration_result.message_count or 0)


@functools.cache
def contract_schema(message_type: str) -> dict[str, Any]:
    """The published JSON Schema of one message type (its `type` field), as a partner reads
    it: the committed `docs/schemas/<type>.schema.json`, never our own models."""
    from partnerbus.contract import load_schemas

    return load_schemas()[message_type]
