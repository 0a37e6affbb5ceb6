"""The ops page's figures at the terminal (`partnerbus ops status [--watch]`): the same
snapshot, alerts first, then a row per partner, the parked needs, the queues."""

from __future__ import annotations

import asyncio

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from partnerbus.ops.monitor import Snapshot, human_duration


async def pause(seconds: float) -> None:
    """Between two frames of `--watch` (a test replaces it)."""
    await asyncio.sleep(seconds)


def _or_dash(value: float | int | None, fmt: str = "{}") -> str:
    return "–" if value is None else fmt.format(value)


def status_view(snap: Snapshot, prefix: str, all_partners: bool = False) -> list[RenderableType]:
    parts: list[RenderableType] = [
        Text(f"partnerbus — {prefix} at {snap.at:%Y-%m-%d %H:%M:%S} UTC", style="bold")
    ]
    idle = [a for a in snap.alerts if a.kind == "no-consumer" and a.partner]
    others = [a for a in snap.alerts if a not in idle]
    for alert in others:
        parts.append(Text(f"! {alert.text}", style="red"))
    if idle:
        named = ", ".join(
            f"{a.partner} ({a.waiting} waiting)" if a.waiting else str(a.partner)
            for a in sorted(idle, key=lambda a: (-a.waiting, a.partner or ""))
        )
        parts.append(Text(f"! no consumer on {len(idle)} partner queue(s): {named}", style="red"))
    if not snap.alerts:
        parts.append(Text("nothing needs attention", style="green"))
    table = Table(title="partners")
    for column in (
        "partner",
        "received",
        "filtered",
        "queued",
        "oldest",
        "consumers",
        "sent",
        "awaiting",
        "accepted",
        "rejected",
        "completed",
        "expired",
        "dead letters",
        "median answer",
    ):
        table.add_column(column, overflow="fold")
    hidden = 0
    for r in snap.partners:
        busy = r.received or r.sent or r.dead_lettered or r.awaiting or r.queue_depth or r.consumers
        if not busy and not all_partners:
            hidden += 1
            continue
        rejected = str(r.rejected) + (
            " (" + ", ".join(f"{k} {n}" for k, n in r.rejected_by_reason.items()) + ")"
            if r.rejected_by_reason
            else ""
        )
        table.add_row(
            r.partner_id,
            str(r.received),
            f"{r.filtered} ({r.filtered_no_consent}·{r.filtered_no_partner}·"
            f"{r.filtered_invalid}·{r.filtered_refused_sender})",
            _or_dash(r.queue_depth),
            "–" if r.oldest_age_s is None else human_duration(r.oldest_age_s),
            _or_dash(r.consumers),
            str(r.sent),
            str(r.awaiting),
            str(r.accepted),
            rejected,
            str(r.completed),
            str(r.expired),
            str(r.dead_lettered),
            "–" if r.median_answer_s is None else human_duration(r.median_answer_s),
            style="red" if r.consumers == 0 else "",
        )
    parts.append(table)
    if hidden:
        parts.append(
            Text(f"{hidden} partner(s) with nothing to show not listed (--all)", style="dim")
        )
    parked = Table(title="needs waiting for consent, per agency")
    for column in ("agency · signal", "needs · need", "waiting since"):
        parked.add_column(column)
    for p in snap.parked:
        since = f"{p.oldest_since:%Y-%m-%d %H:%M}" if p.oldest_since else "–"
        parked.add_row(p.agency, str(p.needs), since, style="bold")
        for item in p.items:
            when = f"{item.since:%Y-%m-%d %H:%M}" if item.since else "–"
            parked.add_row(f"  {item.signal_id}", item.need, when, style="dim")
    parts.append(parked if snap.parked else Text("no need waits for consent"))
    queues = Table(title=f"queues under {prefix}")
    for column in ("queue", "role", "ready", "consumers"):
        queues.add_column(column)
    for q in snap.queues:
        if q.role != "partner" and (q.role != "dead-letter" or q.messages):
            style = "red" if q.role == "dead-letter" else ""
            queues.add_row(q.name, q.role, str(q.messages), str(q.consumers), style=style)
    parts.append(queues)
    statuses = ", ".join(f"{s} {n}" for s, n in sorted(snap.ledger.referrals_by_status.items()))
    parts.append(Text(f"referrals: {statuses or 'none'}"))
    parts.append(
        Text(
            f"overdue {len(snap.ledger.overdue)} · parked needs {snap.ledger.parked_needs} · "
            f"outbox pending {snap.ledger.outbox_pending} (failing {snap.ledger.outbox_failing}) · "
            f"dead letters {snap.dead_letters}"
        )
    )
    return parts
