"""How long partners take: per partner and per agreement (the signal's source → the
partner), the time from a referral's sending to its first answer, to its acceptance and to
its completion; median and 90th percentile, computed in SQL over the ledger.

- A referral belongs to the period it was created in (indexed `created_at`; the relay sends
  it within seconds). Its clock starts when the broker confirmed it (`sent_at`), or at its
  creation when a partner's answer overtook the confirm (`sent_at` then stays empty).
- First answer: the first applied transition (`referral_history`) to accepted, rejected,
  in-progress, on-hold, completed or failed. Acceptance: the first to accepted, in-progress,
  on-hold or completed (a partner may skip forward). Completion: the first to completed.
  Referrals not yet answered (or expired) are counted (`waiting`, `expired`), not timed.
- A partner's times grew when the median time to answer of this period is longer than the
  previous period's (both shown): those partners come first, the largest growth first; the
  others follow, the slowest first.
- Privacy: a figure drawn from fewer than `MIN_PERSONS` distinct persons keeps its counts
  and hides its median and 90th percentile (`hidden`); a hidden figure never makes a row
  "grew".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, and_, case, distinct, func, literal, or_, select, union_all
from sqlalchemy.sql import Select

from partnerbus.insights.common import (
    MIN_PERSONS,
    PERCENTILE_DEFINITION,
    Period,
    interpolated,
    rank_of,
    reading,
    rounded,
    seconds_between,
)
from partnerbus.ledger import tables as t
from partnerbus.rules import AWAITING_ANSWER

ANSWER_STATUSES: tuple[str, ...] = (
    "accepted",
    "rejected",
    "in-progress",
    "on-hold",
    "completed",
    "failed",
)
"""A partner's answer: the first applied transition to one of these."""
ACCEPT_STATUSES: tuple[str, ...] = ("accepted", "in-progress", "on-hold", "completed")
"""Taken on: accepted, or a status only an accepted referral reaches (skipped forward)."""
METRICS: tuple[str, ...] = ("answer", "accept", "complete")


@dataclass(frozen=True)
class Figure:
    """One duration's distribution for one row and period: how many referrals it was taken
    from, for how many distinct persons, and (unless hidden) its median and 90th
    percentile, in seconds."""

    count: int = 0
    persons: int = 0
    median_s: float | None = None
    p90_s: float | None = None
    hidden: bool = False

    def as_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "persons": self.persons,
            "median_s": self.median_s,
            "p90_s": self.p90_s,
            "hidden": self.hidden,
        }


@dataclass(frozen=True)
class Counts:
    sent: int = 0
    persons: int = 0
    waiting: int = 0
    expired: int = 0

    def as_json(self) -> dict[str, int]:
        return {
            "sent": self.sent,
            "persons": self.persons,
            "waiting": self.waiting,
            "expired": self.expired,
        }


@dataclass(frozen=True)
class TimesRow:
    """A partner (`source` None) or an agreement, this period and the previous one."""

    partner: str
    source: str | None
    current: Counts
    previous: Counts
    figures: dict[str, Figure] = field(default_factory=dict)
    previous_figures: dict[str, Figure] = field(default_factory=dict)

    @property
    def growth(self) -> float | None:
        """The median time to answer, this period over the previous one (both shown)."""
        now, before = self.figures.get("answer"), self.previous_figures.get("answer")
        if now is None or before is None or now.median_s is None or before.median_s is None:
            return None
        if before.median_s == 0:
            return None if now.median_s == 0 else float("inf")
        return round(now.median_s / before.median_s, 4)

    @property
    def grew(self) -> bool:
        growth = self.growth
        return growth is not None and growth > 1

    def as_json(self) -> dict[str, Any]:
        growth = self.growth
        out: dict[str, Any] = {"partner": self.partner}
        if self.source is not None:
            out["source"] = self.source
        out.update(
            {
                "grew": self.grew,
                "answer_growth": None if growth is None or growth == float("inf") else growth,
                "current": {
                    **self.current.as_json(),
                    **{m: self.figures.get(m, Figure()).as_json() for m in METRICS},
                },
                "previous": {
                    **self.previous.as_json(),
                    **{m: self.previous_figures.get(m, Figure()).as_json() for m in METRICS},
                },
            }
        )
        return out


@dataclass(frozen=True)
class ResponseTimes:
    period: Period
    partners: list[TimesRow]
    agreements: list[TimesRow]
    engine: str
    method: str
    """`percentile_cont` (PostgreSQL's own) or `window` (ROW_NUMBER/COUNT, portable)."""
    min_persons: int = MIN_PERSONS

    def as_json(self) -> dict[str, Any]:
        return {
            "insight": "response-times",
            "version": 1,
            "period": self.period.as_json(),
            "min_persons": self.min_persons,
            "percentile": PERCENTILE_DEFINITION,
            "unit": "seconds",
            "engine": self.engine,
            "method": self.method,
            "partners": [row.as_json() for row in self.partners],
            "agreements": [row.as_json() for row in self.agreements],
        }


