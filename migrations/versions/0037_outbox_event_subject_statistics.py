"""The planner learns how many webhook.event jobs tell of one payment or refund: extended statistics
st_outbox_jobs_event_subject on outbox_jobs' (payload #>> '{data,id}'), 0034's ix_outbox_jobs_event_subject's
expression, then ANALYZE outbox_jobs to fill them.

That index is partial (kind = 'webhook.event'), and PostgreSQL keeps no statistics of a partial index's expression:
it took each id of an erasure's batch (core.members._erase_events: 500 of her payments' and refunds' ids) to match
0.5% of the jobs, the batch nine in ten of them, and read the whole outbox for each batch instead of the index
(EXPLAIN ANALYZE, PostgreSQL 15, 30,000 webhook.event jobs of one member's 10,000 payments, on the shared 2-core
host: 225-250 ms a batch, 20 batches, for 1,500 rows; with them 12 ms), as many times over as the outbox keeps
finished jobs of every kind. webhook_deliveries' ix_webhook_deliveries_subject is not partial: PostgreSQL keeps its
expression's statistics, and its plan was the index's already.

CREATE STATISTICS and ANALYZE take SHARE UPDATE EXCLUSIVE on the table: reads and writes go on meanwhile; ANALYZE
reads a sample (30,000 rows). PostgreSQL 14 and later only: PostgreSQL 13 (which the gateway runs on) has no
statistics on an expression (its CREATE STATISTICS is a syntax error there, and `migrate` stopped at this revision),
so nothing is done there and the erasure reads as before it; SQLite has no such statistics (and plans these queries
by its own rules).

Revision ID: 0037
Revises: 0036
"""

from alembic import op

revision = '0037'
down_revision = '0036'
branch_labels = None
depends_on = None

NAME = 'st_outbox_jobs_event_subject'


def upgrade() -> None:
    dialect = op.get_bind().dialect
    if dialect.name != 'postgresql' or (dialect.server_version_info or (14,)) < (14,):
        return
    op.execute(f"CREATE STATISTICS IF NOT EXISTS {NAME} ON ((payload #>> '{{data,id}}')) FROM outbox_jobs")
    op.execute('ANALYZE outbox_jobs')


def downgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return
    op.execute(f'DROP STATISTICS IF EXISTS {NAME}')
