"""Indexes for the reports by the moment money moved: payments and refunds by cooperative and completed_at (the
reconciliation's `settled` section, exports with `basis=completed`), and refunds by cooperative and created_at
(the refunds export and section had none).

On PostgreSQL each is built with CREATE INDEX CONCURRENTLY, outside the migration's transaction: `migrate` runs
on the live database (README, "Deploying a release"), and a plain CREATE INDEX holds a lock that blocks every
INSERT and UPDATE of the table while it builds (1.85 s with 1.5M payments; minutes at tens of millions). A
concurrent build that was interrupted (the process killed, a cancel, a deadlock) leaves an INVALID index
behind: the next `migrate` drops it and builds it again; a valid one (e.g. built by hand beforehand with
CREATE INDEX CONCURRENTLY) is kept. SQLite builds them plainly.

Revision ID: 0004
Revises: 0003
"""

from migrations.online import build_indexes, drop_indexes

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


# (name, table, columns), in build order.
INDEXES = (
    ('ix_payments_coop_completed', 'payments', ['cooperative_id', 'completed_at']),
    ('ix_refunds_coop_created', 'refunds', ['cooperative_id', 'created_at']),
    ('ix_refunds_coop_completed', 'refunds', ['cooperative_id', 'completed_at']),
)


def upgrade() -> None:
    build_indexes(INDEXES)


def downgrade() -> None:
    drop_indexes(INDEXES)
