"""Refunds keep a digest of the request that made them, so a reused idempotency key with another request
(another amount, "everything" instead of a sum, another reason) is refused instead of answered with the
first refund.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('refunds') as batch:
        batch.add_column(sa.Column('request_hash', sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('refunds') as batch:
        batch.drop_column('request_hash')
