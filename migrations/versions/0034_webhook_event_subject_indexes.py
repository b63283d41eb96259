"""Indexes for finding a payment's or a refund's stored webhook events by the id in their data: erasing a member
(core.members.erase_member) scrubs her payments' events (the account's mask, a person's notes) from the delivery
rows and the webhook.event jobs that keep them, by her payments' and refunds' ids. An event's id names its subject
only before it is digested (core.webhooks.stored_event_id: a flag's, a review's, reported money's), and a prefix
of it is no index's; without these, each erasure read a cooperative's whole retained deliveries and jobs.

- webhook_deliveries ((payload #>> '{data,id}'));
- outbox_jobs ((payload #>> '{data,id}')) WHERE kind = 'webhook.event' (partial: no other job is an entry).

The expression is core.db.event_data_id's (json_extract(payload, '$.data.id') on SQLite), which the queries use.
Built by migrations.online.build_indexes: CREATE INDEX CONCURRENTLY on PostgreSQL, outside the migration's
transaction, an INVALID leftover of an interrupted build dropped and built again; SQLite builds them plainly.

Revision ID: 0034
Revises: 0033
"""

import sqlalchemy as sa
from alembic import op

from migrations.online import build_indexes, drop_indexes

revision = '0034'
down_revision = '0033'
branch_labels = None
depends_on = None

# (name, table), in build order, and the partial one's predicate (no other job is an entry).
INDEXES = (('ix_webhook_deliveries_subject', 'webhook_deliveries'), ('ix_outbox_jobs_event_subject', 'outbox_jobs'))
WHERE = {'ix_outbox_jobs_event_subject': "kind = 'webhook.event'"}
EXPRESSION = {'postgresql': "(payload #>> '{data,id}')", 'sqlite': "json_extract(payload, '$.data.id')"}


def _specs() -> list:
    expression = sa.text(EXPRESSION['postgresql' if op.get_bind().dialect.name == 'postgresql' else 'sqlite'])
    return [(name, table, [expression]) for name, table in INDEXES]


def upgrade() -> None:
    build_indexes(_specs(), where=WHERE)


def downgrade() -> None:
    drop_indexes(_specs())
