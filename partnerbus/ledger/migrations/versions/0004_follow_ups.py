"""follow-ups: parked needs and stalled referrals

`signal_needs.parked_since` (when the need began to wait for consent) and
`signal_needs.reminded_at` (when the advisor was reminded of it); `referrals
.stalled_reminded_at` (when the partner was reminded of an accepted referral with no news)
and `referrals.stalled_reported_at` (when the advisor was told). Needs parked when the
column arrives have waited since their state last changed.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 00:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("signal_needs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("parked_since", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("reminded_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("referrals", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("stalled_reminded_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(
            sa.Column("stalled_reported_at", sa.DateTime(timezone=True), nullable=True)
        )
    op.execute("UPDATE signal_needs SET parked_since = updated_at WHERE state = 'parked'")


def downgrade() -> None:
    with op.batch_alter_table("referrals", schema=None) as batch_op:
        batch_op.drop_column("stalled_reported_at")
        batch_op.drop_column("stalled_reminded_at")
    with op.batch_alter_table("signal_needs", schema=None) as batch_op:
        batch_op.drop_column("reminded_at")
        batch_op.drop_column("parked_since")
