"""Indexes for the ops page and the jobs list, whose queries scanned tables that only grow.

The ops page (`GET /ops/data`, refreshed every 4 s while open) counts the payment updates of the last hour (up to
`minutes=1440`) and the last 24 hours' payments, USSD sessions, SMS and webhook deliveries. With no index on those
time columns a super admin's page read every table whole (hundreds of ms each with a year of traffic), and a
cooperative admin's read the cooperative's whole history through its `cooperative_id` index. `GET /v1/jobs` for a
cooperative admin counted and paged the cooperative's jobs with no index on outbox_jobs.cooperative_id: a scan of
every job.

- payments: (updated_at) and (created_at) alone. The window bounds what either reads (an hour or a day of the
  whole gateway's payments), scoped or not, and the scoped 24h query already has ix_payments_coop_created; a
  (cooperative_id, updated_at) pair as well would be a third index on the payment path for little gain.
- ussd_sessions, sms_messages, webhook_deliveries: the time column alone (super admin) and (cooperative_id,
  time) (a cooperative admin: that cooperative's day only). PostgreSQL 15 has no skip scan, so one composite
  index cannot serve the unscoped query.
- outbox_jobs: (cooperative_id, id), the jobs list's filter and order (newest first): its count reads the
  index only, its page the last 20 entries.

Built as 0004's are: CREATE INDEX CONCURRENTLY on PostgreSQL, outside the migration's transaction (`migrate` runs
on the live database; a plain build blocks every INSERT and UPDATE of the table while it runs); an INVALID
leftover of an interrupted build is dropped and built again, a valid index of that name is kept. SQLite builds
them plainly.

Revision ID: 0010
Revises: 0009
"""

from migrations.online import build_indexes, drop_indexes

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


# (name, table, columns), in build order.
INDEXES = (
    ('ix_payments_updated', 'payments', ['updated_at']),
    ('ix_payments_created', 'payments', ['created_at']),
    ('ix_ussd_sessions_started', 'ussd_sessions', ['started_at']),
    ('ix_ussd_sessions_coop_started', 'ussd_sessions', ['cooperative_id', 'started_at']),
    ('ix_sms_messages_created', 'sms_messages', ['created_at']),
    ('ix_sms_messages_coop_created', 'sms_messages', ['cooperative_id', 'created_at']),
    ('ix_webhook_deliveries_created', 'webhook_deliveries', ['created_at']),
    ('ix_webhook_deliveries_coop_created', 'webhook_deliveries', ['cooperative_id', 'created_at']),
    ('ix_outbox_jobs_coop_id', 'outbox_jobs', ['cooperative_id', 'id']),
)


def upgrade() -> None:
    build_indexes(INDEXES)


def downgrade() -> None:
    drop_indexes(INDEXES)
