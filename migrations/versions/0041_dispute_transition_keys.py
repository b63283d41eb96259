"""The idempotency keys of dispute transitions: dispute_transition_keys (dispute_id, idempotency_key: the primary
key, a client's key being its dispute's; request_hash: the digest of the request it came with). A cooperative's
system or an officer's browser retrying POST /v1/disputes/{id}/transitions after a lost answer gets the dispute as
it is (core.disputes.move_keyed_dispute), not a second note and `dispute.updated` event, nor a 409 for the
resolution its first request made. The digest only: never the note, free text that may name the member.

A new, small table: built plainly. Downgrading drops it (a retry under a key then applies again, as one without).

Revision ID: 0041
Revises: 0040
"""

import sqlalchemy as sa
from alembic import op

import core.db

revision = '0041'
down_revision = '0040'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'dispute_transition_keys',
        sa.Column('dispute_id', sa.String(length=36), nullable=False),
        sa.Column('idempotency_key', sa.String(length=128), nullable=False),
        sa.Column('request_hash', sa.String(length=64), nullable=False),
        sa.Column('created_at', core.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['dispute_id'], ['disputes.id'],
                                name=op.f('fk_dispute_transition_keys_dispute_id_disputes')),
        sa.PrimaryKeyConstraint('dispute_id', 'idempotency_key', name=op.f('pk_dispute_transition_keys')),
    )


def downgrade() -> None:
    op.drop_table('dispute_transition_keys')
