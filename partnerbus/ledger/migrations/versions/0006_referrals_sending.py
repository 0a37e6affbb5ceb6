"""referrals sending

`referrals.sending_until`: a relay has checked the referral and is publishing it, until
then at the latest. Meanwhile the compare-and-set that every change of a referral's state
goes through refuses (the writer's transaction re-runs), so that a revocation, an answer
or an expiry comes wholly before the relay's check or after it has recorded the confirm,
although the relay no longer holds a transaction open while the broker confirms (issue 9).
Existing rows: none is being sent (null).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28 09:15:02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("referrals", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sending_until", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("referrals", schema=None) as batch_op:
        batch_op.drop_column("sending_until")
