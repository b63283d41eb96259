"""A cooperative names the USSD aggregator its members dial through (Nalo in Ghana, Africa's Talking in Rwanda):
the SMS texts' "dial ..." use that aggregator's service code with the cooperative's extension. NULL: the default
USSD_SERVICE_CODE, as before.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('cooperatives') as batch:
        batch.add_column(sa.Column('ussd_aggregator', sa.String(length=16), nullable=True))


def downgrade() -> None:
    # ALTER TABLE ... DROP COLUMN on both engines (SQLite since 3.35): a batch copy of the table would drop
    # and re-create `cooperatives`, which SQLite's foreign keys (on, see core.db) refuse while rows refer to it.
    op.execute("ALTER TABLE cooperatives DROP COLUMN ussd_aggregator")
