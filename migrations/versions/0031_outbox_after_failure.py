"""An outbox job says whether it waits for its retry after a failed try: outbox_jobs.after_failure.

A handler that retries its failures with its attempt given back (core.outbox.RetryLater with failed=True: a webhook
delivery, bounded by its three days rather than by the job's attempts; a payment poll whose status query failed)
leaves its job PENDING with attempts 0 however long it has been failing. An admin's run-now of the jobs waiting after
a failed attempt (GET /v1/jobs?waiting=true, POST /v1/jobs/replay {"waiting": true}) told such a job from a planned
wait only by a per-kind prefix of its last_error; the worker now writes what the handler said, for every kind.

A constant default: PostgreSQL adds the column without rewriting the table, and the previous release's workers, which
never write it, leave false (their jobs are told waiting by their attempts, as before). Plain ALTER TABLE on both
engines (SQLite adds and, since 3.35, drops a column in place, as 0026).

The webhook deliveries waiting after a failure when this runs (PENDING, their last_error the previous release's
"webhook attempt N failed: ..." that it listed them by) are marked so: left false, they were no longer listed nor run
now for up to 6 hours, until their next try, exactly when an operator who has just fixed a receiver asks for them
(and again after a downgrade and an upgrade, which keep that last_error). On PostgreSQL in a transaction of its own
after the column is committed, as 0020's backfill, so ADD COLUMN's lock on the table is not held while it runs.

Each step may be run again (a `migrate` cut short resumes).

Revision ID: 0031
Revises: 0030
"""

import sqlalchemy as sa
from alembic import op

revision = '0031'
down_revision = '0030'
branch_labels = None
depends_on = None

# core.webhooks.deliver's last_error for a failed try, which the previous release's core.outbox.RETRIED_FAILURE read.
BACKFILL = """
UPDATE outbox_jobs SET after_failure = true
WHERE status = 'PENDING' AND kind = 'webhook.deliver' AND last_error LIKE 'webhook attempt %'
  AND after_failure = false"""


def _has_column() -> bool:
    """The column is there already (a `migrate` cut short after adding it: each DDL commits at once on SQLite)."""
    if op.get_context().as_sql:
        return False
    return 'after_failure' in {column['name'] for column in sa.inspect(op.get_bind()).get_columns('outbox_jobs')}


def upgrade() -> None:
    if not _has_column():
        op.add_column('outbox_jobs', sa.Column('after_failure', sa.Boolean(), nullable=False,
                                               server_default=sa.false()))
    if op.get_bind().dialect.name == 'postgresql':
        with op.get_context().autocommit_block():  # the column committed first
            op.execute(BACKFILL)
    else:
        op.execute(BACKFILL)


def downgrade() -> None:
    op.execute("ALTER TABLE outbox_jobs DROP COLUMN after_failure")
