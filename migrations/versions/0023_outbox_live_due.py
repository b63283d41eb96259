"""The plain outbox claim reads the due jobs in order: ix_outbox_live_due on outbox_jobs (run_at) WHERE status IN
('PENDING', 'RUNNING').

The claim (core.outbox._claim without a lane to spare) asks for the oldest due jobs, `status IN ('PENDING',
'RUNNING') AND run_at <= now() ORDER BY run_at LIMIT batch`. ix_outbox_due (status, run_at) cannot give two statuses'
rows in run_at order: PostgreSQL read every due job and sorted them at each claim (13-15 ms a claim with 20,000 due,
the rent-day backlog behind a provider outage; every worker claims several times a second). This partial index
holds the live jobs only (the finished ones, kept for weeks, are most of the table) in run_at order: the claim reads
its batch and stops (0.2 ms). ix_outbox_due stays: retention and the in-flight look-ups read it by status.

Built as 0013's are (migrations.online): CREATE INDEX CONCURRENTLY on PostgreSQL, outside the migration's
transaction; an INVALID leftover of an interrupted build is dropped and built again. SQLite builds it plainly (its
claim has the same shape).

Revision ID: 0023
Revises: 0022
"""

from migrations.online import build_indexes, drop_indexes

revision = '0023'
down_revision = '0022'
branch_labels = None
depends_on = None

INDEXES = (('ix_outbox_live_due', 'outbox_jobs', ['run_at']),)
WHERE = {'ix_outbox_live_due': "status IN ('PENDING', 'RUNNING')"}


def upgrade() -> None:
    build_indexes(INDEXES, WHERE)


def downgrade() -> None:
    drop_indexes(INDEXES)
