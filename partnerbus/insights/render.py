"""The insights at the terminal (rich tables) and as charts (PNG, matplotlib's Agg backend)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from partnerbus.insights.common import MIN_PERSONS
from partnerbus.insights.response_times import METRICS, Figure, ResponseTimes, TimesRow
from partnerbus.insights.unmet import CATEGORIES, Unmet

HIDDEN = f"<{MIN_PERSONS} p."


def duration(seconds: float | None) -> str:
    """A duration for people: 45 s, 12 min, 5.2 h, 3.1 d."""
    if seconds is None:
        return "—"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _figure(f: Figure) -> str:
    if f.count == 0:
        return "—"
    if f.hidden:
        return f"n={f.count} ({HIDDEN})"
    return f"{duration(f.median_s)} / {duration(f.p90_s)}  n={f.count}"


def _growth(row: TimesRow) -> str:
    growth = row.growth
    if growth is None:
        return "—"
    if growth == float("inf"):
        return "[red]new delay[/red]"
    text = f"×{growth:.2f}"
    return f"[red]{text}[/red]" if row.grew else text


def response_times_tables(result: ResponseTimes) -> list[Table]:
    p = result.period
    tables = []
    for title, rows, with_source in (
        ("partners", result.partners, False),
        ("agreements (source → partner)", result.agreements, True),
    ):
        table = Table(
            title=f"response times by {title}, {p.since:%Y-%m-%d} → {p.until:%Y-%m-%d} "
            "(median / 90th percentile)",
            caption=f"growth: median time to answer against {p.previous.since:%Y-%m-%d} → "
            f"{p.since:%Y-%m-%d}; {HIDDEN}: fewer than {result.min_persons} persons, "
            "figures hidden",
        )
        if with_source:
            table.add_column("source")
        table.add_column("partner")
        table.add_column("sent", justify="right")
        table.add_column("waiting", justify="right")
        table.add_column("expired", justify="right")
        for metric in METRICS:
            table.add_column(f"to {metric}")
        table.add_column("growth", justify="right")
        for row in rows:
            cells = [row.source or ""] if with_source else []
            cells += [
                row.partner,
                str(row.current.sent),
                str(row.current.waiting),
                str(row.current.expired),
                *(_figure(row.figures[m]) for m in METRICS),
                _growth(row),
            ]
            table.add_row(*cells)
        tables.append(table)
    return tables


def unmet_tables(result: Unmet) -> list[Table]:
    p = result.period
    table = Table(
        title=f"unmet demand by need × {result.by}, {p.since:%Y-%m-%d} → {p.until:%Y-%m-%d}",
        caption=f"needs of signals; {HIDDEN}: fewer than {result.min_persons} persons "
        f"(small territories rolled into 'other …'); {result.hidden_cells} cell(s) hidden; "
        "supply: the directory's communes without a partner open to all",
    )
    for column in ("need", result.by, "needs", *CATEGORIES, "supply"):
        table.add_column(column, justify="right" if column in ("needs", *CATEGORIES) else "left")
    for cell in result.cells:
        supply = "—"
        if cell.supply is not None:
            s = cell.supply
            supply = {
                "none": f"[red]no partner[/red] ({s.communes})",
                "partial": f"[yellow]gap {s.without_partner}/{s.communes}[/yellow]",
                "restricted": "restricted only",
                "covered": "covered",
            }.get(s.status, s.status)
        table.add_row(
            cell.need,
            cell.name if cell.rolled_up else f"{cell.name} ({cell.territory})",
            str(cell.units),
            *(
                HIDDEN if cell.categories[c] is None else str(cell.categories[c])
                for c in CATEGORIES
            ),
            supply,
        )
    gaps = Table(title=f"supply gaps the directory shows (by {result.by})")
    for column in ("need", f"{result.by}s without a partner open to all", "where"):
        gaps.add_column(column)
    by_need: dict[str, list[str]] = {}
    for gap in result.supply_gaps:
        full = gap.supply.without_partner == gap.supply.communes
        by_need.setdefault(gap.need, []).append(
            gap.name if full else f"{gap.name} ({gap.supply.without_partner}/{gap.supply.communes})"
        )
    for need, names in by_need.items():
        gaps.add_row(need, str(len(names)), ", ".join(names[:6]) + (" …" if len(names) > 6 else ""))
    totals = Table(title="unmet needs in the period (all territories)")
    for category in CATEGORIES:
        totals.add_column(category, justify="right")
    totals.add_row(
        *(
            HIDDEN if result.totals.get(c, 0) is None else str(result.totals.get(c, 0))
            for c in CATEGORIES
        )
    )
    return [totals, table, gaps]


def print_tables(tables: list[Table], console: Console | None = None) -> None:
    out = console or Console()
    for table in tables:
        out.print(table)


# charts -----------------------------------------------------------------------------------


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


@contextmanager
def _chart(path: Path | str, size: tuple[float, float], title: str, fontsize: int) -> Iterator[Any]:
    """A figure's axes (matplotlib's Agg backend); on leaving, its title set and the figure
    written to `path` as PNG, then closed (written or not)."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        yield ax
        ax.set_title(title, fontsize=fontsize)
        fig.tight_layout()
        fig.savefig(Path(path), format="png", dpi=110)
    finally:
        plt.close(fig)


