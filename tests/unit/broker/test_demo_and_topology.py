"""The parts of the broker room that need no broker: topology as data, the demo's guard."""

from __future__ import annotations

import asyncio

from partnerbus.broker.topology import Topology
from partnerbus.entrypoints.demo import main as demo_main
from partnerbus.settings import Settings
from tests.keys import TEST_KEY


def test_the_demo_says_how_to_start_rabbitmq_when_none_is_reachable(capsys) -> None:
    """No broker: exit code 2 and the commands that start one, not a traceback."""
    code = asyncio.run(demo_main(Settings(amqp_url="amqp://guest:guest@127.0.0.1:1/")))
    out = capsys.readouterr().out
    assert code == 2
    assert "not reachable at 127.0.0.1:1" in out
    assert "rabbitmq-server -detached" in out
    assert "docker compose up -d rabbitmq" in out


def test_every_work_queue_is_a_quorum_queue_with_a_delivery_limit_and_a_dead_letter_route() -> None:
    """Intake and partner queues all carry the arguments that keep a poison message out of a loop."""
    t = Topology("pb", delivery_limit=7)
    queues = [q for q, _ in t.intake_queues()] + [t.partner_queue("ccas-lille")]
    for queue in queues:
        args = queue.arguments
        assert args["x-queue-type"] == "quorum"
        assert args["x-delivery-limit"] == 7
        assert args["x-dead-letter-exchange"] == "pb.dlx"
        assert args["x-dead-letter-routing-key"] == queue.name
        assert args["x-dead-letter-strategy"] == "at-least-once"
    assert t.partner_queue("ccas-lille").name == "pb.partner.ccas-lille"
    assert t.dlq_name("pb.intake.signals") == "pb.intake.signals.dlq"


def test_a_delay_queue_returns_its_messages_to_the_work_queue_after_its_ttl() -> None:
    """Retry step n waits its configured delay, then dead-letters back to the work queue."""
    t = Topology("pb", retry_delays_ms=(100, 2_000))
    retry = t.retry_queue("pb.intake.signals", 1)
    assert retry.name == "pb.intake.signals.retry.1"
    assert retry.arguments["x-message-ttl"] == 2_000
    assert retry.arguments["x-dead-letter-exchange"] == ""
    assert retry.arguments["x-dead-letter-routing-key"] == "pb.intake.signals"


def test_dead_letter_and_delay_queues_are_bounded_and_refuse_rather_than_drop() -> None:
    """Each dead-letter and delay queue has a length limit whose overflow refuses the publish (never `drop-head`); the service's settings reach the topology."""
    from partnerbus.entrypoints.bootstrap import create_app

    t = create_app(
        Settings(
            prefix="pb",
            pseudonym_key=TEST_KEY,
            dead_letter_max_messages=50,
            dead_letter_max_bytes=4096,
            retry_max_messages=20,
            retry_max_bytes=2048,
        )
    ).topology
    dlq = t.dead_letter_queue("pb.intake.signals")
    assert dlq.arguments["x-max-length"] == 50
    assert dlq.arguments["x-max-length-bytes"] == 4096
    assert dlq.arguments["x-overflow"] == "reject-publish"
    retry = t.retry_queue("pb.intake.signals", 0)
    assert retry.arguments["x-max-length"] == 20
    assert retry.arguments["x-max-length-bytes"] == 2048
    assert retry.arguments["x-overflow"] == "reject-publish"
    unbounded = Topology("pb", dead_letter_max_messages=None, dead_letter_max_bytes=None)
    args = unbounded.dead_letter_queue("pb.x").arguments
    assert "x-max-length" not in args
    assert args["x-overflow"] == "reject-publish"


def test_the_topology_tells_a_partner_queue_from_any_other() -> None:
    """`partner_of` names the partner of `<prefix>.partner.<id>` only: not its dead letters, delay queues, intake queues, nor another prefix's."""
    t = Topology("pb.x")
    assert t.partner_of("pb.x.partner.ccas-lille") == "ccas-lille"
    for other in (
        "pb.x.partner.ccas-lille.dlq",
        "pb.x.partner.ccas-lille.retry.0",
        "pb.x.intake.signals",
        "pb.y.partner.ccas-lille",
        "pb.x.partner.",
        "",
    ):
        assert t.partner_of(other) is None, other
