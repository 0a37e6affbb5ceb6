"""What every use case runs with: the `Ledger` (record, directory, clock, policies), and
the two wrappers every use case goes through, so that no use case does it by hand:

- `use_case`: the clock is read once, at the start of the transaction, and the use case
  runs with a ledger pinned to that instant: every row it writes, every message it emits
  and every consent it evaluates says the same `now` (a transaction re-run after a
  `Conflict` reads the clock again, once);
- `intake`: for a message taken from a queue, the dedupe mark as well: a message already
  processed does nothing and answers False, one seen for the first time is marked in the
  same transaction as what it changes, and answers True.
"""

from __future__ import annotations

import copy
import functools
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Concatenate, ParamSpec, Protocol, TypeVar

from partnerbus.directory import Directory
from partnerbus.ledger.store import LedgerTx, Store
from partnerbus.rules import (
    PARKED_FOLLOW_UP,
    STALLED_FOLLOW_UP,
    DeadlinePolicy,
    FollowUpPolicy,
    check_pseudonym_key,
    disclose,
    recipient_roles,
)
from partnerbus.schemas import Message

Clock = Callable[[], datetime]
BUS = "partnerbus"
"""The actor the bus records for what it decided itself."""
DIRECTORY_UPDATES_KEY = "directory.updates"
"""Routing key, on the deliveries exchange, of the broadcast every worker's directory hears
(no partner id can contain a dot, so it never reaches a partner)."""

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class Ledger:
    """What every use case needs: the record, the directory, the clock and the policies."""

    store: Store
    directory: Directory
    clock: Clock
    pseudonym_key: bytes
    deadlines: DeadlinePolicy
    consent_notice: timedelta = timedelta(days=14)
    parked: FollowUpPolicy = PARKED_FOLLOW_UP
    """A need parked for consent: when the advisor is reminded, when the need closes."""
    stalled: FollowUpPolicy = STALLED_FOLLOW_UP
    """An accepted referral with no news: when the partner is reminded, the advisor told."""

    def __post_init__(self) -> None:
        check_pseudonym_key(self.pseudonym_key)  # a guessable key makes pseudonyms reversible

    def at(self, now: datetime) -> Ledger:
        """This ledger with its clock stopped at `now`: what a use case runs with. A copy
        of this one (its key already checked), not a new one built and checked again: it
        is made for every use case (issue 9)."""
        stopped = copy.copy(self)
        object.__setattr__(stopped, "clock", _Stopped(now))
        return stopped


@dataclass(frozen=True)
class _Stopped:
    """A clock that always answers the instant its transaction started."""

    now: datetime

    def __call__(self) -> datetime:
        return self.now


def use_case(
    run: Callable[Concatenate[Ledger, LedgerTx, P], R],
) -> Callable[Concatenate[Ledger, LedgerTx, P], R]:
    """One `now` per transaction: the clock is read here, once, and the use case (and
    everything it calls) reads that instant from `ledger.clock()`."""

    @functools.wraps(run)
    def at_one_instant(ledger: Ledger, tx: LedgerTx, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return run(ledger.at(ledger.clock()), tx, *args, **kwargs)

    return at_one_instant


class Identified(Protocol):
    """A message taken from a queue: its id is what dedupe keys on."""

    @property
    def message_id(self) -> str: ...


M = TypeVar("M", bound=Identified)


def intake(
    run: Callable[[Ledger, LedgerTx, M], None],
) -> Callable[[Ledger, LedgerTx, M, str], bool]:
    """The prologue of every use case a message from a queue starts: one `now` (see
    `use_case`), and the dedupe mark, taken in the use case's own transaction. False for
    a message already processed from `queue` (nothing is done again), True otherwise."""

    @functools.wraps(run)
    def once(ledger: Ledger, tx: LedgerTx, message: M, queue: str) -> bool:
        now = ledger.clock()
        if not tx.processed.first_time(message.message_id, queue, now):
            return False
        run(ledger.at(now), tx, message)
        return True

    return once


def _derived_id(*parts: str) -> str:
    """A deterministic message id for what the bus emits: a relayed row sent twice, or a
    use case run again after a rollback, keeps one id that partners can deduplicate on."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "partnerbus:" + "|".join(parts)))


def send(
    ledger: Ledger,
    tx: LedgerTx,
    message: Message,
    recipient: str,
    *,
    source: str | None = None,
    agency: str | None = None,
    referral_id: str | None = None,
) -> None:
    """Write `message` to the outbox for `recipient`, cut to what its roles may see
    (docs/DISCLOSURE.md): its relation to the signal (`source` and `agency` are the
    signal's) and whether the directory says it is a creditor. Every message the bus sends
    a partner goes through here (the outbox takes only `Disclosed` messages)."""
    roles = recipient_roles(
        message,
        recipient,
        source=source,
        agency=agency,
        creditor=ledger.directory.is_creditor(recipient),
    )
    tx.outbox.enqueue(disclose(message, roles), recipient, ledger.clock(), referral_id=referral_id)
