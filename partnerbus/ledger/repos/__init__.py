"""The ledger's repositories: one concern each, all over one transaction's connection
(`LedgerTx` holds them as `tx.signals`, `tx.consents`, `tx.referrals`, …)."""

from partnerbus.ledger.repos.audit import AuditRepository
from partnerbus.ledger.repos.base import Conflict, Repository
from partnerbus.ledger.repos.capacity import CapacityRepository
from partnerbus.ledger.repos.consents import ConsentRepository
from partnerbus.ledger.repos.journal import JournalRepository
from partnerbus.ledger.repos.outbox import (
    OutboxRepository,
    OutboxRow,
    UnsentRow,
    outbox_priority,
)
from partnerbus.ledger.repos.processed import ProcessedRepository
from partnerbus.ledger.repos.referrals import ReferralRepository, ReferralRow
from partnerbus.ledger.repos.retention import RetentionRepository
from partnerbus.ledger.repos.signals import SignalRepository, SignalRow

__all__ = [
    "AuditRepository",
    "CapacityRepository",
    "Conflict",
    "ConsentRepository",
    "JournalRepository",
    "OutboxRepository",
    "OutboxRow",
    "ProcessedRepository",
    "ReferralRepository",
    "ReferralRow",
    "Repository",
    "RetentionRepository",
    "SignalRepository",
    "SignalRow",
    "UnsentRow",
    "outbox_priority",
]
