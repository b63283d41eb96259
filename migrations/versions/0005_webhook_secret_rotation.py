"""Webhook endpoints keep the secret a rotation replaced (encrypted like the current one) and until when
deliveries are still signed with it, so that a cooperative can rotate its secret without refusing events
while its receiver switches over.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

import core.db

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('webhook_endpoints') as batch:
        batch.add_column(sa.Column('previous_secret_enc', sa.String(length=255), nullable=True))
        batch.add_column(sa.Column('previous_secret_expires_at', core.db.UTCDateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('webhook_endpoints') as batch:
        batch.drop_column('previous_secret_expires_at')
        batch.drop_column('previous_secret_enc')
