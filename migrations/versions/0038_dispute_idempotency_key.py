"""A dispute opened over the API with an idempotency key keeps it: disputes.idempotency_key (the client's key) and
disputes.request_hash (the digest of the request it came with), and uq_disputes_cooperative_key, a unique index on
(cooperative_id, idempotency_key) WHERE idempotency_key IS NOT NULL. A cooperative's system retrying
POST /v1/disputes after a lost answer gets the dispute its first request opened (core.disputes.open_keyed_dispute),
not 409 DISPUTE_ALREADY_OPEN while it is open, nor a second dispute once it is closed; two at once open one.

Nullable columns without a default: PostgreSQL adds them without rewriting the table. The index is partial (a
dispute opened without a key, every one before this revision, is no entry): built plainly, in the migration's
transaction, over columns that are NULL in every row (nothing to sort; disputes are few).

Revision ID: 0038
Revises: 0037
"""

import sqlalchemy as sa
from alembic import op

revision = '0038'
down_revision = '0037'
branch_labels = None
depends_on = None

INDEX = 'uq_disputes_cooperative_key'
COLUMNS = ('idempotency_key', 'request_hash')


def upgrade() -> None:
    with op.batch_alter_table('disputes') as batch:
        batch.add_column(sa.Column('idempotency_key', sa.String(length=128), nullable=True))
        batch.add_column(sa.Column('request_hash', sa.String(length=64), nullable=True))
    where = sa.text('idempotency_key IS NOT NULL')
    op.create_index(INDEX, 'disputes', ['cooperative_id', 'idempotency_key'], unique=True, postgresql_where=where,
                    sqlite_where=where)


def downgrade() -> None:
    op.drop_index(INDEX, table_name='disputes')
    # ALTER TABLE ... DROP COLUMN on both engines (SQLite since 3.35), as 0024's: a batch copy of the table would
    # drop and re-create `disputes`, which SQLite's foreign keys (on, see core.db) may refuse.
    for column in reversed(COLUMNS):
        op.execute(f"ALTER TABLE disputes DROP COLUMN {column}")
