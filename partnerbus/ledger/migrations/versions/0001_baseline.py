"""The ledger as it stood when migrations came in (the baseline).

Revision ID: 0001
Revises:
Create Date: 2026-11-27

On an empty database it creates every table and index. On a ledger created before
migrations (by `create_all`; `partnerbus.ledger.migrate.upgrade` runs it with the
`adopting` attribute), it creates only what that ledger lacks: the tables it has are kept
with their rows, and the indexes added after the first release (ix_referral_history_at,
ix_referral_history_actor, ix_outbox_referral), which `create_all` never added to an
existing table, are created. Either way the ledger is then recorded at 0001.

Never edit this revision: a change to the schema is a new revision (see ../README.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.String(length=128)
PARTNER = sa.String(length=64)


def _time() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _tables() -> dict[str, tuple[sa.schema.SchemaItem, ...]]:
    """Fresh column objects on each call: a Column belongs to the one table it built."""
    return {
        "processed_messages": (
            sa.Column("message_id", ID, nullable=False),
            sa.Column("queue", sa.String(length=64), nullable=False),
            sa.Column("processed_at", _time(), nullable=False),
            sa.PrimaryKeyConstraint("message_id", "queue"),
        ),
        "signals": (
            sa.Column("signal_id", ID, nullable=False),
            sa.Column("source", PARTNER, nullable=False),
            sa.Column("person_ref", sa.String(length=64), nullable=False),
            sa.Column("commune", sa.String(length=5), nullable=False),
            sa.Column("urgency", sa.String(length=16), nullable=False),
            sa.Column("agency", PARTNER, nullable=True),
            sa.Column("advisor", sa.String(length=64), nullable=True),
            sa.Column("body", sa.Text(), nullable=False),
            sa.Column("received_at", _time(), nullable=False),
            sa.Column("note_deleted_at", _time(), nullable=True),
            sa.Column("anonymised_at", _time(), nullable=True),
            sa.PrimaryKeyConstraint("signal_id"),
        ),
        "signal_needs": (
            sa.Column("signal_id", ID, nullable=False),
            sa.Column("need", sa.String(length=160), nullable=False),
            sa.Column("state", sa.String(length=16), nullable=False),
            sa.Column("detail", sa.Text(), nullable=True),
            sa.Column("updated_at", _time(), nullable=False),
            sa.PrimaryKeyConstraint("signal_id", "need"),
        ),
        "consents": (
            sa.Column("consent_id", ID, nullable=False),
            sa.Column("person_ref", sa.String(length=64), nullable=False),
            sa.Column("scope", sa.Text(), nullable=False),
            sa.Column("collected_by", sa.String(length=80), nullable=False),
            sa.Column("agency", PARTNER, nullable=False),
            sa.Column("method", sa.String(length=8), nullable=False),
            sa.Column("granted_at", _time(), nullable=False),
            sa.Column("valid_until", _time(), nullable=False),
            sa.Column("revoked_at", _time(), nullable=True),
            sa.Column("revoked_by", sa.String(length=80), nullable=True),
            sa.Column("expiry_notified_at", _time(), nullable=True),
            sa.PrimaryKeyConstraint("consent_id"),
        ),
        "consent_journal": (
            sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
            sa.Column("consent_id", ID, nullable=True),
            sa.Column("person_ref", sa.String(length=64), nullable=False),
            sa.Column("event", sa.String(length=16), nullable=False),
            sa.Column("by", sa.String(length=80), nullable=False),
            sa.Column("at", _time(), nullable=False),
            sa.Column("body", sa.Text(), nullable=False),
            sa.PrimaryKeyConstraint("id"),
        ),
        "referrals": (
            sa.Column("referral_id", ID, nullable=False),
            sa.Column("signal_id", ID, nullable=False),
            sa.Column("need", sa.String(length=160), nullable=False),
            sa.Column("attempt", sa.Integer(), nullable=False),
            sa.Column("partner_id", PARTNER, nullable=False),
            sa.Column("partner_kind", sa.String(length=64), nullable=False),
            sa.Column("consent_id", ID, nullable=False),
            sa.Column("status", sa.String(length=16), nullable=False),
            sa.Column("reason", sa.String(length=32), nullable=True),
            sa.Column("outcome", sa.Text(), nullable=True),
            sa.Column("urgency", sa.String(length=16), nullable=False),
            sa.Column("created_at", _time(), nullable=False),
            sa.Column("updated_at", _time(), nullable=False),
            sa.Column("sent_at", _time(), nullable=True),
            sa.Column("due_at", _time(), nullable=True),
            sa.Column("remind_at", _time(), nullable=True),
            sa.Column("reminded", sa.Boolean(), nullable=False),
            sa.Column("closed_at", _time(), nullable=True),
            sa.Column("anonymised_at", _time(), nullable=True),
            sa.PrimaryKeyConstraint("referral_id"),
            sa.UniqueConstraint("signal_id", "need", "attempt", name="uq_referral_attempt"),
        ),
        "referral_history": (
            sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
            sa.Column("referral_id", ID, nullable=False),
            sa.Column("from_status", sa.String(length=16), nullable=False),
            sa.Column("to_status", sa.String(length=16), nullable=False),
            sa.Column("outcome", sa.String(length=8), nullable=False),
            sa.Column("actor", sa.String(length=80), nullable=False),
            sa.Column("reason", sa.Text(), nullable=True),
            sa.Column("at", _time(), nullable=False),
            sa.PrimaryKeyConstraint("id"),
        ),
        "outbox": (
            sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
            sa.Column("message_id", ID, nullable=False),
            sa.Column("routing_key", PARTNER, nullable=False),
            sa.Column("message_type", sa.String(length=40), nullable=False),
            sa.Column("body", sa.Text(), nullable=False),
            sa.Column("referral_id", ID, nullable=True),
            sa.Column("created_at", _time(), nullable=False),
            sa.Column("claimed_until", _time(), nullable=True),
            sa.Column("sent_at", _time(), nullable=True),
            sa.Column("attempts", sa.Integer(), nullable=False),
            sa.Column("last_error", sa.Text(), nullable=True),
            sa.PrimaryKeyConstraint("id"),
            sa.UniqueConstraint("message_id"),
        ),
        "audit": (
            sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
            sa.Column("at", _time(), nullable=False),
            sa.Column("actor", sa.String(length=80), nullable=False),
            sa.Column("action", sa.String(length=40), nullable=False),
            sa.Column("subject", ID, nullable=False),
            sa.Column("person_ref", sa.String(length=64), nullable=True),
            sa.Column("partner_id", PARTNER, nullable=True),
            sa.Column("why", sa.Text(), nullable=True),
            sa.PrimaryKeyConstraint("id"),
        ),
        "partner_capacity": (
            sa.Column("partner_id", PARTNER, nullable=False),
            sa.Column("status", sa.String(length=40), nullable=False),
            sa.Column("remaining", sa.Integer(), nullable=True),
            sa.Column("updated_at", _time(), nullable=False),
            sa.PrimaryKeyConstraint("partner_id"),
        ),
    }


INDEXES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("ix_signals_person_ref", "signals", ("person_ref",)),
    ("ix_signal_needs_state", "signal_needs", ("state",)),
    ("ix_consents_person_ref", "consents", ("person_ref",)),
    ("ix_consent_journal_person_ref", "consent_journal", ("person_ref",)),
    ("ix_referrals_signal_id", "referrals", ("signal_id",)),
    ("ix_referrals_partner_id", "referrals", ("partner_id",)),
    ("ix_referrals_consent_id", "referrals", ("consent_id",)),
    ("ix_referrals_status", "referrals", ("status",)),
    ("ix_referral_history_referral_id", "referral_history", ("referral_id",)),
    ("ix_referral_history_at", "referral_history", ("at",)),
    ("ix_referral_history_actor", "referral_history", ("actor", "id")),
    ("ix_outbox_pending", "outbox", ("sent_at", "id")),
    ("ix_outbox_referral", "outbox", ("referral_id", "id")),
    ("ix_audit_subject", "audit", ("subject",)),
    ("ix_audit_person_ref", "audit", ("person_ref",)),
)


def _present() -> dict[str, set[str]]:
    """The tables already there and their indexes: none, unless a ledger from before
    migrations is being adopted."""
    if not context.config.attributes.get("adopting"):
        return {}
    inspector = sa.inspect(op.get_bind())
    return {
        table: {str(index["name"]) for index in inspector.get_indexes(table)}
        for table in inspector.get_table_names()
    }


def upgrade() -> None:
    present = _present()
    for table, elements in _tables().items():
        if table not in present:
            op.create_table(table, *elements)
    for name, table, columns in INDEXES:
        if name not in present.get(table, set()):
            op.create_index(name, table, list(columns), unique=False)


def downgrade() -> None:
    for name, table, _columns in reversed(INDEXES):
        op.drop_index(name, table_name=table)
    for table in reversed(_tables()):
        op.drop_table(table)
