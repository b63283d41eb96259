"""Refunds say whether they were recorded rather than sent: `returned_by_provider` is true for the money a provider
sent back on its own (a chargeback, a reversal by its customer care), recorded COMPLETED and never sent
(core.refunds.ReturnedByProvider). The refund JSON and refunds.csv show it with the provider's id for the reversal,
so a treasurer can tell a chargeback recorded into a closed month from a refund the gateway paid, and match it to
the provider's statement.

A server default (false): PostgreSQL adds the column without rewriting the table (a constant default is stored in
the catalogue), and refunds made before it were all sent. Those recorded as returned before it stay false: their
audit log says so (`refund.returned_by_provider`).

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('refunds') as batch:
        batch.add_column(sa.Column('returned_by_provider', sa.Boolean(), server_default=sa.false(),
                                   nullable=False))


def downgrade() -> None:
    # ALTER TABLE ... DROP COLUMN on both engines (SQLite since 3.35), as 0008's: a batch copy of the table would
    # drop and re-create `refunds`, which SQLite's foreign keys (on, see core.db) may refuse.
    op.execute("ALTER TABLE refunds DROP COLUMN returned_by_provider")
