"""The durable record's tables (SQLAlchemy Core): portable between SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores aware datetimes in UTC; SQLite gives them back naive, this makes them aware."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            msg = "naive datetime refused: the ledger stores aware UTC times only"
            raise ValueError(msg)
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = MetaData()

ID = String(128)
PARTNER = String(64)

processed = Table(
    "processed_messages",
    metadata,
    Column("message_id", ID, primary_key=True),
    Column("queue", String(64), primary_key=True),
    Column("processed_at", UTCDateTime, nullable=False),
)

signals = Table(
    "signals",
    metadata,
    Column("signal_id", ID, primary_key=True),
    Column("source", PARTNER, nullable=False),
    Column("person_ref", String(64), nullable=False, index=True),
    Column("commune", String(5), nullable=False),
    Column("urgency", String(16), nullable=False),
    Column("agency", PARTNER),
    Column("advisor", String(64)),
    # The signal as received (JSON); retention removes its free text, then its identifiers.
    Column("body", Text, nullable=False),
    Column("received_at", UTCDateTime, nullable=False),
    Column("note_deleted_at", UTCDateTime),
    Column("anonymised_at", UTCDateTime),
)

signal_needs = Table(
    "signal_needs",
    metadata,
    Column("signal_id", ID, primary_key=True),
    Column("need", String(160), primary_key=True),
    # parked | routed | no-partner | refused | withdrawn | closed
    Column("state", String(16), nullable=False),
    Column("detail", Text),
    Column("updated_at", UTCDateTime, nullable=False),
    # While parked: since when (kept when it is parked again), and when the advisor was
    # reminded (the scheduler's parked-needs follow-up).
    Column("parked_since", UTCDateTime),
    Column("reminded_at", UTCDateTime),
    Index("ix_signal_needs_state", "state"),
    # the unmet-demand insight: needs ending in a state within a period (0005)
    Index("ix_signal_needs_state_updated", "state", "updated_at"),
)

consents = Table(
    "consents",
    metadata,
    Column("consent_id", ID, primary_key=True),
    Column("person_ref", String(64), nullable=False, index=True),
    Column("scope", Text, nullable=False),
    Column("collected_by", String(80), nullable=False),
    Column("agency", PARTNER, nullable=False),
    Column("method", String(8), nullable=False),
    Column("granted_at", UTCDateTime, nullable=False),
    Column("valid_until", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime),
    Column("revoked_by", String(80)),
    Column("expiry_notified_at", UTCDateTime),
)

consent_journal = Table(
    "consent_journal",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("consent_id", ID),
    Column("person_ref", String(64), nullable=False, index=True),
    Column("event", String(16), nullable=False),  # granted | revoked | refused
    Column("by", String(80), nullable=False),
    Column("at", UTCDateTime, nullable=False),
    Column("body", Text, nullable=False),
)

referrals = Table(
    "referrals",
    metadata,
    Column("referral_id", ID, primary_key=True),
    Column("signal_id", ID, nullable=False, index=True),
    Column("need", String(160), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("partner_id", PARTNER, nullable=False, index=True),
    Column("partner_kind", String(64), nullable=False),
    Column("consent_id", ID, nullable=False, index=True),
    Column("status", String(16), nullable=False, index=True),
    Column("reason", String(32)),
    Column("outcome", Text),
    Column("urgency", String(16), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("sent_at", UTCDateTime),
    Column("due_at", UTCDateTime),
    Column("remind_at", UTCDateTime),
    Column("reminded", Boolean, nullable=False, default=False),
    Column("closed_at", UTCDateTime),
    Column("anonymised_at", UTCDateTime),
    # Accepted with no news: when the partner was reminded, when the advisor was told.
    Column("stalled_reminded_at", UTCDateTime),
    Column("stalled_reported_at", UTCDateTime),
    # A relay has checked it and is publishing it: until then nothing else changes its
    # state (the compare-and-set waits), so a revocation or an answer comes wholly before
    # the check or after the confirm is recorded (0006).
    Column("sending_until", UTCDateTime),
    UniqueConstraint("signal_id", "need", "attempt", name="uq_referral_attempt"),
    # the places a partner's open referrals take, counted on each routing (capacity)
    Index("ix_referrals_partner_status", "partner_id", "status"),
    # the insights (0005): the referrals of a period, and those closed in it by status
    Index("ix_referrals_created_at", "created_at"),
    Index("ix_referrals_status_closed", "status", "closed_at"),
)

referral_history = Table(
    "referral_history",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("referral_id", ID, nullable=False, index=True),
    Column("from_status", String(16), nullable=False),
    Column("to_status", String(16), nullable=False),
    Column("outcome", String(8), nullable=False),  # applied | ignored | refused
    Column("actor", String(80), nullable=False),
    Column("reason", Text),
    Column("at", UTCDateTime, nullable=False),
    # The workers' acceptance-rate refresh: who answered lately, then their last answers.
    Index("ix_referral_history_at", "at"),
    Index("ix_referral_history_actor", "actor", "id"),
    # The response-times insight: a referral's first answer, acceptance, completion read
    # from the index alone (0005).
    Index("ix_referral_history_first", "referral_id", "outcome", "to_status", "at"),
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("message_id", ID, nullable=False, unique=True),
    Column("routing_key", PARTNER, nullable=False),
    Column("message_type", String(40), nullable=False),
    Column("body", Text, nullable=False),
    Column("referral_id", ID),
    Column("created_at", UTCDateTime, nullable=False),
    Column("claimed_until", UTCDateTime),
    Column("sent_at", UTCDateTime),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text),
    # What leaves first when the relay is behind: 0 an urgent or asap referral, 1 a routine
    # referral, 2 everything else (notices, reminders, withdrawals). The claim takes rows
    # by (priority, id), still after the earlier rows of their referral.
    Column("priority", SmallInteger, nullable=False, default=2, server_default="2"),
    Index("ix_outbox_pending", "sent_at", "id"),
    Index("ix_outbox_claim", "sent_at", "priority", "id"),
    # One referral's messages leave in order: a row waits for the earlier rows of its
    # referral (the relay's claim looks them up by referral).
    Index("ix_outbox_referral", "referral_id", "id"),
)

audit = Table(
    "audit",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", UTCDateTime, nullable=False),
    Column("actor", String(80), nullable=False),
    Column("action", String(40), nullable=False),
    Column("subject", ID, nullable=False, index=True),
    Column("person_ref", String(64), index=True),
    Column("partner_id", PARTNER),
    Column("why", Text),
)

partner_capacity = Table(
    "partner_capacity",
    metadata,
    Column("partner_id", PARTNER, primary_key=True),
    Column("status", String(40), nullable=False),
    Column("remaining", Integer),
    Column("updated_at", UTCDateTime, nullable=False),
)
