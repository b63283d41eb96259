"""Retention reads the ended jobs in order: ix_outbox_jobs_ended on outbox_jobs (run_at, id) WHERE status IN ('DONE',
'DISCARDED').

`main.py prune` walks the ended jobs past their period oldest first by (run_at, id), a batch at a time
(core.retention._walk). ix_outbox_due (status, run_at) cannot give two statuses' rows in run_at order: PostgreSQL
read the whole table and sorted every old ended job at each batch (0.4-0.9 s a batch, 37 s for 500,000 jobs, two
parallel workers each time, beside the service's writes). This partial index holds the ended jobs only, in the
walk's order: a batch reads its rows from where the last one stopped (a few ms).

Built as 0023's is (migrations.online): CREATE INDEX CONCURRENTLY on PostgreSQL, outside the migration's
transaction; an INVALID leftover of an interrupted build is dropped and built again. SQLite builds it plainly.

Revision ID: 0039
Revises: 0038
"""

from migrations.online import build_indexes, drop_indexes

revision = '0039'
down_revision = '0038'
branch_labels = None
depends_on = None

INDEXES = (('ix_outbox_jobs_ended', 'outbox_jobs', ['run_at', 'id']),)
WHERE = {'ix_outbox_jobs_ended': "status IN ('DONE', 'DISCARDED')"}


def upgrade() -> None:
    build_indexes(INDEXES, WHERE)


def downgrade() -> None:
    drop_indexes(INDEXES)
