"""The outbox relay: sends what the ledger committed, with publisher confirms.

A use case writes its outgoing messages in the same transaction as its state change; the
subscriber asks the relay to send them right after the commit, and a background sweep sends
whatever a crash left behind. Rows are claimed for a lease before they are sent, so two
workers do not send one together; a crash between the confirm and the commit that records it
sends it once more, with the same `message_id` (at least once; partners deduplicate on it).

The relay works in windows: it claims up to `window` rows (the most pressing first: urgent
referrals, then routine ones, then notices), publishes them all at once and waits for their
confirms together, then records them in one transaction. A claim holds at most one row per
referral (`Store.claim_pending`), so publishing a window at once never reorders a referral's
messages, across relays too. The first row of a window goes alone: if the broker cannot be
reached, the rest is given back untried.

The `delivered` notices a window's confirms queue for the source and the agency are claimed
as that transaction writes them, and published as soon as it has committed: no claim of
their own, and they never wait behind later referrals.

A window that carries referrals goes in three steps: the short transaction that claims it
also checks each of them (still awaiting an answer, covered by a consent valid now) and
marks those that may leave as being sent; the window is published and its confirms awaited
with no transaction open; a second transaction records the confirms and clears the mark.
While a referral is marked, the compare-and-set that every change of its state goes through
refuses, and the writer re-runs: a revocation, an answer or an expiry comes wholly before
the check (the referral does not leave) or after the record (it sees that it left). Neither
SQLite's write lock nor a PostgreSQL row lock is held while the broker confirms (issue 9).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Any

from aio_pika.exceptions import DeliveryError

from partnerbus.broker.topology import Topology
from partnerbus.errors import describe_error
from partnerbus.handlers.sizing import Sizer
from partnerbus.ledger.store import LedgerTx, OutboxRow, is_conflict, rerun_on_conflict
from partnerbus.usecases import Ledger, mark_delivered, send_or_withhold

log = logging.getLogger("partnerbus.relay")

Publish = Callable[..., Awaitable[Any]]
Outcomes = dict[int, BaseException | None]
"""Row id → None (confirmed) or the failure of its publish."""


WINDOW = 256
"""Rows published at once, confirms awaited together, recorded in one transaction."""


class _TooLate(Exception):  # noqa: N818 - a signal to give a window back, not an error
    """Half the lease passed before the window could be published."""


@dataclass
class _Checked:
    """A window the relay checked (`Relay._check_in`): the rows to publish (its referrals marked
    as being sent), and how many it withheld."""

    to_send: list[OutboxRow]
    withheld: int


@dataclass
class _Round:
    sent: int = 0
    withheld: int = 0
    refused: tuple[int, ...] = ()
    unreachable: bool = False
    claimed: int = 0
    later: list[OutboxRow] = field(default_factory=list)
    """Rows the window's transaction claimed as it wrote them, to publish after its commit."""


