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

import sqlalchemy as sa
from alembic import op

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


def _index_state(name: str) -> bool | None:
    """PostgreSQL: True when index `name` exists and is valid, False when a build left it INVALID, None when absent
    (or unknown: offline SQL, `alembic upgrade --sql`, which then emits CREATE INDEX CONCURRENTLY IF NOT EXISTS)."""
    if op.get_context().as_sql:
        return None
    row = op.get_bind().execute(sa.text(
        "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE c.relname = :name AND pg_catalog.pg_table_is_visible(c.oid)"), {"name": name}).first()
    return None if row is None else bool(row[0])


def upgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        for name, table, columns in INDEXES:
            op.create_index(name, table, columns)
        return
    # Outside a transaction (CONCURRENTLY requires it); the revisions before this one are committed first.
    with op.get_context().autocommit_block():
        for name, table, columns in INDEXES:
            state = _index_state(name)
            if state is False:  # an interrupted concurrent build's leftover: neither used nor complete
                op.drop_index(name, table_name=table, postgresql_concurrently=True, if_exists=True)
            if state is not True:
                op.create_index(name, table, columns, postgresql_concurrently=True, if_not_exists=True)


def downgrade() -> None:
    concurrently = {'postgresql_concurrently': True} if op.get_bind().dialect.name == 'postgresql' else {}
    if not concurrently:
        for name, table, _columns in reversed(INDEXES):
            op.drop_index(name, table_name=table)
        return
    with op.get_context().autocommit_block():
        for name, table, _columns in reversed(INDEXES):
            op.drop_index(name, table_name=table, if_exists=True, **concurrently)
