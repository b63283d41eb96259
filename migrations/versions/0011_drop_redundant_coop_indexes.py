"""Drop the single-column cooperative_id indexes that a composite beginning with cooperative_id now covers.

Revision 0001 indexed every cooperative_id foreign key alone. Later revisions added composites that begin with the
same column, and a B-tree serves a lookup on its leading column as well as the single-column index did:

- payments: (cooperative_id, created_at) and the unique (cooperative_id, idempotency_key)
- refunds: (cooperative_id, created_at)
- sms_messages, webhook_deliveries: (cooperative_id, created_at); ussd_sessions: (cooperative_id, started_at)
- members: the unique (cooperative_id, phone_index)

Each redundant index was written on every INSERT (and on the UPDATEs that are not HOT) of the busiest tables: a
payment's row carried twelve indexes, now eleven; a USSD session, an SMS and a webhook delivery one fewer each. No
query needs them (cooperatives are never deleted, so no foreign-key check scans by cooperative_id alone).

Dropped with DROP INDEX CONCURRENTLY on PostgreSQL, outside the migration's transaction (a plain DROP INDEX waits
for, then blocks, every reader and writer of the table); IF EXISTS, so a database where one was already dropped by
hand migrates the same. The downgrade builds them again as 0004's and 0010's are built. SQLite drops them plainly.

Revision ID: 0011
Revises: 0010
"""

from migrations.online import build_indexes, drop_indexes

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


# (name, table, columns): revision 0001's names.
INDEXES = (
    ('ix_payments_cooperative_id', 'payments', ['cooperative_id']),
    ('ix_refunds_cooperative_id', 'refunds', ['cooperative_id']),
    ('ix_sms_messages_cooperative_id', 'sms_messages', ['cooperative_id']),
    ('ix_webhook_deliveries_cooperative_id', 'webhook_deliveries', ['cooperative_id']),
    ('ix_ussd_sessions_cooperative_id', 'ussd_sessions', ['cooperative_id']),
    ('ix_members_cooperative_id', 'members', ['cooperative_id']),
)


def upgrade() -> None:
    drop_indexes(INDEXES)


def downgrade() -> None:
    build_indexes(INDEXES)