def response_times(
    engine: Engine,
    period: Period,
    *,
    native: bool | None = None,
    min_persons: int = MIN_PERSONS,
) -> ResponseTimes:
    """The response-times insight over `period` (and the previous period of its length).

    `native`: PostgreSQL's `percentile_cont` (True), the portable window-function query
    (False); by default the engine's own when it has one. Both give the same figures."""
    if min_persons < MIN_PERSONS:
        msg = f"the privacy threshold is at least {MIN_PERSONS} persons"
        raise ValueError(msg)
    dialect = engine.dialect.name
    use_native = dialect == "postgresql" if native is None else native
    if use_native and dialect != "postgresql":
        msg = f"{dialect} has no percentile_cont: use the portable query"
        raise ValueError(msg)
    with reading(engine) as conn:
        found = conn.execute(_query(period, dialect, use_native)).mappings().all()
    counts = list({(r["partner_id"], r["source"], r["period"]): r for r in found}.values())
    figures = [
        {**r, "persons": r[f"{r['metric']}_persons"]} for r in found if r["metric"] is not None
    ]
    partners = _rows(
        [r for r in counts if r["source"] == ALL],
        [f for f in figures if f["source"] == ALL],
        min_persons,
    )
    agreements = _rows(
        [r for r in counts if r["source"] != ALL],
        [f for f in figures if f["source"] != ALL],
        min_persons,
    )
    return ResponseTimes(
        period,
        partners,
        agreements,
        dialect,
        "percentile_cont" if use_native else "window",
        min_persons,
    )


# the queries -----------------------------------------------------------------------------
#
# One statement for both levels and both periods: a partner's rows carry the source ALL,
# an agreement's its source. Each referral of the two periods is read once (`timed`,
# materialised), its first answer, acceptance and completion looked up in its history by
# the referral's index; its counts (`stats`) and the percentiles (`figures`) are taken
# from it and joined.

ALL = "*"
"""The `source` of a partner's own rows (every source)."""


def _timed(period: Period, dialect: str) -> Any:
    """The referrals created in either period: partner, source, person, status, and the
    whole seconds from its clock start to its first answer, acceptance and completion (one
    probe of the history's covering index per referral, `ix_referral_history_first`)."""
    r, s, h = t.referrals.c, t.signals.c, t.referral_history.c
    which = case((r.created_at >= period.since, literal("current")), else_=literal("previous"))
    columns = [r.partner_id, s.source, s.person_ref, r.status, which.label("period")]
    started = func.coalesce(r.sent_at, r.created_at)
    firsts = {
        "answer": func.min(h.at),
        "accept": func.min(case((h.to_status.in_(ACCEPT_STATUSES), h.at))),
        "complete": func.min(case((h.to_status == "completed", h.at))),
    }
    return (
        select(
            *columns,
            *(seconds_between(started, at, dialect).label(m) for m, at in firsts.items()),
        )
        .join_from(t.referrals, t.signals, s.signal_id == r.signal_id)
        .outerjoin(
            t.referral_history,
            and_(
                h.referral_id == r.referral_id,
                h.outcome == "applied",
                h.to_status.in_(ANSWER_STATUSES),
            ),
        )
        .where(r.created_at >= period.previous.since, r.created_at < period.until)
        .group_by(r.referral_id, r.sent_at, r.created_at, *columns)
        .cte("timed")
        .prefix_with("MATERIALIZED")
    )


def _levels(timed: Any) -> list[Any]:
    """The source column of each level: ALL (per partner), the signal's (per agreement)."""
    return [literal(ALL), timed.c.source]


def _stats(timed: Any) -> Any:
    """Per row and period: referrals sent, their persons, waiting, expired, and the
    persons behind each figure (those whose referral reached it)."""
    c = timed.c
    parts = []
    for source in _levels(timed):
        parts.append(
            select(
                c.partner_id,
                source.label("source"),
                c.period,
                func.count().label("sent"),
                func.count(distinct(c.person_ref)).label("persons"),
                func.sum(case((c.status.in_(sorted(AWAITING_ANSWER)), 1), else_=0)).label(
                    "waiting"
                ),
                func.sum(case((c.status == "expired", 1), else_=0)).label("expired"),
                *(
                    func.count(distinct(case((c[m].is_not(None), c.person_ref)))).label(
                        f"{m}_persons"
                    )
                    for m in METRICS
                ),
            ).group_by(c.partner_id, source, c.period)
        )
    return union_all(*parts).cte("stats")


def _durations(timed: Any) -> Any:
    """One row per referral, level and metric it reached: its duration in whole seconds."""
    c = timed.c
    parts = [
        select(
            c.partner_id,
            source.label("source"),
            c.period,
            literal(metric).label("metric"),
            c[metric].label("seconds"),
        ).where(c[metric].is_not(None))
        for source in _levels(timed)
        for metric in METRICS
    ]
    return union_all(*parts).subquery("durations")


