"""Refresh tokens already traded for a new pair, by their `jti`: each works once (rotation). The single use was
recorded only in Redis, so a Redis that lost its data (flushed, restarted without persistence, failed over to a
replica that missed the write) let a spent refresh token mint new pairs again for the rest of its 7-day life. The
database is the system of record: the primary key refuses a second use, also of two refreshes at once.

`id` is the token's `jti` (named as every table `prune` walks by id is); `expires_at` is the token's own expiry:
`prune` deletes the rows of tokens expired more than a day ago (core.retention), walking
ix_used_refresh_tokens_expires_at. A new, empty table: built plainly, nothing waits on it.
Tokens used before this revision were recorded in Redis only; nothing to carry over (Redis still has them, or has
lost them already).

Revision ID: 0015
Revises: 0014
"""

import sqlalchemy as sa
from alembic import op

import core.db

revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'used_refresh_tokens',
        sa.Column('id', sa.String(length=64), nullable=False),
        sa.Column('expires_at', core.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_used_refresh_tokens')),
    )
    op.create_index('ix_used_refresh_tokens_expires_at', 'used_refresh_tokens', ['expires_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_used_refresh_tokens_expires_at', table_name='used_refresh_tokens')
    op.drop_table('used_refresh_tokens')
