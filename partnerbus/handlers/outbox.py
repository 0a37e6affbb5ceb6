"""The outbox relay: sends what the ledger committed, with publisher confirms.

A use case writes its outgoing messages in the same transaction as its state change; the
subscriber asks the relay to send them right after the commit, and a background sweep sends
whatever a crash left behind. A row is claimed for a lease before it is sent, so two workers
do not send it together; a crash between the confirm and `mark_sent` sends it once more,
with the same `message_id` (at least once; partners deduplicate on it).

A referral is sent inside one transaction that holds its consent (shared) and its row
(locked) from the last check to the recorded confirm: a revocation, an answer or an expiry
comes wholly before (the referral does not leave) or after (it sees that it left). Rows
about one referral leave in outbox order across relays (`Store.claim_pending`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import timedelta
from functools import partial
from typing import Any

from aio_pika.exceptions import DeliveryError

from partnerbus.broker.topology import Topology
from partnerbus.errors import describe_error
from partnerbus.ledger.store import LedgerTx, OutboxRow, backoff, is_conflict
from partnerbus.usecases import Ledger, mark_delivered, send_or_withhold

log = logging.getLogger("partnerbus.relay")

Publish = Callable[..., Awaitable[Any]]


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
    ) -> None:
        self.ledger = ledger
        self.topology = topology
        self.publish = publish
        self.executor = executor
        self.timeout_s = timeout_s
        self.lease = lease
        self.sent = 0
        self.failed = 0
        self.withheld = 0
        # The last ids sent, for `wait_recorded`; bounded so a long-running service keeps
        # a constant footprint.
        self._recorded: dict[str, None] = {}
        self._progress = asyncio.Event()
        # One sender at a time in a process, so that messages leave in commit order and a
        # row is never sent twice by the same process; the subscribers only wake it (`kick`)
        # and ack without waiting for the send.
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()

    async def _db(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, partial(fn, *args))

    async def flush(self, rounds: int = 4) -> int:
        """Send what is pending, and what sending it committed in turn (a confirm records a
        `delivered` notice for the source), for a few rounds. Returns how many were sent."""
        total = 0
        async with self._lock:
            for _ in range(rounds):
                sent = await self._flush_once()
                total += sent
                if sent == 0:
                    break
        return total

    def kick(self) -> None:
        """Something was committed to the outbox: send it now rather than at the next sweep."""
        self._wake.set()

    async def _flush_once(self) -> int:
        store = self.ledger.store
        rows: list[OutboxRow] = await self._db(
            store.claim_pending, self.ledger.clock(), self.lease, 200
        )
        claimed_at = time.monotonic()
        sent = 0
        for index, row in enumerate(rows):
            if time.monotonic() - claimed_at > self.lease.total_seconds() / 2:
                # Past half the lease: another worker may claim the rest soon; give them
                # back untried (their claims do not count as tries) rather than race it.
                await self._db(store.release_untried, [r.id for r in rows[index:]])
                break
            if self._is_referral(row):
                outcome = await self._db(self._send_referral, row, asyncio.get_running_loop())
                if outcome == "withheld":
                    self.withheld += 1
                    self.kick()  # the withdrawal it may have queued goes out next
                    continue
                self._after_send(row, outcome)
            else:
                outcome = await self._send(row)
            if outcome == "unreachable":
                # The broker is gone: trying the rest of the batch now would only fail
                # again. Give them back untried, for the next sweep (or another worker).
                await self._db(store.release_untried, [r.id for r in rows[index + 1 :]])
                break
            sent += outcome == "sent"
        self.sent += sent
        return sent

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

    async def _send(self, row: OutboxRow) -> str:
        """Publish one claimed row and record its confirm: `sent`; `refused` when the broker
        refused this message (unroutable, nacked); `unreachable` when it could not be asked
        (connection or channel lost, confirm timed out). Both leave the row for a later try."""
        store = self.ledger.store
        try:
            await self._publish(row)
        except Exception as exc:
            self._failed(row, exc)
            await self._db(store.release, row.id, describe_error(exc))
            return _failure(exc)
        await self._db(self._confirmed, row)
        self._after_send(row, "sent")
        return "sent"

    def _failed(self, row: OutboxRow, exc: BaseException) -> None:
        self.failed += 1
        log.warning(
            "outbox row %s to %s not sent: %s", row.id, row.routing_key, describe_error(exc)
        )

    def _after_send(self, row: OutboxRow, outcome: str) -> None:
        if outcome != "sent":
            return
        self._recorded[row.message_id] = None
        if len(self._recorded) > 10_000:
            del self._recorded[next(iter(self._recorded))]
        self._progress.set()

    def _send_referral(self, row: OutboxRow, loop: asyncio.AbstractEventLoop) -> str:
        """On a database thread: check, publish and record the confirm of one referral in
        ONE transaction, holding its consent (shared) and its row (locked) throughout, so
        that a revocation either commits before (the referral is withheld, never leaves)
        or waits and comes after (it sees that the referral left, and the partner is told).
        The publish runs on the event loop, which is free meanwhile. A conflict before the
        publish re-runs the transaction; after it, the row waits for the next try (sent
        again with the same message id if the first reached the partner)."""
        published = False

        def attempt(tx: LedgerTx) -> str:
            nonlocal published
            assert row.referral_id is not None
            if not send_or_withhold(self.ledger, tx, row.referral_id, row.id, row.attempts):
                log.info("referral %s withheld: no longer open or consented", row.referral_id)
                return "withheld"
            published = True
            future = None
            try:
                future = asyncio.run_coroutine_threadsafe(_awaited(self._publish(row)), loop)
                future.result(timeout=self.timeout_s + 5)
            except Exception as exc:
                if future is not None:
                    future.cancel()
                if isinstance(exc, FutureTimeout):
                    exc = TimeoutError("no confirm in time")
                self._failed(row, exc)
                tx.release_row(row.id, describe_error(exc))
                return _failure(exc)
            tx.mark_sent(row.id, self.ledger.clock())
            mark_delivered(self.ledger, tx, row.referral_id)
            return "sent"

        store = self.ledger.store
        for tries in range(1, 9):
            try:
                with store.begin() as tx:
                    return attempt(tx)
            except Exception as exc:
                if published or tries == 8 or not is_conflict(exc):
                    if published:
                        # It may have left: the row keeps its claim (counted as a try) and
                        # goes again after the lease, with the same message id.
                        log.warning(
                            "referral row %s published but its confirm not recorded (%s)",
                            row.id,
                            type(exc).__name__,
                        )
                    raise
                backoff(tries)
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _is_referral(row: OutboxRow) -> bool:
        return row.message_type == "referral" and row.referral_id is not None

    def _confirmed(self, row: OutboxRow) -> None:
        now = self.ledger.clock()
        self.ledger.store.run(lambda tx: tx.mark_sent(row.id, now))

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
                while await self.flush() > 0:
                    pass
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


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def _failure(exc: BaseException) -> str:
    return "refused" if isinstance(exc, DeliveryError) else "unreachable"
