"""How a dead letter is described to ops: our headers are believed only on the bus's own copies."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from partnerbus.broker.dlq import describe


def message(user_id: str | None, headers: dict[str, Any]) -> Any:
    return SimpleNamespace(
        user_id=user_id,
        headers=headers,
        message_id="m-1",
        type="signal",
        body=b"{}",
        timestamp=None,  # when the bus made its copy (the letter's `died_at`)
    )


def test_the_bus_own_dead_letter_gives_its_reason_origin_and_first_sender() -> None:
    """A copy the bus published (user_id is the bus) is read from our headers."""
    letter = describe(
        "p.intake.signals.dlq",
        message(
            "guest",
            {
                "partnerbus-error": "invalid message: needs: field required",
                "partnerbus-error-queue": "p.intake.signals",
                "partnerbus-original-exchange": "p.signals",
                "partnerbus-original-routing-key": "lmh-proximite",
                "partnerbus-original-user": "pb-lmh-proximite",
            },
        ),
        "guest",
    )
    assert letter.reason == "invalid message: needs: field required"
    assert letter.died_in == "p.intake.signals"
    assert (letter.exchange, letter.routing_key) == ("p.signals", "lmh-proximite")
    assert letter.sender == "pb-lmh-proximite"


def test_headers_a_partner_set_itself_are_ignored_on_a_message_rabbitmq_dead_lettered() -> None:
    """A partner's own message that died by the delivery limit is described from x-death and its verified user_id, whatever our headers on it claim."""
    letter = describe(
        "p.intake.signals.dlq",
        message(
            "pb-lmh-proximite",
            {
                "partnerbus-error": "harmless, replay me",
                "partnerbus-error-queue": "p.partner.caf-nord",
                "partnerbus-original-user": "pb-lmh-recouvrement",
                "x-death": [
                    {
                        "reason": "delivery_limit",
                        "count": 3,
                        "queue": "p.intake.signals",
                        "exchange": "p.signals",
                        "routing-keys": ["lmh-proximite"],
                    }
                ],
            },
        ),
        "guest",
    )
    assert letter.reason.startswith("delivery limit reached")
    assert letter.died_in == "p.intake.signals"
    assert letter.sender == "pb-lmh-proximite"


def test_a_bus_copy_with_an_empty_first_sender_names_no_sender_never_the_bus() -> None:
    """The bus's copy of a message that came without user_id: the sender is unknown (None), not the bus user that published the copy, and the refusal mark is read."""
    letter = describe(
        "p.intake.signals.dlq",
        message(
            "guest",
            {
                "partnerbus-error": "no user_id property: publish with user_id set",
                "partnerbus-error-queue": "p.intake.signals",
                "partnerbus-original-user": "",
                "partnerbus-refusal": "authentication",
            },
        ),
        "guest",
    )
    assert letter.sender is None
    assert letter.refusal == "authentication"


def test_a_message_the_bus_published_itself_names_the_bus_as_its_sender() -> None:
    """No first-sender header at all on the bus's own message (`partnerbus consent`, the bus's own publications): the bus is the sender."""
    letter = describe("p.intake.consents.dlq", message("guest", {}), "guest")
    assert letter.sender == "guest"
    assert letter.refusal is None


def test_a_refusal_mark_a_partner_set_itself_is_ignored() -> None:
    """Our headers count only on the bus's own copies: a partner's message claiming to be an authentication refusal (or not) is judged by x-death and its own user."""
    letter = describe(
        "p.intake.signals.dlq",
        message("pb-lmh-proximite", {"partnerbus-refusal": "authentication", "x-death": []}),
        "guest",
    )
    assert letter.refusal is None
    assert letter.sender == "pb-lmh-proximite"


def test_a_message_held_while_the_dead_letters_were_full_says_so() -> None:
    """Rejected by the bus while the dead-letter queue was full, then moved in by RabbitMQ: the reason says what happened, and the sender is its own verified user."""
    letter = describe(
        "p.intake.signals.dlq",
        message(
            "pb-lmh-proximite",
            {
                "x-death": [
                    {
                        "reason": "rejected",
                        "count": 1,
                        "queue": "p.intake.signals",
                        "exchange": "p.signals",
                        "routing-keys": ["lmh-proximite"],
                    }
                ]
            },
        ),
        "guest",
    )
    assert letter.reason.startswith("refused while this dead-letter queue was full")
    assert letter.died_in == "p.intake.signals"
    assert letter.sender == "pb-lmh-proximite"
