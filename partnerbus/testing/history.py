"""A synthetic year of a département's referrals, written straight into a ledger: what the
insights are measured on (`bench.insights`) and what the demo shows them on.

`generate(store, referrals, seed)` writes about `referrals` referrals over the year before
`END` (2026-11-01) with their signals, needs and history, in bulk (no use case runs): the
bundled sample's real communes (the Métropole Européenne de Lille, Nord) and partners with
their needs; a person lives in one commune and has 1-2 needs per signal; each partner
answers after a lognormal delay of its own (median 1 h to 4 days), some slowing down over
the year; outcomes (seed 12, 20,000 referrals): completed ~46 %, accepted or in
progress ~16 %, rejected ~18 % (a third `full`), expired ~8 % (rerouted: a second attempt),
cancelled or withdrawn ~7 %, failed ~3 %, the last month's partly still waiting; 4 % of
needs find no partner, 3 % close without consent. Person references are `T-BENCH-…` tokens
of no one.
"""

from __future__ import annotations

import math
import random
import zlib
from datetime import UTC, datetime, timedelta
from typing import Any

from partnerbus.directory import load_sample
from partnerbus.ledger import tables as t
from partnerbus.ledger.store import Store

END = datetime(2026, 11, 1, tzinfo=UTC)
YEAR = timedelta(days=365)
BATCH = 5_000
"""Signals generated, then written, at a time (their needs, referrals and history with them)."""


def _profiles(rng: random.Random, partner_ids: list[str]) -> dict[str, tuple[float, float]]:
    """Each partner's median answer delay (hours) and its drift over the year (x1 to x2.5
    for one in four)."""
    out = {}
    for pid in partner_ids:
        median_h = math.exp(rng.uniform(math.log(1), math.log(96)))
        drift = rng.uniform(1.0, 2.5) if rng.random() < 0.25 else 1.0
        out[pid] = (median_h, drift)
    return out


