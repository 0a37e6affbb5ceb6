"""The message contracts refuse what a partner must not send, with a readable reason."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from partnerbus.handlers.delivery import describe_validation
from partnerbus.schemas import ConsentGranted, ConsentScope, ReferralStatusChanged, Signal

NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
ARREARS = "logement-hebergement--reduire-les-impayes-de-loyer"


def signal(**changes) -> dict:
    values = {
        "message_id": "sig-1",
        "occurred_at": NOW.isoformat(),
        "source": "lmh-recouvrement",
        "person_ref": "T-59512-0412",
        "commune": "59512",
        "needs": [ARREARS],
    }
    values.update(changes)
    return values


def reason(model, data) -> str:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(data)
    return describe_validation(caught.value)


def test_a_minimal_signal_is_valid_and_frozen() -> None:
    """Only the identifying fields are required; a built signal cannot be changed."""
    built = Signal.model_validate(signal())
    assert built.urgency == "routine"
    with pytest.raises(ValidationError):
        built.commune = "59350"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"person_ref": "jeanne.dupont@example.org"}, "pseudonymous"),
        ({"commune": "5935"}, "commune"),
        ({"needs": []}, "needs"),
        ({"needs": [ARREARS, ARREARS]}, "needs must not repeat"),
        ({"needs": ["Logement Hébergement"]}, "needs.0"),
        ({"message_id": None}, "message_id"),
        ({"occurred_at": "2026-11-23T09:00:00"}, "occurred_at"),
        ({"colour": "blue"}, "colour: Extra inputs are not permitted"),
        ({"schema_version": 3}, "it accepts 1, 2"),
        ({"schema_version": 0}, "schema_version"),
    ],
)
def test_a_bad_signal_is_refused_with_the_field_named(changes: dict, expected: str) -> None:
    """Each defect names its field in the reason the dead-letter header will carry."""
    assert expected in reason(Signal, signal(**changes))


def test_a_consent_to_anyone_is_not_consent() -> None:
    """A scope must name partner kinds or partners."""
    with pytest.raises(ValidationError, match="partner kinds or partners"):
        ConsentScope(needs=(ARREARS,))


def test_a_consent_ends_after_it_begins() -> None:
    """valid_until must follow granted_at."""
    data = {
        "message_id": "m",
        "occurred_at": NOW,
        "consent_id": "c-1",
        "person_ref": "T-1234",
        "scope": {"needs": [ARREARS], "partner_kinds": ["caf"]},
        "collected_by": "a.martin",
        "agency": "lmh-agence-roubaix",
        "method": "oral",
        "granted_at": NOW,
        "valid_until": NOW - timedelta(days=1),
    }
    assert "valid_until must be after granted_at" in reason(ConsentGranted, data)


def test_a_rejection_carries_a_reason_from_the_fixed_list() -> None:
    """`rejected` without a reason, or with one off the list, is refused."""
    base = {
        "message_id": "m",
        "occurred_at": NOW,
        "referral_id": "r-1",
        "partner": "ccas-roubaix",
        "status": "rejected",
    }
    assert "carries a reason" in reason(ReferralStatusChanged, base)
    assert "reason" in reason(ReferralStatusChanged, {**base, "reason": "busy"})
    assert ReferralStatusChanged.model_validate({**base, "reason": "full"}).reason == "full"


def test_a_completion_carries_its_outcome() -> None:
    """`completed` without an outcome is refused; with one it is valid."""
    base = {
        "message_id": "m",
        "occurred_at": NOW,
        "referral_id": "r-1",
        "partner": "ccas-roubaix",
        "status": "completed",
    }
    assert "carries its outcome" in reason(ReferralStatusChanged, base)
    done = ReferralStatusChanged.model_validate({**base, "outcome": "FSL granted"})
    assert done.outcome == "FSL granted"
    # the bus's copy to the signal's source (signal_id set) leaves the partner's words out
    forwarded = {**base, "signal_id": "s-1", "need": "logement-hebergement"}
    assert ReferralStatusChanged.model_validate(forwarded).outcome is None


def test_a_number_is_not_a_moment() -> None:
    """A Unix timestamp where a date is expected is refused, not read as seconds since 1970."""
    assert "ISO 8601" in reason(Signal, signal(occurred_at=-28964))
    assert "ISO 8601" in reason(Signal, signal(occurred_at=1763888400))
