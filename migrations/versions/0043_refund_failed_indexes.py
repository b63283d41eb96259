"""GET /v1/disputes?refundFailed= reads three partial indexes of refunds instead of the table:
ix_refunds_dispute_status (dispute_id, status) WHERE dispute_id IS NOT NULL, ix_refunds_failed (id) WHERE status =
'FAILED' and ix_refunds_payment_unfailed (payment_id, created_at) WHERE status <> 'FAILED'.

The list (admin_api.disputes) asks which disputes' own refund FAILED, which were resolved on linked refunds that all
FAILED, and whether a refund of the payment made since did not fail. PostgreSQL read the whole refunds table for each
of the three (and hashed every refund that did not fail), then compiled the query (JIT): 0.15-0.7 s a request at
100,000 disputes and 400,000 refunds. From these indexes it reads the few refunds each question is about, and asks
the last one of the disputes listed only.

Built as 0039's is (migrations.online): CREATE INDEX CONCURRENTLY on PostgreSQL, outside the migration's
transaction; an INVALID leftover of an interrupted build is dropped and built again. SQLite builds them plainly.

Revision ID: 0043
Revises: 0042
"""

from migrations.online import build_indexes, drop_indexes

revision = '0043'
down_revision = '0042'
branch_labels = None
depends_on = None

INDEXES = (
    ('ix_refunds_dispute_status', 'refunds', ['dispute_id', 'status']),
    ('ix_refunds_failed', 'refunds', ['id']),
    ('ix_refunds_payment_unfailed', 'refunds', ['payment_id', 'created_at']),
)
WHERE = {
    'ix_refunds_dispute_status': 'dispute_id IS NOT NULL',
    'ix_refunds_failed': "status = 'FAILED'",
    'ix_refunds_payment_unfailed': "status <> 'FAILED'",
}


def upgrade() -> None:
    build_indexes(INDEXES, WHERE)


def downgrade() -> None:
    drop_indexes(INDEXES)
