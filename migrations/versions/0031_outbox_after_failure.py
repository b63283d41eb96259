"""An outbox job says whether it waits for its retry after a failed try: outbox_jobs.after_failure.

A handler that retries its failures with its attempt given back (core.outbox.RetryLater with failed=True: a webhook
delivery, bounded by its three days rather than by the job's attempts; a payment poll whose status query failed)
leaves its job PENDING with attempts 0 however long it has been failing. An admin's run-now of the jobs waiting after
a failed attempt (GET /v1/jobs?waiting=true, POST /v1/jobs/replay {"waiting": true}) told such a job from a planned
wait only by a per-kind prefix of its last_error; the worker now writes what the handler said, for every kind.

A constant default: PostgreSQL adds the column without rewriting the table, and the previous release's workers, which
never write it, leave false (their jobs are told waiting by their attempts, as before). Plain ALTER TABLE on both
engines (SQLite adds and, since 3.35, drops a column in place, as 0026). A webhook delivery waiting after a failure
when this runs reads as a planned wait until its next try.

Revision ID: 0031
Revises: 0030
"""

import sqlalchemy as sa
from alembic import op

revision = '0031'
down_revision = '0030'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('outbox_jobs', sa.Column('after_failure', sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    op.execute("ALTER TABLE outbox_jobs DROP COLUMN after_failure")
