"""outbox priority: what leaves first when the relay is behind

0 an urgent or asap referral, 1 a routine referral, 2 everything else; rows waiting to be
sent when the column arrives get the priority the relay would have given them.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 18:49:40.654583
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("priority", sa.SmallInteger(), server_default="2", nullable=False)
        )
        batch_op.create_index("ix_outbox_claim", ["sent_at", "priority", "id"], unique=False)
    # Referrals still waiting keep their place ahead of the notices.
    op.execute(
        "UPDATE outbox SET priority = CASE WHEN referral_id IN ("
        "SELECT referral_id FROM referrals WHERE urgency IN ('urgent', 'asap')"
        ") THEN 0 ELSE 1 END WHERE message_type = 'referral' AND sent_at IS NULL"
    )


def downgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_index("ix_outbox_claim")
        batch_op.drop_column("priority")
