"""A flagged payment (`mismatch`) is cleared by a person who checked it (POST /v1/payments/{id}/review): the payment
keeps its last review, what the flag said (`reviewed_detail`, the `mismatch_detail` it had), who cleared it
(`reviewed_by`, the actor as the audit log names it), when (`reviewed_at`) and their note (`review_note`), so that
its JSON still says it was flagged and why once `mismatch` is false. Every review is also in the audit log
(`payment.reviewed`).

Nullable columns without a default: PostgreSQL adds them without rewriting the table, and no payment was reviewed
before them.

Revision ID: 0024
Revises: 0023
"""

import sqlalchemy as sa
from alembic import op

import core.db

revision = '0024'
down_revision = '0023'
branch_labels = None
depends_on = None

COLUMNS = ('reviewed_detail', 'reviewed_by', 'reviewed_at', 'review_note')


def upgrade() -> None:
    with op.batch_alter_table('payments') as batch:
        batch.add_column(sa.Column('reviewed_detail', sa.String(length=300), nullable=True))
        batch.add_column(sa.Column('reviewed_by', sa.String(length=64), nullable=True))
        batch.add_column(sa.Column('reviewed_at', core.db.UTCDateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('review_note', sa.String(length=300), nullable=True))


def downgrade() -> None:
    # ALTER TABLE ... DROP COLUMN on both engines (SQLite since 3.35), as 0008's: a batch copy of the table would
    # drop and re-create `payments`, which SQLite's foreign keys (on, see core.db) may refuse.
    for column in reversed(COLUMNS):
        op.execute(f"ALTER TABLE payments DROP COLUMN {column}")
