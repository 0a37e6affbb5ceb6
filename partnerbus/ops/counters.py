"""Counters a service process keeps (Prometheus' default registry): served on
`metrics_port` when it is set (`partnerbus run`), beside the monitor's figures."""

from __future__ import annotations

from prometheus_client import Counter

SCHEDULED_ITEM_FAILURES = Counter(
    "partnerbus_scheduled_item_failures",
    "Items of a scheduled pass (a reminder, an expiry, a withdrawal, a notice, retention) "
    "that failed: rolled back and tried again at the next pass",
    ["task"],
)

INTAKE_VERDICTS = Counter(
    "partnerbus_intake_verdicts",
    "Messages the intake decided, by queue (without the prefix) and outcome (processed, "
    "duplicate, refused: dead-lettered, retried, held)",
    ["queue", "outcome"],
)

__all__ = ["INTAKE_VERDICTS", "SCHEDULED_ITEM_FAILURES"]
