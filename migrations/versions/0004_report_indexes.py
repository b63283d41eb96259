"""Indexes for the reports by the moment money moved: payments and refunds by cooperative and completed_at (the
reconciliation's `settled` section, exports with `basis=completed`), and refunds by cooperative and created_at
(the refunds export and section had none).

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_payments_coop_completed', 'payments', ['cooperative_id', 'completed_at'])
    op.create_index('ix_refunds_coop_created', 'refunds', ['cooperative_id', 'created_at'])
    op.create_index('ix_refunds_coop_completed', 'refunds', ['cooperative_id', 'completed_at'])


def downgrade() -> None:
    op.drop_index('ix_refunds_coop_completed', table_name='refunds')
    op.drop_index('ix_refunds_coop_created', table_name='refunds')
    op.drop_index('ix_payments_coop_completed', table_name='payments')
