"""The ops page's charts as plain geometry, drawn as inline SVG by the templates.

Hand-written SVG rather than matplotlib's: a few rectangles per chart, a few hundred bytes
each, redrawn at every refresh without a figure to build (matplotlib's SVG embeds its
glyphs and styles, tens of kilobytes, and takes tens of milliseconds per figure); and the
template escapes every label like the rest of the page.
"""

from __future__ import annotations

from dataclasses import dataclass

from partnerbus.ops.monitor import Snapshot

COLOURS = {
    "requested": "#9aa5b1",
    "delivered": "#7b8794",
    "received": "#52606d",
    "accepted": "#3e9b5b",
    "in-progress": "#2f7a47",
    "on-hold": "#c9a227",
    "completed": "#1f5f8b",
    "rejected": "#c0392b",
    "expired": "#8e44ad",
    "failed": "#e67e22",
    "cancelled": "#bdc3c7",
    "withdrawn": "#95a5a6",
}
WIDTH, HEIGHT, LEFT, BOTTOM = 560, 170, 34, 22


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    w: float
    h: float
    colour: str
    title: str


@dataclass(frozen=True)
class Chart:
    title: str
    bars: list[Bar]
    labels: list[tuple[float, str]]
    """x and text of the axis labels."""
    top: int
    """The value of the top of the y axis."""
    legend: list[tuple[str, str]]
    width: int = WIDTH
    height: int = HEIGHT
    empty: bool = False


def _scale(top: int) -> float:
    return (HEIGHT - BOTTOM - 10) / max(top, 1)


def stacked_per_day(title: str, days: list[str], series: dict[str, list[int]]) -> Chart:
    totals = [sum(values[i] for values in series.values()) for i in range(len(days))]
    top = max(totals, default=0)
    k = _scale(top)
    step = (WIDTH - LEFT) / max(len(days), 1)
    bars: list[Bar] = []
    for i, day in enumerate(days):
        y: float = HEIGHT - BOTTOM
        for status, values in series.items():
            if values[i]:
                h = values[i] * k
                y -= h
                bars.append(
                    Bar(
                        LEFT + i * step + 2,
                        y,
                        step - 4,
                        h,
                        COLOURS.get(status, "#555"),
                        f"{day}: {values[i]} {status}",
                    )
                )
    labels = [(LEFT + i * step + step / 2, day[5:]) for i, day in enumerate(days) if i % 2 == 0]
    legend = [(status, COLOURS.get(status, "#555")) for status in series]
    return Chart(title, bars, labels, top, legend, empty=top == 0)


def _single(title: str, days: list[str], values: list[int], colour: str) -> Chart:
    top = max(values, default=0)
    k = _scale(top)
    step = (WIDTH - LEFT) / max(len(days), 1)
    bars = [
        Bar(LEFT + i * step + 2, HEIGHT - BOTTOM - v * k, step - 4, v * k, colour, f"{d}: {v}")
        for i, (d, v) in enumerate(zip(days, values, strict=True))
        if v
    ]
    labels = [(LEFT + i * step + step / 2, day[5:]) for i, day in enumerate(days) if i % 2 == 0]
    return Chart(title, bars, labels, top, [], empty=top == 0)


def acceptance_per_partner(snap: Snapshot) -> Chart:
    """Median time from sent to accepted, one bar per partner that accepted any; in
    seconds, minutes or hours, whichever fits the longest."""
    rows = [
        (r.partner_id, r.median_accept_s or 0.0)
        for r in snap.partners
        if r.median_accept_s is not None
    ]
    longest = max((s for _, s in rows), default=0.0)
    unit, per = ("s", 1.0) if longest < 120 else ("min", 60.0) if longest < 7200 else ("h", 3600.0)
    values = [(pid, s / per) for pid, s in rows]
    top = max(1, int(max((v for _, v in values), default=0.0) + 0.999))
    k = _scale(top)
    step = (WIDTH - LEFT) / max(len(values), 1)
    width = min(step - 4, 60)
    bars = [
        Bar(
            LEFT + i * step + 2,
            HEIGHT - BOTTOM - max(v * k, 1),
            width,
            max(v * k, 1),
            "#3e9b5b",
            f"{pid}: median {v:.1f} {unit} to acceptance",
        )
        for i, (pid, v) in enumerate(values)
    ]
    labels = [(LEFT + i * step + 2 + width / 2, pid[:14]) for i, (pid, _) in enumerate(values)]
    title = f"Time to acceptance per partner (median, {unit})"
    return Chart(title, bars, labels, top, [], empty=not values)


def charts(snap: Snapshot) -> list[Chart]:
    c = snap.charts
    return [
        stacked_per_day("Referrals per day, by status now", c.days, c.referrals_per_day),
        acceptance_per_partner(snap),
        _single(
            "Dead letters per day (those in the queues now)",
            c.days,
            c.dead_letters_per_day,
            "#c0392b",
        ),
    ]
