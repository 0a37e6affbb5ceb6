"""referrals by partner and status: a partner's open referrals counted on each routing

Capacity is enforced by counting the partner's open referrals when a need is routed to it;
this index keeps that count to the partner's referrals in the open statuses.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 00:20:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("referrals", schema=None) as batch_op:
        batch_op.create_index("ix_referrals_partner_status", ["partner_id", "status"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("referrals", schema=None) as batch_op:
        batch_op.drop_index("ix_referrals_partner_status")