def generate(store: Store, referrals: int, seed: int) -> dict[str, int]:
    """Write about `referrals` referrals (and what goes with them); the row counts."""
    rng = random.Random(seed)
    d = load_sample()
    communes = d.communes()
    weights = [rng.paretovariate(1.2) for _ in communes]
    serving: dict[str, list[str]] = {}
    for p in d.partners():
        for need in p.needs:
            serving.setdefault(need, []).append(p.id)
    needs = sorted(serving)
    sources = [p.id for p in d.partners() if p.kind == "bailleur-social"] or ["bailleur"]
    profiles = _profiles(rng, sorted({pid for ids in serving.values() for pid in ids}))
    persons = max(referrals // 2, 10)
    home = {n: rng.choices(communes, weights)[0] for n in range(persons)}
    counts = {"signals": 0, "signal_needs": 0, "referrals": 0, "referral_history": 0}
    made = 0
    number = 0
    while made < referrals:
        batch: dict[str, list[dict[str, Any]]] = {k: [] for k in counts}
        for _ in range(BATCH):
            if made >= referrals:
                break
            number += 1
            made += _signal(rng, number, d, needs, serving, sources, profiles, home, batch)
        with store.begin() as tx:
            for name, table in (
                ("signals", t.signals),
                ("signal_needs", t.signal_needs),
                ("referrals", t.referrals),
                ("referral_history", t.referral_history),
            ):
                if batch[name]:
                    tx.conn.execute(table.insert(), batch[name])
                    counts[name] += len(batch[name])
    return counts


def _signal(
    rng: random.Random,
    number: int,
    d: Any,
    needs: list[str],
    serving: dict[str, list[str]],
    sources: list[str],
    profiles: dict[str, tuple[float, float]],
    home: dict[int, str],
    batch: dict[str, list[dict[str, Any]]],
) -> int:
    person = rng.randrange(len(home))
    at = END - YEAR + timedelta(seconds=rng.uniform(0, YEAR.total_seconds()))
    signal_id = f"bench-s-{number}"
    batch["signals"].append(
        {
            "signal_id": signal_id,
            "source": rng.choice(sources),
            "person_ref": f"T-BENCH-{person}",
            "commune": home[person],
            "urgency": "routine",
            "agency": None,
            "advisor": None,
            "body": "{}",
            "received_at": at,
        }
    )
    made = 0
    for need in rng.sample(needs, 2 if rng.random() < 0.3 else 1):
        roll = rng.random()
        if roll < 0.04:
            _need(batch, signal_id, need, "no-partner", at)
            continue
        if roll < 0.07:
            closes = at + timedelta(days=30)
            _need(batch, signal_id, need, "closed", min(closes, END), parked_since=at)
            continue
        state = "routed"
        partners = list(serving[need])
        rng.shuffle(partners)
        start = at + timedelta(seconds=rng.uniform(1, 30))
        for attempt, partner in enumerate(partners[:2], start=1):
            status, end = _referral(rng, signal_id, need, attempt, partner, start, profiles, batch)
            made += 1
            if status == "completed":
                state = "closed"
            if status not in ("expired", "rejected") or end is None or end >= END:
                break
            start = end + timedelta(seconds=rng.uniform(1, 30))
        _need(batch, signal_id, need, state, at)
    return made


def _need(
    batch: dict[str, list[dict[str, Any]]],
    signal_id: str,
    need: str,
    state: str,
    at: datetime,
    *,
    parked_since: datetime | None = None,
) -> None:
    batch["signal_needs"].append(
        {
            "signal_id": signal_id,
            "need": need,
            "state": state,
            "detail": None,
            "updated_at": at,
            "parked_since": parked_since,
        }
    )


FINAL = (
    ("completed", 0.48),
    ("accepted", 0.06),
    ("in-progress", 0.06),
    ("rejected", 0.18),
    ("expired", 0.08),
    ("cancelled", 0.05),
    ("withdrawn", 0.02),
    ("failed", 0.03),
)
REASONS = (("full", 0.35), ("not-eligible", 0.3), ("unreachable", 0.15), ("other", 0.2))


def _referral(
    rng: random.Random,
    signal_id: str,
    need: str,
    attempt: int,
    partner: str,
    created: datetime,
    profiles: dict[str, tuple[float, float]],
    batch: dict[str, list[dict[str, Any]]],
) -> tuple[str, datetime | None]:
    referral_id = f"bench-r-{signal_id}-{zlib.crc32(need.encode()):08x}-{attempt}"
    median_h, drift = profiles[partner]
    along = (created - (END - YEAR)) / YEAR
    delay = timedelta(hours=median_h * (1 + (drift - 1) * along) * math.exp(rng.gauss(0, 0.9)))
    final = rng.choices([s for s, _ in FINAL], [w for _, w in FINAL])[0]
    sent = created + timedelta(seconds=rng.uniform(0.05, 3))
    steps: list[tuple[str, datetime, str]] = [("delivered", sent, "bus")]
    if rng.random() < 0.5:
        steps.append(("received", sent + delay * rng.uniform(0.05, 0.5), partner))
    answer = sent + delay
    reason = None
    if final == "expired":
        steps.append(("expired", sent + timedelta(days=15), "bus"))
    elif final in ("cancelled", "withdrawn"):
        steps.append((final, sent + delay * rng.uniform(0.2, 3), "advisor"))
    elif final == "rejected":
        reason = rng.choices([r for r, _ in REASONS], [w for _, w in REASONS])[0]
        steps.append(("rejected", answer, partner))
    else:
        steps.append(("accepted", answer, partner))
        if final in ("in-progress", "completed", "failed"):
            working = answer + timedelta(days=rng.uniform(0.5, 6))
            steps.append(("in-progress", working, partner))
            if final != "in-progress":
                steps.append((final, working + timedelta(days=rng.expovariate(1 / 20)), partner))
    steps = [s for s in steps if s[1] < END]
    status, closed_at, previous = "requested", None, "requested"
    for to_status, at, actor in steps:
        batch["referral_history"].append(
            {
                "referral_id": referral_id,
                "from_status": previous,
                "to_status": to_status,
                "outcome": "applied",
                "actor": actor,
                "reason": None,
                "at": at,
            }
        )
        previous = status = to_status
        if to_status in ("rejected", "completed", "failed", "expired", "cancelled", "withdrawn"):
            closed_at = at
    last = steps[-1][1] if steps else created
    batch["referrals"].append(
        {
            "referral_id": referral_id,
            "signal_id": signal_id,
            "need": need,
            "attempt": attempt,
            "partner_id": partner,
            "partner_kind": "bench",
            "consent_id": f"bench-c-{signal_id}",
            "status": status,
            "reason": reason,
            "urgency": "routine",
            "created_at": created,
            "updated_at": last,
            "sent_at": sent if sent < END else None,
            "due_at": sent + timedelta(days=15),
            "reminded": False,
            "closed_at": closed_at,
        }
    )
    return status, closed_at
