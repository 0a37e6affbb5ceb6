"""What the network learns from its ledger: how long partners take to answer, and the
demand nobody met; organisations and territories, never persons (docs/INSIGHTS.md)."""

from partnerbus.insights.common import (
    DEFAULT_PERIOD,
    MIN_PERSONS,
    PERCENTILE_DEFINITION,
    Period,
    resolve_period,
)
from partnerbus.insights.render import (
    print_tables,
    response_times_png,
    response_times_tables,
    unmet_png,
    unmet_tables,
)
from partnerbus.insights.response_times import ResponseTimes, TimesRow, response_times
from partnerbus.insights.unmet import CATEGORIES, Unmet, UnmetCell, unmet

__all__ = [
    "CATEGORIES",
    "DEFAULT_PERIOD",
    "MIN_PERSONS",
    "PERCENTILE_DEFINITION",
    "Period",
    "ResponseTimes",
    "TimesRow",
    "Unmet",
    "UnmetCell",
    "print_tables",
    "resolve_period",
    "response_times",
    "response_times_png",
    "response_times_tables",
    "unmet",
    "unmet_png",
    "unmet_tables",
]