class Relay:
    def __init__(
        self,
        ledger: Ledger,
        topology: Topology,
        publish: Publish,
        executor: Executor,
        *,
        timeout_s: float,
        lease: timedelta = timedelta(seconds=60),
        window: int = WINDOW,
        window_budget_s: float = 0.0,
        renew: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.ledger = ledger
        self.topology = topology
        self.publish = publish
        # The relay's own database thread (the service gives it one apart from the
        # intake's), so that sending never queues behind intake transactions.
        self.executor = executor
        self.timeout_s = timeout_s
        self.lease = lease
        self.window = window
        # Each window sized to take about `window_budget_s` (`Sizer`): an urgent row waits
        # for the window under way, at most about that long. 0: always `window` rows.
        self.sizer = Sizer(window, window_budget_s)
        # Replaces the publishing channel after a window the broker refused whole: a
        # channel can keep nacking a quorum queue whose leader died (`partnerbus.broker.publisher`).
        self.renew = renew
        # How long a referral checked for sending stays closed to other changes at most
        # (a crash between the check and the record): the publish's own bound, and margin.
        self._sending_hold = timedelta(seconds=2 * timeout_s + 10)
        self.renewals = 0
        """Channels replaced after a window refused whole."""
        self.sent = 0
        self.failed = 0
        self.withheld = 0
        # The last ids sent, for `wait_recorded`; bounded so a long-running service keeps
        # a constant footprint.
        self._recorded: dict[str, None] = {}
        self._progress = asyncio.Event()
        # One sender at a time in a process, so that a row is never sent twice by the same
        # process; the subscribers only wake it (`kick`) and ack without waiting.
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        # notices published, their outcomes not yet committed (`_send_later`)
        self._unrecorded: list[tuple[list[OutboxRow], Outcomes]] = []

    async def _db(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, partial(fn, *args, **kwargs)
        )

    async def flush(self, rounds: int | None = None) -> int:
        """Send what is pending, window after window, and what sending committed in turn
        (a confirm queues `delivered` notices for the source and the agency), until a
        window makes no progress, the broker is unreachable, or `rounds` windows were
        sent. A row the broker refused is not tried again in the same flush. Returns how
        many rows were sent."""
        total = 0
        refused: set[int] = set()
        async with self._lock:
            done = 0
            while rounds is None or done < rounds:
                done += 1
                result = await self._flush_once(refused)
                total += result.sent
                refused.update(result.refused)
                # nothing claimed: the claim only recorded the last notices' confirms
                if result.unreachable or result.claimed == 0 or result.sent + result.withheld == 0:
                    break
            if self._unrecorded:  # no claim came after the last notices: their own commit
                pending = await self._db(self._settle_alone)
                total += self._tallied(pending).sent
        return total

    def kick(self) -> None:
        """Something was committed to the outbox: send it now rather than at the next sweep."""
        self._wake.set()

    async def _flush_once(self, refused: set[int] | None = None) -> _Round:
        began = time.monotonic()
        refused = set() if refused is None else refused
        # the notices published after the last window: recorded in this claim's
        # transaction (one transaction fewer per window), refused ones not claimed again
        pending, self._unrecorded = self._unrecorded, []
        refused.update(_refused_ids(pending))
        try:
            rows, checked = await self._db(
                self._claim_and_check, self.sizer.size, set(refused), pending
            )
        except BaseException:
            self._unrecorded = pending + self._unrecorded  # recorded by a later commit
            raise
        settled = self._tallied(pending)
        if not rows:
            return settled
        claimed_at = time.monotonic()
        if checked is not None:
            result = await self._send_checked(checked)
        elif any(self._is_referral(row) for row in rows):
            result = await self._send_referrals(rows, claimed_at)
        else:
            result = await self._send_plain(rows, claimed_at)
        result.claimed = len(rows)
        if not result.unreachable:
            self.sizer.observe(len(rows), time.monotonic() - began)
        if result.refused and not result.sent and self.renew is not None:
            log.warning(
                "the broker refused a whole window (%d rows): the relay opens a new channel",
                len(result.refused),
            )
            await self.renew()
            self.renewals += 1
        self.sent += result.sent
        self.withheld += result.withheld
        if result.withheld:
            self.kick()  # a withdrawal it may have queued goes out next
        result.sent += settled.sent
        return result

    def _settle(self, pending: list[tuple[list[OutboxRow], Outcomes]], tx: LedgerTx) -> None:
        """Record the outcomes of notices published after a window (in `tx`)."""
        now = self.ledger.clock()
        for rows, outcomes in pending:
            _record(tx, rows, outcomes, now)

    def _settle_alone(self) -> list[tuple[list[OutboxRow], Outcomes]]:
        """On the relay's database thread: the notices not yet recorded, in a transaction of
        their own (the flush ends: no claim comes after them). Returns them, to tally."""
        pending, self._unrecorded = self._unrecorded, []
        try:
            self.ledger.store.run(partial(self._settle, pending))
        except BaseException:
            self._unrecorded = pending + self._unrecorded
            raise
        return pending

    def _tallied(self, pending: list[tuple[list[OutboxRow], Outcomes]]) -> _Round:
        """`_tally` of notices whose outcomes were just committed."""
        total = _Round()
        for rows, outcomes in pending:
            one = self._tally(rows, outcomes)
            total.sent += one.sent
            total.refused += one.refused
            total.unreachable = total.unreachable or one.unreachable
        self.sent += total.sent
        return total

    def _publish(self, row: OutboxRow) -> Awaitable[Any]:
        return self.publish(
            row.body.encode(),
            exchange=self.topology.deliveries,
            routing_key=row.routing_key,
            persist=True,
            mandatory=True,
            message_id=row.message_id,
            message_type=row.message_type,
            content_type="application/json",
            timeout=self.timeout_s,
        )

    async def _publish_window(self, rows: list[OutboxRow], *, probe: bool = True) -> Outcomes:
        """Publish `rows` and wait for their confirms: row id → None (confirmed) or the
        failure. With `probe`, the first goes alone: if the broker cannot be asked, the
        others are not tried (absent from the result). The rest are published at once, in
        order, on the one confirming channel, and their confirms awaited together."""
        outcomes: Outcomes = {}
        if not rows:
            return outcomes
        first: OutboxRow | None = rows[0] if probe else None
        rest = rows[1:] if probe else rows
        if first is not None:
            try:
                await self._publish(first)
                outcomes[first.id] = None
            except Exception as exc:
                outcomes[first.id] = exc
                if _failure(exc) == "unreachable":
                    return outcomes
        results = await asyncio.gather(
            *(_awaited(self._publish(row)) for row in rest), return_exceptions=True
        )
        for row, result in zip(rest, results, strict=True):
            outcomes[row.id] = result if isinstance(result, BaseException) else None
        return outcomes

    def _tally(self, rows: list[OutboxRow], outcomes: dict[int, BaseException | None]) -> _Round:
        result = _Round()
        refused: list[int] = []
        for row in rows:
            if row.id not in outcomes:
                continue
            exc = outcomes[row.id]
            if exc is None:
                result.sent += 1
                self._after_send(row)
                continue
            self._failed(row, exc)
            if _failure(exc) == "refused":
                refused.append(row.id)
            else:
                result.unreachable = True
        result.refused = tuple(refused)
        return result

    async def _send_plain(self, rows: list[OutboxRow], claimed_at: float) -> _Round:
        """Rows that need no check at send time (notices, reminders, withdrawals): publish
        the window, then record every confirm and failure in one short transaction."""
        store = self.ledger.store
        if self._too_late(claimed_at):
            await self._db(store.release_untried, [row.id for row in rows])
            return _Round()
        outcomes = await self._publish_window(rows)
        await self._db(self._record_plain, rows, outcomes)
        return self._tally(rows, outcomes)

    def _record_plain(
        self, rows: list[OutboxRow], outcomes: dict[int, BaseException | None]
    ) -> None:
        now = self.ledger.clock()

        def record(tx: LedgerTx) -> None:
            _record(tx, rows, outcomes, now)

        self.ledger.store.run(record)

    async def _send_referrals(self, rows: list[OutboxRow], claimed_at: float) -> _Round:
        """A window with referrals claimed without their checks (they failed in the claim's
        transaction): checked apart (`_check_window`), then published and recorded
        (`_send_checked`). A check that fails for another reason than a concurrent change
        (a row the use cases cannot read) sends the window again row by row, so that one
        bad row does not hold the others back."""
        try:
            checked = await self._db(self._check_window, rows, claimed_at)
        except _CheckFailed as failed:
            if len(rows) == 1:
                raise failed.error from None
        else:
            return await self._send_checked(checked)
        total = _Round()
        for row in rows:
            try:
                one_checked = await self._db(self._check_window, [row], claimed_at)
            except _CheckFailed as failed:
                log.error(
                    "outbox row %s not checked (%s); tried again after its lease",
                    row.id,
                    describe_error(failed.error),
                )
                continue
            one = await self._send_checked(one_checked)
            total.sent += one.sent
            total.withheld += one.withheld
            total.refused += one.refused
            if one.unreachable:
                total.unreachable = True
                rest = [r.id for r in rows[rows.index(row) + 1 :]]
                await self._db(self.ledger.store.release_untried, rest)
                break
        return total

    async def _send_later(self, result: _Round) -> _Round:
        """The notices a window's confirms queued (claimed as they were written), published
        now that its transaction has committed. Their confirms are recorded by the next
        commit of this relay (the next window's or claim's, or the flush's last), not by one
        of their own: until then they stay claimed, so nobody sends them again; after a
        crash they go again once their lease is over, with the same ids."""
        if result.later:
            outcomes = await self._publish_window(result.later, probe=False)
            self._unrecorded.append((result.later, outcomes))
            result.later = []
        return result

    def _check_window(self, rows: list[OutboxRow], claimed_at: float) -> _Checked:
        """On the relay's database thread, in one short transaction: the last check of each
        referral of the window (it still awaits an answer and a consent valid now covers
        it; otherwise it is withheld, its row deleted), and those that may leave marked as
        being sent (`ReferralRepository.mark_sending`). From this commit until
        `_record_window`'s, no revocation, answer or expiry of theirs commits: each
        re-runs, and comes after the confirm is recorded (it then sees that the referral
        left). Nothing is held open while the broker confirms. A conflict re-runs the
        check; past half the lease the rows are given back untried."""
        store = self.ledger.store

        def check(tx: LedgerTx) -> _Checked:
            checked = self._check_in(tx, rows)
            if self._too_late(claimed_at):
                raise _TooLate
            return checked

        try:
            return store.run(check)
        except _TooLate:
            # Past half the lease: another worker may claim these soon; give them back
            # untried (their claims do not count) rather than race it.
            store.release_untried([row.id for row in rows])
            return _Checked([], 0)

    def _check_in(self, tx: LedgerTx, rows: list[OutboxRow]) -> _Checked:
        """In `tx`: the last check of each referral of `rows` (`send_or_withhold`), those
        that may leave marked as being sent. `_CheckFailed` for a row the use cases cannot
        read (not a concurrent change)."""
        withheld = 0
        to_send: list[OutboxRow] = []
        # what the checks read, in three statements for the window (issue 9)
        tx.prefetch_referrals([r.referral_id for r in rows if r.referral_id is not None])
        for row in rows:
            if not self._is_referral(row):
                to_send.append(row)
                continue
            assert row.referral_id is not None
            try:
                clear = send_or_withhold(self.ledger, tx, row.referral_id, row.id, row.attempts)
            except Exception as exc:
                if is_conflict(exc) or not tx.usable:
                    raise
                raise _CheckFailed(exc) from None
            if clear:
                to_send.append(row)
            else:
                log.info("referral %s withheld: no longer open or consented", row.referral_id)
                withheld += 1
        tx.referrals.mark_sending(_referral_ids(to_send), self.ledger.clock() + self._sending_hold)
        return _Checked(to_send, withheld)

    def _claim_and_check(
        self,
        size: int,
        exclude: set[int],
        pending: list[tuple[list[OutboxRow], Outcomes]],
    ) -> tuple[list[OutboxRow], _Checked | None]:
        """On the relay's database thread, in ONE transaction: the notices published after
        the last window recorded (`pending`), up to `size` rows claimed, and the referrals
        among them checked and marked as being sent (`_check_in`): a window costs two
        transactions, this one and its record, as it did when one transaction held it
        through the confirms. A concurrent change re-runs it (on PostgreSQL a revocation
        deleting a row this claim holds while holding the consent this check waits for is
        such a change: one of the two is told of a deadlock and re-runs, the other goes
        on); a row the checks cannot read makes it claim without them (None:
        `_send_referrals` checks the window apart, then row by row)."""
        store = self.ledger.store
        settle = partial(self._settle, pending) if pending else None

        def attempt() -> tuple[list[OutboxRow], _Checked | None]:
            checked: list[_Checked] = []

            def then(tx: LedgerTx, rows: list[OutboxRow]) -> None:
                if any(self._is_referral(row) for row in rows):
                    checked.append(self._check_in(tx, rows))

            try:
                rows = store.claim_pending(
                    self.ledger.clock(), self.lease, size, exclude=exclude, settle=settle, then=then
                )
            except _CheckFailed:
                rows = store.claim_pending(
                    self.ledger.clock(), self.lease, size, exclude=exclude, settle=settle
                )
                return rows, None
            return rows, (checked[0] if checked else None)

        return rerun_on_conflict(attempt)

    async def _send_checked(self, checked: _Checked) -> _Round:
        """Publish what `_check_window` cleared, then record the confirms (`_record_window`)
        and publish the `delivered` notices they queued."""
        if not checked.to_send:
            return _Round(withheld=checked.withheld)
        outcomes = await self._publish_window(checked.to_send)
        pending, self._unrecorded = self._unrecorded, []
        try:
            notices: list[OutboxRow] = await self._db(
                self._record_window, checked.to_send, outcomes, pending
            )
        except BaseException as exc:
            self._unrecorded = pending + self._unrecorded
            if outcomes:
                # They may have left: the rows keep their claims (counted as a try) and go
                # again after the lease, with the same message ids.
                log.warning(
                    "%d outbox rows published but their confirms not recorded (%s)",
                    len(outcomes),
                    type(exc).__name__,
                )
            raise
        settled = self._tallied(pending)
        result = self._tally(checked.to_send, outcomes)
        result.withheld = checked.withheld
        result.sent += settled.sent
        result.later = notices
        return await self._send_later(result)

    def _record_window(
        self,
        rows: list[OutboxRow],
        outcomes: Outcomes,
        pending: list[tuple[list[OutboxRow], Outcomes]],
    ) -> list[OutboxRow]:
        """On the relay's database thread, in one transaction: the window's confirms and
        failures, its referrals no longer being sent and those confirmed delivered (and
        disclosed), and the notices published after the last window (`pending`). The
        `delivered` notices the confirms queue for the source and the agency are claimed
        as they are written (no claim transaction of their own, issue 9) and returned, to
        publish once this has committed."""
        store = self.ledger.store

        referral_ids = _referral_ids(rows)

        def record(tx: LedgerTx) -> list[OutboxRow]:
            now = self.ledger.clock()
            self._settle(pending, tx)
            tx.prefetch_referrals(referral_ids)  # what `mark_delivered` reads, at once
            tx.referrals.mark_sending(referral_ids, None)
            _record(tx, rows, outcomes, now)
            with tx.outbox.claiming(now + self.lease) as notices:
                for row in rows:
                    if self._is_referral(row) and outcomes.get(row.id, False) is None:
                        assert row.referral_id is not None
                        mark_delivered(self.ledger, tx, row.referral_id)
            return notices

        return store.run(record)

    def _too_late(self, claimed_at: float) -> bool:
        return time.monotonic() - claimed_at > self.lease.total_seconds() / 2

    def _failed(self, row: OutboxRow, exc: BaseException) -> None:
        self.failed += 1
        log.warning(
            "outbox row %s to %s not sent: %s", row.id, row.routing_key, describe_error(exc)
        )

    def _after_send(self, row: OutboxRow) -> None:
        self._recorded[row.message_id] = None
        if len(self._recorded) > 10_000:
            del self._recorded[next(iter(self._recorded))]
        self._progress.set()

    @staticmethod
    def _is_referral(row: OutboxRow) -> bool:
        return row.message_type == "referral" and row.referral_id is not None

    async def wait_recorded(self, message_id: str, timeout: float = 10.0) -> None:
        """Wait until this process has sent `message_id` and recorded the confirm."""
        async with asyncio.timeout(timeout):
            while message_id not in self._recorded:
                self._progress.clear()
                await self._progress.wait()

    async def run(self, interval_s: float, stop: asyncio.Event) -> None:
        """The sender: wakes on `kick` or every `interval_s` (what a crash or an outage left),
        sends until nothing is pending; on `stop` (which also kicks), sends one last time."""
        while not stop.is_set():
            self._wake.clear()
            try:
                await self.flush()
            except Exception as exc:
                # no traceback: a database error's text would carry the values it was given
                log.error(
                    "outbox relay failed (%s); next try in %.1fs", describe_error(exc), interval_s
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=interval_s)
        try:
            await self.flush()
        except Exception as exc:
            log.error(
                "last outbox flush before shutdown failed (%s); the next start sends it",
                describe_error(exc),
            )


class _CheckFailed(Exception):  # noqa: N818 - carries the error of one window's check
    def __init__(self, error: BaseException) -> None:
        super().__init__(type(error).__name__)
        self.error = error


def _record(
    tx: LedgerTx,
    rows: list[OutboxRow],
    outcomes: dict[int, BaseException | None],
    now: Any,
) -> None:
    """One window's confirms in one statement; each failure kept with its error (its claim
    counts: it may have reached the broker); rows never tried given back uncounted."""
    tx.outbox.mark_sent_many(
        [row.id for row in rows if row.id in outcomes and outcomes[row.id] is None], now
    )
    for row in rows:
        exc = outcomes.get(row.id)
        if exc is not None:
            tx.outbox.release_row(row.id, describe_error(exc))
    tx.outbox.release_untried([row.id for row in rows if row.id not in outcomes])


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def _referral_ids(rows: list[OutboxRow]) -> list[str]:
    """The referrals a window carries (its rows that are referrals themselves)."""
    return [row.referral_id for row in rows if Relay._is_referral(row) and row.referral_id]


def _refused_ids(pending: list[tuple[list[OutboxRow], Outcomes]]) -> set[int]:
    return {
        row_id
        for _rows, outcomes in pending
        for row_id, exc in outcomes.items()
        if exc is not None and _failure(exc) == "refused"
    }


def _failure(exc: BaseException) -> str:
    return "refused" if isinstance(exc, DeliveryError) else "unreachable"
