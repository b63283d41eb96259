"""Indexes for finding a payment's or a refund's stored webhook events by the id in their data: erasing a member
(core.members.erase_member) scrubs her payments' events (the account's mask, a person's notes) from the delivery
rows and the webhook.event jobs that keep them, by her payments' and refunds' ids. An event's id names its subject
only before it is digested (core.webhooks.stored_event_id: a flag's, a review's, reported money's), and a prefix
of it is no index's; without these, each erasure read a cooperative's whole retained deliveries and jobs.

- webhook_deliveries ((payload #>> '{data,id}'));
- outbox_jobs ((payload #>> '{data,id}')) WHERE kind = 'webhook.event' (partial: no other job is an entry).

The expression is core.db.event_data_id's (json_extract(payload, '$.data.id') on SQLite), which the queries use.
Built as migrations.online builds indexes: CREATE INDEX CONCURRENTLY on PostgreSQL, outside the migration's
transaction, an INVALID leftover of an interrupted build dropped and built again; SQLite builds them plainly.

Revision ID: 0034
Revises: 0033
"""

import sqlalchemy as sa
from alembic import op

from migrations.online import _index_state

revision = '0034'
down_revision = '0033'
branch_labels = None
depends_on = None

# (name, table, predicate or None), in build order.
INDEXES = (
    ('ix_webhook_deliveries_subject', 'webhook_deliveries', None),
    ('ix_outbox_jobs_event_subject', 'outbox_jobs', "kind = 'webhook.event'"),
)
EXPRESSION = {'postgresql': "(payload #>> '{data,id}')", 'sqlite': "json_extract(payload, '$.data.id')"}


def _create(name: str, table: str, where: str | None, dialect: str, concurrently: str = '') -> None:
    op.execute(sa.text(f"CREATE INDEX {concurrently}IF NOT EXISTS {name} ON {table} ({EXPRESSION[dialect]})"
                       + (f" WHERE {where}" if where else '')))


def upgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        for name, table, where in INDEXES:
            _create(name, table, where, 'sqlite')
        return
    with op.get_context().autocommit_block():
        for name, table, where in INDEXES:
            state = _index_state(name)
            if state is False:  # an interrupted concurrent build's leftover: neither used nor complete
                op.execute(sa.text(f"DROP INDEX CONCURRENTLY IF EXISTS {name}"))
            if state is not True:
                _create(name, table, where, 'postgresql', 'CONCURRENTLY ')


def downgrade() -> None:
    concurrently = 'CONCURRENTLY ' if op.get_bind().dialect.name == 'postgresql' else ''
    if concurrently:
        with op.get_context().autocommit_block():
            for name, _table, _where in reversed(INDEXES):
                op.execute(sa.text(f"DROP INDEX CONCURRENTLY IF EXISTS {name}"))
        return
    for name, _table, _where in reversed(INDEXES):
        op.execute(sa.text(f"DROP INDEX IF EXISTS {name}"))
