"""Group commit: what a queue has prefetched is recorded in one transaction, then acked.

Each intake handler hands its decoded, authenticated message to its queue's `Batcher` and
awaits the outcome. The batcher gathers what the event loop has ready (no fixed sleep: it
flushes as soon as the list of waiting handlers stops growing, or when it is full), then
runs one transaction in the intake's own database thread: each message's use case in its
own SAVEPOINT, so that one that fails is rolled back alone and gets its own exception
(refused, dead-lettered, retried: exactly as when it ran alone), and one commit for all.
(The savepoints are taken only once a message has failed: the batch first runs without
them, and runs again with them if one fails.)
Only after that commit is any handler told, so every message is acked after its record is
durable; a commit that fails fails every message of the batch (retried, never acked).

Re-runs: when one message meets a concurrent change (a `Conflict`, a serialization failure,
a deadlock), the whole batch re-runs on fresh reads (`Store.run`), as a lone message's
transaction did. A transient failure (the database unreachable) ends the whole transaction:
every message of the batch gets it and goes to its retry queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial

from partnerbus.handlers.delivery import is_transient
from partnerbus.handlers.sizing import Sizer
from partnerbus.ledger.store import LedgerTx, Store, is_conflict

log = logging.getLogger("partnerbus.batch")

Work = Callable[[LedgerTx], bool]


@dataclass
class _Waiting:
    work: Work
    future: asyncio.Future[bool]


@dataclass
class _Outcome:
    done: bool = False
    error: BaseException | None = None


def _ends_transaction(exc: BaseException, tx: LedgerTx) -> bool:
    """A failure the savepoint cannot contain: re-run the whole batch, or give it up."""
    return is_conflict(exc) or is_transient(exc) or not tx.usable


@dataclass
class Batcher:
    """One queue's group commit (see the module)."""

    store: Store
    executor: Executor
    max_size: int = 128
    max_wait_s: float = 0.0
    """Extra wait for stragglers once the loop has nothing ready (0: none)."""
    budget_s: float = 0.0
    """Time a batch's transaction should take at most, about (`Sizer`); 0: `max_size`."""
    on_commit: Callable[[list[bool]], None] = lambda _done: None
    """Told after each committed batch (the relay is kicked when something was recorded)."""
    _waiting: list[_Waiting] = field(default_factory=list)
    _flusher: asyncio.Task[None] | None = None
    batches: int = 0
    """Transactions committed (the tests and the benchmark read it)."""
    sizer: Sizer = field(init=False)

    def __post_init__(self) -> None:
        self.sizer = Sizer(self.max_size, self.budget_s)

    async def record(self, work: Work) -> bool:
        """Run `work` in the next batch's transaction; True/False as `work` returned, once
        the batch has committed; its own exception when it failed."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(work, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def _gather(self) -> None:
        """Let every handler that is ready hand its message in: yield to the loop until the
        list stops growing (or is full); then, when set, a short wait for stragglers."""
        size = self.sizer.size
        seen = -1
        while seen != len(self._waiting) and len(self._waiting) < size:
            seen = len(self._waiting)
            await asyncio.sleep(0)
        if self.max_wait_s > 0 and len(self._waiting) < size:
            await asyncio.sleep(self.max_wait_s)

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            await self._gather()
            size = self.sizer.size
            batch = self._waiting[:size]
            del self._waiting[:size]
            try:
                outcomes = await loop.run_in_executor(self.executor, self._timed, batch)
            except asyncio.CancelledError:  # the loop is stopping: nothing is acked
                for item in batch:
                    item.future.cancel()
                raise
            except Exception as exc:  # the transaction failed whole (commit included)
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            self.batches += 1
            for item, outcome in zip(batch, outcomes, strict=True):
                if item.future.done():  # its handler was cancelled: redelivered, deduped
                    continue
                if outcome.error is not None:
                    item.future.set_exception(outcome.error)
                else:
                    item.future.set_result(outcome.done)
            try:
                self.on_commit([o.done for o in outcomes if o.error is None])
            except Exception:
                log.exception("after-commit hook failed")

    def _timed(self, batch: list[_Waiting]) -> list[_Outcome]:
        """`_run`, its time (in the database thread: not the wait for it) told to the sizer."""
        began = time.perf_counter()
        outcomes = self._run(batch)
        self.sizer.observe(len(batch), time.perf_counter() - began)
        return outcomes

    def _run(self, batch: list[_Waiting]) -> list[_Outcome]:
        """One transaction for the batch. Optimistic first: the messages run one after the
        other with no savepoint (two statements each spared, issue 9); the first that
        fails rolls the whole transaction back, and the batch runs again with each message
        in its own savepoint, so that the failing one is rolled back alone and gets its own
        exception. Only committed work is ever told to a handler, either way."""

        def work(tx: LedgerTx, guard: bool) -> list[_Outcome]:
            outcomes: list[_Outcome] = []
            for item in batch:
                try:
                    with tx.savepoint() if guard else contextlib.nullcontext():
                        outcomes.append(_Outcome(done=item.work(tx)))
                except Exception as exc:
                    if _ends_transaction(exc, tx):
                        raise  # Store.run re-runs a conflict; anything else fails all
                    if not guard:
                        raise _Guard from exc
                    outcomes.append(_Outcome(error=exc))
            return outcomes

        try:
            return self.store.run(partial(work, guard=False))
        except _Guard:
            return self.store.run(partial(work, guard=True))


class _Guard(Exception):  # noqa: N818 - a signal to run the batch again, guarded
    """A message of an unguarded batch failed: run it again, each message in a savepoint."""
