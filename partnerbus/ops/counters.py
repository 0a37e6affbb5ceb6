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

__all__ = ["SCHEDULED_ITEM_FAILURES"]