def _percentiles(durations: Any, use_native: bool) -> Any:
    """Per row, period and metric: n, median, 90th percentile."""
    d = durations.c
    group = [d.partner_id, d.source, d.period, d.metric]
    if use_native:
        return (
            select(
                *group,
                func.count().label("n"),
                func.percentile_cont(0.5).within_group(d.seconds).label("median"),
                func.percentile_cont(0.9).within_group(d.seconds).label("p90"),
            )
            .group_by(*group)
            .subquery("figures")
        )
    # One window (one sort): every row's rank and its group's size; then only the rows at
    # the ranks a percentile needs (i and i+1 of each) are grouped.
    ranked = select(
        *group,
        d.seconds,
        (
            func.row_number().over(partition_by=group, order_by=d.seconds, rows=(None, None)) - 1
        ).label("rn"),
        func.count().over(partition_by=group, order_by=d.seconds, rows=(None, None)).label("n"),
    ).subquery("ranked")
    k = ranked.c
    ranks = [rank_of(k.n, p) + step for p in (50, 90) for step in (0, 1)]
    picked = select(ranked).where(or_(*(k.rn == r for r in ranks))).subquery("picked")
    q = picked.c
    kgroup = [q.partner_id, q.source, q.period, q.metric]
    bounds = (
        select(
            *kgroup,
            func.max(q.n).label("n"),
            *[
                func.max(case((q.rn == rank_of(q.n, p) + step, q.seconds))).label(f"{side}{p}")
                for p in (50, 90)
                for side, step in (("lo", 0), ("hi", 1))
            ],
        )
        .group_by(*kgroup)
        .subquery("bounds")
    )
    b = bounds.c
    return select(
        b.partner_id,
        b.source,
        b.period,
        b.metric,
        b.n,
        interpolated(b.lo50, b.hi50, b.n, 50).label("median"),
        interpolated(b.lo90, b.hi90, b.n, 90).label("p90"),
    ).subquery("figures")


def _query(period: Period, dialect: str, use_native: bool) -> Select[Any]:
    """One statement: each row's counts, beside its figures (one result row per metric
    reached, or one with no metric)."""
    timed = _timed(period, dialect)
    stats = _stats(timed)
    figures = _percentiles(_durations(timed), use_native)
    s, f = stats.c, figures.c
    return select(stats, f.metric, f.n, f.median, f.p90).select_from(
        stats.outerjoin(
            figures,
            and_(f.partner_id == s.partner_id, f.source == s.source, f.period == s.period),
        )
    )


# the rows --------------------------------------------------------------------------------

NONE = Figure(hidden=True)
"""A figure no referral reached: nothing to show."""


def _rows(counts: Sequence[Any], figures: Sequence[Any], min_persons: int) -> list[TimesRow]:
    def key_of(row: Any) -> tuple[str, str | None]:
        return (row["partner_id"], None if row["source"] == ALL else row["source"])

    by_key: dict[tuple[str, str | None], dict[str, Any]] = {}

    def slot(row: Any) -> dict[str, Any]:
        return by_key.setdefault(
            key_of(row),
            {"current": Counts(), "previous": Counts(), "fig_current": {}, "fig_previous": {}},
        )

    for row in counts:
        slot(row)[row["period"]] = Counts(
            int(row["sent"]), int(row["persons"]), int(row["waiting"]), int(row["expired"])
        )
    for row in figures:
        persons = int(row["persons"])
        hidden = persons < min_persons
        slot(row)[f"fig_{row['period']}"][row["metric"]] = Figure(
            count=int(row["n"]),
            persons=persons,
            median_s=None if hidden else rounded(row["median"]),
            p90_s=None if hidden else rounded(row["p90"]),
            hidden=hidden,
        )
    out = [
        TimesRow(
            partner=partner,
            source=source,
            current=v["current"],
            previous=v["previous"],
            figures={m: v["fig_current"].get(m, NONE) for m in METRICS},
            previous_figures={m: v["fig_previous"].get(m, NONE) for m in METRICS},
        )
        for (partner, source), v in by_key.items()
        # a row only the previous period knows says nothing of this one: kept only if it had
        # referrals this period (or figures to compare with)
        if v["current"].sent or v["fig_current"]
    ]
    return sorted(out, key=_order)


def _order(row: TimesRow) -> tuple[int, float, float, str, str]:
    """Grown first (largest growth first), then the slowest to answer first, then by name."""
    growth = row.growth
    median = row.figures["answer"].median_s
    return (
        0 if row.grew else 1,
        -(growth or 0.0) if row.grew else 0.0,
        -(median if median is not None else -1.0),
        row.partner,
        row.source or "",
    )
