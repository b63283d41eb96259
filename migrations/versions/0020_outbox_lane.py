"""Outbox jobs carry their lane: the payment provider a payment's or refund's job calls (core.outbox's lanes).

A worker holds each provider's jobs to a share of its slots, and its claim spares a provider at its share. That claim
read each due job's provider from its payment row (a correlated subquery through the payload's payment_id, a
refund's through refunds), for every job it skipped: on rent day with a provider down, thousands of its jobs are due
and every claim (one each time a slot frees) read them all again, PostgreSQL's CPU going to it exactly when the
machine is busiest (and, priced as a read on every row, the claim was planned as a scan of all due jobs and
JIT-compiled: half a second a claim with 20,000 due).

- outbox_jobs.lane: nullable (the previous release's processes run on the new schema and do not know it);
  varchar(24) COLLATE "C" on PostgreSQL, as the claim compares lanes in byte order (core.outbox._spared).
- Written by the database when a job is inserted, whichever code or release inserts it: on PostgreSQL a BEFORE
  INSERT trigger with outbox_job_lane(kind, payload) (the payment's provider, a refund's through its payment; NULL
  for any other kind), a function the claim also reads for a row left without its lane; on SQLite (the embedded
  default, whose worker claims too) an AFTER INSERT trigger. A payment's provider never changes once created, so
  a job's lane does not either.
- The jobs not finished (PENDING, RUNNING, and PARKED, which a person may replay) of those kinds get theirs; DONE
  ones are never claimed again. On PostgreSQL in a transaction of its own after the column and the trigger are
  committed, so ADD COLUMN's lock on the table is not held while it runs, and every job inserted meanwhile already
  has its lane.
- ix_outbox_due_lane (lane, run_at) WHERE status IN ('PENDING', 'RUNNING'): the claim reads the other lanes' due
  jobs by lane ranges and never a full lane's backlog. Built as 0013's are (migrations.online): CONCURRENTLY on
  PostgreSQL; an INVALID leftover of an interrupted build is built again.

Each step may be run again (a `migrate` cut short resumes). Downgrading drops the index, the triggers, the
functions and the column (the previous release never read them).

Revision ID: 0020
Revises: 0019
"""

import sqlalchemy as sa
from alembic import op

from migrations.online import build_indexes, drop_indexes

revision = '0020'
down_revision = '0019'
branch_labels = None
depends_on = None

INDEXES = (('ix_outbox_due_lane', 'outbox_jobs', ['lane', 'run_at']),)
WHERE = {'ix_outbox_due_lane': "status IN ('PENDING', 'RUNNING')"}

# The SQL is written out whole (a released revision never changes): the kinds with a lane are core.outbox's
# LANE_KINDS, a payment's provider the payments row's, a refund's its payment's.
LANE_FUNCTION = """
CREATE OR REPLACE FUNCTION outbox_job_lane(kind text, payload jsonb) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
SELECT CASE
    WHEN kind IN ('payment.collect', 'payment.poll') THEN
        (SELECT provider FROM payments WHERE id = payload ->> 'payment_id')
    WHEN kind IN ('refund.submit', 'refund.poll') THEN
        (SELECT p.provider FROM refunds r JOIN payments p ON p.id = r.payment_id WHERE r.id = payload ->> 'refund_id')
END
$$"""
TRIGGER_FUNCTION = """
CREATE OR REPLACE FUNCTION outbox_jobs_lane() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.lane := outbox_job_lane(NEW.kind, NEW.payload);
    RETURN NEW;
END
$$"""
TRIGGER = """
CREATE TRIGGER outbox_jobs_lane BEFORE INSERT ON outbox_jobs FOR EACH ROW
WHEN (NEW.lane IS NULL AND NEW.kind IN ('payment.collect', 'payment.poll', 'refund.submit', 'refund.poll'))
EXECUTE FUNCTION outbox_jobs_lane()"""
BACKFILL = """
UPDATE outbox_jobs SET lane = outbox_job_lane(kind, payload)
WHERE lane IS NULL AND status IN ('PENDING', 'RUNNING', 'PARKED')
  AND kind IN ('payment.collect', 'payment.poll', 'refund.submit', 'refund.poll')"""
# SQLite: outbox_job_lane's CASE on the row, in an AFTER INSERT trigger (a BEFORE trigger cannot change NEW there).
SQLITE_TRIGGER = """
CREATE TRIGGER IF NOT EXISTS outbox_jobs_lane AFTER INSERT ON outbox_jobs FOR EACH ROW
WHEN NEW.lane IS NULL AND NEW.kind IN ('payment.collect', 'payment.poll', 'refund.submit', 'refund.poll')
BEGIN
    UPDATE outbox_jobs SET lane = CASE
        WHEN NEW.kind IN ('payment.collect', 'payment.poll') THEN
            (SELECT provider FROM payments WHERE id = json_extract(NEW.payload, '$.payment_id'))
        ELSE (SELECT p.provider FROM refunds r JOIN payments p ON p.id = r.payment_id
              WHERE r.id = json_extract(NEW.payload, '$.refund_id'))
    END
    WHERE id = NEW.id;
END"""
SQLITE_BACKFILL = """
UPDATE outbox_jobs SET lane = CASE
    WHEN kind IN ('payment.collect', 'payment.poll') THEN
        (SELECT provider FROM payments WHERE id = json_extract(outbox_jobs.payload, '$.payment_id'))
    ELSE (SELECT p.provider FROM refunds r JOIN payments p ON p.id = r.payment_id
          WHERE r.id = json_extract(outbox_jobs.payload, '$.refund_id'))
END
WHERE lane IS NULL AND status IN ('PENDING', 'RUNNING', 'PARKED')
  AND kind IN ('payment.collect', 'payment.poll', 'refund.submit', 'refund.poll')"""


def _has_lane() -> bool:
    """SQLite: the column is there already (a `migrate` cut short after adding it: each DDL commits at once there)."""
    if op.get_context().as_sql:
        return False
    return 'lane' in {column['name'] for column in sa.inspect(op.get_bind()).get_columns('outbox_jobs')}


def upgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.execute('ALTER TABLE outbox_jobs ADD COLUMN IF NOT EXISTS lane varchar(24) COLLATE "C"')
        op.execute(LANE_FUNCTION)
        op.execute(TRIGGER_FUNCTION)
        op.execute("DROP TRIGGER IF EXISTS outbox_jobs_lane ON outbox_jobs")
        op.execute(TRIGGER)
        with op.get_context().autocommit_block():  # the column and the trigger committed first
            op.execute(BACKFILL)
    else:
        if not _has_lane():
            op.add_column('outbox_jobs', sa.Column('lane', sa.String(24), nullable=True))
        op.execute(SQLITE_TRIGGER)
        op.execute(SQLITE_BACKFILL)
    build_indexes(INDEXES, WHERE)


def downgrade() -> None:
    drop_indexes(INDEXES)
    if op.get_bind().dialect.name == 'postgresql':
        op.execute("DROP TRIGGER IF EXISTS outbox_jobs_lane ON outbox_jobs")
        op.execute("DROP FUNCTION IF EXISTS outbox_jobs_lane()")
        op.execute("DROP FUNCTION IF EXISTS outbox_job_lane(text, jsonb)")
    else:
        op.execute("DROP TRIGGER IF EXISTS outbox_jobs_lane")
    # ALTER TABLE ... DROP COLUMN on both engines (SQLite since 3.35), as 0012's downgrade.
    op.execute("ALTER TABLE outbox_jobs DROP COLUMN lane")