def _nothing(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center")
    ax.set_axis_off()


def response_times_png(result: ResponseTimes, path: Path | str, *, limit: int = 25) -> Path:
    """A ranked horizontal bar chart: each partner's median time to answer (bar) and its
    90th percentile (whisker), slowest at the top; partners whose times grew in red."""
    rows = [r for r in result.partners if r.figures["answer"].median_s is not None]
    rows.sort(key=lambda r: r.figures["answer"].median_s or 0.0, reverse=True)
    rows = rows[:limit]
    p = result.period
    title = f"Time to answer a referral, {p.since:%Y-%m-%d} → {p.until:%Y-%m-%d}"
    with _chart(path, (9, max(2.5, 0.4 * len(rows) + 1.5)), title, 10) as ax:
        if not rows:
            _nothing(ax, "no figure to show")
        else:
            days = 86400.0
            medians = [(r.figures["answer"].median_s or 0.0) / days for r in rows]
            p90s = [(r.figures["answer"].p90_s or 0.0) / days for r in rows]
            labels = [f"{r.partner} (n={r.figures['answer'].count})" for r in rows]
            colours = ["#c0392b" if r.grew else "#2e86c1" for r in rows]
            y = list(range(len(rows)))[::-1]
            ax.barh(y, medians, color=colours)
            ax.errorbar(
                p90s, y, xerr=None, fmt="|", color="black", markersize=12, label="90th percentile"
            )
            ax.set_yticks(y)
            ax.set_yticklabels(labels, fontsize=8)
            ax.set_xlabel("median time to answer (days); | = 90th percentile; red: grew")
            ax.legend(loc="lower right", fontsize=8)
    return Path(path)


def unmet_png(result: Unmet, path: Path | str, *, limit: int = 30) -> Path:
    """A need × territory heat map of the unmet needs shown (hidden cells left blank);
    a cell where the directory has no partner for the need is marked ∅."""
    import numpy as np

    needs = sorted({c.need for c in result.cells})
    totals: dict[str, int] = {}
    for c in result.cells:
        totals[c.territory] = totals.get(c.territory, 0) + c.units
    places = sorted(totals, key=lambda code: -totals[code])[:limit]
    names = {c.territory: c.name for c in result.cells}
    grid = np.full((len(needs), len(places)), np.nan)
    marks: list[tuple[int, int]] = []
    for c in result.cells:
        if c.territory in places:
            i, j = needs.index(c.need), places.index(c.territory)
            grid[i, j] = c.units
            if c.supply is not None and c.supply.status == "none":
                marks.append((i, j))
    size = (max(6.0, 0.45 * len(places) + 4.5), max(3.0, 0.35 * len(needs) + 2.0))
    p = result.period
    title = (
        f"Unmet needs by {result.by}, {p.since:%Y-%m-%d} → {p.until:%Y-%m-%d}\n"
        f"(cells under {result.min_persons} persons rolled up or hidden; ∅: no partner in "
        "the directory)"
    )
    with _chart(path, size, title, 9) as ax:
        if not (needs and places):
            _nothing(ax, "no cell to show")
        else:
            top = float(np.nanmax(grid))
            image = ax.imshow(
                np.ma.masked_invalid(grid), cmap="OrRd", aspect="auto", vmin=0, vmax=top
            )
            ax.set_xticks(range(len(places)))
            ax.set_xticklabels(
                [_short(names[p], 32) for p in places], rotation=60, ha="right", fontsize=7
            )
            ax.set_yticks(range(len(needs)))
            ax.set_yticklabels([_short(n.split("--")[-1], 40) for n in needs], fontsize=7)
            for i, j in zip(*np.nonzero(~np.isnan(grid)), strict=True):
                ink = "white" if grid[i, j] > top * 0.6 else "black"
                text = f"{int(grid[i, j])}"
                ax.text(j, i, text, ha="center", va="center", fontsize=6, color=ink)
            for i, j in marks:
                ax.text(j + 0.3, i - 0.25, "∅", ha="center", va="center", fontsize=6)
            ax.figure.colorbar(image, ax=ax, label="unmet needs")
    return Path(path)
