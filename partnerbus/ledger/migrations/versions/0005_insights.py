"""insights: the referrals of a period, those closed in it by status, needs by state and date

`partnerbus insights response-times` takes the referrals created in a period
(`ix_referrals_created_at`) and reads when each was first answered, accepted, completed
from the history's index alone (`ix_referral_history_first`); `partnerbus insights unmet`
the referrals closed in it as expired or rejected (`ix_referrals_status_closed`) and the
needs that ended in a state in it (`ix_signal_needs_state_updated`). Without them each
insight reads every referral.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 03:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("referrals", schema=None) as batch_op:
        batch_op.create_index("ix_referrals_created_at", ["created_at"], unique=False)
        batch_op.create_index("ix_referrals_status_closed", ["status", "closed_at"], unique=False)
    with op.batch_alter_table("referral_history", schema=None) as batch_op:
        batch_op.create_index(
            "ix_referral_history_first",
            ["referral_id", "outcome", "to_status", "at"],
            unique=False,
        )
    with op.batch_alter_table("signal_needs", schema=None) as batch_op:
        batch_op.create_index(
            "ix_signal_needs_state_updated", ["state", "updated_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("signal_needs", schema=None) as batch_op:
        batch_op.drop_index("ix_signal_needs_state_updated")
    with op.batch_alter_table("referral_history", schema=None) as batch_op:
        batch_op.drop_index("ix_referral_history_first")
    with op.batch_alter_table("referrals", schema=None) as batch_op:
        batch_op.drop_index("ix_referrals_status_closed")
        batch_op.drop_index("ix_referrals_created_at")
