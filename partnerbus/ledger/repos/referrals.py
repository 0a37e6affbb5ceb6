"""Referrals, their compare-and-set state changes and their history."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, fields, replace
from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy import and_, bindparam, func, or_, select, update

from partnerbus.ledger import tables as t
from partnerbus.ledger.repos.base import Conflict, Prepared, Repository, row_of
from partnerbus.rules.lifecycle import AWAITING_ANSWER

# Built once and run as `Prepared` (its SQL rendered once per dialect, issue 9).
INSERT = Prepared(t.referrals.insert())
INSERT_HISTORY = Prepared(t.referral_history.insert())
# The hot reads, built once with bound parameters (see INSERT).
GET = select(t.referrals).where(t.referrals.c.referral_id == bindparam("referral_id"))
GET_LOCKED = GET.with_for_update()
# The compare-and-set: its key, expected status and instant bound under names no column
# has, so that the other parameters given are the columns it sets. A referral a relay is
# publishing (`mark_sending`) is not changed until the relay has recorded the outcome.
COMPARE_AND_SET = Prepared(
    update(t.referrals).where(
        t.referrals.c.referral_id == bindparam("where_referral_id"),
        t.referrals.c.status == bindparam("where_status"),
        or_(
            t.referrals.c.sending_until.is_(None),
            t.referrals.c.sending_until <= bindparam("where_now"),
        ),
    )
)


@dataclass(frozen=True)
class ReferralRow:
    referral_id: str
    signal_id: str
    need: str
    attempt: int
    partner_id: str
    partner_kind: str
    consent_id: str
    status: str
    reason: str | None
    outcome: str | None
    urgency: str
    created_at: datetime
    updated_at: datetime
    sent_at: datetime | None
    due_at: datetime | None
    remind_at: datetime | None
    reminded: bool
    closed_at: datetime | None
    anonymised_at: datetime | None
    stalled_reminded_at: datetime | None = None
    stalled_reported_at: datetime | None = None
    sending_until: datetime | None = None


_FIELDS = frozenset(f.name for f in fields(ReferralRow))


class ReferralRepository(Repository):
    """Referral rows: every write of a referral's state is a compare-and-set (`update`),
    recorded in its history (`record_transition`)."""

    def add(self, **values: Any) -> None:
        INSERT(self.conn, values)
        self.cache.count_referral(values["partner_id"], None, values["status"])

    def get(self, referral_id: str, *, lock: bool = False) -> ReferralRow | None:
        """A referral; with `lock`, its row is held until this transaction ends
        (SELECT … FOR UPDATE on PostgreSQL; SQLite's BEGIN IMMEDIATE holds everything)."""
        cached = self.cache.get("referral", referral_id, lock=lock)
        if cached is not None:
            return cached  # type: ignore[no-any-return]
        query = GET_LOCKED if lock else GET
        row = self.conn.execute(query, {"referral_id": referral_id}).first()
        if row is None:
            return None
        referral = row_of(ReferralRow, row)
        self.cache.put("referral", referral_id, referral, locked=lock)
        return referral

    def prefetch(self, referral_ids: Collection[str]) -> list[ReferralRow]:
        """Read these referrals in one statement (unlocked), for `get` to serve where it
        may (see `RowCache`); returns those not cached before that were found."""
        return self._prefetch(
            "referral", t.referrals.c.referral_id, referral_ids, partial(row_of, ReferralRow)
        )

    def for_signal(self, signal_id: str, need: str | None = None) -> list[ReferralRow]:
        query = select(t.referrals).where(t.referrals.c.signal_id == signal_id)
        if need is not None:
            query = query.where(t.referrals.c.need == need)
        rows = self.conn.execute(query.order_by(t.referrals.c.need, t.referrals.c.attempt))
        return [row_of(ReferralRow, r) for r in rows]

    def under_consent(self, consent_id: str, statuses: frozenset[str]) -> list[ReferralRow]:
        rows = self.conn.execute(
            select(t.referrals)
            .where(t.referrals.c.consent_id == consent_id, t.referrals.c.status.in_(statuses))
            .order_by(t.referrals.c.referral_id)
        )
        return [row_of(ReferralRow, r) for r in rows]

    def with_ended_consent(self, now: datetime, statuses: frozenset[str]) -> list[ReferralRow]:
        """Referrals in `statuses` whose consent has run out (not revoked: revocation
        withdraws at once)."""
        rows = self.conn.execute(
            select(t.referrals)
            .join(t.consents, t.consents.c.consent_id == t.referrals.c.consent_id)
            .where(
                t.referrals.c.status.in_(statuses),
                t.consents.c.valid_until <= now,
                t.consents.c.revoked_at.is_(None),
            )
            .order_by(t.referrals.c.referral_id)
        )
        return [row_of(ReferralRow, r) for r in rows]

    def waiting(self, started_by: Mapping[str, datetime]) -> list[ReferralRow]:
        """Referrals still waiting for the partner's answer whose clock started (sent, or
        created if never sent) at or before `started_by[urgency]`, for the deadline watch:
        the caller gives, per urgency, the latest start whose first step (a reminder) has
        come, so that only referrals with something due are read, not every open one (a
        pass that read them all held the write lock for as long as it took, issue 9)."""
        started = func.coalesce(t.referrals.c.sent_at, t.referrals.c.created_at)
        rows = self.conn.execute(
            select(t.referrals)
            .where(
                t.referrals.c.status.in_(AWAITING_ANSWER),
                or_(
                    *(
                        and_(t.referrals.c.urgency == urgency, started <= latest)
                        for urgency, latest in started_by.items()
                    )
                ),
            )
            .order_by(t.referrals.c.due_at, t.referrals.c.referral_id)
        )
        return [row_of(ReferralRow, r) for r in rows]

    def quiet(self, statuses: frozenset[str], news_before: datetime) -> list[ReferralRow]:
        """Referrals in `statuses` with no news since before `news_before` (their last news
        is `updated_at`) whose advisor has not yet been told they stalled, for the
        stalled-referrals follow-up."""
        rows = self.conn.execute(
            select(t.referrals)
            .where(
                t.referrals.c.status.in_(statuses),
                t.referrals.c.updated_at < news_before,
                t.referrals.c.stalled_reported_at.is_(None),
            )
            .order_by(t.referrals.c.updated_at, t.referrals.c.referral_id)
        )
        return [row_of(ReferralRow, r) for r in rows]

    def mark_stalled(
        self, referral_id: str, status: str, last_news: datetime, column: str, now: datetime
    ) -> bool:
        """Record a step of the stalled-referral follow-up (`column`: stalled_reminded_at
        or stalled_reported_at), once: False if the referral has had news since
        `last_news` (its status or `updated_at` moved) or the step was taken already
        (another pass, another worker)."""
        c = t.referrals.c
        self.cache.drop("referral", referral_id)
        return bool(
            self.conn.execute(
                update(t.referrals)
                .where(
                    c.referral_id == referral_id,
                    c.status == status,
                    c.updated_at == last_news,
                    c[column].is_(None),
                )
                .values({column: now})
            ).rowcount
        )

    def update(
        self, referral_id: str, expected_status: str, *, now: datetime, **values: Any
    ) -> None:
        """Compare-and-set: write only if the referral is still `expected_status` (the
        status the decision was made on) and no relay is publishing it at `now`
        (`mark_sending`); otherwise raise `Conflict` and the transaction re-runs on a
        fresh read, after the relay has recorded what the broker said. Every write of a
        referral's state goes through here."""
        changed = COMPARE_AND_SET(
            self.conn,
            {
                **values,
                "where_referral_id": referral_id,
                "where_status": expected_status,
                "where_now": now,
            },
        ).rowcount
        if changed != 1:
            self.cache.drop("referral", referral_id)
            msg = f"referral {referral_id} is no longer {expected_status}, or is being sent"
            raise Conflict(msg)
        cached = self.cache.entry("referral", referral_id)
        if "status" in values:
            partner_id = cached[0].partner_id if cached is not None else None
            self.cache.count_referral(partner_id, expected_status, values["status"])
        if cached is not None and set(values) <= _FIELDS:
            # written under the compare-and-set: the row as it now stands
            self.cache.put("referral", referral_id, replace(cached[0], **values), locked=True)
        else:
            self.cache.drop("referral", referral_id)

    def mark_sending(self, referral_ids: Collection[str], until: datetime | None) -> None:
        """The relay has checked these referrals and publishes them now: until it records
        the outcome (`until` None), or `until` at the latest (it crashed), no state change
        of theirs commits (`update` refuses). One statement for the window."""
        if not referral_ids:
            return
        self.conn.execute(
            update(t.referrals)
            .where(t.referrals.c.referral_id.in_(list(referral_ids)))
            .values(sending_until=until)
        )
        for referral_id in referral_ids:
            cached = self.cache.entry("referral", referral_id)
            if cached is not None:
                self.cache.put(
                    "referral", referral_id, replace(cached[0], sending_until=until), locked=True
                )

    def record_transition(
        self,
        referral_id: str,
        from_status: str,
        to_status: str,
        outcome: str,
        actor: str,
        reason: str | None,
        at: datetime,
    ) -> None:
        INSERT_HISTORY(
            self.conn,
            {
                "referral_id": referral_id,
                "from_status": from_status,
                "to_status": to_status,
                "outcome": outcome,
                "actor": actor,
                "reason": reason,
                "at": at,
            },
        )
